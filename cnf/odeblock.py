"""One continuous normalizing flow block: the ODE ``dz/dt = f(t, z)`` on ``[0, T]``.

The block integrates the augmented state ``(z, Δ, R[, K, F])`` with

    dz/dt = f(t, z)          dΔ/dt = tr(∂f/∂z)        dR/dt = ‖∂f/∂z‖_F
    dK/dt = ‖f‖²             dF/dt = ‖∂f/∂z‖_F²       (K, F: RNODE penalties, optional)

Forward (data at ``t=0`` to latent at ``t=T``), ``Δ(T) = ∫_0^T tr J dt`` is the
log-determinant ``log|det ∂z(T)/∂z(0)|``; in reverse (``T -> 0``) the same state
accumulates ``-∫_0^T tr J dt = log|det ∂z(0)/∂z(T)|``. ``R`` is the cumulative
Jacobian Frobenius norm; with the Hutchinson divergence its integrand is
``‖J ε‖`` for the solve's probe ``ε``, whose square is unbiased for ``‖J‖_F²``
(so ``‖J ε‖`` itself is biased low by Jensen's inequality; exact for ``Exact``).

Only ``z`` and ``Δ`` enter adaptive step-size control; ``R``, ``K`` and ``F``
only measure the trajectory. The field reads ``z`` alone, so the adjoint (backward)
solve controls its steps by ``z`` and ``a_z`` (see :func:`cnf.solver.integrate`):
the adjoints of ``Δ, R, K, F`` are constant. Sampling needs ``z`` alone: with ``density=False``
the block integrates ``dz/dt = f`` without tangents, which saves the
Jacobian-vector products (about half of each evaluation with a Hutchinson probe,
two thirds with the exact 2-D divergence). The Hutchinson probe and any weight
gates are drawn once per solve and closed over, so the field is deterministic
inside a solve.

References: FFJORD, Grathwohl et al. 2019; RNODE, Finlay et al. 2020.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field as dataclass_field
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cnf.divergence import Divergence, Exact
from cnf.errors import ConfigError, NonFiniteError, SolverError
from cnf.fields import VectorField
from cnf.solver import Solver, integrate

_TINY = 1e-12  # floor under ‖J‖_F² before the square root (its gradient at 0 is infinite)


class WeightGates(Protocol):
    """Multiplicative gates on prunable weights (for example L0 hard-concrete gates).

    Called once per solve; returns a multiplier for some of the field's prunable
    weights, keyed like :meth:`VectorField.prunable_weights`.
    """

    def __call__(self) -> dict[str, Tensor]: ...


@dataclass
class NFECounter:
    """Vector-field evaluations of one solve: ``forward`` during the solve,
    ``backward`` afterwards, when ``loss.backward()`` runs (the adjoint solve, or the
    evaluations a checkpointed solve recomputes)."""

    forward: int = 0
    backward: int = 0
    solved: bool = False
    last_t: Tensor | None = dataclass_field(default=None, repr=False)

    def tick(self, t: Tensor) -> None:
        if self.solved:
            self.backward += 1
        else:
            self.forward += 1
        self.last_t = t


@dataclass
class BlockOutput:
    """Result of one block solve; per-sample quantities have shape ``(B,)``
    (``logabsdet`` and ``jac_norm`` are ``None`` for a solve without density)."""

    z: Tensor
    logabsdet: Tensor | None
    jac_norm: Tensor | None
    kinetic: Tensor | None
    jac_frobenius: Tensor | None
    nfe: NFECounter


class CNFBlock(nn.Module):
    """A CNF block: integrates ``field`` from ``0`` to ``end_time`` (or back).

    Args:
        field: the vector field ``f(t, z)``.
        end_time: ``T``; trainable when ``train_end_time`` (parametrized as ``√T²``
            so it stays positive).
        divergence / test_divergence: estimators for training and eval mode.
        solver / test_solver: ODE solver settings for training and eval mode.
        kinetic, jacobian_frobenius: also integrate the RNODE penalties (training only).
        gates: optional multiplicative weight gates, sampled once per solve.
    """

    def __init__(
        self,
        field: VectorField,
        *,
        end_time: float = 1.0,
        train_end_time: bool = False,
        divergence: Divergence = Exact(),
        test_divergence: Divergence | None = None,
        solver: Solver = Solver(),
        test_solver: Solver | None = None,
        kinetic: bool = False,
        jacobian_frobenius: bool = False,
        gates: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not end_time > 0:
            raise ConfigError(f"end_time must be positive (got {end_time})")
        self.field = field
        root = torch.tensor(math.sqrt(end_time))
        if train_end_time:
            self.sqrt_end_time = nn.Parameter(root)
        else:
            self.register_buffer("sqrt_end_time", root)
        self.divergence = divergence
        self.test_divergence = test_divergence or divergence
        self.solver = solver
        self.test_solver = test_solver or solver
        self.kinetic = kinetic
        self.jacobian_frobenius = jacobian_frobenius
        self.gates = gates

    @property
    def end_time(self) -> Tensor:
        return self.sqrt_end_time * self.sqrt_end_time

    def solve_weights(self) -> dict[str, Tensor]:
        """The field's effective weights for one solve: ``weight * mask * gate``."""
        weights = self.field.masked_weights()
        if self.gates is not None:
            for name, gate in self.gates().items():
                weights[name] = weights[name] * gate
        return weights

    def forward(self, x: Tensor, *, reverse: bool = False, density: bool = True) -> BlockOutput:
        """Integrate ``x`` from ``t=0`` to ``T`` (or from ``T`` to ``0`` if ``reverse``);
        with ``density=False``, ``z`` alone (no log-determinant, R or penalties)."""
        divergence = self.divergence if self.training else self.test_divergence
        solver = self.solver if self.training else self.test_solver
        penalties = density and self.training and (self.kinetic or self.jacobian_frobenius)
        field = self.field
        weights = self.solve_weights()
        inputs = field.solve_inputs(weights)  # what every evaluation reads, computed once
        tangents = divergence.tangents(x) if density else None
        counter = NFECounter()
        t0, t1 = torch.zeros_like(self.end_time), self.end_time
        times = torch.stack([t1, t0] if reverse else [t0, t1]).to(x)
        # An evaluation's time enters the gradient only through the start time times[0]
        # when the adjoint solves (its dL/dt integral yields dL/d(times[0]) alone) or when
        # backpropagation goes through an adaptive solver (the stage times are times[0]
        # plus step sizes that the controller chose, constants; the end time acts through
        # the final interpolation, outside the evaluations). A fixed grid instead ends its
        # last step at the end time, so there the stage times carry its gradient. When
        # only times[0] would get it and it is a constant (solves forward from 0), the
        # evaluations skip the field's time derivative.
        start_time_grad = reverse and times.requires_grad
        detach_time = not start_time_grad and (solver.adjoint or solver.adaptive)

        def evaluate(t: Tensor, z: Tensor) -> tuple[Tensor, ...]:
            counter.tick(t)
            if detach_time:
                t = t.detach()
            f, jv = field(t, z, tangents, inputs)
            if not density:
                return (f,)
            div, fro_sq = divergence.reduce(tangents, jv)
            out = (f, div, fro_sq.clamp_min(_TINY).sqrt())
            if penalties:
                out += (f.pow(2).flatten(1).sum(1), fro_sq)
            return out

        checkpointed = solver.checkpoint and not solver.adjoint and torch.is_grad_enabled()

        def dynamics(t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            if checkpointed:
                # No activations are kept: the backward pass recomputes the evaluations it
                # reaches (those of accepted steps; the counter counts them as backward NFE).
                return checkpoint(evaluate, t, state[0], use_reentrant=False)
            return evaluate(t, state[0])

        zeros = x.new_zeros(x.shape[0])
        if not density:
            state: tuple[Tensor, ...] = (x,)
        else:
            state = (x, zeros, zeros) + ((zeros, zeros) if penalties else ())
        # The adjoint differentiates with respect to the weights and parameters themselves:
        # each backward evaluation's vector-Jacobian product runs through the small
        # per-solve graph of ``inputs``, which keeps the adjoint state (one entry per
        # tensor here) as small as the parameters, not as large as, say, a time map.
        params = [*weights.values()] + [
            p for name, p in field.named_parameters() if name not in weights
        ]
        try:
            final = integrate(
                solver, dynamics, state, times, params, n_controlled=min(2, len(state)),
                n_coupled=1, start_time_grad=start_time_grad,
            )
        except SolverError as exc:
            raise self._solve_failure(exc, (x, *params), counter) from exc
        counter.solved = True
        return _block_output(final, counter, reverse, density, penalties)

    def _solve_failure(self, exc: SolverError, tensors: tuple[Tensor, ...], counter: NFECounter) -> Exception:
        """What a failed solve raises: :class:`NonFiniteError` if its input or weights
        hold NaN or inf, else the solver's error with the time where it failed."""
        if not all(torch.isfinite(p).all() for p in tensors):
            return NonFiniteError("NaN or inf values in the input or weights of an ODE solve")
        at = float(torch.as_tensor(counter.last_t).detach()) if counter.last_t is not None else math.nan
        where = f"t={at:.4g}" if math.isfinite(at) else "the initial step"
        return SolverError(f"{exc} (failed at {where} of [0, {float(self.end_time.detach()):.4g}])")


def _block_output(final: tuple[Tensor, ...], counter: NFECounter, reverse: bool, density: bool,
                  penalties: bool) -> BlockOutput:
    """The block's result from the final augmented state ``(z[, Δ, R[, K, F]])``; the
    measured integrals change sign in reverse (``Δ`` already is the log-determinant)."""
    if not density:
        return BlockOutput(final[0], None, None, None, None, counter)
    sign = -1.0 if reverse else 1.0
    return BlockOutput(
        z=final[0],
        logabsdet=final[1],
        jac_norm=sign * final[2],
        kinetic=sign * final[3] if penalties else None,
        jac_frobenius=sign * final[4] if penalties else None,
        nfe=counter,
    )
