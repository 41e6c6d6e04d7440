"""Compaction: turn a unit-pruned model into a genuinely smaller dense one.

    python -m pruning.compact CHECKPOINT --out NEW_CHECKPOINT

A hidden unit whose outgoing weights are all masked (column ``j`` of
``layers.{l+1}.weight_mask``, see :mod:`pruning.structured`) contributes exactly
zero to the field and to its Jacobian, whatever its incoming weights, bias and
time terms are. Compaction deletes every such unit: row ``j`` of the weight, mask,
bias and time parameters of ``layers.l`` and column ``j`` of the weight and mask
of ``layers.{l+1}``. The compacted model computes the same function as the masked
one (up to the summation order of the smaller matrix products) with fewer
rows, columns or channels, so each function evaluation costs less.

The widths may differ per block, so the new config records them in
``model.block_hidden_dims`` and :func:`build.build_model` rebuilds the smaller
model from it. The checkpoint holds the config, event shape and weights, not the
optimizer state: it is for sampling and evaluation, not for ``--resume``.
Gated models (L0, PathReg) must be hardened first with ``python -m pruning.export``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import torch
from torch import Tensor

from build import build_model, load_model
from cnf.checkpoint import check_derived_output, save_derived_checkpoint
from cnf.config import Config, to_dict
from cnf.errors import ConfigError, report_user_errors
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
def compact(model: Flow, config: Config) -> tuple[Flow, Config]:
    """The smaller model without the pruned units of ``model``, and its config.

    ``config`` is the one ``model`` was built from. The new model has the device,
    dtype and train/eval mode of ``model``; ``model`` is not changed.
    """
    if any(block.gates is not None for block in model.blocks):
        raise ConfigError("cannot compact a gated model; harden its gates first: python -m pruning.export")
    keep = live_units(model)
    widths = [[int(k.sum()) for k in block] for block in keep]
    smaller = dataclasses.replace(config, model=dataclasses.replace(config.model, block_hidden_dims=widths))
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
    reference = next(model.parameters())
    new = build_model(smaller, model.event_shape).to(device=reference.device, dtype=reference.dtype)
    new.load_state_dict(state)
    return new.train(model.training), smaller


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pruning.compact", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="checkpoint.pt or best.pt of a run with pruning.granularity=unit")
    p.add_argument("--out", required=True, help="where to write the compacted checkpoint")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    source, out = Path(args.checkpoint), Path(args.out)
    check_derived_output(source, out, "masked model")
    model, config, ckpt = load_model(source)
    small, smaller = compact(model, config)
    save_derived_checkpoint(
        {
            "config": to_dict(smaller), "event_shape": list(ckpt["event_shape"]),
            "model": small.state_dict(), "step": ckpt.get("step"),
            "best_val": ckpt.get("best_val"), "compacted_from": str(source),
        },
        out,
    )
    (p0, f0), (p1, f1) = field_cost(model), field_cost(small)
    print(f"compacted: hidden widths {smaller.model.block_hidden_dims}; field parameters {p0} -> {p1}, "
          f"FLOPs per evaluation and sample {f0} -> {f1} -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return report_user_errors(run, args)


if __name__ == "__main__":
    sys.exit(main())
