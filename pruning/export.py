"""Harden trained L0/PathReg gates into fixed pruning masks.

    python -m pruning.export CHECKPOINT --out NEW_CHECKPOINT

The eval-mode gates ``g = min(1, max(0, sigmoid(log α)(ζ − γ) + γ))`` become
part of the model: entries with ``g = 0`` are written into the weight masks and
the gate values are folded into the weights (``W <- W ⊙ g``), then the gates
are removed. The result is a plain masked model whose effective weights equal
the eval-mode gated weights exactly, so it samples and evaluates like any pruned
model. The new checkpoint's config has ``regularization.l0`` and
``regularization.pathreg`` set to 0, so ``build_model`` (and ``sample.py``)
rebuild it without gates. It holds the config, event shape and weights, not the
optimizer state: it is for sampling and benchmarking, not for ``--resume``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from build import load_model
from cnf.checkpoint import check_derived_output, save_derived_checkpoint
from cnf.config import to_dict
from cnf.errors import ConfigError, report_user_errors
from cnf.flow import Flow
from pruning.gates import HardConcreteGates
from pruning.masks import mask_buffer
from pruning.pathreg import path_sparsity


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pruning.export", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="checkpoint.pt or best.pt of a run with regularization.l0 or pathreg > 0")
    p.add_argument("--out", required=True, help="where to write the hardened checkpoint")
    return p.parse_args(argv)


def export(args: argparse.Namespace) -> int:
    source, out = Path(args.checkpoint), Path(args.out)
    check_derived_output(source, out, "gated model")
    model, config, ckpt = load_model(source)
    if not config.regularization.gated:
        raise ConfigError(
            f"checkpoint {str(source)!r} has no gates (regularization.l0 and pathreg are 0); "
            "it is already a plain masked model"
        )
    harden_gates(model)
    plain = dataclasses.replace(
        config, regularization=dataclasses.replace(config.regularization, l0=0.0, pathreg=0.0)
    )
    save_derived_checkpoint(
        {
            "config": to_dict(plain), "event_shape": list(ckpt["event_shape"]),
            "model": model.state_dict(), "step": ckpt.get("step"),
            "best_val": ckpt.get("best_val"), "hardened_from": str(source),
        },
        out,
    )
    kept = total = 0
    for block in model.blocks:
        for name in block.field.prunable_weights():
            mask = mask_buffer(block.field, name)
            kept, total = kept + int(mask.sum()), total + mask.numel()
    paths = path_sparsity(model)
    path_text = "" if paths is None else f", path sparsity {paths:.3f}"
    print(f"hardened gates: weight sparsity {1 - kept / max(total, 1):.3f} "
          f"({kept}/{total} kept){path_text} -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return report_user_errors(export, args)


if __name__ == "__main__":
    sys.exit(main())
