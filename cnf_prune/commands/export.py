"""Harden trained L0/PathReg gates into fixed pruning masks.

    cnf-export CHECKPOINT --out NEW_CHECKPOINT      (or python -m cnf_prune.commands.export)

Folds the eval-mode gates into the masks and weights (:func:`pruning.export.harden_gates`).
The new checkpoint's config has ``regularization.l0`` and ``regularization.pathreg``
set to 0, so ``build_model`` (and ``sample.py``) rebuild it without gates. It holds
the config, event shape and weights, not the optimizer state: it is for sampling
and benchmarking, not for ``--resume``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from cnf_prune.commands import derived_checkpoint_parser, report_user_errors
from cnf.errors import ConfigError
from cnf_prune.build import load_model
from cnf_prune.checkpoint import check_derived_output, derived_payload, save_derived_checkpoint
from cnf_prune.config import to_dict
from pruning.export import harden_gates, weight_sparsity
from pruning.pathreg import path_sparsity


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = derived_checkpoint_parser("cnf-export", __doc__, "regularization.l0 or pathreg > 0", "hardened")
    return parser.parse_args(argv)


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
    save_derived_checkpoint(derived_payload(ckpt, to_dict(plain), model.state_dict(), hardened_from=str(source)), out)
    kept, total = weight_sparsity(model)
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
