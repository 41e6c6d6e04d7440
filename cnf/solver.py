"""ODE solver settings and the one call into torchdiffeq.

:class:`Solver` holds what a solve needs (method, tolerances, adjoint or direct
backpropagation) and :func:`integrate` runs it. Only the first ``n_controlled``
states of the augmented state take part in adaptive step-size control: states
that merely *measure* the trajectory (the cumulative Jacobian norm, regularizer
integrals) must not change the steps the solver takes, or measuring R would
change the NFE.

The adjoint method solves, from ``t1`` back to ``t0``, the augmented system

    dy/dt = f(t, y)           da/dt = -aᵀ ∂f/∂y
    da_θ/dt = -aᵀ ∂f/∂θ       da_t/dt = -aᵀ ∂f/∂t

with ``y = (z, Δ, R, ...)``. Only the first ``n_coupled`` states (``z``) are read
by ``f``; the others only accumulate, so their adjoints are constant in time
(``∂f/∂Δ = 0``) and their backward re-integration is discarded by torchdiffeq
(it restarts from the forward values). torchdiffeq's default backward norm still
includes ``a_t``, whose integral is only ``∂L/∂t0`` (unused when ``t0`` is a
constant), and every parameter adjoint. The backward norm here is the maximum
over ``z`` and ``a_z``, plus ``a_t`` when ``t0`` needs a gradient, plus the
parameter adjoints unless ``adjoint_seminorm`` (Kidger et al. 2021).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from torchdiffeq import odeint, odeint_adjoint
from torchdiffeq._impl.odeint import SOLVERS

from cnf.errors import ConfigError, SolverError

ADAPTIVE_METHODS = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams")

State = tuple[Tensor, ...]


@dataclass(frozen=True)
class Solver:
    """How to integrate: a torchdiffeq ``method`` with ``rtol``/``atol`` (adaptive
    methods) or ``step_size`` (fixed-step methods); ``adjoint`` selects
    ``odeint_adjoint`` (O(1) memory, a second solve backwards) over direct
    backpropagation through the solver's operations; ``adjoint_seminorm`` leaves
    the parameter adjoints out of the backward step-size control (Kidger et al.
    2021); ``checkpoint`` (with backpropagation only) keeps no activations of the
    field's evaluations and recomputes each one the backward pass reaches (the same
    gradient as plain backpropagation, in memory close to the adjoint's);
    ``max_num_steps`` bounds an adaptive solve (``None``: unbounded).
    """

    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    step_size: float | None = None
    adjoint: bool = True
    adjoint_seminorm: bool = False
    checkpoint: bool = False
    max_num_steps: int | None = None

    def __post_init__(self) -> None:
        if self.method not in ADAPTIVE_METHODS + FIXED_METHODS or self.method not in SOLVERS:
            valid = ", ".join(ADAPTIVE_METHODS + FIXED_METHODS)
            raise ConfigError(f"unknown solver method {self.method!r}; valid: {valid}")
        if not (self.rtol > 0 and self.atol > 0):
            raise ConfigError(
                f"solver tolerances must be positive (got rtol={self.rtol}, atol={self.atol})"
            )
        if self.method in FIXED_METHODS and not (self.step_size and self.step_size > 0):
            raise ConfigError(
                f"fixed-step method {self.method!r} needs a positive step_size "
                "(for example --set solver.step_size=0.05)"
            )
        if self.checkpoint and self.adjoint:
            raise ConfigError(
                "solver.checkpoint recomputes evaluations when backpropagating through the solver; "
                "it needs solver.adjoint: false (for the adjoint method, set solver.checkpoint=false)"
            )
        if self.max_num_steps is not None and self.max_num_steps < 1:
            raise ConfigError(f"max_num_steps must be positive (got {self.max_num_steps})")

    @property
    def adaptive(self) -> bool:
        return self.method in ADAPTIVE_METHODS

    def describe(self) -> str:
        if self.adaptive:
            return f"{self.method} (rtol={self.rtol:g}, atol={self.atol:g})"
        return f"{self.method} (step_size={self.step_size:g})"


def integrate(
    solver: Solver,
    dynamics: Callable[[Tensor, State], State],
    state: State,
    times: Tensor,
    params: Sequence[Tensor],
    n_controlled: int,
    n_coupled: int | None = None,
    start_time_grad: bool | None = None,
) -> State:
    """Integrate ``dynamics`` from ``times[0]`` to ``times[-1]``; return the final state.

    ``params`` are the tensors ``dynamics`` closes over that need gradients (used
    by the adjoint method). ``n_coupled`` (default ``n_controlled``) is how many
    leading states ``dynamics`` reads: only these and their adjoints control the
    backward steps. ``start_time_grad`` says whether ``times[0]`` needs a gradient
    (default: whether ``times`` does). Raises :class:`SolverError` if the step
    size underflows.
    """

    def norm(states: Sequence[Tensor]) -> Tensor:
        # Step sizes are decisions of the controller, not functions to differentiate:
        # backpropagating through the solver (adjoint: false) differentiates the steps
        # taken with their sizes held fixed, as the adjoint method does.
        return _rms_max([s.detach() for s in states[:n_controlled]])

    options: dict = {"norm": norm}
    if solver.step_size is not None and not solver.adaptive:
        options["step_size"] = solver.step_size
    if solver.max_num_steps is not None and solver.adaptive:
        options["max_num_steps"] = solver.max_num_steps
    kwargs = dict(rtol=solver.rtol, atol=solver.atol, method=solver.method, options=options)
    try:
        if solver.adjoint:
            adjoint_options = {k: v for k, v in options.items() if k != "norm"}
            adjoint_options["norm"] = adjoint_norm(
                len(state),
                n_controlled if n_coupled is None else n_coupled,
                times.requires_grad if start_time_grad is None else start_time_grad,
                not solver.adjoint_seminorm,
            )
            out = odeint_adjoint(
                dynamics, state, times, adjoint_params=tuple(p for p in params if p.requires_grad),
                adjoint_options=adjoint_options, **kwargs,
            )
        else:
            out = odeint(dynamics, state, times, **kwargs)
    except AssertionError as exc:
        raise solver_failure(exc, solver) from exc
    return tuple(s[-1] for s in out)


def _rms_max(tensors: Sequence[Tensor]) -> Tensor:
    """``max_i sqrt(mean(x_i²))``: torchdiffeq's mixed norm over a tuple of states
    (a NaN state gives a NaN norm, which the solver reports)."""
    return torch.stack([s.pow(2).mean().sqrt() for s in tensors]).max()


def adjoint_norm(
    n_states: int, n_coupled: int, start_time_grad: bool, param_adjoints: bool
) -> Callable[[Sequence[Tensor]], Tensor]:
    """The backward solve's error norm over torchdiffeq's tupled adjoint state
    ``(a_t, y_1..y_n, a_1..a_n, a_θ_1, ...)`` (each entry an error ratio).

    It is ``max`` of the RMS of ``y_i`` and ``a_i`` for ``i ≤ n_coupled``, of
    ``|a_t|`` if ``start_time_grad``, and of each ``a_θ`` if ``param_adjoints``.
    """

    def norm(ratios: Sequence[Tensor]) -> Tensor:
        ys, adjs = ratios[1:1 + n_states], ratios[1 + n_states:1 + 2 * n_states]
        parts = [*ys[:n_coupled], *adjs[:n_coupled]]
        if param_adjoints:
            parts.extend(ratios[1 + 2 * n_states:])
        out = _rms_max(parts)
        return torch.maximum(out, ratios[0].abs()) if start_time_grad else out

    return norm


def solver_failure(exc: BaseException, solver: Solver, where: str = "") -> Exception:
    """Turn torchdiffeq's assertion (step underflow, too many steps) into a
    :class:`SolverError` with advice; any other exception is returned unchanged."""
    text = str(exc)
    if "underflow in dt" not in text and "max_num_steps" not in text:
        return exc
    what = "step size underflowed" if "underflow" in text else "step limit exceeded"
    return SolverError(
        f"ODE solver {solver.describe()} {what}{where}: the dynamics became too stiff. "
        "Try a looser tolerance (--set solver.rtol=1e-4 --set solver.atol=1e-4), more "
        "weight decay (train.weight_decay), kinetic/Jacobian regularization "
        "(regularization.kinetic, regularization.jacobian_frobenius), or a fixed-step "
        "solver (--set solver.method=rk4 --set solver.step_size=0.05)"
    )
