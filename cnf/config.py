"""Config sections of the flow library, and the schema machinery every section uses.

A section is a dataclass. :func:`build_section` turns nested dicts (from YAML or
``--set``) into one: an unknown key or a value of the wrong type raises
:class:`~cnf.errors.ConfigError` naming the valid keys, and every name that
selects a registered object (a data set, layer type, nonlinearity, solver method)
is checked against its registry when the section is built, before any data or
model work. Value ranges are checked in each section's ``__post_init__``.

This module holds the sections of :mod:`cnf` (``data``, ``model``, ``solver``);
:mod:`pruning.config` holds the pruning sections, and the application composes
them into one experiment config.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from cnf.activations import ACTIVATIONS
from cnf.conv import CONV_LAYERS
from cnf.data import dataset_names
from cnf.errors import ConfigError, DataError
from cnf.layers import LAYERS
from cnf.solver import Solver


FIELDS = ("default", "unet")


def check(cond: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``cond``."""
    if not cond:
        raise ConfigError(message)


def check_name(value: str, valid: typing.Iterable[str], what: str, error: type[Exception] = ConfigError) -> None:
    """Raise ``error`` unless ``value`` is one of the registered names ``valid``."""
    names = list(valid)
    if value not in names:
        raise error(f"unknown {what} {value!r}; valid: {', '.join(names)}")


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
        check_name(self.name, dataset_names(), "dataset", DataError)
        check(self.val_size > 0 and self.test_size > 0, "data.val_size and data.test_size must be positive")
        check(self.downsample >= 1, f"data.downsample must be a positive integer (got {self.downsample})")
        check(self.subset is None or self.subset > 0, f"data.subset must be positive or null (got {self.subset})")
        check(1e-7 <= self.logit_alpha < 0.5,
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
    # The field (field_type): "default" (an MLP for flat data, FFJORD's concat-conv field in the
    # multiscale flow for images) or "unet" (images: one block over the whole image with
    # a time-conditioned U-Net of unet_channels per level, see cnf/unet.py).
    field_type: str = "default"
    unet_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    unet_groups: int = 8
    unet_time_dim: int = 64

    def __post_init__(self) -> None:
        check_name(self.layer_type, sorted(set(LAYERS) | set(CONV_LAYERS)), "layer_type")
        check_name(self.nonlinearity, sorted(ACTIVATIONS), "nonlinearity")
        check_name(self.field_type, FIELDS, "model.field_type")
        check(len(self.unet_channels) > 0 and all(c > 0 and c % self.unet_groups == 0 for c in self.unet_channels),
              f"model.unet_channels must be positive multiples of model.unet_groups={self.unet_groups} "
              f"(got {self.unet_channels})")
        check(self.unet_groups > 0 and self.unet_time_dim > 0, "model.unet_groups and unet_time_dim must be positive")
        check(self.base_components >= 0,
               f"model.base_components must be 0 (standard normal) or a number of mixture components "
               f"(got {self.base_components})")
        check(self.base_fit_size >= max(1, self.base_components),
               f"model.base_fit_size must be at least model.base_components and positive (got {self.base_fit_size})")
        check(self.block_hidden_dims is None or all(
                   len(dims) == len(self.hidden_dims) and all(h > 0 for h in dims) for dims in self.block_hidden_dims),
               "model.block_hidden_dims must be null or, per block, as many positive widths as model.hidden_dims "
               f"(got {self.block_hidden_dims})")
        check(self.scales is None or self.scales > 0, f"model.scales must be positive or null (got {self.scales})")
        check(self.kernel_size > 0 and self.kernel_size % 2 == 1,
               f"model.kernel_size must be a positive odd number (got {self.kernel_size})")
        check(len(self.hidden_dims) > 0 and all(h > 0 for h in self.hidden_dims),
               f"model.hidden_dims must be a non-empty list of positive ints (got {self.hidden_dims})")
        check(self.num_blocks > 0, f"model.num_blocks must be positive (got {self.num_blocks})")
        check(self.end_time > 0, f"model.end_time must be positive (got {self.end_time})")
        for key in ("divergence", "test_divergence"):
            value = getattr(self, key)
            check(value in ("exact", "hutchinson") or (key == "test_divergence" and value is None),
                   f"model.{key} must be exact or hutchinson (got {value!r})")
        check(self.noise in ("gaussian", "rademacher"),
               f"model.noise must be gaussian or rademacher (got {self.noise!r})")


@dataclass(frozen=True)
class SolverConfig(Solver):
    """The ``solver`` section: the training solve's settings (the fields of
    :class:`~cnf.solver.Solver`, validated there) and ``test_*`` overrides for
    evaluation and sampling, each defaulting to the training value."""

    test_method: str | None = None
    test_rtol: float | None = None
    test_atol: float | None = None
    test_step_size: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.test_solver()  # validate the test settings too

    def train_solver(self) -> Solver:
        """The solver of training solves (adjoint as configured)."""
        return Solver(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Solver)})

    def test_solver(self, tolerance: float | None = None) -> Solver:
        """The solver of evaluation and sampling (never adjoint); ``tolerance``, if
        given, sets ``rtol = atol`` of an adaptive method."""
        rtol = self.test_rtol if self.test_rtol is not None else self.rtol
        atol = self.test_atol if self.test_atol is not None else self.atol
        if tolerance is not None:
            rtol = atol = tolerance
        return Solver(
            method=self.test_method or self.method, rtol=rtol, atol=atol,
            step_size=self.test_step_size if self.test_step_size is not None else self.step_size,
            adjoint=False, max_num_steps=self.max_num_steps,
        )


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
        return build_section(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug


def _split_list(text: str) -> list[str]:
    """``"64-64-64"`` or ``"64,64"`` (FFJORD's way of writing layer widths) as a list."""
    if text[:1].isdigit():
        return [p for p in text.replace("-", ",").split(",") if p]
    return [text]


def build_section(cls: type, values: Any, prefix: str = "") -> Any:
    """An instance of the section dataclass ``cls`` from nested dicts (missing keys
    take defaults); ``prefix`` names the section in messages."""
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
