"""Compaction: turn a unit-pruned model into a genuinely smaller dense one.

A hidden unit whose outgoing weights are all masked (column ``j`` of
``layers.{l+1}.weight_mask``, see :mod:`pruning.structured`) contributes exactly
zero to the field and to its Jacobian, whatever its incoming weights, bias and
time terms are. Compaction deletes every such unit: row ``j`` of the weight, mask,
bias and time parameters of ``layers.l`` and column ``j`` of the weight and mask
of ``layers.{l+1}``. The compacted model computes the same function as the masked
one (up to the summation order of the smaller matrix products) with fewer
rows, columns or channels, so each function evaluation costs less.

The widths may differ per block: :func:`compacted_state` returns them with the
smaller state dict, and the application records them in the config's
``model.block_hidden_dims`` to rebuild the smaller model (``cnf-compact`` writes
such a checkpoint). Gated models (L0, PathReg) must be hardened first
(:func:`pruning.export.harden_gates`).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from cnf.errors import ConfigError
from cnf.flow import Flow
from pruning.masks import mask_buffer
from pruning.structured import hidden_layers

_LAYER_KEY = re.compile(r"^blocks\.(\d+)\.field\.layers\.(\d+)\.(\w+)$")


def live_units(model: Flow) -> list[list[Tensor]]:
    """Per block, per hidden layer: which units have any unmasked outgoing weight.

    Raises:
        ConfigError: if a hidden layer has no live unit left.
    """
    per_block: list[list[Tensor]] = [[] for _ in model.blocks]
    for layer, (_, outgoing) in hidden_layers(model).items():
        mask = mask_buffer(model, outgoing)
        live = mask.abs().sum(dim=[d for d in range(mask.dim()) if d != 1]) > 0
        if not bool(live.any()):
            raise ConfigError(
                f"every unit of {layer} is pruned (its outgoing weights are all masked), so the field "
                "no longer depends on its input there; this model cannot be compacted; prune at a lower sparsity"
            )
        per_block[int(layer.split(".")[1])].append(live)
    return per_block


def _select(value: Tensor, dim: int, keep: Tensor | None) -> Tensor:
    if keep is None:
        return value
    return value.index_select(dim, keep.nonzero().squeeze(1).to(value.device))


@torch.no_grad()
def compacted_state(model: Flow) -> tuple[list[list[int]], dict[str, Tensor]]:
    """``(widths, state)``: per block the hidden widths without the pruned units of
    ``model``, and the state dict of the smaller model of those widths (which
    computes the same function). ``model`` is not changed.
    """
    if any(block.gates is not None for block in model.blocks):
        raise ConfigError("cannot compact a gated model; harden its gates first: cnf-export")
    if any(not hasattr(block.field, "layers") for block in model.blocks):
        raise ConfigError("compaction handles layered fields (MLP, concat conv); this model's field "
                          f"({type(model.blocks[0].field).__name__}) keeps its masked units, which cost "
                          "nothing in the output but are still computed")
    keep = live_units(model)
    widths = [[int(k.sum()) for k in block] for block in keep]
    state = {}
    for key, value in model.state_dict().items():
        match = _LAYER_KEY.match(key)
        if match:
            block, index, attr = int(match[1]), int(match[2]), match[3]
            rows = keep[block][index] if index < len(keep[block]) else None
            cols = keep[block][index - 1] if index > 0 else None
            if attr in ("weight", "weight_mask"):
                value = _select(_select(value, 0, rows), 1, cols)
            elif value.dim() > 0:  # bias and time terms: one entry (or kernel) per output
                value = _select(value, 0, rows)
        state[key] = value
    return widths, state


def field_cost(model: Flow) -> tuple[int, int]:
    """``(parameters, FLOPs)`` of evaluating every block's field once on one sample:
    the field parameters, and ``2 · in · out`` multiply-adds per linear layer
    (``2 · in · out · k² · H · W`` per convolution), counted dense, as computed."""
    params = flops = 0
    for block in model.blocks:
        params += sum(p.numel() for p in block.field.parameters())
        spatial = 1
        for size in block.field.event_shape[1:]:
            spatial *= size
        flops += sum(2 * layer.weight.numel() * spatial for layer in block.field.layers)
    return params, flops
