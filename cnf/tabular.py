r"""The five tabular density-estimation benchmarks of MAF, preprocessed exactly as MAF does.

POWER, GAS, HEPMASS, MINIBOONE and BSDS300 are read from the files of the MAF data
archive (Zenodo record 1161203) laid out under one data root::

    root/power/data.npy
    root/gas/ethylene_CO.pickle          (a pandas pickle; needs pandas)
    root/hepmass/1000_train.csv, root/hepmass/1000_test.csv
    root/miniboone/data.npy
    root/BSDS300/BSDS300.hdf5            (needs h5py)

The first load preprocesses the raw files and caches the splits in
``root/<dir>/processed.npz``; later loads read the cache. A folder may instead hold
already preprocessed splits as ``train.npy``, ``val.npy`` and ``test.npy``, which are then
loaded as they are.

POWER, GAS and MINIBOONE are split the same way, in row order (POWER is shuffled first):
the last :math:`N_\text{test} = \lfloor 0.1 N \rfloor` rows are the test set and the last
:math:`\lfloor 0.1 (N - N_\text{test}) \rfloor` rows of the rest the validation set, about
81/9/10. Standardisation :math:`x \mapsto (x - \mu) / \sigma` is per column; which rows
give :math:`\mu, \sigma` differs between the sets and is stated in each builder below.

References:
    Papamakarios, Pavlakou and Murray, "Masked Autoregressive Flow for Density
    Estimation", NeurIPS 2017 (Appendix D; github.com/gpapamak/maf, ``datasets/``).
"""

from __future__ import annotations

import importlib
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from cnf.errors import DataError

__all__ = ["TABULAR_DATASETS", "TabularSplits", "load_tabular"]

_Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]

_ZENODO = "the MAF data archive on Zenodo (record 1161203, https://zenodo.org/records/1161203)"
_REPLACE = f"replace it with the file from {_ZENODO}"
_CACHE_NAME = "processed.npz"
# Bump when the preprocessing changes, so that old caches are rebuilt rather than trusted.
_CACHE_VERSION = 1
_SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class TabularSplits:
    """The three splits of a tabular data set, each a float32 array of shape ``(N, D)``."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _maf_split(data: np.ndarray, path: Path) -> _Arrays:
    """Split rows in order: the last tenth is test, the last tenth of the rest is val."""
    n_test = int(0.1 * len(data))
    n_val = int(0.1 * (len(data) - n_test))
    # MAF slices with data[-n:], which silently takes every row when n is 0.
    if n_val == 0:
        raise DataError(
            f"{path} has only {len(data)} rows, too few for the train/val/test split; {_REPLACE}"
        )
    rest, test = data[:-n_test], data[-n_test:]
    return rest[:-n_val], rest[-n_val:], test


def _standardise(
    arrays: Sequence[np.ndarray], reference: np.ndarray, ddof: int, path: Path
) -> list[np.ndarray]:
    """Map every array by ``(x - mean) / std`` with the column statistics of ``reference``."""
    bad = np.flatnonzero(~np.isfinite(reference).all(axis=0))
    if bad.size:
        raise DataError(f"column(s) {bad.tolist()} of {path} hold NaN or infinite values; {_REPLACE}")
    mean = reference.mean(axis=0)
    std = reference.std(axis=0, ddof=ddof)
    constant = np.flatnonzero(~(std > 0))
    if constant.size:
        raise DataError(
            f"column(s) {constant.tolist()} of {path} are constant after preprocessing and "
            f"cannot be standardised; {_REPLACE}"
        )
    return [(array - mean) / std for array in arrays]


def _read_npy(path: Path, columns: int) -> np.ndarray:
    """A 2-D ``.npy`` array with the given number of columns, as a float64 copy."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise DataError(
            f"cannot read {path} as a NumPy .npy array ({error}); {_REPLACE}"
        ) from error
    data = _numeric_array(data, path, _REPLACE)
    if data.ndim != 2 or data.shape[1] != columns:
        raise DataError(
            f"{path} holds an array of shape {data.shape}, expected (N, {columns}); {_REPLACE}"
        )
    return np.array(data, dtype=np.float64)


def _numeric_array(data, path: Path, advice: str) -> np.ndarray:
    """``data`` from ``np.load`` if it is one array of numbers (not an ``.npz``
    archive, not strings or records)."""
    if not isinstance(data, np.ndarray):
        data.close()
        raise DataError(f"{path} is an .npz archive, not a single .npy array; {advice}")
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_):
        raise DataError(f"{path} holds {data.dtype} values, not numbers; {advice}")
    return data


