"""Benchmark: FFJORD's default toy configuration, seconds per training iteration.

    python bench/bench_toy.py [--iterations 1000] [--config configs/toy.yaml] [--set KEY=VALUE ...]

Trains ``configs/toy.yaml`` (checkerboard, 64-64-64 concatsquash tanh MLP, T=0.5
trainable, dopri5 rtol=atol=1e-5 with the adjoint, exact divergence, batch 100,
Adam 1e-3, weight decay 1e-5) and prints, per window of iterations, the seconds
per iteration, mean forward/backward NFE, and finally the validation NLL.
For the comparison with FFJORD's own train_toy.py, side by side on one machine, use
bench/vs_ffjord.py (results in bench/results/).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import training_setup, training_step  # noqa: E402  (train.py's model and step)
from cnf_prune.config import load_config  # noqa: E402
from cnf_prune.commands import report_user_errors  # noqa: E402
from cnf.errors import ConfigError  # noqa: E402
from cnf_prune.evaluate import evaluate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/toy.yaml")
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--window", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return report_user_errors(bench, args)


def bench(args: argparse.Namespace) -> int:
    if args.iterations < 1 or args.window < 1:
        raise ConfigError("--iterations and --window must be positive")
    config = load_config(args.config, args.overrides)
    data, model, opt, ema = training_setup(config, torch.device("cpu"))
    print(f"config {args.config} {' '.join(args.overrides)}; torch threads {torch.get_num_threads()}")
    print(f"{'iters':>11} {'s/iter':>8} {'NFE fwd':>8} {'NFE bwd':>8} {'ms/NFE':>7} {'train NLL':>9}")
    total_time = total_nfe_f = total_nfe_b = 0.0
    win = dict(time=0.0, f=0, b=0, nll=0.0, n=0)
    for it in range(1, args.iterations + 1):
        x = data.train_batch(config.train.batch_size)
        start = time.perf_counter()
        nll, trace = training_step(model, data, opt, ema, config, x, it - 1)
        elapsed = time.perf_counter() - start
        win["time"] += elapsed
        win["f"] += trace.nfe_forward
        win["b"] += trace.nfe_backward
        win["nll"] += nll.item()
        win["n"] += 1
        total_time += elapsed
        total_nfe_f += trace.nfe_forward
        total_nfe_b += trace.nfe_backward
        if it % args.window == 0 or it == args.iterations:
            n = win["n"]
            ms_per_nfe = 1e3 * win["time"] / (win["f"] + win["b"])
            print(f"{it - n + 1:>5}-{it:<5} {win['time'] / n:8.4f} {win['f'] / n:8.1f} {win['b'] / n:8.1f} "
                  f"{ms_per_nfe:7.2f} {win['nll'] / n:9.3f}", flush=True)
            win = dict(time=0.0, f=0, b=0, nll=0.0, n=0)
    with ema.applied(model) if ema is not None else contextlib.nullcontext():
        val = evaluate(model, data.val, batch_size=config.train.val_batch_size)
    n = args.iterations
    print(f"mean over {n} iterations: {total_time / n:.4f} s/iter, NFE {total_nfe_f / n:.1f} fwd / "
          f"{total_nfe_b / n:.1f} bwd; val NLL {val.nll:.3f} (test-solver NFE {val.nfe:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
