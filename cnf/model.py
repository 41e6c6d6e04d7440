"""Build a :class:`~cnf.flow.Flow` from the ``model`` and ``solver`` config sections.

This is the config boundary of the flow library: names in the sections become
objects (solvers, divergence estimators, layers) here and nowhere else.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from torch import nn

from cnf.base import GaussianMixture
from cnf.config import ModelConfig, SolverConfig
from cnf.divergence import make_divergence
from cnf.errors import ConfigError
from cnf.conv import ConvField
from cnf.fields import MLPField, VectorField
from cnf.flow import Flow
from cnf.multiscale import MultiscaleFlow, default_scales, scale_shapes
from cnf.odeblock import CNFBlock
from cnf.unet import UNetField

GateFactory = Callable[[VectorField], nn.Module]


def make_field(
    m: ModelConfig, event_shape: Sequence[int], hidden_dims: Sequence[int] | None = None
) -> VectorField:
    """The field of one block; ``hidden_dims`` overrides ``m.hidden_dims``."""
    widths = m.hidden_dims if hidden_dims is None else hidden_dims
    if len(event_shape) == 1:
        return MLPField(
            event_shape[0], widths, layer_type=m.layer_type, nonlinearity=m.nonlinearity
        )
    if len(event_shape) == 3 and m.field_type == "unet":
        return UNetField(
            event_shape, m.unet_channels, groups=m.unet_groups, nonlinearity=m.nonlinearity,
            time_dim=m.unet_time_dim,
        )
    if len(event_shape) == 3:
        return ConvField(
            event_shape, widths, layer_type=m.layer_type, nonlinearity=m.nonlinearity,
            kernel_size=m.kernel_size,
        )
    raise ConfigError(f"no vector field for data of shape {tuple(event_shape)}")


def build_flow(
    m: ModelConfig,
    solvers: SolverConfig,
    event_shape: Sequence[int],
    *,
    kinetic: bool = False,
    jacobian_frobenius: bool = False,
    make_gates: GateFactory | None = None,
) -> Flow:
    """The flow described by the ``model`` section ``m`` for data of ``event_shape``:
    a stack of ``num_blocks`` blocks for flat data and U-Net image fields, FFJORD's
    multiscale flow for images otherwise, integrated with the ``solver`` section's training and test solvers.

    ``kinetic``/``jacobian_frobenius`` make every block integrate the RNODE
    penalties; ``make_gates``, if given, builds the weight gates of each field.
    """
    solver, test_solver = solvers.train_solver(), solvers.test_solver()
    divergence = make_divergence(m.divergence, m.noise)
    test_divergence = make_divergence(m.test_divergence, m.noise) if m.test_divergence else None

    # Per-block widths (compacted models) are consumed in ``flow.blocks`` order.
    block_widths = iter(m.block_hidden_dims or [])

    def make_blocks(shape: Sequence[int]) -> list[CNFBlock]:
        return [make_block(make_field(m, shape, next(block_widths, None))) for _ in range(m.num_blocks)]

    def make_block(field: VectorField) -> CNFBlock:
        return CNFBlock(
            field,
            end_time=m.end_time,
            train_end_time=m.train_end_time,
            divergence=divergence,
            test_divergence=test_divergence,
            solver=solver,
            test_solver=test_solver,
            kinetic=kinetic,
            jacobian_frobenius=jacobian_frobenius,
            gates=make_gates(field) if make_gates else None,
        )

    # An unfitted mixture is N(0, I); the trainer fits it (cnf.base.fit_base), checkpoints keep it.
    base = GaussianMixture(math.prod(event_shape), m.base_components) if m.base_components else None
    if len(event_shape) == 3 and m.field_type != "unet":
        shapes = scale_shapes(event_shape, m.scales or default_scales(event_shape))
        scales = [(make_blocks(before), make_blocks(after) if after else []) for before, after in shapes]
        flow: Flow = MultiscaleFlow(scales, event_shape, base)
    else:
        flow = Flow(make_blocks(event_shape), event_shape, base)
    if m.block_hidden_dims is not None and len(m.block_hidden_dims) != len(flow.blocks):
        raise ConfigError(
            f"model.block_hidden_dims lists {len(m.block_hidden_dims)} blocks but the flow has "
            f"{len(flow.blocks)}; set it to null or give one list of widths per block"
        )
    return flow