def _read_csv(path: Path) -> np.ndarray:
    """A comma-separated numeric table below one header line, as float64."""
    try:
        return np.loadtxt(path, delimiter=",", skiprows=1, comments=None, ndmin=2)
    except (OSError, ValueError) as error:
        raise DataError(
            f"cannot read {path} as a numeric CSV file with one header line ({error}); {_REPLACE}"
        ) from error


def _import_optional(package: str, path: Path) -> ModuleType:
    """Import an optional dependency, or say which one reading ``path`` needs."""
    try:
        return importlib.import_module(package)
    except ImportError as error:
        raise DataError(
            f"reading {path} needs the optional package {package}: pip install {package}"
        ) from error


def _build_power(paths: Sequence[Path]) -> _Arrays:
    """POWER: household electric power consumption (UCI), D = 6.

    ``data.npy`` has 8 columns: active power, reactive power, voltage, intensity, three
    sub-meterings and time. The rows are shuffled by ``numpy.random.RandomState(42)``;
    reactive power (column 1) and intensity (column 3) are dropped; uniform noise from the
    same generator dequantises the rest: :math:`U(0, 0.001)` on active power,
    :math:`U(0, 0.01)` on voltage, :math:`U(0, 1)` on each sub-metering, none on time
    (drawn in the order voltage, active power, sub-meterings, as MAF does). After the
    split, all three sets are standardised with the statistics of train and val together
    (population standard deviation).
    """
    (path,) = paths
    data = _read_npy(path, columns=8)
    rng = np.random.RandomState(42)
    rng.shuffle(data)
    n = len(data)
    data = np.delete(data, [1, 3], axis=1)
    voltage_noise = 0.01 * rng.rand(n, 1)
    active_noise = 0.001 * rng.rand(n, 1)
    sub_metering_noise = rng.rand(n, 3)
    data += np.hstack([active_noise, voltage_noise, sub_metering_noise, np.zeros((n, 1))])
    train, val, test = _maf_split(data, path)
    train, val, test = _standardise([train, val, test], np.vstack([train, val]), 0, path)
    return train, val, test


def _build_gas(paths: Sequence[Path]) -> _Arrays:
    """GAS: chemical sensors exposed to ethylene and CO (UCI), D = 8.

    The pickled data frame loses its ``Meth``, ``Eth`` and ``Time`` columns. Then, while
    some column has a Pearson correlation above 0.98 with another one, the first such
    column is dropped (the 16 sensors come down to 8). The whole table is standardised with
    its own statistics (sample standard deviation, ``ddof=1``) *before* the split, which
    keeps row order.
    """
    (path,) = paths
    pd = _import_optional("pandas", path)
    try:
        frame = pd.read_pickle(path)
    # Unpickling can fail with almost any exception type (a truncated file, a class that
    # moved between pandas versions, ...), and each means the same thing here.
    except Exception as error:
        raise DataError(
            f"cannot read {path} as a pandas pickle ({type(error).__name__}: {error}); {_REPLACE}"
        ) from error
    if not isinstance(frame, pd.DataFrame):
        raise DataError(
            f"{path} holds a {type(frame).__name__}, not a pandas DataFrame; {_REPLACE}"
        )
    dropped = ["Meth", "Eth", "Time"]
    absent = [column for column in dropped if column not in frame.columns]
    if absent:
        raise DataError(f"{path} has no column(s) {absent}; {_REPLACE}")
    try:
        data = frame.drop(columns=dropped).to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise DataError(f"{path} has non-numeric sensor columns ({error}); {_REPLACE}") from error
    data = data[:, _uncorrelated_columns(data, threshold=0.98)]
    (data,) = _standardise([data], data, 1, path)
    return _maf_split(data, path)


