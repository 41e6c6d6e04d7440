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
from typing import Callable, Protocol

from torch import Tensor

from cnf.flow import Flow, FlowTrace
from cnf.sources import DataSource
from pruning.config import RegularizationConfig
from pruning.tracking import regularization_terms


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
