"""Sampling throughput against the batch size, for choosing sample.py's defaults.

    .venv/bin/python bench/sample_batch.py CHECKPOINT [CHECKPOINT ...] [--n 10000]
        [--batch-sizes 100 500 1000 5000 10000]

For each checkpoint and batch size it draws ``--n`` samples as ``sample.py`` does
(test solver, samples only, batch-independent noise) and prints samples per
second, the NFE per batch and the peak resident memory of the process so far,
with the date and machine. Each batch size runs once after one warm-up batch.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnf_prune.build import load_model  # noqa: E402
from cnf_prune.sampling import SampleNoise  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 500, 1000, 5000, 10000])
    args = p.parse_args()
    print(f"# {datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads")
    print("| checkpoint | batch | samples/s | NFE per batch | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for path in args.checkpoints:
        model = load_model(path)[0].eval()
        noise = SampleNoise(model, 0, 1.0)
        with torch.no_grad():
            model.trace(noise.draw(0, min(args.batch_sizes)), reverse=True, density=False)  # warm-up
            for batch in args.batch_sizes:
                start, done, nfe, solves = time.perf_counter(), 0, 0, 0
                while done < args.n:
                    count = min(batch, args.n - done)
                    nfe += model.trace(noise.draw(done, count), reverse=True, density=False).nfe_forward
                    done, solves = done + count, solves + 1
                rate = args.n / (time.perf_counter() - start)
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                print(f"| {path} | {batch} | {rate:.0f} | {nfe / solves:.0f} | {peak:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
