"""Weight masks: which weights are prunable, top-k selection, applying masks.

Masks live in the model as ``<weight>_mask`` buffers from construction (see
:mod:`cnf.layers`); this module only fills them. Everything is keyed by the full
parameter name, e.g. ``blocks.0.field.layers.1.weight``.
"""

from __future__ import annotations

from fnmatch import fnmatch
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from cnf.errors import ConfigError
from cnf.flow import Flow


def prunable_weights(model: Flow, patterns: Sequence[str] = ("*",)) -> dict[str, nn.Parameter]:
    """Prunable weights whose full name matches any fnmatch ``pattern``.

    By default only the data weights of the field layers are prunable; biases and
    the small time-conditioning parameters stay dense. A pattern that matches no
    prunable weight is an error.
    """
    every = {
        f"blocks.{k}.field.{name}": p
        for k, block in enumerate(model.blocks)
        for name, p in block.field.prunable_weights().items()
    }
    for pattern in patterns:
        if not any(fnmatch(name, pattern) for name in every):
            raise ConfigError(
                f"pruning.layers pattern {pattern!r} matches no prunable weight; "
                f"prunable: {', '.join(every)}"
            )
    return {n: p for n, p in every.items() if any(fnmatch(n, pat) for pat in patterns)}


def mask_buffer(model: nn.Module, name: str) -> Tensor:
    """The mask buffer of the prunable weight ``name``."""
    return model.get_buffer(f"{name}_mask")


def select_top(scores: Mapping[str, Tensor], sparsity: float, scope: str = "global") -> dict[str, Tensor]:
    """Boolean keep-masks holding the largest scores.

    ``global``: one threshold over all weights, keeping ``round((1 - sparsity) N)``
    of the ``N`` scored weights; ``layer``: the same fraction within each weight.
    Ties are broken by position (earlier entries are kept), so the count is exact.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1) (got {sparsity})")
    if scope == "layer":
        return {n: _top_fraction(s.flatten(), 1.0 - sparsity).view_as(s) for n, s in scores.items()}
    if scope != "global":
        raise ConfigError(f"pruning scope must be 'global' or 'layer' (got {scope!r})")
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = _top_fraction(flat, 1.0 - sparsity)
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start : start + s.numel()].view_as(s)
        start += s.numel()
    return out


def _top_fraction(flat: Tensor, fraction: float) -> Tensor:
    k = int(round(fraction * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        # A stable sort keeps tied entries in order; no cast, so float64 scores
        # (SynFlow's) keep their full precision and range.
        keep[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    return keep


@torch.no_grad()
def apply_masks(model: nn.Module, keep: Mapping[str, Tensor]) -> None:
    """Write keep-masks into the mask buffers and zero the pruned weights.

    Zeroing the weights as well as masking them keeps them exactly zero under
    Adam with weight decay: their gradient is zero, so the moments stay zero.
    """
    for name, mask in keep.items():
        buf = mask_buffer(model, name)
        buf.copy_(mask.to(buf))
        model.get_parameter(name).mul_(buf)


def sparsity_table(model: Flow) -> str:
    """Per-weight table of pruned fractions, as printed once at the start of training."""
    rows = [("weight", "shape", "kept", "sparsity")]
    total = kept = 0
    for name, p in prunable_weights(model).items():
        m = mask_buffer(model, name)
        n, k = m.numel(), int(m.sum())
        total, kept = total + n, kept + k
        rows.append((name, "x".join(map(str, p.shape)), f"{k}/{n}", f"{1 - k / n:.3f}"))
    rows.append(("total", "", f"{kept}/{total}", f"{1 - kept / max(total, 1):.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
