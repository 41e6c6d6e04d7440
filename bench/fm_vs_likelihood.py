"""Flow matching against likelihood training of the same toy CNF, at the same wall-clock budget.

    .venv/bin/python bench/fm_vs_likelihood.py [--seconds 300] [--data checkerboard 8gaussians]
        [--out runs/fm_vs_likelihood]

For each data set it trains ``configs/toy.yaml`` (maximum likelihood, FFJORD's
setting) and ``configs/toy_fm.yaml`` (flow matching, the same 64-64-64 concatsquash
field with a fixed T = 1) for ``--seconds`` of training each (``train.time_limit``),
one after the other, then samples 5000 points from each ``best.pt``. It prints per
run: steps taken, test NLL (nats, dopri5 at 1e-5, 5000 test points), the test
cumulative Jacobian norm R, the test NFE and the sampling NFE, with the date and
machine. Runs go one at a time, each with its default thread count.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"likelihood": "configs/toy.yaml", "flow matching": "configs/toy_fm.yaml"}


def last_scalar(run: Path, tag: str) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return events.Scalars(tag)[-1].value


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=300.0, help="training seconds per run (default 300)")
    p.add_argument("--data", nargs="+", default=["checkerboard", "8gaussians"])
    p.add_argument("--out", default="runs/fm_vs_likelihood")
    args = p.parse_args()
    out = ROOT / args.out
    print(f"# {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{__import__('os').cpu_count()} CPUs; {args.seconds:g} s of training per run")
    print("| data | objective | steps | test NLL | R (test) | test NFE | sampling NFE |")
    print("|---|---|---|---|---|---|---|")
    for data in args.data:
        for objective, config in CONFIGS.items():
            run = out / f"{data}_{objective.replace(' ', '_')}"
            cmd = [sys.executable, "train.py", config, "--out", str(run), "--set", f"data.name={data}",
                   "train.iterations=1000000", f"train.time_limit={args.seconds}", "train.val_every=500",
                   "train.checkpoint_every=500"]
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"| {data} | {objective} | failed: {done.stderr.strip().splitlines()[-1]} |||||")
                continue
            steps = re.search(r"done: (\d+) steps", done.stdout)[1]
            drawn = subprocess.run([sys.executable, "sample.py", str(run / "best.pt"), "--out", str(run / "s.npy"),
                                    "--n", "5000"], cwd=ROOT, capture_output=True, text=True, check=True)
            sampling_nfe = re.search(r"NFE (\d+) per batch", drawn.stdout)[1]
            print(f"| {data} | {objective} | {steps} | {last_scalar(run, 'test/nll'):.3f} | "
                  f"{last_scalar(run, 'test/jacobian_norm'):.2f} | {last_scalar(run, 'test/nfe'):.0f} | "
                  f"{sampling_nfe} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
