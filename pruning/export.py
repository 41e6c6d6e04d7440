"""Harden trained L0/PathReg gates into fixed pruning masks.

The eval-mode gates ``g = min(1, max(0, sigmoid(log α)(ζ − γ) + γ))`` become
part of the model: entries with ``g = 0`` are written into the weight masks and
the gate values are folded into the weights (``W <- W ⊙ g``), then the gates
are removed. The result is a plain masked model whose effective weights equal
the eval-mode gated weights exactly, so it samples and evaluates like any pruned
model. ``cnf-export`` (:mod:`cnf_prune.commands.export`) applies it to a checkpoint.
"""

from __future__ import annotations

import torch

from cnf.errors import ConfigError
from cnf.flow import Flow
from pruning.gates import HardConcreteGates
from pruning.masks import mask_buffer


@torch.no_grad()
def harden_gates(model: Flow) -> Flow:
    """Fold every block's eval-mode gates into its masks and weights, in place.

    Afterwards ``block.gates`` is ``None`` and, for every prunable weight,
    ``mask <- mask ⊙ [g > 0]`` and ``weight <- weight ⊙ g``. Returns ``model``.
    """
    for block in model.blocks:
        gates = block.gates
        if gates is None:
            continue
        if not isinstance(gates, HardConcreteGates):
            raise ConfigError(f"cannot harden gates of type {type(gates).__name__}")
        for name, g in gates.deterministic().items():
            mask = mask_buffer(block.field, name)
            mask.mul_((g > 0).to(mask))
            block.field.get_parameter(name).mul_(g)
        block.gates = None
    return model


def weight_sparsity(model: Flow) -> tuple[int, int]:
    """``(kept, total)``: unmasked and all prunable weights over every block's field."""
    kept = total = 0
    for block in model.blocks:
        for name in block.field.prunable_weights():
            mask = mask_buffer(block.field, name)
            kept, total = kept + int(mask.sum()), total + mask.numel()
    return kept, total
