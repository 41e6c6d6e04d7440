"""The experiment config: the library sections composed into one, loaded from
YAML with ``--set`` overrides.

A config is a tree of dataclasses (:class:`Config`). YAML files and
``section.key=value`` overrides are merged onto the defaults; an unknown key, a
value of the wrong type or an unregistered name raises
:class:`~cnf.errors.ConfigError` naming the valid choices, when the config
loads, before any data or model work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

from cnf.config import DataConfig, ModelConfig, SolverConfig, build_section, check
from cnf.errors import ConfigError
from cnf.images import IMAGE_DATASETS
from pruning.config import PruningConfig, RegularizationConfig

__all__ = [
    "Config", "DataConfig", "ModelConfig", "PruningConfig", "RegularizationConfig", "SolverConfig",
    "TrainConfig", "apply_overrides", "from_dict", "load_config", "save_config", "to_dict",
]


OBJECTIVES = ("likelihood", "flow_matching")
COUPLINGS = ("independent", "ot")
FM_PRECISIONS = ("float32", "bfloat16")


@dataclass
class TrainConfig:
    """Optimization and bookkeeping intervals (in iterations). ``early_stopping``:
    stop after this many validations without a better validation NLL (0: never);
    ``figures``: log a density/sample figure (2-D) or sample grid (images) per validation;
    ``lr_schedule``: ``constant``, or ``cosine`` (from ``lr`` at step 0 down to 0 at
    ``iterations``), after a linear warm-up over the first ``warmup_iterations``
    steps when that is positive (FFJORD's schedule: ``lr * (step + 1) / warmup`` for
    the steps before it); ``ema_decay``: evaluate, sample and checkpoint an exponential
    moving average of the parameters with this decay (0: the last iterate; see
    :mod:`cnf.ema`); ``tf32``: let float32 convolutions and matrix products on
    NVIDIA GPUs use TF32 tensor cores (see :func:`cnf.distributed.use_tf32`)."""

    iterations: int = 10000
    batch_size: int = 100
    lr: float = 1e-3
    lr_schedule: str = "constant"
    warmup_iterations: int = 0
    weight_decay: float = 1e-5
    ema_decay: float = 0.0
    val_every: int = 100
    val_batch_size: int = 1000
    checkpoint_every: int = 100
    log_every: int = 10
    device: str = "auto"
    max_bad_steps: int = 20
    grad_clip: float | None = None
    early_stopping: int = 0
    figures: bool = True
    tf32: bool = False
    # torch CPU threads (null: 1 for the 2-D toy sets, whose small field runs fastest on
    # one thread, torch's default otherwise); see docs/performance.md
    threads: int | None = None
    # Keep freed CPU memory for reuse (glibc malloc; null: on for image data, whose
    # evaluations are faster with it, off otherwise). It raises the peak resident memory;
    # see docs/performance.md and cnf_prune/allocator.py.
    keep_freed_memory: bool | None = None
    # Compile each block's vector field with torch.compile (inductor): the first steps
    # and the first validation pay the compile time; see docs/performance.md
    compile: bool = False
    # What a batch's loss is: "likelihood" (FFJORD: the NLL through an ODE solve, plus
    # penalties) or "flow_matching" (regression on a straight conditional path, no solve;
    # fm_sigma_min: the path's σ_min; fm_coupling: "independent" or "ot", minibatch
    # optimal transport between data and base draws); see docs/flow_matching.md.
    objective: str = "likelihood"
    fm_sigma_min: float = 0.0
    fm_coupling: str = "independent"
    # The field's arithmetic in the flow-matching regression step: "float32", or
    # "bfloat16" (autocast: convolutions and matrix products in bfloat16, weights, loss
    # and optimizer in float32). Validation, test and sampling always run in float32.
    fm_precision: str = "float32"
    # Validation examples evaluated at each validation (null: all of the validation set);
    # flow-matching runs validate with a full ODE solve, their expensive part.
    val_examples: int | None = None
    # Stop training after this many seconds of this process's training loop (null: no
    # limit), validating, checkpointing and testing as at train.iterations: runs of
    # different objectives can be compared at the same wall-clock budget.
    time_limit: float | None = None

    def __post_init__(self) -> None:
        check(self.time_limit is None or self.time_limit > 0, f"train.time_limit must be positive or null (got {self.time_limit})")
        check(self.objective in OBJECTIVES,
              f"unknown train.objective {self.objective!r}; valid: {', '.join(OBJECTIVES)}")
        check(self.fm_coupling in COUPLINGS,
              f"unknown train.fm_coupling {self.fm_coupling!r}; valid: {', '.join(COUPLINGS)}")
        check(self.fm_precision in FM_PRECISIONS,
              f"unknown train.fm_precision {self.fm_precision!r}; valid: {', '.join(FM_PRECISIONS)}")
        check(self.fm_precision == "float32" or self.objective == "flow_matching",
              f"train.fm_precision {self.fm_precision} applies to train.objective flow_matching only: the "
              "likelihood's ODE solve controls its error in float32; set train.fm_precision=float32")
        check(0 <= self.fm_sigma_min < 1, f"train.fm_sigma_min must be in [0, 1) (got {self.fm_sigma_min})")
        check(self.val_examples is None or self.val_examples > 0,
              f"train.val_examples must be positive or null (got {self.val_examples})")
        check(self.threads is None or self.threads > 0, f"train.threads must be positive or null (got {self.threads})")
        for key in ("iterations", "batch_size", "val_every", "val_batch_size", "checkpoint_every",
                    "log_every", "max_bad_steps"):
            check(getattr(self, key) > 0, f"train.{key} must be positive (got {getattr(self, key)})")
        check(self.lr > 0, f"train.lr must be positive (got {self.lr})")
        check(self.lr_schedule in ("constant", "cosine"),
               f"train.lr_schedule must be 'constant' or 'cosine' (got {self.lr_schedule!r})")
        check(self.warmup_iterations >= 0,
              f"train.warmup_iterations must be non-negative (got {self.warmup_iterations})")
        check(self.weight_decay >= 0, f"train.weight_decay must be non-negative (got {self.weight_decay})")
        check(0 <= self.ema_decay < 1, f"train.ema_decay must lie in [0, 1) (got {self.ema_decay})")
        check(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip must be positive or null")
        check(self.early_stopping >= 0, f"train.early_stopping must be non-negative (got {self.early_stopping})")


@dataclass
class Config:
    """A whole experiment."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)

    def __post_init__(self) -> None:
        check(0 <= self.seed < 2**63, f"seed must be a non-negative integer below 2**63 (got {self.seed})")
        if self.train.objective == "flow_matching":
            check_flow_matching(self)
        check(self.model.field_type != "unet" or (self.regularization.pathreg == 0 and self.regularization.path_weights == 0),
              "PathReg and the path norm need fields whose weights chain from input to output; the U-Net's skip "
              "connections and group norms do not: set regularization.pathreg and path_weights to 0 or use "
              "model.field_type=default")
        check(self.model.field_type != "unet" or self.data.name in IMAGE_DATASETS,
              f"model.field_type 'unet' is an image field; data.name {self.data.name!r} is not an image set")


