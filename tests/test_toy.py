import numpy as np
import pytest

from cnf.errors import DataError
from cnf.toy import TOY_DATASETS, sample_toy


@pytest.mark.parametrize("name", TOY_DATASETS)
@pytest.mark.parametrize("n", [1, 7, 1000])
def test_shape_dtype_finite(name: str, n: int) -> None:
    x = sample_toy(name, n, np.random.default_rng(0))
    assert x.shape == (n, 2)
    assert x.dtype == np.float32
    assert np.isfinite(x).all()


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_seeded(name: str) -> None:
    a = sample_toy(name, 500, np.random.default_rng(123))
    b = sample_toy(name, 500, np.random.default_rng(123))
    c = sample_toy(name, 500, np.random.default_rng(124))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_rows_are_shuffled(name: str) -> None:
    # Any prefix must look like the whole sample, so the two halves of a sample sorted
    # by construction order would fail this: compare the means of the halves.
    x = sample_toy(name, 20_000, np.random.default_rng(1)).astype(np.float64)
    first, second = x[:10_000], x[10_000:]
    se = np.sqrt(x.var(axis=0) / 10_000 * 2)
    assert np.all(np.abs(first.mean(axis=0) - second.mean(axis=0)) < 5 * se)


def test_checkerboard_on_black_squares() -> None:
    x = sample_toy("checkerboard", 20_000, np.random.default_rng(2)).astype(np.float64)
    assert np.all(np.abs(x) <= 4.0)
    cells = np.floor(x / 2.0).astype(int)
    assert np.all((cells[:, 0] + cells[:, 1]) % 2 == 0)
    # All eight black squares are used, about equally.
    _, counts = np.unique(cells, axis=0, return_counts=True)
    assert len(counts) == 8
    assert counts.min() > 0.8 * 20_000 / 8


def test_eight_gaussians_clusters() -> None:
    x = sample_toy("8gaussians", 40_000, np.random.default_rng(3)).astype(np.float64)
    angles = np.arange(8) * np.pi / 4
    centres = 4.0 / 1.414 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    nearest = np.argmin(((x[:, None, :] - centres) ** 2).sum(-1), axis=1)
    std = 0.5 / 1.414
    for k in range(8):
        members = x[nearest == k]
        assert abs(len(members) / len(x) - 1 / 8) < 0.01
        se = std / np.sqrt(len(members))
        np.testing.assert_allclose(members.mean(axis=0), centres[k], atol=5 * se)
        np.testing.assert_allclose(members.std(axis=0), std, rtol=0.05)


@pytest.mark.parametrize(
    ("name", "radii", "noise"),
    [("circles", (3.0, 1.5), 0.24), ("rings", (3.0, 2.25, 1.5, 0.75), 0.08)],
)
def test_circle_radii(name: str, radii: tuple[float, ...], noise: float) -> None:
    n = 20_000
    x = sample_toy(name, n, np.random.default_rng(4)).astype(np.float64)
    r = np.linalg.norm(x, axis=1)
    gaps = np.abs(r[:, None] - np.array(radii))
    nearest = gaps.argmin(axis=1)
    # Radial noise is about N(0, noise^2) for noise much smaller than the radius.
    assert np.mean(gaps.min(axis=1) < 3 * noise) > 0.99
    shares = np.bincount(nearest, minlength=len(radii)) / n
    np.testing.assert_allclose(shares, 1 / len(radii), atol=0.02)


def test_moons_and_swissroll_ranges() -> None:
    rng = np.random.default_rng(5)
    moons = sample_toy("moons", 20_000, rng).astype(np.float64)
    # 2 * [x range of the moons, -1 .. 2] - 1, widened by the noise.
    assert -3.0 - 1.0 < moons[:, 0].min() < -2.5 and 3.0 < moons[:, 0].max() < 3.0 + 1.0
    roll = sample_toy("swissroll", 20_000, rng).astype(np.float64)
    # Radius of the noiseless roll is t / 5 with t in [1.5 pi, 4.5 pi].
    r = np.linalg.norm(roll, axis=1)
    assert np.mean((r > 1.5 * np.pi / 5 - 0.8) & (r < 4.5 * np.pi / 5 + 0.8)) > 0.99


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(DataError) as info:
        sample_toy("spiral", 10, np.random.default_rng(0))
    message = str(info.value)
    assert "spiral" in message
    assert all(name in message for name in TOY_DATASETS)


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_n(n: object) -> None:
    with pytest.raises(DataError, match="positive integer"):
        sample_toy("moons", n, np.random.default_rng(0))  # type: ignore[arg-type]


def test_rng_must_be_a_generator() -> None:
    with pytest.raises(TypeError, match="default_rng"):
        sample_toy("moons", 10, np.random.RandomState(0))  # type: ignore[arg-type]
