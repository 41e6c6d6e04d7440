"""Pruning-at-initialization scores, keyed by full parameter name.

Every scorer has the signature ``scorer(model, batches, settings, seed) -> {name: score}``
(``settings``: the ``pruning`` config section): it scores the prunable weights
selected by ``settings.layers`` (names like ``blocks.0.field.layers.1.weight``), and :func:`pruning.masks.select_top` then
keeps the weights with the *largest* scores. Scorers never change the model.

Gradients are taken with respect to the raw weights ``θ``. The ODE block uses
``θ ⊙ mask``, so at a full mask (pruning at initialization) ``∂/∂θ`` is the
gradient with respect to the effective weight. With ``n`` scoring batches,

    dL = (1/n) Σ_b ∂L_b/∂θ,   L_b = mean NLL of batch b (training mode)
    dR = (1/n) Σ_b ∂R_b/∂θ,   R_b = batch mean of the cumulative Jacobian norm
                                    ∫_0^T ‖∂f/∂z‖_F dt of each block's solve,

both from one solve per batch, so they share θ, the batch and (with the
Hutchinson estimator) the probe. The scores:

==========================  ==============================================================
``random``                  ``u ~ U[0, 1)`` from a generator seeded with ``seed``
``magnitude``               ``|θ|``
``snip``                    ``|θ ⊙ dL|``
``jacobian_spectrum``       ``dR ⊙ dL`` (signed)
``jacobian_spectrum_abs``   ``|dR ⊙ dL|``
``jacobian_spectrum_snip``  ``(1 − m) s_JS / Σ|s_JS| + m s_SNIP / Σ|s_SNIP|``,
                            ``m = settings.snip_mix``, sums over all scored weights
``grasp``                   ``θ ⊙ (H dL)``, ``H`` the Hessian of the NLL
``synflow``                 ``|θ ⊙ ∂R_sf/∂θ|``, iterative and data-free (see :func:`synflow`)
==========================  ==============================================================

References: SNIP, Lee et al. 2019; GraSP, Wang et al. 2020; SynFlow, Tanaka et al.
2020; Jacobian-spectrum pruning, Shalova and Schilders (the seed of this project).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from cnf.activations import Activation
from cnf.errors import ConfigError
from cnf.flow import Flow, FlowTrace
from pruning.masks import apply_masks, mask_buffer, prunable_weights, select_top

if TYPE_CHECKING:
    from pruning.config import PruningConfig

Scores = dict[str, Tensor]
Scorer = Callable[..., Scores]  # (model, batches, settings, seed, *, loss=None) -> scores


def _nll(model: Flow, trace: FlowTrace) -> Tensor:
    return -(model.base.log_prob(trace.out) + trace.logabsdet).mean()


def _jac_norm(model: Flow, trace: FlowTrace) -> Tensor:  # noqa: ARG001
    return trace.jac_norm.mean()


OBJECTIVES: dict[str, Callable[[Flow, FlowTrace], Tensor]] = {"nll": _nll, "jac_norm": _jac_norm}

# A training loss L of one scoring batch: ``loss(model, x, trace)`` with ``trace`` the
# batch's training-mode solve. None means the NLL (maximum likelihood); a flow-matching
# run passes its regression loss, so that ``dL`` is the gradient of what it trains.
Loss = Callable[[Flow, Tensor, FlowTrace], Tensor]


def objective_value(obj: str, model: Flow, x: Tensor, trace: FlowTrace, loss: Loss | None) -> Tensor:
    """One batch's ``obj`` (``nll``: the training loss L, i.e. ``loss`` or the NLL;
    ``jac_norm``: R) from its solve ``trace``."""
    if obj == "nll" and loss is not None:
        return loss(model, x, trace)
    return OBJECTIVES[obj](model, trace)


def objective_gradients(
    model: Flow,
    batches: Sequence[Tensor],
    weights: Mapping[str, nn.Parameter],
    objectives: Sequence[str] = ("nll", "jac_norm"),
    loss: Loss | None = None,
) -> dict[str, Scores]:
    """Batch-averaged gradients of each objective (``nll``: L, the NLL or ``loss``;
    ``jac_norm``: R) with respect to ``weights``, from one training-mode solve per batch.

    Returns ``{objective: {weight name: gradient}}``. The model's mode is restored.
    """
    names, params = list(weights), list(weights.values())
    total = {obj: [torch.zeros_like(p) for p in params] for obj in objectives}
    was_training = model.training
    model.train()
    try:
        for x in batches:
            trace = model.trace(x)
            for i, obj in enumerate(objectives):
                grads = torch.autograd.grad(
                    objective_value(obj, model, x, trace, loss), params, retain_graph=i + 1 < len(objectives),
                    allow_unused=True,
                )
                for acc, g in zip(total[obj], grads):
                    if g is not None:
                        acc.add_(g)
    finally:
        model.train(was_training)
    return {obj: {n: g / len(batches) for n, g in zip(names, grads)} for obj, grads in total.items()}


def _scored(model: Flow, settings: PruningConfig) -> dict[str, nn.Parameter]:
    return prunable_weights(model, settings.layers)


def random_scores(
    model: Flow, batches: Sequence[Tensor], settings: PruningConfig, seed: int, *, loss: Loss | None = None
) -> Scores:
    """Uniform scores from a CPU generator seeded with ``seed`` (device independent)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        n: torch.rand(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        for n, p in _scored(model, settings).items()
    }


