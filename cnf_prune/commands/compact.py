"""Compaction: turn a unit-pruned checkpoint into a genuinely smaller dense one.

    cnf-compact CHECKPOINT --out NEW_CHECKPOINT      (or python -m cnf_prune.commands.compact)

The compacted model computes the same function as the masked one with fewer
rows, columns or channels (see :mod:`pruning.compact`); its config records the
new widths in ``model.block_hidden_dims``. The checkpoint holds the config, event
shape and weights, not the optimizer state: it is for sampling and evaluation,
not for ``--resume``. Gated models (L0, PathReg) must be hardened first with
``cnf-export``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cnf_prune.commands import derived_checkpoint_parser, report_user_errors
from cnf_prune.build import compact_model, load_model
from cnf_prune.checkpoint import check_derived_output, derived_payload, save_derived_checkpoint
from cnf_prune.config import to_dict
from pruning.compact import field_cost


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return derived_checkpoint_parser("cnf-compact", __doc__, "pruning.granularity=unit", "compacted").parse_args(argv)


def run(args: argparse.Namespace) -> int:
    source, out = Path(args.checkpoint), Path(args.out)
    check_derived_output(source, out, "masked model")
    model, config, ckpt = load_model(source)
    small, smaller = compact_model(model, config)
    save_derived_checkpoint(derived_payload(ckpt, to_dict(smaller), small.state_dict(), compacted_from=str(source)), out)
    (p0, f0), (p1, f1) = field_cost(model), field_cost(small)
    print(f"compacted: hidden widths {smaller.model.block_hidden_dims}; field parameters {p0} -> {p1}, "
          f"FLOPs per evaluation and sample {f0} -> {f1} -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return report_user_errors(run, args)


if __name__ == "__main__":
    sys.exit(main())
