"""Path penalties: PathReg on gate probabilities and the weight path norm.

A vector field's prunable weights ``W_1, ..., W_{L+1}`` (input to output, each
``(out, in)``) chain into input->output paths. For non-negative matrices
``M_l`` the entry ``(M_{L+1} ··· M_1)_{ij}`` is the sum, over all paths from
input ``j`` to output ``i``, of the product of the entries on the path, so

    ‖M_{L+1} ··· M_1‖_{1,1} = 1ᵀ M_{L+1} ··· M_1 1

is that sum over all paths, computed with matrix-vector products.

* PathReg: ``M_l = G_l``, the open probabilities ``q(z ≠ 0)`` of layer ``l``'s
  gates, so the norm is the expected number of open input->output paths.
* Weight path norm (C-NODE): ``M_l = |W_l|`` with the masked weights.

Pruned entries (``weight_mask == 0``) carry no path: both penalties use
``mask ⊙ G_l`` and ``mask ⊙ |W_l|``. Time conditioning is not a data feature:
the layers keep their time parameters apart from ``weight``, so a chain of
``weight``-shaped matrices has the data dimensions, and nothing else, at its
ends. Convolution weights ``(out, in, k, k)`` are summed over their kernel
entries to ``(out, in)`` channel matrices, which chain the same way (a path
then also picks one kernel entry per layer). A flow's penalty is the sum over
its blocks.

References: Aliee et al. 2022, "Sparsity in Continuous-Depth Neural Networks"
(PathReg, eqs. 9-12); Aliee et al. 2021, C-NODE (the weight path norm).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from cnf.errors import ConfigError
from cnf.flow import Flow
from cnf.odeblock import CNFBlock
from pruning.gates import HardConcreteGates, flow_gates
from pruning.masks import mask_buffer


def channel_matrix(weight: Tensor) -> Tensor:
    """``(out, in, *kernel) -> (out, in)`` by summing the kernel entries."""
    if weight.dim() < 2:
        raise ConfigError(f"a path needs weights with at least 2 dims (got shape {tuple(weight.shape)})")
    return weight.reshape(weight.shape[0], weight.shape[1], -1).sum(-1)


def is_chain(weights: Sequence[Tensor]) -> bool:
    """Whether each weight's input size is the previous weight's output size."""
    return len(weights) > 0 and all(w.dim() >= 2 for w in weights) and all(
        b.shape[1] == a.shape[0] for a, b in zip(weights[:-1], weights[1:])
    )


def _check_chain(weights: Sequence[Tensor]) -> list[Tensor]:
    if not is_chain(weights):
        shapes = ", ".join(str(tuple(w.shape)) for w in weights)
        raise ConfigError(
            f"path penalties need prunable weights that chain input->output; got shapes {shapes}"
        )
    return [channel_matrix(w) for w in weights]


def path_norm(matrices: Sequence[Tensor]) -> Tensor:
    """``‖M_{L+1} ··· M_1‖_{1,1}`` for non-negative ``matrices`` given input first.

    Each matrix is ``(out, in)`` (or a conv weight, summed over its kernel).
    """
    mats = _check_chain(matrices)
    v = mats[0].sum(1)
    for m in mats[1:]:
        v = m @ v
    return v.sum()


def reachability(weights: Sequence[Tensor]) -> Tensor:
    """Boolean ``(out, in)``: whether some path of non-zero entries joins input ``j`` to output ``i``.

    Entries of any sign count; a conv channel pair is joined if any kernel entry is non-zero.
    """
    mats = _check_chain([(w != 0).to(torch.float64) for w in weights])
    reach = mats[0] > 0
    for m in mats[1:]:
        reach = (m @ reach.to(m.dtype)) > 0
    return reach


def _masks(block: CNFBlock) -> dict[str, Tensor]:
    return {name: mask_buffer(block.field, name) for name in block.field.prunable_weights()}


def gate_path_norm(gates: HardConcreteGates, masks: dict[str, Tensor] | None = None) -> Tensor:
    """PathReg of one field, ``‖G_{L+1} ··· G_1‖_{1,1}``, with ``G_l = mask ⊙ q(z ≠ 0)``."""
    probs = gates.open_probabilities()
    if masks is not None:
        probs = {n: p * masks[n] for n, p in probs.items()}
    return path_norm(list(probs.values()))


def pathreg(model: Flow) -> Tensor:
    """``Σ_blocks ‖G_{L+1} ··· G_1‖_{1,1}``: the expected number of open paths (a scalar)."""
    gates = flow_gates(model)
    if not gates:
        raise ConfigError("PathReg needs a gated model; build the model with gates (regularization.l0 or pathreg > 0)")
    return sum(gate_path_norm(g, _masks(model.blocks[k])) for k, g in gates.items())


def weight_path_norm(model: Flow) -> Tensor:
    """``Σ_blocks ‖|W_{L+1}| ··· |W_1|‖_{1,1}`` over the masked weights (gates not applied)."""
    return sum(
        path_norm([w.abs() for w in block.field.masked_weights().values()])
        for block in model.blocks
    )


def eval_weights(block: CNFBlock) -> dict[str, Tensor]:
    """The block's effective weights in eval mode (masks times deterministic gates)."""
    was = block.training
    block.eval()
    try:
        with torch.no_grad():
            return block.solve_weights()
    finally:
        block.train(was)


def path_sparsity(model: Flow) -> float | None:
    """Fraction of input->output pairs with no path of non-zero eval-mode weights.

    For a gated flow without pruning masks this is the fraction of zero entries
    of the eval-time gate adjacency ``G_{L+1} ··· G_1`` (a weight entry is zero
    exactly when its gate is); masks count as closed entries. Pooled over blocks.
    ``None`` when some block's weights do not chain input->output.
    """
    zeros = total = 0
    for block in model.blocks:
        weights = list(eval_weights(block).values())
        if not is_chain(weights):
            return None
        reach = reachability(weights)
        zeros += int((~reach).sum())
        total += reach.numel()
    return zeros / max(total, 1)
