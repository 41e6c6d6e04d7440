"""What training logs about sparsity and adds as sparsity penalties."""

from __future__ import annotations

import torch
from torch import Tensor

from pruning.config import RegularizationConfig
from cnf.flow import Flow
from pruning.gates import expected_l0
from pruning.pathreg import path_sparsity, pathreg, weight_path_norm


def sparsity_scalars(model: Flow) -> dict[str, float]:
    """``sparsity/weights``: fraction of prunable weights that are zero in the
    effective (masked, and for gated models eval-mode gated) weights; plus one
    ``sparsity/layer/<name>`` per prunable weight; ``sparsity/paths``: fraction of
    input->output pairs joined by no path of non-zero effective weights (for a
    gated model, the zero entries of the eval-time gate adjacency), logged when
    every field's weights chain input->output."""
    total = zeros = 0
    out: dict[str, float] = {}
    for name, weight in effective_weights(model).items():
        n, z = weight.numel(), int((weight == 0).sum())
        total, zeros = total + n, zeros + z
        out[f"sparsity/layer/{name}"] = z / n
    out["sparsity/weights"] = zeros / max(total, 1)
    paths = path_sparsity(model)
    if paths is not None:
        out["sparsity/paths"] = paths
    return out


def effective_weights(model: Flow) -> dict[str, Tensor]:
    """Effective weights keyed by full parameter name, gates in eval mode."""
    out = {}
    for k, block in enumerate(model.blocks):
        was = block.training
        block.eval()
        with torch.no_grad():
            for name, w in block.solve_weights().items():
                out[f"blocks.{k}.field.{name}"] = w
        block.train(was)
    return out


def regularization_terms(model: Flow, config: RegularizationConfig) -> dict[str, Tensor]:
    """Sparsity penalties with a non-zero weight in ``config``, unweighted.

    ``l0``: expected number of open gates; ``pathreg``: expected number of open
    input->output paths ``‖G_{L+1}···G_1‖_{1,1}``; ``path_weights``: the weight path
    norm ``‖|W_{L+1}|···|W_1|‖_{1,1}``; each summed over blocks (see
    :mod:`pruning.gates` and :mod:`pruning.pathreg`).
    """
    terms: dict[str, Tensor] = {}
    if config.l0 > 0:
        terms["l0"] = expected_l0(model)
    if config.pathreg > 0:
        terms["pathreg"] = pathreg(model)
    if config.path_weights > 0:
        terms["path_weights"] = weight_path_norm(model)
    return terms
