"""Build a :class:`~cnf.flow.Flow` from a :class:`~cnf.config.Config`.

This is the config boundary: names in the config become objects (solvers,
divergence estimators, layers) here and nowhere else.
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from cnf.config import Config
from cnf.divergence import make_divergence
from cnf.errors import ConfigError
from cnf.fields import MLPField, VectorField
from cnf.flow import Flow
from cnf.odeblock import CNFBlock
from cnf.solver import Solver

GateFactory = Callable[[VectorField], nn.Module]


def make_solvers(config: Config) -> tuple[Solver, Solver]:
    """Training and test-time solvers from ``config.solver``."""
    s = config.solver
    train = Solver(
        method=s.method, rtol=s.rtol, atol=s.atol, step_size=s.step_size, adjoint=s.adjoint,
        adjoint_seminorm=s.adjoint_seminorm, max_num_steps=s.max_num_steps,
    )
    test = Solver(
        method=s.test_method or s.method,
        rtol=s.test_rtol if s.test_rtol is not None else s.rtol,
        atol=s.test_atol if s.test_atol is not None else s.atol,
        step_size=s.test_step_size if s.test_step_size is not None else s.step_size,
        adjoint=False, max_num_steps=s.max_num_steps,
    )
    return train, test


def make_field(config: Config, event_shape: Sequence[int]) -> VectorField:
    m = config.model
    if len(event_shape) == 1:
        return MLPField(
            event_shape[0], m.hidden_dims, layer_type=m.layer_type, nonlinearity=m.nonlinearity
        )
    raise ConfigError(f"no vector field for data of shape {tuple(event_shape)}")


def build_flow(
    config: Config, event_shape: Sequence[int], *, make_gates: GateFactory | None = None
) -> Flow:
    """The flow described by ``config`` for data of ``event_shape``.

    ``make_gates``, if given, builds the weight gates of each block's field.
    """
    m, r = config.model, config.regularization
    solver, test_solver = make_solvers(config)
    divergence = make_divergence(m.divergence, m.noise)
    test_divergence = make_divergence(m.test_divergence, m.noise) if m.test_divergence else None
    blocks = []
    for _ in range(m.num_blocks):
        field = make_field(config, event_shape)
        blocks.append(
            CNFBlock(
                field,
                end_time=m.end_time,
                train_end_time=m.train_end_time,
                divergence=divergence,
                test_divergence=test_divergence,
                solver=solver,
                test_solver=test_solver,
                kinetic=r.kinetic > 0,
                jacobian_frobenius=r.jacobian_frobenius > 0,
                gates=make_gates(field) if make_gates else None,
            )
        )
    return Flow(blocks, event_shape)