def magnitude_scores(
    model: Flow, batches: Sequence[Tensor], settings: PruningConfig, seed: int, *, loss: Loss | None = None
) -> Scores:
    """``|θ|``."""
    return {n: p.detach().abs() for n, p in _scored(model, settings).items()}


def snip_scores(
    model: Flow, batches: Sequence[Tensor], settings: PruningConfig, seed: int, *, loss: Loss | None = None
) -> Scores:
    """``|θ ⊙ dL|``: the first-order change of the NLL when a weight is removed.

    References: SNIP: Single-shot Network Pruning, Lee et al. 2019.
    """
    weights = _scored(model, settings)
    d_loss = objective_gradients(model, batches, weights, ("nll",), loss)["nll"]
    return {n: (p.detach() * d_loss[n]).abs() for n, p in weights.items()}


def _spectrum(
    model: Flow, batches: Sequence[Tensor], settings: PruningConfig, seed: int, loss: Loss | None = None
) -> tuple[Scores, Scores]:
    """``(s_JS = dR ⊙ dL, s_SNIP = |θ ⊙ dL|)``; raises if ``dR ≡ 0``."""
    weights = _scored(model, settings)
    grads = objective_gradients(model, batches, weights, loss=loss)
    d_loss, d_jac = grads["nll"], grads["jac_norm"]
    if all(torch.count_nonzero(g) == 0 for g in d_jac.values()):
        raise ConfigError(
            f"pruning.method {settings.method!r}: the gradient of the cumulative Jacobian "
            "norm R is identically zero at initialization, so every Jacobian-spectrum score is 0 "
            "(a zero-initialized last layer makes ∂f/∂z ≡ 0); initialize the field with non-zero "
            "weights or choose another pruning.method"
        )
    js = {n: d_jac[n] * d_loss[n] for n in weights}
    snip = {n: (p.detach() * d_loss[n]).abs() for n, p in weights.items()}
    return js, snip


def jacobian_spectrum_scores(
    model: Flow, batches: Sequence[Tensor], settings: PruningConfig, seed: int, *, loss: Loss | None = None
) -> Scores:
    """``s = dR ⊙ dL``, signed; the largest are kept.

    A gradient step ``dθ = −η dL`` changes R by ``−η Σ_i dR_i dL_i``: weights with a
    large positive ``s_i`` are those whose training steps lower R the most.

    Raises:
        ConfigError: if ``dR`` is identically zero (e.g. a zero-initialized last layer).
    """
    return _spectrum(model, batches, settings, seed, loss)[0]


def jacobian_spectrum_abs_scores(
    model: Flow, batches: Sequence[Tensor], settings: PruningConfig, seed: int, *, loss: Loss | None = None
) -> Scores:
    """``|dR ⊙ dL|``: weights whose training steps change R the most, either way."""
    return {n: s.abs() for n, s in _spectrum(model, batches, settings, seed, loss)[0].items()}


def jacobian_spectrum_snip_scores(
    model: Flow, batches: Sequence[Tensor], settings: PruningConfig, seed: int, *, loss: Loss | None = None
) -> Scores:
    """``(1 − m) s_JS / Σ|s_JS| + m s_SNIP / Σ|s_SNIP|`` with ``m = settings.snip_mix``.

    ``s_JS = dR ⊙ dL`` and ``s_SNIP = |θ ⊙ dL|``; each sum runs over every scored
    weight, so both parts have unit ℓ1 norm and ``m`` sets their balance
    (``m = 0``: Jacobian spectrum, ``m = 1``: SNIP, up to a common scale).
    """
    js, snip = (_unit_l1(s) for s in _spectrum(model, batches, settings, seed, loss))
    m = settings.snip_mix
    return {n: (1 - m) * js[n] + m * snip[n] for n in js}


def _unit_l1(scores: Scores) -> Scores:
    total = sum(s.abs().sum() for s in scores.values())
    return {n: s / total if total > 0 else s for n, s in scores.items()}


def _direct_backprop(model: Flow) -> Flow:
    """A copy of ``model`` whose solvers backpropagate through the solver steps
    (``odeint``) instead of the adjoint, so second derivatives exist."""
    twin = copy.deepcopy(model)
    for block in twin.blocks:
        block.solver = dataclasses.replace(block.solver, adjoint=False, checkpoint=False)
    return twin


