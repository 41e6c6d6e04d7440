"""Benchmark: what unit pruning and compaction buy at sampling time.

    python bench/bench_structured.py [--config configs/toy.yaml] [--iterations 300]
        [--sparsities 0.5 0.75 0.9] [--methods random jacobian_spectrum] [--jobs 2]
        [--threads 1] [--out bench/structured_toy.md] [--set KEY=VALUE ...]

Trains a dense model and unit-pruned models (``pruning.granularity=unit``, one per
method and sparsity, ``pruning.scope=layer`` by default so that no layer loses all
its units) with ``train.py``, ``--jobs`` runs at a time on one thread each (a run
already in ``--runs`` is reused, so the measurement can be repeated alone). Then,
one model at a time on ``--threads`` threads, it measures on the final checkpoint:
test NLL (and bits/dim for images) and NFE per test solve; the field's parameters
and FLOPs per function evaluation (dense, as computed) of the masked and the
compacted model; the wall time of sampling one batch of ``--samples`` from the same
base noise with each (best of ``--repeats``), and the largest difference between
their samples. The table is printed and written as Markdown to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cnf.data import make_data  # noqa: E402
from cnf_prune.evaluate import evaluate  # noqa: E402
from cnf.flow import Flow  # noqa: E402
from cnf_prune.build import load_model  # noqa: E402
from cnf_prune.build import compact_model as compact  # noqa: E402
from cnf_prune.commands.train import train as train_config  # noqa: E402
from cnf_prune.config import load_config  # noqa: E402
from pruning.compact import field_cost  # noqa: E402


def variants(methods: list[str], sparsities: list[float], scope: str) -> dict[str, list[str]]:
    out = {"dense": []}
    for method in methods:
        for s in sparsities:
            out[f"{method} {s:g}"] = [
                f"pruning.method={method}", f"pruning.sparsity={s}", "pruning.granularity=unit",
                f"pruning.scope={scope}",
            ]
    return out


def train_logged(config, run: Path, log: Path) -> int:
    """Train in this (worker) process with its output in ``log``."""
    import contextlib

    with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return train_config(config, run)


def train(name: str, overrides: list[str], args: argparse.Namespace, runs: Path, pool: ProcessPoolExecutor) -> Path:
    run = runs / name.replace(" ", "_")
    if (run / "checkpoint.pt").is_file():  # trained by an earlier call with the same --runs
        return run / "checkpoint.pt"
    sets = [*args.overrides, f"train.iterations={args.iterations}", "train.threads=1", *overrides]
    log = runs / f"{run.name}.log"
    code = pool.submit(train_logged, load_config(args.config, sets), run, log).result()
    if code != 0:
        raise SystemExit(f"training {name!r} failed (exit {code}); see {log}")
    return run / "checkpoint.pt"


@torch.no_grad()
def sample_seconds(models: list[Flow], z: torch.Tensor, repeats: int) -> list[tuple[float, torch.Tensor, int]]:
    """Best-of-``repeats`` wall time of sampling from ``z`` with each model, the
    models taking turns so that they share the machine's load, and their samples."""
    best = [float("inf")] * len(models)
    out: list = [None] * len(models)
    for _ in range(repeats):
        for i, model in enumerate(models):
            start = time.perf_counter()
            trace = model.trace(z, reverse=True, density=False)  # as sample.py samples
            best[i] = min(best[i], time.perf_counter() - start)
            out[i] = (trace.out, trace.nfe_forward)
    return [(t, x, nfe) for t, (x, nfe) in zip(best, out)]


def measure(name: str, checkpoint: Path, args: argparse.Namespace) -> dict[str, str]:
    model, config, _ = load_model(checkpoint)
    model.eval()
    small, _ = compact(model, config)
    data = make_data(config.data, config.seed)
    test = evaluate(model, data.test, batch_size=config.train.val_batch_size, preprocess=data.preprocess)
    metrics = data.metrics(test.nll)
    torch.manual_seed(0)
    z = model.base_noise(args.samples)
    (t_masked, x_masked, nfe), (t_small, x_small, _) = sample_seconds([model, small], z, args.repeats)
    (p0, f0), (p1, f1) = field_cost(model), field_cost(small)
    widths = [[layer.weight.shape[0] for layer in block.field.layers[:-1]] for block in small.blocks]
    return {
        "model": name,
        "widths": "; ".join("-".join(map(str, w)) for w in dict.fromkeys(map(tuple, widths))),
        "test NLL": f"{test.nll:.3f}" + (f" ({metrics['bits_per_dim']:.3f} bpd)" if "bits_per_dim" in metrics else ""),
        "test NFE": f"{test.nfe:.0f}",
        "sample NFE": f"{nfe}",
        "params masked": f"{p0}",
        "params compact": f"{p1}",
        "FLOPs/eval masked": f"{f0}",
        "FLOPs/eval compact": f"{f1}",
        "s/batch masked": f"{t_masked:.3f}",
        "s/batch compact": f"{t_small:.3f}",
        "speedup": f"{t_masked / t_small:.2f}x",
        "max abs Δx": f"{(x_masked - x_small).abs().max().item():.1e}",
    }


def markdown(rows: list[dict[str, str]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(r[k] for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/toy.yaml")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    p.add_argument("--methods", nargs="+", default=["random", "jacobian_spectrum"])
    p.add_argument("--scope", default="layer", choices=["layer", "global"])
    p.add_argument("--jobs", type=int, default=2, help="training runs at a time (one thread each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads while measuring")
    p.add_argument("--samples", type=int, default=1000, help="samples per timed batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--runs", default=None,
                   help="directory for the training runs (default: a temporary one); runs already there are reused")
    p.add_argument("--out", default=None, help="Markdown file for the table")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[])
    args = p.parse_args(argv)

    runs = Path(args.runs or tempfile.mkdtemp(prefix="bench_structured_"))
    runs.mkdir(parents=True, exist_ok=True)
    todo = variants(args.methods, args.sparsities, args.scope)
    start = time.perf_counter()
    # --jobs worker processes train (one thread each); threads here only wait on them
    with ProcessPoolExecutor(args.jobs) as workers, ThreadPoolExecutor(args.jobs) as pool:
        checkpoints = dict(zip(todo, pool.map(lambda kv: train(*kv, args, runs, workers), todo.items())))
    print(f"trained {len(todo)} models for {args.iterations} iterations in {time.perf_counter() - start:.0f} s "
          f"({args.jobs} at a time) under {runs}")

    torch.set_num_threads(args.threads)
    rows = [measure(name, ckpt, args) for name, ckpt in checkpoints.items()]
    header = (f"{args.config} {' '.join(args.overrides)}, {args.iterations} iterations; unit pruning "
              f"(scope {args.scope}); sampling {args.samples} per batch on {args.threads} thread(s), "
              f"best of {args.repeats}")
    table = markdown(rows)
    print(header)
    print(table)
    if args.out:
        Path(args.out).write_text(f"{header}\n\n{table}\n")


if __name__ == "__main__":
    main()
