import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cnf.errors import DataError
from cnf.tabular import TABULAR_DATASETS, TabularSplits, load_tabular

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

DIMS = {"power": 6, "gas": 8, "hepmass": 21, "miniboone": 43, "bsds300": 63}
RAW_FILES = {
    "power": ["power/data.npy"],
    "gas": ["gas/ethylene_CO.pickle"],
    "hepmass": ["hepmass/1000_train.csv", "hepmass/1000_test.csv"],
    "miniboone": ["miniboone/data.npy"],
    "bsds300": ["BSDS300/BSDS300.hdf5"],
}
# (train, val, test) sizes of the synthetic files written below.
SIZES = {
    "power": (810, 90, 100),
    "gas": (810, 90, 100),
    "hepmass": (450, 50, 200),
    "miniboone": (810, 90, 100),
    "bsds300": (100, 20, 30),
}


def write_power(root: Path, n: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(0)
    data = rng.normal(loc=np.arange(8.0), scale=np.arange(1.0, 9.0), size=(n, 8))
    data[:, 7] = np.arange(n)  # time: gets no noise, so it tracks the shuffle
    # The two columns MAF drops: if either survived, the load would fail on NaN.
    data[:, [1, 3]] = np.nan
    (root / "power").mkdir(parents=True, exist_ok=True)
    np.save(root / "power" / "data.npy", data)
    return data


def write_miniboone(root: Path, n: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(1)
    data = rng.normal(loc=np.linspace(-5, 5, 43), scale=np.linspace(0.5, 3, 43), size=(n, 43))
    (root / "miniboone").mkdir(parents=True, exist_ok=True)
    np.save(root / "miniboone" / "data.npy", data)
    return data


def write_gas(root: Path, n: int = 1000) -> np.ndarray:
    """Sensors in 8 near-duplicate pairs; returns the sensors MAF's cleaning keeps."""
    pd = pytest.importorskip("pandas", reason="GAS is a pandas pickle; pandas is optional")
    rng = np.random.default_rng(2)
    base = rng.normal(loc=3.0, scale=2.0, size=(n, 8))
    sensors = np.empty((n, 16))
    sensors[:, 0::2] = base
    sensors[:, 1::2] = base + 0.05 * rng.normal(size=(n, 8))  # correlation ~ 0.9997
    frame = pd.DataFrame(sensors, columns=[f"S{k}" for k in range(16)])
    frame.insert(0, "Time", np.arange(n, dtype=float))
    frame.insert(1, "Meth", rng.uniform(size=n))
    frame.insert(2, "Eth", rng.uniform(size=n))
    (root / "gas").mkdir(parents=True, exist_ok=True)
    frame.to_pickle(root / "gas" / "ethylene_CO.pickle")
    # Within each pair the first column is met first and dropped.
    return sensors[:, 1::2]


HEPMASS_DISCRETE = [2, 5, 9, 13, 17, 20]
HEPMASS_KEPT = [j for j in range(27) if j not in HEPMASS_DISCRETE]


def hepmass_features(rng: np.random.Generator, n: int) -> np.ndarray:
    features = rng.normal(size=(n, 27))
    features[:, HEPMASS_DISCRETE] = rng.integers(0, 3, size=(n, 6))
    return features


def write_hepmass(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Returns the signal rows (features only) of the training and test files."""
    rng = np.random.default_rng(3)
    train = hepmass_features(rng, 500)
    # MAF counts repeats of each feature's *smallest* value only: 5 repeats keep it,
    # 6 drop it, and many repeats of another value do not matter.
    train[:5, 0] = -10.0
    train[:50, 1] = 0.5
    train[:, 20] = rng.uniform(1.0, 2.0, size=500)
    train[:6, 20] = 0.0
    test = hepmass_features(rng, 200)
    background = 1e3 + hepmass_features(rng, 700)

    def table(signal: np.ndarray, noise: np.ndarray, extra: int) -> np.ndarray:
        labels = np.r_[np.ones(len(signal)), np.zeros(len(noise))]
        rows = np.c_[labels, np.vstack([signal, noise]), np.full((len(labels), extra), 1000.0)]
        # Interleave background rows while keeping the signal rows in order.
        position = np.r_[np.linspace(0, 1, len(signal)), rng.uniform(size=len(noise))]
        return rows[np.argsort(position, kind="stable")]

    folder = root / "hepmass"
    folder.mkdir(parents=True, exist_ok=True)
    names = ["# label"] + [f"f{k}" for k in range(27)]
    for file, signal, noise, extra in [
        ("1000_train.csv", train, background[:200], 0),
        ("1000_test.csv", test, background[200:], 1),  # the test file has one more column
    ]:
        header = ",".join(names + ["mass"] * extra)
        rows = table(signal, noise, extra)
        np.savetxt(folder / file, rows, delimiter=",", fmt="%.9g", header=header, comments="")
    return train, test


def write_bsds300(root: Path) -> dict[str, np.ndarray]:
    h5py = pytest.importorskip("h5py", reason="BSDS300 is an HDF5 file; h5py is optional")
    rng = np.random.default_rng(4)
    sizes = {"train": 100, "validation": 20, "test": 30}
    splits = {key: rng.normal(size=(n, 63)).astype(np.float32) for key, n in sizes.items()}
    (root / "BSDS300").mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "BSDS300" / "BSDS300.hdf5", "w") as archive:
        for key, array in splits.items():
            archive.create_dataset(key, data=array)
    return splits


WRITERS = {
    "power": write_power,
    "gas": write_gas,
    "hepmass": write_hepmass,
    "miniboone": write_miniboone,
    "bsds300": write_bsds300,
}


def standardise(x: np.ndarray, reference: np.ndarray, ddof: int) -> np.ndarray:
    return (x - reference.mean(axis=0)) / reference.std(axis=0, ddof=ddof)


def assert_splits_close(splits: TabularSplits, expected: tuple[np.ndarray, ...]) -> None:
    for got, want in zip((splits.train, splits.val, splits.test), expected):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TABULAR_DATASETS)
def test_shapes_and_dtype(name: str, tmp_path: Path) -> None:
    WRITERS[name](tmp_path)
    splits = load_tabular(name, tmp_path)
    for split, size in zip((splits.train, splits.val, splits.test), SIZES[name]):
        assert split.shape == (size, DIMS[name])
        assert split.dtype == np.float32
        assert np.isfinite(split).all()


def test_power_follows_maf(tmp_path: Path) -> None:
    raw = write_power(tmp_path)
    splits = load_tabular("power", tmp_path)
    # MAF: shuffle with RandomState(42), drop columns 3 and 1, then noise from the same
    # generator drawn in the order voltage, active power, sub-meterings.
    rng = np.random.RandomState(42)
    data = raw[rng.permutation(len(raw))][:, [0, 2, 4, 5, 6, 7]]
    data[:, [1]] += 0.01 * rng.rand(1000, 1)
    data[:, [0]] += 0.001 * rng.rand(1000, 1)
    data[:, 2:5] += rng.rand(1000, 3)
    train, val, test = data[:810], data[810:900], data[900:]
    reference = data[:900]
    expected = tuple(standardise(x, reference, ddof=0) for x in (train, val, test))
    assert_splits_close(splits, expected)
    train_val = np.vstack([splits.train, splits.val]).astype(np.float64)
    np.testing.assert_allclose(train_val.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(train_val.std(axis=0), 1.0, atol=1e-5)


def test_miniboone_follows_maf(tmp_path: Path) -> None:
    raw = write_miniboone(tmp_path)
    splits = load_tabular("miniboone", tmp_path)
    # No shuffle; standardised with train + val statistics, population std.
    train, val, test = raw[:810], raw[810:900], raw[900:]
    expected = tuple(standardise(x, raw[:900], ddof=0) for x in (train, val, test))
    assert_splits_close(splits, expected)


def test_gas_follows_maf(tmp_path: Path) -> None:
    kept = write_gas(tmp_path)
    splits = load_tabular("gas", tmp_path)
    # Standardised with the statistics of *all* rows (sample std) before the split.
    data = standardise(kept, kept, ddof=1)
    assert_splits_close(splits, (data[:810], data[810:900], data[900:]))
    every = np.vstack([splits.train, splits.val, splits.test]).astype(np.float64)
    np.testing.assert_allclose(every.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(every.std(axis=0, ddof=1), 1.0, atol=1e-5)


def test_hepmass_follows_maf(tmp_path: Path) -> None:
    train, test = write_hepmass(tmp_path)
    splits = load_tabular("hepmass", tmp_path)
    # Signal rows only; train-file statistics (sample std); val is the tail of the train file.
    reference = train[:, HEPMASS_KEPT]
    train_val = standardise(reference, reference, ddof=1)
    expected_test = standardise(test[:, HEPMASS_KEPT], reference, ddof=1)
    assert_splits_close(splits, (train_val[:450], train_val[450:], expected_test))
    train_val = np.vstack([splits.train, splits.val]).astype(np.float64)
    np.testing.assert_allclose(train_val.std(axis=0, ddof=1), 1.0, atol=1e-5)


def test_hepmass_test_file_needs_its_extra_column(tmp_path: Path) -> None:
    write_hepmass(tmp_path)
    shutil.copy(tmp_path / "hepmass" / "1000_train.csv", tmp_path / "hepmass" / "1000_test.csv")
    with pytest.raises(DataError, match="1000_test.csv"):
        load_tabular("hepmass", tmp_path)


def test_bsds300_splits_are_used_as_they_are(tmp_path: Path) -> None:
    raw = write_bsds300(tmp_path)
    splits = load_tabular("BSDS300", tmp_path)
    np.testing.assert_array_equal(splits.train, raw["train"])
    np.testing.assert_array_equal(splits.val, raw["validation"])
    np.testing.assert_array_equal(splits.test, raw["test"])


def test_cache_is_written_and_reused(tmp_path: Path) -> None:
    write_power(tmp_path)
    first = load_tabular("power", tmp_path)
    cache = tmp_path / "power" / "processed.npz"
    assert cache.is_file()
    assert sorted(path.name for path in cache.parent.iterdir()) == ["data.npy", "processed.npz"]
    (tmp_path / "power" / "data.npy").unlink()  # a second load must not need it
    second = load_tabular("power", tmp_path)
    for a, b in zip((first.train, first.val, first.test), (second.train, second.val, second.test)):
        np.testing.assert_array_equal(a, b)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def overwrite_with_garbage(path: Path) -> None:
    path.write_bytes(b"not a numpy archive")


def overwrite_with_wrong_shape(path: Path) -> None:
    arrays = {key: np.zeros((4, 5), np.float32) for key in ("train", "val", "test")}
    np.savez(path, version=np.int64(1), **arrays)


def overwrite_with_old_version(path: Path) -> None:
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in ("train", "val", "test")}
    np.savez(path, version=np.int64(0), **{key: value + 1 for key, value in arrays.items()})


@pytest.mark.parametrize(
    "damage",
    [truncate, overwrite_with_garbage, overwrite_with_wrong_shape, overwrite_with_old_version],
)
def test_bad_cache_is_rebuilt(tmp_path: Path, damage: Callable[[Path], None]) -> None:
    write_miniboone(tmp_path)
    first = load_tabular("miniboone", tmp_path)
    cache = tmp_path / "miniboone" / "processed.npz"
    damage(cache)
    second = load_tabular("miniboone", tmp_path)
    np.testing.assert_array_equal(first.train, second.train)
    np.testing.assert_array_equal(first.test, second.test)
    with np.load(cache) as archive:  # and the rebuilt cache is whole again
        np.testing.assert_array_equal(archive["val"], first.val)


def test_unwritable_cache_warns_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_miniboone(tmp_path)

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError("read-only file system")

    monkeypatch.setattr("cnf.tabular.tempfile.mkstemp", refuse)
    with pytest.warns(UserWarning, match="could not write the cache"):
        splits = load_tabular("miniboone", tmp_path)
    assert splits.train.shape == (810, 43)
    assert not (tmp_path / "miniboone" / "processed.npz").exists()


@pytest.mark.parametrize("name", TABULAR_DATASETS)
def test_missing_files_name_path_and_zenodo(name: str, tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_tabular(name, tmp_path)
    message = str(info.value)
    for file in RAW_FILES[name]:
        assert str(tmp_path / file) in message
    assert "Zenodo" in message and "1161203" in message
    if name == "gas":
        assert "pip install pandas" in message
    if name == "bsds300":
        assert "pip install h5py" in message


@pytest.mark.parametrize(("name", "package"), [("gas", "pandas"), ("bsds300", "h5py")])
def test_missing_optional_package(
    name: str, package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / RAW_FILES[name][0]
    path.parent.mkdir(parents=True)
    path.write_bytes(b"placeholder")
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    with pytest.raises(DataError, match=f"pip install {package}"):
        load_tabular(name, tmp_path)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("power", b"garbage"),
        ("miniboone", b"\x93NUMPY broken"),
        ("gas", b"garbage"),
        ("bsds300", b"garbage"),
    ],
)
def test_corrupt_raw_file_is_named(name: str, content: bytes, tmp_path: Path) -> None:
    if name == "gas":
        pytest.importorskip("pandas", reason="pandas is optional")
    if name == "bsds300":
        pytest.importorskip("h5py", reason="h5py is optional")
    path = tmp_path / RAW_FILES[name][0]
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(DataError, match=str(path)):
        load_tabular(name, tmp_path)


def test_wrong_columns_and_too_few_rows(tmp_path: Path) -> None:
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", np.zeros((100, 7)))
    with pytest.raises(DataError, match=r"expected \(N, 8\)"):
        load_tabular("power", tmp_path)
    np.save(tmp_path / "power" / "data.npy", np.random.default_rng(0).normal(size=(10, 8)))
    with pytest.raises(DataError, match="too few"):
        load_tabular("power", tmp_path)


def test_npz_string_and_nan_files_are_named_for_what_they_are(tmp_path: Path) -> None:
    data = write_miniboone(tmp_path)
    path = tmp_path / "miniboone" / "data.npy"
    with open(path, "wb") as f:
        np.savez(f, data=data)  # an archive under the .npy name
    with pytest.raises(DataError, match=r"\.npz archive, not a single \.npy array"):
        load_tabular("miniboone", tmp_path)
    np.save(path, data.astype(str))
    with pytest.raises(DataError, match="not numbers"):
        load_tabular("miniboone", tmp_path)
    data[3, 7] = np.nan
    np.save(path, data)
    with pytest.raises(DataError, match=r"column\(s\) \[7\] of .* hold NaN or infinite values"):
        load_tabular("miniboone", tmp_path)
    split = tmp_path / "gas"
    split.mkdir()
    for name in ("train", "val", "test"):
        np.savez(split / f"{name}.npy", x=np.zeros((4, 8)))
        (split / f"{name}.npy.npz").rename(split / f"{name}.npy")
    with pytest.raises(DataError, match=r"train\.npy is an \.npz archive"):
        load_tabular("gas", tmp_path)


def test_unknown_name_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_tabular("cifar10", tmp_path)
    assert all(name in str(info.value) for name in TABULAR_DATASETS)


def test_presplit_layout_is_loaded_as_is(tmp_path: Path) -> None:
    folder = tmp_path / "gas"
    folder.mkdir()
    rng = np.random.default_rng(5)
    sizes = {"train": 30, "val": 5, "test": 7}
    arrays = {split: rng.normal(size=(n, 8)) for split, n in sizes.items()}
    for split, array in arrays.items():
        np.save(folder / f"{split}.npy", array)
    splits = load_tabular("gas", tmp_path)
    np.testing.assert_array_equal(splits.val, arrays["val"].astype(np.float32))
    assert splits.train.dtype == np.float32 and splits.test.shape == (7, 8)
    assert not (folder / "processed.npz").exists()
    np.save(folder / "test.npy", rng.normal(size=(7, 9)))
    with pytest.raises(DataError, match="test.npy"):
        load_tabular("gas", tmp_path)


@pytest.mark.skipif(
    not (SHARED_DATA / "miniboone").is_dir(), reason=f"no real MINIBOONE splits at {SHARED_DATA}"
)
def test_real_miniboone_presplit(tmp_path: Path) -> None:
    folder = tmp_path / "miniboone"
    folder.mkdir()
    for split in ("val", "test"):
        shutil.copy(SHARED_DATA / "miniboone" / f"{split}.npy", folder / f"{split}.npy")
    with pytest.raises(DataError) as info:
        load_tabular("miniboone", tmp_path)
    assert str(folder / "train.npy") in str(info.value)
    assert str(folder / "data.npy") in str(info.value)

    shutil.copy(folder / "val.npy", folder / "train.npy")
    splits = load_tabular("miniboone", tmp_path)
    assert splits.val.shape == (3284, 43) and splits.test.shape == (3648, 43)
    assert all(split.dtype == np.float32 for split in (splits.train, splits.val, splits.test))
    # MAF standardised these with train + val statistics, so val alone is near 0 / 1.
    assert np.abs(splits.val.mean(axis=0)).max() < 0.5