def _uncorrelated_columns(data: np.ndarray, threshold: float) -> list[int]:
    """Columns left after repeatedly dropping the first one correlated above ``threshold``.

    A column is crowded when its correlation with some *other* column exceeds the threshold
    (its correlation with itself always counts once). A pairwise correlation does not change
    when other columns are removed, so one correlation matrix serves every round.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        correlation = np.corrcoef(data, rowvar=False)
    keep = list(range(data.shape[1]))
    while True:
        partners = (correlation[np.ix_(keep, keep)] > threshold).sum(axis=1)
        crowded = np.flatnonzero(partners > 1)
        if crowded.size == 0:
            return keep
        del keep[crowded[0]]


def _build_hepmass(paths: Sequence[Path]) -> _Arrays:
    """HEPMASS: particle collisions with a new particle of mass 1000 (UCI), D = 21.

    Only the signal rows (label, the first column, equal to 1) are kept and the label is
    dropped; the test file also loses its last column (it has one more than the training
    file). Both files are standardised with the statistics of the training file (train and
    val together; sample standard deviation, ``ddof=1``). Then every feature whose
    *smallest* value occurs more than 5 times in the training file is dropped: MAF's test
    for "too many repeated values" looks only at the smallest value, and on the real data
    it removes 6 of the 27 features. The last tenth of the training file, in file order,
    becomes the validation set; the test file is the test set.
    """
    train_path, test_path = paths
    train = _read_csv(train_path)
    test = _read_csv(test_path)
    if train.shape[1] < 2 or test.shape[1] != train.shape[1] + 1:
        raise DataError(
            f"{train_path} has {train.shape[1]} columns and {test_path} has {test.shape[1]}; "
            f"expected a label and 27 features in the first and one more trailing column in "
            f"the second, as in {_ZENODO}"
        )
    train = train[train[:, 0] == 1, 1:]
    test = test[test[:, 0] == 1, 1:-1]
    if len(train) < 10 or len(test) == 0:
        raise DataError(
            f"{train_path} has {len(train)} and {test_path} has {len(test)} signal rows, too "
            f"few for the train/val/test split; are they the files from {_ZENODO}?"
        )
    train, test = _standardise([train, test], train, 1, train_path)
    keep = [j for j, feature in enumerate(train.T) if np.sum(feature == feature.min()) <= 5]
    train, test = train[:, keep], test[:, keep]
    n_val = int(0.1 * len(train))
    return train[:-n_val], train[-n_val:], test


def _build_miniboone(paths: Sequence[Path]) -> _Arrays:
    """MINIBOONE: particle identification events (UCI), D = 43.

    ``data.npy`` is already cleaned by MAF (outliers and discrete features removed). It is
    split in row order, then standardised with the statistics of train and val together
    (population standard deviation).
    """
    (path,) = paths
    data = _read_npy(path, columns=43)
    train, val, test = _maf_split(data, path)
    train, val, test = _standardise([train, val, test], np.vstack([train, val]), 0, path)
    return train, val, test


def _build_bsds300(paths: Sequence[Path]) -> _Arrays:
    """BSDS300: 8 x 8 natural image patches without their last pixel, D = 63.

    The HDF5 file already holds the preprocessed splits as datasets ``train``,
    ``validation`` and ``test``; they are used as they are.
    """
    (path,) = paths
    h5py = _import_optional("h5py", path)
    keys = ("train", "validation", "test")
    try:
        with h5py.File(path, "r") as archive:
            train, val, test = (np.asarray(archive[key][:]) for key in keys)
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise DataError(
            f"cannot read datasets {', '.join(keys)} from {path} ({error}); {_REPLACE}"
        ) from error
    return train, val, test


@dataclass(frozen=True)
class _Source:
    """Where a data set lives under the root, what it is read from and how it is built."""

    directory: str
    raw_files: tuple[str, ...]
    dim: int
    build: Callable[[Sequence[Path]], _Arrays]
    package: str | None = None


_SOURCES: dict[str, _Source] = {
    "power": _Source("power", ("data.npy",), 6, _build_power),
    "gas": _Source("gas", ("ethylene_CO.pickle",), 8, _build_gas, package="pandas"),
    "hepmass": _Source("hepmass", ("1000_train.csv", "1000_test.csv"), 21, _build_hepmass),
    "miniboone": _Source("miniboone", ("data.npy",), 43, _build_miniboone),
    "bsds300": _Source("BSDS300", ("BSDS300.hdf5",), 63, _build_bsds300, package="h5py"),
}

TABULAR_DATASETS: tuple[str, ...] = tuple(_SOURCES)
"""Names accepted by :func:`load_tabular`."""


def load_tabular(name: str, root: str | os.PathLike[str]) -> TabularSplits:
    """Load the train, validation and test splits of a MAF tabular benchmark.

    Looks in ``root/<dir>`` (``<dir>`` is the name, except ``BSDS300``) for, in order:
    ``train.npy``, ``val.npy`` and ``test.npy`` (already preprocessed splits, loaded as
    they are); the cache ``processed.npz`` of an earlier load; the raw files of the MAF
    archive, which are preprocessed as MAF does and then cached. The cache is written
    atomically (a temporary file, then :func:`os.replace`); an unreadable or outdated cache
    is rebuilt from the raw files, and a folder that cannot be written only gives a warning.
    The cache is not compared with the raw files: delete it after replacing them.

    Args:
        name: One of :data:`TABULAR_DATASETS` (case-insensitive).
        root: The data root holding one folder per data set.

    Returns:
        The splits as float32 arrays of shape ``(N, D)``: D is 6 for POWER, 8 for GAS,
        21 for HEPMASS, 43 for MINIBOONE and 63 for BSDS300.

    Raises:
        DataError: If the name is unknown, or the files are missing, unreadable or not
            shaped like the published ones. The message names the file and where it goes.

    References:
        Papamakarios, Pavlakou and Murray, "Masked Autoregressive Flow for Density
        Estimation", NeurIPS 2017.
    """
    key = name.lower() if isinstance(name, str) else ""
    source = _SOURCES.get(key)
    if source is None:
        raise DataError(
            f"unknown tabular data set {name!r}; valid names are: {', '.join(TABULAR_DATASETS)}"
        )
    folder = Path(root) / source.directory
    split_paths = [folder / f"{split}.npy" for split in _SPLIT_NAMES]
    if all(path.is_file() for path in split_paths):
        return TabularSplits(*(_load_split(path, source.dim) for path in split_paths))

    cache = folder / _CACHE_NAME
    cached = _read_cache(cache, source.dim)
    if cached is not None:
        return cached

    raw_paths = [folder / file for file in source.raw_files]
    missing = [path for path in raw_paths if not path.is_file()]
    if missing:
        raise DataError(_missing_message(key, source, folder, missing, split_paths))
    arrays = source.build(raw_paths)
    splits = TabularSplits(*(_checked(array, source.dim, raw_paths[0]) for array in arrays))
    _write_cache(cache, splits)
    return splits


def _checked(array: np.ndarray, dim: int, path: Path) -> np.ndarray:
    """``array`` as float32 after checking it is a finite, non-empty ``(N, dim)`` table."""
    if array.ndim != 2 or array.shape[1] != dim or len(array) == 0:
        raise DataError(f"{path} gives an array of shape {array.shape}, expected (N, {dim}), N > 0")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise DataError(f"{path} gives NaN or infinite values")
    return array


def _load_split(path: Path, dim: int) -> np.ndarray:
    """One preprocessed split from a ``.npy`` file, as float32."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"cannot read {path} as a NumPy .npy array ({error})") from error
    return _checked(_numeric_array(array, path, "write each split with np.save"), dim, path)


