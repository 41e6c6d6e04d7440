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


def _spiral_support_distance(x: np.ndarray, grid: int = 2000) -> np.ndarray:
    """Distance from each point to the noiseless support of ``2spirals``: the union over
    ``t`` in [0, 3 pi] of the squares ``(c(t) + [0, 0.5]^2) / 3``, ``c(t) = (-t cos t, t sin t)``,
    and of their negations (the second arm)."""
    t = np.linspace(0.0, 3.0 * np.pi, grid)
    lower = np.stack([-np.cos(t) * t, np.sin(t) * t], axis=1) / 3.0
    upper = lower + 0.5 / 3.0
    distances = []
    for y in (x, -x):
        gap = np.maximum(np.maximum(lower[None] - y[:, None], y[:, None] - upper[None]), 0.0)
        distances.append(np.sqrt((gap**2).sum(-1)).min(axis=1))
    return np.minimum(*distances)


def test_two_spirals_second_moment_is_closed_form() -> None:
    r"""With :math:`t = 3\pi\sqrt{u}` (density :math:`2t/(9\pi^2)` on :math:`[0, 3\pi]`),
    jitter :math:`a, b \sim U(0, 0.5)` and noise 0.1,

    .. math:: E|x|^2 = \big(E t^2 + 2 E a\,(E[t\sin t] - E[t\cos t]) + 2 E a^2\big)/9 + 2 \cdot 0.1^2

    with :math:`E t^2 = 4.5\pi^2`, :math:`E[t\cos t] = -4/(3\pi)`,
    :math:`E[t\sin t] = 2 - 8/(9\pi^2)`, :math:`E a = 1/4`, :math:`E a^2 = 1/12` (the second
    arm, the negation, has the same :math:`|x|`). :math:`t = 3\pi u` would give
    :math:`E t^2 = 3\pi^2`, about 1.6 less.
    """
    x = sample_toy("2spirals", 20_000, np.random.default_rng(6)).astype(np.float64)
    t_cos, t_sin = -4.0 / (3.0 * np.pi), 2.0 - 8.0 / (9.0 * np.pi**2)
    expected = (4.5 * np.pi**2 + 2 * 0.25 * (t_sin - t_cos) + 2 / 12) / 9.0 + 2 * 0.1**2
    # sd of |x|^2 is about pi^2 / sqrt(12) ~ 2.9: standard error 0.02 at this n
    assert np.mean((x**2).sum(axis=1)) == pytest.approx(expected, abs=0.15)
    # the arms are each other's negation: the mean is zero
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=0.05)


def test_two_spirals_noise_is_small_around_the_support() -> None:
    """A noiseless point lies on the support (:func:`_spiral_support_distance`), so the
    distance of the noisy point is at most :math:`|\\epsilon|`: :math:`E d^2 \\le 2 \\cdot 0.1^2`.
    Most points stay inside the band, so the mean is far below the bound; noise 0.3 puts
    many points well outside it."""
    x = sample_toy("2spirals", 1_000, np.random.default_rng(7)).astype(np.float64)
    d = _spiral_support_distance(x)
    assert np.mean(d**2) < 2 * 0.1**2
    assert np.mean(d > 0.3) < 0.01  # P(|eps| > 0.3) = exp(-4.5) = 0.011 bounds it
    assert np.mean(d > 0) > 0.05  # but there is noise


def test_pinwheel_radius_second_moment_is_closed_form() -> None:
    r"""Rotations keep norms: :math:`|x|^2 = 4(f_1^2 + f_2^2)` with :math:`f_1 \sim N(1, 0.3^2)`,
    :math:`f_2 \sim N(0, 0.1^2)`, so :math:`E|x|^2 = 4(1 + 0.09 + 0.01) = 4.4`."""
    x = sample_toy("pinwheel", 20_000, np.random.default_rng(8)).astype(np.float64)
    # sd of |x|^2 is about 4 * sqrt(4 * 0.09) = 2.4: standard error 0.017
    assert np.mean((x**2).sum(axis=1)) == pytest.approx(4.4, abs=0.1)


