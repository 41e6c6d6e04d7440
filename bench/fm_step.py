"""Benchmark: one flow-matching training step in float32 and in bfloat16 (train.fm_precision),
eager and compiled (train.compile).

    .venv/bin/python bench/fm_step.py [CONFIG] [--steps 10] [--warmup 3] [--rounds 2] [--compile]
        [--set KEY=VALUE ...]

Builds the config's model as ``train.py`` does (default ``configs/mnist_fm_cpu.yaml``;
its data set must be under ``data.root``, see the README) and times the regression
step on preprocessed training batches (dequantized and logit-transformed images), backward pass and Adam update at ``train.batch_size`` with each
precision, alternating between them for ``--rounds`` rounds (the same model state,
base draws and times each round), so that both see the same machine load. Prints the
seconds per step of each precision, their ratio and the loss of the first batch.
With ``--compile`` it then compiles the fields in place (as ``train.compile: true``
does) and times both precisions again, printing the first (compiling) step's time
separately and the number of steps after which compiling has paid for itself.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnf_prune.build import build_model  # noqa: E402
from cnf_prune.commands import report_user_errors  # noqa: E402
from cnf_prune.config import load_config  # noqa: E402
from cnf_prune.objectives import FlowMatching, make_objective  # noqa: E402
from cnf_prune.setup import compile_fields  # noqa: E402
from cnf.data import make_data  # noqa: E402
from cnf.errors import ConfigError  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


def time_steps(model, state, objective: FlowMatching, batches, lr: float, warmup: int) -> tuple[float, float]:
    """Seconds per step after ``warmup`` steps, and the first batch's loss, from ``state``."""
    model.load_state_dict(state)
    optimizer = torch.optim.Adam(model.parameters(), lr)
    seconds, first = [], None
    for i, x in enumerate(batches):
        start = time.perf_counter()
        loss = objective.regression_loss(model, x, torch.Generator().manual_seed(i))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
        first = float(loss.detach()) if first is None else first
    return sum(seconds) / len(seconds), first


def objective_for(config, precision: str) -> FlowMatching:
    """The config's flow-matching objective at ``precision``, as the trainer builds it."""
    return make_objective(dataclasses.replace(config.train, fm_precision=precision), config.regularization)


def run(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        raise ConfigError("--steps and --rounds must be positive and --warmup at least 0")
    config = load_config(args.config, [*args.overrides, "train.objective=flow_matching"])
    torch.manual_seed(config.seed)
    data = make_data(config.data, config.seed)
    model = build_model(config, data.event_shape)
    state = copy.deepcopy(model.state_dict())
    batches = [data.preprocess(data.train_batch(config.train.batch_size))[0]
               for _ in range(args.warmup + args.steps)]
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; {args.config}, "
          f"batch {config.train.batch_size}, {args.steps} steps after {args.warmup} warm-up, {args.rounds} rounds")
    results: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for round_ in range(args.rounds):
        for precision in PRECISIONS:
            objective = objective_for(config, precision)
            seconds, loss = time_steps(model, state, objective, batches, config.train.lr, args.warmup)
            results[precision].append(seconds)
            print(f"round {round_}: {precision:9s} {seconds:.3f} s/step (first batch loss {loss:.3f})", flush=True)
    best = {p: min(v) for p, v in results.items()}
    print(f"best of {args.rounds}: float32 {best['float32']:.3f} s/step, bfloat16 {best['bfloat16']:.3f} s/step, "
          f"bfloat16/float32 {best['bfloat16'] / best['float32']:.2f}x")
    if args.compile:
        compile_fields(model)
        for precision in PRECISIONS:
            objective = objective_for(config, precision)
            start = time.perf_counter()
            time_steps(model, state, objective, batches[:1], config.train.lr, 0)
            first = time.perf_counter() - start
            seconds, _ = time_steps(model, state, objective, batches, config.train.lr, args.warmup)
            saved = best[precision] - seconds
            even = f"{(first - seconds) / saved:.0f} steps" if saved > 0 else "never"
            print(f"compiled {precision:9s} {seconds:.3f} s/step ({best[precision] / seconds:.2f}x eager); "
                  f"first step with compilation {first:.1f} s; pays for itself after {even}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/mnist_fm_cpu.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time the compiled field")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    return report_user_errors(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