def _read_cache(path: Path, dim: int) -> TabularSplits | None:
    """The cached splits, or ``None`` when the cache is absent, unreadable or outdated."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if int(archive["version"]) != _CACHE_VERSION:
                return None
            arrays = [archive[split] for split in _SPLIT_NAMES]
    except FileNotFoundError:
        return None
    # The cache is only a copy of what the raw files give: whatever makes it unreadable
    # (a truncated write, a foreign file, a numpy format change), the cure is a rebuild.
    except Exception:
        return None
    for array in arrays:
        if array.dtype != np.float32 or array.ndim != 2 or array.shape[1] != dim or len(array) == 0:
            return None
    return TabularSplits(*arrays)


def _write_cache(path: Path, splits: TabularSplits) -> None:
    """Write the cache atomically; if the folder is not writable, warn and go on."""
    temporary: str | None = None
    try:
        handle, temporary = tempfile.mkstemp(prefix=".processed-", suffix=".tmp", dir=path.parent)
        with os.fdopen(handle, "wb") as file:
            np.savez(
                file,
                version=np.int64(_CACHE_VERSION),
                train=splits.train,
                val=splits.val,
                test=splits.test,
            )
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
        warnings.warn(
            f"could not write the cache {path} ({error}); the next load will preprocess the "
            f"raw files again",
            stacklevel=3,
        )


def _missing_message(
    key: str, source: _Source, folder: Path, missing: Sequence[Path], split_paths: Sequence[Path]
) -> str:
    """What is missing, where each file goes and where to get it."""
    raw = " and ".join(str(path) for path in missing)
    present = [path.name for path in split_paths if path.is_file()]
    if present:
        absent = [path for path in split_paths if not path.is_file()]
        return (
            f"{key.upper()}: found {', '.join(present)} in {folder} but not "
            f"{', '.join(path.name for path in absent)}. Put the missing preprocessed split(s) "
            f"at {' and '.join(str(path) for path in absent)} (float arrays of shape "
            f"(N, {source.dim})), or put the raw file(s) {raw} from {_ZENODO} in place to "
            f"build all three splits."
        )
    needs = ""
    if source.package:
        needs = (
            f" Reading it needs the optional package {source.package}: "
            f"pip install {source.package}."
        )
    return (
        f"{key.upper()} data not found: expected {raw}. The file(s) are in {_ZENODO}; extract "
        f"them to exactly that path, or put already preprocessed train.npy, val.npy and "
        f"test.npy in {folder}.{needs}"
    )
