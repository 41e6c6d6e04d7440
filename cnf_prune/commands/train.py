"""Train a continuous normalizing flow (optionally pruned or gated).

    python train.py CONFIG --out RUN_DIR [--set KEY=VALUE ...] [--resume]

Writes TensorBoard events, ``config.yaml``, ``checkpoint.pt`` (latest) and
``best.pt`` (best validation NLL) under RUN_DIR. ``--resume`` continues from
``RUN_DIR/checkpoint.pt`` exactly where it stopped (same batches, same noise).
One run at a time holds RUN_DIR (a second one stops with exit code 7).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Iterator

import torch

from cnf.errors import CheckpointError, ConfigError, UserError
from cnf.toy import TOY_DATASETS
from cnf_prune import allocator, distributed
from cnf_prune.checkpoint import load_checkpoint
from cnf_prune.config import Config, load_config
from cnf_prune.rundir import locked_run_directory
from cnf_prune.trainer import Trainer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. --set solver.rtol=1e-4 train.lr=5e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)  # every name checked here, before any work
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return train(config, Path(args.out), resume=args.resume)


def train(config: Config, out: Path, *, resume: bool = False) -> int:
    """Train ``config`` into the run directory ``out``; the exit code (a
    :class:`UserError` becomes one ``error:`` line on stderr and its code)."""
    try:
        with distributed.session(config.train.device) as ctx, threads_for(config, ctx):
            return run(config, out, ctx, resume=resume)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def run(config: Config, out: Path, ctx: distributed.Context, *, resume: bool) -> int:
    """Train ``config`` into ``out`` (rank 0 locks it; every rank reads the checkpoint
    to resume from); the exit code."""
    distributed.check_batch_size(config.train.batch_size, ctx)
    lock = locked_run_directory(out) if ctx.main else contextlib.nullcontext(out)
    with lock:
        if ctx.main:
            check_run_directory(out, resume)
        saved = load_checkpoint(out / "checkpoint.pt") if resume else None
        trainer = Trainer(config, out, ctx, saved)
        return trainer.run()


def check_run_directory(out: Path, resume: bool) -> None:
    if resume and not (out / "checkpoint.pt").is_file():
        raise CheckpointError(f"--resume: there is no {out / 'checkpoint.pt'} to resume from")
    if not resume and (out / "checkpoint.pt").is_file():
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")


@contextlib.contextmanager
def threads_for(config: Config, ctx: distributed.Context) -> Iterator[int]:
    """Use ``train.threads`` torch CPU threads for the duration (null: 1 for 2-D toy
    data, measured fastest there; torch's default otherwise), said once; on a CPU,
    as ``train.keep_freed_memory`` says (default: for image data), also keep freed
    memory for reuse (:mod:`cnf_prune.allocator`)."""
    before = torch.get_num_threads()
    threads = config.train.threads or (1 if config.data.name in TOY_DATASETS else before)
    if ctx.device.type == "cpu":
        kept = allocator.enabled_for(config) and allocator.keep_freed_memory()
        if ctx.main:
            source = "train.threads" if config.train.threads else "the default for this data; set train.threads to change"
            print(f"threads: {threads} ({source})" + ("; freed memory kept for reuse (glibc malloc)" if kept else ""))
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    sys.exit(main())
