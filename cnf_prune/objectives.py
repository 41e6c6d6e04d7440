"""Training objectives: what the trainer minimizes on one batch.

An objective is called as ``objective(step_model, model, data, x)`` with the
model to differentiate through (``step_model``: the flow, or its DDP wrapper),
the flow itself (for its base and gates), the data source (for preprocessing)
and a raw training batch ``x``; it returns a :class:`BatchLoss`. The trainer
only backpropagates ``loss`` and logs the rest, so a new training objective is a
new class here, not a change to the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from torch import Tensor

from cnf.flow import Flow, FlowTrace
from cnf.flow_matching import StraightPath, flow_matching_loss, minibatch_ot_coupling, sample_times
from cnf.sources import DataSource
from pruning.config import RegularizationConfig
from pruning.tracking import regularization_terms

if TYPE_CHECKING:
    from cnf_prune.config import TrainConfig


@dataclass
class BatchLoss:
    """The loss of one batch and what is logged about it.

    ``loss``: the scalar to minimize; ``nll``: the batch's mean NLL in nats per
    example (``None`` when the objective does not compute it); ``trace``: the
    training solve (NFE, R), ``None`` without one; ``penalties``: unweighted
    regularization terms by name; ``scalars``: other objective-specific values,
    logged under ``train/<name>``.
    """

    loss: Tensor
    nll: Tensor | None = None
    trace: FlowTrace | None = None
    penalties: dict[str, Tensor] = field(default_factory=dict)
    scalars: dict[str, Tensor] = field(default_factory=dict)


class Objective(Protocol):
    """A training objective (see the module docstring)."""

    def __call__(self, step_model: Callable[[Tensor], FlowTrace], model: Flow, data: DataSource,
                 x: Tensor) -> BatchLoss: ...


class Likelihood:
    """Maximum likelihood (FFJORD): the batch's NLL through one solve, plus the
    weighted RNODE penalties (kinetic energy, Jacobian Frobenius norm) the solve
    integrates and the weighted sparsity penalties of the gates (L0, PathReg,
    path norm)::

        loss = NLL + λ_K ∫‖f‖² + λ_J ∫‖∂f/∂z‖_F² + Σ_k λ_k penalty_k
    """

    def __init__(self, regularization: RegularizationConfig) -> None:
        self.weights = regularization

    def __call__(self, step_model: Callable[[Tensor], FlowTrace], model: Flow, data: DataSource,
                 x: Tensor) -> BatchLoss:
        x, pre_logdet = data.preprocess(x)  # images: dequantize, logit; else identity
        trace = step_model(x)
        nll = -(model.base.log_prob(trace.out) + trace.logabsdet + pre_logdet).mean()
        r = self.weights
        loss = nll
        if trace.kinetic is not None:
            loss = loss + r.kinetic * trace.kinetic.mean() + r.jacobian_frobenius * trace.jac_frobenius.mean()
        penalties = regularization_terms(model, r)
        for name, value in penalties.items():
            loss = loss + getattr(r, name) * value
        return BatchLoss(loss, nll=nll, trace=trace, penalties=penalties)


class FlowMatching:
    """Conditional flow matching (Lipman et al. 2023) of the flow's single block:

        loss = E_{t ~ U[0, T]} ‖f(t, x_t) − u_t(x_t | x, z)‖² + Σ_k λ_k penalty_k

    on the straight path from the preprocessed data ``x`` (``t = 0``) to base draws
    ``z`` (``t = T``, the block's fixed end time), optionally paired by minibatch
    optimal transport (``coupling="ot"``). No ODE is solved: ``trace`` is ``None``,
    and the NLL, R and NFE come from validation solves. Sparsity penalties (L0) add
    as for the likelihood; the field is evaluated with the block's effective
    (masked, gated) weights.

    References: Lipman et al. 2023; Tong et al. 2023 (minibatch OT coupling).
    """

    def __init__(self, regularization: RegularizationConfig, *, sigma_min: float = 0.0,
                 coupling: str = "independent", precision: str = "float32") -> None:
        self.weights, self.sigma_min, self.coupling = regularization, sigma_min, coupling
        self.precision = precision

    def regression_loss(self, model: Flow, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The flow-matching regression loss of a preprocessed batch ``x`` (base draws
        and times from ``generator``, or the global generator)."""
        (block,) = model.blocks
        end_time = float(block.end_time)
        z = model.base_noise(len(x), generator=generator)
        if self.coupling == "ot":
            z = z[minibatch_ot_coupling(x, z)]
        t = sample_times(len(x), end_time, generator=generator, dtype=x.dtype, device=x.device)
        path = StraightPath(end_time, self.sigma_min)
        weights = block.solve_weights()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"):
            return flow_matching_loss(block.field, x, z, t, path=path, weights=weights)

    def __call__(self, step_model: Callable[[Tensor], FlowTrace], model: Flow, data: DataSource,
                 x: Tensor) -> BatchLoss:
        x, _ = data.preprocess(x)  # images: dequantize, logit; else identity
        fm = self.regression_loss(model, x)
        loss = fm
        penalties = regularization_terms(model, self.weights)
        for name, value in penalties.items():
            loss = loss + getattr(self.weights, name) * value
        return BatchLoss(loss, penalties=penalties, scalars={"fm_loss": fm.detach()})


def make_objective(train: TrainConfig, regularization: RegularizationConfig) -> Objective:
    """The objective that ``train.objective`` names."""
    if train.objective == "flow_matching":
        return FlowMatching(regularization, sigma_min=train.fm_sigma_min, coupling=train.fm_coupling,
                            precision=train.fm_precision)
    return Likelihood(regularization)