def grasp_scores(
    model: Flow, batches: Sequence[Tensor], settings: PruningConfig, seed: int, *, loss: Loss | None = None
) -> Scores:
    """``θ ⊙ (H dL)``: GraSP with the NLL's Hessian-gradient product.

    GraSP removes the weights with the largest ``S = −θ ⊙ H g``, whose removal
    reduces the gradient norm ``‖g‖²`` the least (or increases it); keeping the
    largest ``θ ⊙ H g`` is the same selection. ``g = dL`` is averaged over the
    batches first; then ``H g = (1/n) Σ_b ∂⟨g, ∂L_b/∂θ⟩/∂θ`` by double backward
    through ``odeint`` on a copy of the model (the adjoint has no second derivative).

    References: Picking Winning Tickets Before Training by Preserving Gradient
    Flow, Wang et al. 2020.
    """
    twin = _direct_backprop(model)
    weights = _scored(twin, settings)
    names, params = list(weights), list(weights.values())
    g = objective_gradients(twin, batches, weights, ("nll",), loss)["nll"]
    hg = [torch.zeros_like(p) for p in params]
    twin.train()
    for x in batches:
        grads = torch.autograd.grad(objective_value("nll", twin, x, twin.trace(x), loss), params, create_graph=True)
        inner = sum((g[n] * gr).sum() for n, gr in zip(names, grads))
        for acc, h in zip(hg, torch.autograd.grad(inner, params, allow_unused=True)):
            if h is not None:
                acc.add_(h)
    return {n: p.detach() * h / len(batches) for n, p, h in zip(names, params, hg)}


class _Linear(Activation):
    """The identity with unit slope: SynFlow's linearization of a nonlinearity."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, torch.ones_like(x)


def _linearized(model: Flow) -> Flow:
    """A float64 copy of ``model`` with every parameter replaced by ``|θ|`` and
    every nonlinearity by the identity."""
    twin = copy.deepcopy(model).double()
    for module in list(twin.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Activation):
                setattr(module, name, _Linear())
    with torch.no_grad():
        for p in twin.parameters():
            p.abs_()
    return twin


def synflow_flow(twin: Flow) -> Tensor:
    """``R_sf``: the summed output of every block's field at ``t = 0`` on an all-ones input."""
    ref = next(twin.parameters())
    t = torch.zeros((), dtype=ref.dtype, device=ref.device)
    return sum(  # each field on its own shape (multiscale image flows differ per block)
        block.field(t, torch.ones((1, *block.field.event_shape), dtype=ref.dtype, device=ref.device))[0].sum()
        for block in twin.blocks
    )


def synflow_scores(
    model: Flow, batches: Sequence[Tensor], settings: PruningConfig, seed: int, *, loss: Loss | None = None
) -> Scores:
    """Iterative SynFlow: ``|θ ⊙ ∂R_sf/∂θ|`` on the linearized field, no data.

    The field is copied with ``|θ|`` for every parameter and the identity for
    every nonlinearity, and ``R_sf = 1ᵀ f(t=0, 1)`` (summed over blocks) is the
    "synaptic flow" through it. Over ``k = 1..n`` rounds (``n =
    settings.synflow_iterations``) the copy is pruned to the sparsity
    ``1 − (1 − s)^{k/n}`` by these scores, recomputed each round, so that no layer
    is cut off early (layer collapse). The weights the rounds pruned score
    ``-inf`` and the kept ones their last-round score, so keeping the top ``1 − s``
    reproduces the iterative mask. ``batches`` are ignored.

    The field, not the ODE solve, is evaluated: SynFlow's conservation argument
    needs a network that is positively homogeneous in each layer's weights, which
    the linearized field is and the solution map ``exp(T A)`` of a linear field is
    not; the field's path norm also bounds its Lipschitz constant, which is what
    governs the solver's work. Evaluating it is one forward pass, not a solve.

    References: Pruning neural networks without any data by iteratively
    conserving synaptic flow, Tanaka et al. 2020.
    """
    twin = _linearized(model)
    weights = _scored(twin, settings)
    sparsity, rounds = settings.sparsity, settings.synflow_iterations
    pruned = {n: mask_buffer(twin, n) == 0 for n in weights}
    scores: Scores = {}
    for k in range(1, rounds + 1):
        grads = torch.autograd.grad(synflow_flow(twin), list(weights.values()))
        scores = {
            n: (p.detach() * g).abs().masked_fill(pruned[n], -torch.inf)
            for (n, p), g in zip(weights.items(), grads)
        }
        keep = select_top(scores, 1.0 - (1.0 - sparsity) ** (k / rounds), settings.scope)
        apply_masks(twin, keep)
        pruned = {n: ~m for n, m in keep.items()}
    return {
        n: scores[n].masked_fill(pruned[n], -torch.inf).to(dtype=p.dtype, device=p.device)
        for n, p in _scored(model, settings).items()
    }


SCORERS: dict[str, Scorer] = {
    "random": random_scores,
    "magnitude": magnitude_scores,
    "snip": snip_scores,
    "grasp": grasp_scores,
    "synflow": synflow_scores,
    "jacobian_spectrum": jacobian_spectrum_scores,
    "jacobian_spectrum_abs": jacobian_spectrum_abs_scores,
    "jacobian_spectrum_snip": jacobian_spectrum_snip_scores,
}


def get_scorer(method: str) -> Scorer:
    """The scorer registered as ``method``."""
    try:
        return SCORERS[method]
    except KeyError:
        raise ConfigError(
            f"unknown pruning.method {method!r}; valid: none, {', '.join(SCORERS)}"
        ) from None