def check_flow_matching(config: Config) -> None:
    """What ``train.objective: flow_matching`` cannot train, with what to change."""
    m, r = config.model, config.regularization
    check(not m.train_end_time,
          "train.objective flow_matching holds the end time T fixed (the loss scales with 1/T², so a trained "
          "T would only grow): set model.train_end_time=false")
    check(r.kinetic == 0 and r.jacobian_frobenius == 0,
          "train.objective flow_matching solves no ODE during training, so the RNODE penalties "
          "(regularization.kinetic, jacobian_frobenius) have nothing to act on: set them to 0")
    check(m.num_blocks == 1,
          f"train.objective flow_matching trains one block's field on the path from data to base: set "
          f"model.num_blocks=1 (got {m.num_blocks})")
    image = config.data.name in IMAGE_DATASETS
    check(not image or m.field_type == "unet" or m.scales == 1,
          "train.objective flow_matching cannot train the multiscale flow: its blocks map between scales "
          "that factor out dimensions, so no single conditional path from data to base runs through "
          "one block; use model.field_type=unet (one block over the whole image) or model.scales=1")


def from_dict(values: dict) -> Config:
    """Build and validate a :class:`Config` from nested dicts (missing keys take defaults)."""
    return build_section(Config, values)


def to_dict(config: Config) -> dict:
    """The config as plain nested dicts (for YAML and checkpoints)."""
    return dataclasses.asdict(config)


def apply_overrides(values: dict, overrides: Sequence[str]) -> dict:
    """Apply ``key.sub=value`` strings onto nested dicts; values are parsed as YAML."""
    values = yaml.safe_load(yaml.safe_dump(values)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = values
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return values


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (``None``: defaults only), apply overrides, validate."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(path)!r} is not a UTF-8 text file (a YAML config, "
                              "not a checkpoint or data file)") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return from_dict(apply_overrides(values, overrides))


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
