"""The data set registry: every name ``data.name`` accepts, and the source it makes.

Toy densities (:mod:`cnf.toy`), the tabular benchmarks (:mod:`cnf.tabular`) and
images (:mod:`cnf.images`) each provide their sources; this module only maps
names to them, so a config can check a name before anything is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cnf.errors import ConfigError, DataError
from cnf.images import IMAGE_DATASETS, load_images
from cnf.sources import ArrayData, DataSource, ToyData
from cnf.tabular import TABULAR_DATASETS
from cnf.tabular import load_tabular
from cnf.toy import TOY_DATASETS

if TYPE_CHECKING:
    from cnf.config import DataConfig

__all__ = ["ArrayData", "DataSource", "ToyData", "dataset_names", "make_data"]


def dataset_names() -> tuple[str, ...]:
    """Every valid ``data.name``."""
    return TOY_DATASETS + TABULAR_DATASETS + IMAGE_DATASETS


def make_data(cfg: DataConfig, seed: int) -> DataSource:
    """The data source named by ``cfg.name``."""
    if cfg.downsample != 1 and cfg.name not in IMAGE_DATASETS:
        raise ConfigError(f"data.downsample applies to images only; {cfg.name!r} is not an image set (use 1)")
    if cfg.subset is not None and cfg.name not in IMAGE_DATASETS:
        raise ConfigError(f"data.subset applies to images only; {cfg.name!r} is not an image set (use null)")
    if cfg.name in TOY_DATASETS:
        return ToyData(cfg.name, seed=seed, val_size=cfg.val_size, test_size=cfg.test_size)
    if cfg.name in TABULAR_DATASETS:
        splits = load_tabular(cfg.name, cfg.root)
        return ArrayData(splits.train, splits.val, splits.test, seed=seed)
    if cfg.name in IMAGE_DATASETS:
        return load_images(cfg, seed)
    raise DataError(f"unknown dataset {cfg.name!r}; valid: {', '.join(dataset_names())}")