def test_pinwheel_blades_bend_exponentially_with_the_radius() -> None:
    r"""The polar angle of a point is :math:`\operatorname{atan2}(f_2, f_1) - 2\pi k/5 - 0.25 e^{f_1}`
    and :math:`f_1 \approx |x|/2`. So :math:`\varphi + 0.25 e^{|x|/2}`, wrapped to one blade
    period :math:`2\pi/5` around 0, is about :math:`f_2/f_1`: mean 0, sd about 0.1. A bend of
    :math:`0.25 f_1` instead leaves :math:`0.25(e^{f_1} - f_1)` (about 0.43 at the mean radius)."""
    x = sample_toy("pinwheel", 20_000, np.random.default_rng(9)).astype(np.float64)
    phi = np.arctan2(x[:, 1], x[:, 0])
    period = 2.0 * np.pi / 5
    residual = np.mod(phi + 0.25 * np.exp(np.linalg.norm(x, axis=1) / 2) + period / 2, period) - period / 2
    assert abs(residual.mean()) < 0.01
    assert 0.10 < residual.std() < 0.13
    # five blades of equal weight: the blade index k is uniform on 0..4
    blade = np.round(-(phi + 0.25 * np.exp(np.linalg.norm(x, axis=1) / 2)) / period) % 5
    np.testing.assert_allclose(np.bincount(blade.astype(int), minlength=5) / len(x), 0.2, atol=0.015)


def test_moons_mean_is_closed_form() -> None:
    r"""For even ``n`` the moons have equal sizes and the same :math:`\theta` grid, symmetric
    about :math:`\pi/2`: the upper moon's mean is :math:`(0, \bar s)` and the lower one's
    :math:`(1, 0.5 - \bar s)`, :math:`\bar s` the mean of :math:`\sin\theta`. The pooled mean,
    :math:`(0.5, 0.25)`, maps to :math:`2 (0.5, 0.25) + (-1, -0.2) = (0, 0.3)`."""
    n = 20_000
    x = sample_toy("moons", n, np.random.default_rng(10)).astype(np.float64)
    # noise sd after scaling is 0.2: standard error 0.0014 per coordinate
    np.testing.assert_allclose(x.mean(axis=0), [0.0, 0.3], atol=0.01)


def test_swissroll_radius_variance_is_closed_form() -> None:
    r"""``5 x = (t cos t, t sin t) + eps`` with :math:`t \sim U(1.5\pi, 4.5\pi)` and
    :math:`\epsilon \sim N(0, I)`. The noiseless radius is :math:`t`, and noise moves it by
    :math:`\epsilon_r + \epsilon_\perp^2/(2t)`, :math:`\epsilon_r` an independent :math:`N(0, 1)`:
    :math:`E|5x| \approx 3\pi + E[1/(2t)] = 3\pi + \ln 3/(6\pi)` and
    :math:`\operatorname{Var}|5x| \approx (3\pi)^2/12 + 1 + 2\operatorname{Cov}(t, 1/(2t))
    = 3\pi^2/4 + 1 - (1 - \ln 3)`. Noise 0.1 would take about 1 off the variance."""
    x = 5.0 * sample_toy("swissroll", 50_000, np.random.default_rng(11)).astype(np.float64)
    r = np.linalg.norm(x, axis=1)
    # over seeds: sd 0.015 of the mean; the variance sits 0.12 +- 0.04 below 3 pi^2 / 4 + 1
    assert r.mean() == pytest.approx(3.0 * np.pi + np.log(3) / (6 * np.pi), abs=0.1)
    assert r.var() == pytest.approx(3.0 * np.pi**2 / 4 + 1.0 - (1.0 - np.log(3)), abs=0.25)
