"""What training logs about sparsity and adds as sparsity penalties."""

from __future__ import annotations

import torch
from torch import Tensor

from cnf.config import RegularizationConfig
from cnf.flow import Flow


def sparsity_scalars(model: Flow) -> dict[str, float]:
    """``sparsity/weights``: fraction of prunable weights that are zero in the
    effective (masked, and for gated models eval-mode gated) weights; plus one
    ``sparsity/layer/<name>`` per prunable weight."""
    total = zeros = 0
    out: dict[str, float] = {}
    for name, weight in effective_weights(model).items():
        n, z = weight.numel(), int((weight == 0).sum())
        total, zeros = total + n, zeros + z
        out[f"sparsity/layer/{name}"] = z / n
    out["sparsity/weights"] = zeros / max(total, 1)
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
    """Sparsity penalties with a non-zero weight in ``config``, unweighted."""
    return {}
