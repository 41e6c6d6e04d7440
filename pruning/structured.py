"""Structured (unit-level) pruning: whole hidden units of MLP fields, whole
channels of convolutional fields.

A *unit* is output ``j`` of a hidden layer ``l`` of a block's field: row ``j`` of
``layers.l.weight`` (its incoming weights; for a convolution the kernel slice
``[j, :, :, :]``) together with column ``j`` of ``layers.{l+1}.weight`` (its
outgoing weights, ``[:, j, :, :]``). The field's first input and last output have
the data's size and are never removed.

Unit scores aggregate the weight scores of any pruning-at-initialization method
(:mod:`pruning.scores`) by summation over the unit's incoming and outgoing
weights, keeping signs:

    S_j = Σ_i s(l)_{j i}  +  Σ_k s(l+1)_{k j}     (kernel positions summed as well)

For ``jacobian_spectrum`` (``s = dR ⊙ dL``) this is ``Σ dR_i dL_i`` over the unit's
weights: ``−1/η`` times the first-order change of R when a gradient step of size
``η`` moves only those weights. A weight left out by ``pruning.layers`` contributes nothing, and so does
one scored ``-inf`` (SynFlow's iteratively pruned weights). The units
with the largest ``S_j`` are kept: ``sparsity`` is the fraction of hidden units
removed, over all scored hidden layers (``global``) or within each (``layer``).
A sum runs over ``fan_in + fan_out`` weights, so under ``global`` the units of
wider neighbourhoods score higher for scores of one sign (random, magnitude, SNIP)
and a narrow layer can lose every unit, which is an error: ``layer`` avoids it.

A pruned unit has both its incoming row and its outgoing column masked. Masking
the outgoing column is what makes the masked model *equal* to the model without
the unit: with the row alone, the unit would still emit the constant
``σ(b + time terms)`` into the next layer. :mod:`pruning.compact` then removes such
units for real.
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor

from cnf.errors import ConfigError
from cnf.flow import Flow
from pruning.masks import mask_buffer, select_top


def hidden_layers(model: Flow) -> dict[str, tuple[str, str]]:
    """Every hidden layer of every block's field: ``{layer name: (incoming weight,
    outgoing weight)}``, e.g. ``blocks.0.field.layers.1 -> (blocks.0.field.layers.1.weight,
    blocks.0.field.layers.2.weight)``."""
    out = {}
    for k, block in enumerate(model.blocks):
        units = getattr(block.field, "hidden_units", None)
        if units is not None:  # a field that names its own hidden units (the U-Net)
            for name, (incoming, outgoing) in units().items():
                out[f"blocks.{k}.field.{name}"] = (f"blocks.{k}.field.{incoming}", f"blocks.{k}.field.{outgoing}")
            continue
        prefix = f"blocks.{k}.field.layers"
        for i in range(len(block.field.layers) - 1):
            out[f"{prefix}.{i}"] = (f"{prefix}.{i}.weight", f"{prefix}.{i + 1}.weight")
    return out


def _sum_except(score: Tensor, dim: int) -> Tensor:
    finite = score.masked_fill(score == -float("inf"), 0.0)
    return finite.sum(dim=[d for d in range(score.dim()) if d != dim])


def unit_scores(model: Flow, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{layer name: (units,) scores}``: each unit's incoming plus outgoing weight
    scores (see the module docstring). Hidden layers neither of whose weights is
    scored are left out."""
    out = {}
    for layer, (incoming, outgoing) in hidden_layers(model).items():
        parts = []
        if incoming in scores:
            parts.append(_sum_except(scores[incoming], 0))
        if outgoing in scores:
            parts.append(_sum_except(scores[outgoing], 1))
        if parts:
            out[layer] = sum(parts)
    return out


def unit_weight_masks(model: Flow, keep_units: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Weight keep-masks removing the units not in ``keep_units`` (boolean per
    unit): the current mask with the unit's incoming row and outgoing column zeroed."""
    layers = hidden_layers(model)
    masks: dict[str, Tensor] = {}
    for layer, keep in keep_units.items():
        incoming, outgoing = layers[layer]
        for name, dim in ((incoming, 0), (outgoing, 1)):
            current = masks.get(name, mask_buffer(model, name) != 0)
            shape = [1] * current.dim()
            shape[dim] = -1
            masks[name] = current & keep.to(current.device).view(shape)
    return masks


def select_units(
    model: Flow, scores: Mapping[str, Tensor], sparsity: float, scope: str = "global"
) -> dict[str, Tensor]:
    """Boolean keep-masks for the prunable weights that remove the fraction
    ``sparsity`` of hidden units with the lowest unit scores.

    Raises:
        ConfigError: if a hidden layer would lose every unit (the field would no
            longer depend on its input there).
    """
    per_unit = unit_scores(model, scores)
    if not per_unit:
        raise ConfigError("pruning.granularity 'unit': pruning.layers selects no weight of a hidden layer")
    keep = select_top(per_unit, sparsity, scope)
    for layer, k in keep.items():
        if not bool(k.any()):
            raise ConfigError(
                f"unit pruning at sparsity {sparsity:g} ({scope}) removes all {k.numel()} units of {layer}, "
                "which would cut the field off from its input; lower pruning.sparsity or use pruning.scope=layer"
            )
    return unit_weight_masks(model, keep)


def unit_sparsity(model: Flow) -> float:
    """Fraction of hidden units whose outgoing weights are all masked (removable units)."""
    total = dead = 0
    for _, outgoing in hidden_layers(model).values():
        live = _sum_except(mask_buffer(model, outgoing).abs(), 1) > 0
        total, dead = total + live.numel(), dead + int((~live).sum())
    return dead / max(total, 1)
