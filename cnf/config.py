"""The typed experiment config: one schema, defaults in one place.

A config is a tree of dataclasses. YAML files and ``--set key.sub=value``
overrides are merged onto the defaults; an unknown key or a value of the wrong
type raises :class:`~cnf.errors.ConfigError` naming the valid keys. Value ranges
are checked in each section's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from cnf.errors import ConfigError


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass
class DataConfig:
    """``name``: a toy set (checkerboard, 8gaussians, ...), a tabular benchmark
    (power, gas, hepmass, miniboone, bsds300), mnist or synthetic8 (8x8 bar images
    for smoke tests); ``root``: where data files live; ``val_size``/``test_size``:
    sizes of the fixed toy evaluation sets, and for images the validation images
    held out from the training split and the test images used; ``download``: let
    torchvision download MNIST if it is missing; ``subset``: use only the first
    ``subset`` training images (null: all); ``logit_alpha``: α of the images'
    logit transform ``logit(α + (1 - 2α) y)``; ``downsample``: images only, shrink
    each side by this integer factor (the mean of each block of pixels, rounded
    back to the 256 levels; 1: full size)."""

    name: str = "checkerboard"
    root: str = "data"
    val_size: int = 2000
    test_size: int = 5000
    download: bool = False
    subset: int | None = None
    logit_alpha: float = 1e-6
    downsample: int = 1

    def __post_init__(self) -> None:
        _check(self.val_size > 0 and self.test_size > 0, "data.val_size and data.test_size must be positive")
        _check(self.downsample >= 1, f"data.downsample must be a positive integer (got {self.downsample})")
        _check(self.subset is None or self.subset > 0, f"data.subset must be positive or null (got {self.subset})")
        _check(1e-7 <= self.logit_alpha < 0.5,
               f"data.logit_alpha must be in [1e-7, 0.5) (got {self.logit_alpha}): below 1e-7, 1 - α rounds "
               "to 1 in float32 and white pixels get infinite logits")


@dataclass
class ModelConfig:
    """The vector field and its ODE blocks (FFJORD's toy defaults).

    For images, ``hidden_dims`` are the channels of the convolutional field
    (3x3 kernels, ``kernel_size``), ``num_blocks`` the blocks before and again
    after each squeeze, and ``scales`` the number of scales of the multiscale
    flow (null: as many as the image size allows, FFJORD's choice: 3 for MNIST).
    """

    hidden_dims: list[int] = field(default_factory=lambda: [64, 64, 64])
    layer_type: str = "concatsquash"
    nonlinearity: str = "tanh"
    num_blocks: int = 1
    end_time: float = 0.5
    train_end_time: bool = True
    divergence: str = "exact"
    test_divergence: str | None = None
    noise: str = "gaussian"
    scales: int | None = None
    kernel_size: int = 3
    # Per-block widths, blocks in data-to-latent order (null: every block uses hidden_dims).
    # pruning.compact writes them; image configs use them to widen the cheap coarse scales.
    block_hidden_dims: list[list[int]] | None = None
    # The base distribution: 0 is FFJORD's N(0, I); K >= 1 fits a K-component
    # full-covariance Gaussian mixture by EM to the latents of base_fit_size training
    # examples through the untrained flow, then keeps it fixed (see cnf/base.py).
    base_components: int = 0
    base_fit_size: int = 10000

    def __post_init__(self) -> None:
        _check(self.base_components >= 0,
               f"model.base_components must be 0 (standard normal) or a number of mixture components "
               f"(got {self.base_components})")
        _check(self.base_fit_size >= max(1, self.base_components),
               f"model.base_fit_size must be at least model.base_components and positive (got {self.base_fit_size})")
        _check(self.block_hidden_dims is None or all(
                   len(dims) == len(self.hidden_dims) and all(h > 0 for h in dims) for dims in self.block_hidden_dims),
               "model.block_hidden_dims must be null or, per block, as many positive widths as model.hidden_dims "
               f"(got {self.block_hidden_dims})")
        _check(self.scales is None or self.scales > 0, f"model.scales must be positive or null (got {self.scales})")
        _check(self.kernel_size > 0 and self.kernel_size % 2 == 1,
               f"model.kernel_size must be a positive odd number (got {self.kernel_size})")
        _check(len(self.hidden_dims) > 0 and all(h > 0 for h in self.hidden_dims),
               f"model.hidden_dims must be a non-empty list of positive ints (got {self.hidden_dims})")
        _check(self.num_blocks > 0, f"model.num_blocks must be positive (got {self.num_blocks})")
        _check(self.end_time > 0, f"model.end_time must be positive (got {self.end_time})")
        for key in ("divergence", "test_divergence"):
            value = getattr(self, key)
            _check(value in ("exact", "hutchinson") or (key == "test_divergence" and value is None),
                   f"model.{key} must be exact or hutchinson (got {value!r})")
        _check(self.noise in ("gaussian", "rademacher"),
               f"model.noise must be gaussian or rademacher (got {self.noise!r})")


@dataclass
class SolverConfig:
    """ODE solver for training and (``test_*``, defaulting to the training values) evaluation."""

    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    step_size: float | None = None
    adjoint: bool = True
    adjoint_seminorm: bool = False
    max_num_steps: int | None = None
    test_method: str | None = None
    test_rtol: float | None = None
    test_atol: float | None = None
    test_step_size: float | None = None


@dataclass
class TrainConfig:
    """Optimization and bookkeeping intervals (in iterations). ``early_stopping``:
    stop after this many validations without a better validation NLL (0: never);
    ``figures``: log a density/sample figure (2-D) or sample grid (images) per validation;
    ``lr_schedule``: ``constant``, or ``cosine`` (from ``lr`` at step 0 down to 0 at
    ``iterations``); ``ema_decay``: evaluate, sample and checkpoint an exponential
    moving average of the parameters with this decay (0: the last iterate; see
    :mod:`cnf.ema`); ``tf32``: let float32 convolutions and matrix products on
    NVIDIA GPUs use TF32 tensor cores (see :func:`cnf.distributed.use_tf32`)."""

    iterations: int = 10000
    batch_size: int = 100
    lr: float = 1e-3
    lr_schedule: str = "constant"
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

    def __post_init__(self) -> None:
        for key in ("iterations", "batch_size", "val_every", "val_batch_size", "checkpoint_every",
                    "log_every", "max_bad_steps"):
            _check(getattr(self, key) > 0, f"train.{key} must be positive (got {getattr(self, key)})")
        _check(self.lr > 0, f"train.lr must be positive (got {self.lr})")
        _check(self.lr_schedule in ("constant", "cosine"),
               f"train.lr_schedule must be 'constant' or 'cosine' (got {self.lr_schedule!r})")
        _check(self.weight_decay >= 0, f"train.weight_decay must be non-negative (got {self.weight_decay})")
        _check(0 <= self.ema_decay < 1, f"train.ema_decay must lie in [0, 1) (got {self.ema_decay})")
        _check(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip must be positive or null")
        _check(self.early_stopping >= 0, f"train.early_stopping must be non-negative (got {self.early_stopping})")


@dataclass
class RegularizationConfig:
    """Weights of training penalties added to the NLL (0 disables a term).

    ``kinetic``: ∫‖f‖² dt and ``jacobian_frobenius``: ∫‖∂f/∂z‖_F² dt (RNODE);
    ``l0``: expected number of open hard-concrete gates; ``pathreg``: expected
    number of input->output paths through the gates; ``path_weights``: the weight
    path norm ‖|W_L|···|W_1|‖_{1,1}. ``gate_*``: hard-concrete gate settings.
    """

    kinetic: float = 0.0
    jacobian_frobenius: float = 0.0
    l0: float = 0.0
    pathreg: float = 0.0
    path_weights: float = 0.0
    gate_temperature: float = 2.0 / 3.0
    gate_stretch_low: float = -0.1
    gate_stretch_high: float = 1.1
    gate_init_open: float = 0.9

    def __post_init__(self) -> None:
        for key in ("kinetic", "jacobian_frobenius", "l0", "pathreg", "path_weights"):
            _check(getattr(self, key) >= 0, f"regularization.{key} must be non-negative (got {getattr(self, key)})")
        _check(self.gate_temperature > 0, f"regularization.gate_temperature (β) must be positive (got {self.gate_temperature})")
        _check(self.gate_stretch_low < 0, f"regularization.gate_stretch_low (γ) must be negative (got {self.gate_stretch_low})")
        _check(self.gate_stretch_high > 1, f"regularization.gate_stretch_high (ζ) must exceed 1 (got {self.gate_stretch_high})")
        _check(0 < self.gate_init_open < 1, f"regularization.gate_init_open must be in (0, 1) (got {self.gate_init_open})")

    @property
    def gated(self) -> bool:
        return self.l0 > 0 or self.pathreg > 0


@dataclass
class PruningConfig:
    """Pruning at initialization: ``method`` (none, random, magnitude, snip, synflow,
    grasp, jacobian_spectrum, jacobian_spectrum_abs, jacobian_spectrum_snip; see
    ``pruning/scores.py``), target ``sparsity`` in [0, 1), ``scope`` global or
    layer, ``batches`` scoring batches, ``layers`` fnmatch patterns of prunable
    weights, ``synflow_iterations`` SynFlow's pruning rounds, ``snip_mix`` the SNIP
    share of ``jacobian_spectrum_snip``, ``granularity`` weight (unstructured) or
    unit (whole hidden units/channels, see ``pruning/structured.py``)."""

    method: str = "none"
    sparsity: float = 0.0
    scope: str = "global"
    batches: int = 1
    layers: list[str] = field(default_factory=lambda: ["*"])
    synflow_iterations: int = 100
    snip_mix: float = 0.5
    granularity: str = "weight"

    def __post_init__(self) -> None:
        _check(self.granularity in ("weight", "unit"),
               f"pruning.granularity must be 'weight' or 'unit' (got {self.granularity!r})")
        _check(0.0 <= self.sparsity < 1.0, f"pruning.sparsity must be in [0, 1) (got {self.sparsity})")
        _check(self.scope in ("global", "layer"), f"pruning.scope must be 'global' or 'layer' (got {self.scope!r})")
        _check(self.batches > 0, f"pruning.batches must be positive (got {self.batches})")
        _check(self.synflow_iterations > 0, "pruning.synflow_iterations must be positive")
        _check(0.0 <= self.snip_mix <= 1.0, f"pruning.snip_mix must be in [0, 1] (got {self.snip_mix})")
        _check(self.method != "none" or self.sparsity == 0.0,
               f"pruning.sparsity is {self.sparsity} but pruning.method is 'none'; "
               "choose a method (e.g. --set pruning.method=random) or set the sparsity to 0")


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
        _check(0 <= self.seed < 2**63, f"seed must be a non-negative integer below 2**63 (got {self.seed})")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; numbers may come as strings
    (YAML reads ``1e-5`` as a string)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value] if not isinstance(value, str) else _split_list(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list (got {value!r})")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key} must be true or false (got {value!r})")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer (got {value!r})")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ConfigError(f"{key} must be an integer (got {value!r})")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number (got {value!r})")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number (got {value!r})")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string (got {value!r})")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug


def _split_list(text: str) -> list[str]:
    """``"64-64-64"`` or ``"64,64"`` (FFJORD's way of writing layer widths) as a list."""
    if text[:1].isdigit():
        return [p for p in text.replace("-", ",").split(",") if p]
    return [text]


def _build(cls: type, values: Any, prefix: str) -> Any:
    if values is None:
        values = {}
    where = prefix or "config"
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values (got {values!r})")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        full = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(
            f"unknown config key {full!r}; valid keys in {where}: {', '.join(names)}"
        )
    kwargs = {
        k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()
    }
    return cls(**kwargs)


def from_dict(values: dict) -> Config:
    """Build and validate a :class:`Config` from nested dicts (missing keys take defaults)."""
    return _build(Config, values, "")


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
