"""Benchmark: MNIST training cost of the CPU config (and of FFJORD's GPU config on a GPU).

    python bench/bench_mnist.py [--iterations 10] [--warmup 2] [--threads N] [--set KEY=VALUE ...]

For ``configs/mnist_cpu.yaml`` on the CPU, and for ``configs/mnist.yaml`` on the GPU
when CUDA is available (``--gpu-config``; skip with ``--no-gpu``), trains a freshly
built model for ``--warmup + --iterations`` steps on real MNIST batches (the data
root must hold MNIST; see the README) and prints the seconds per iteration, the
forward/backward NFE per iteration (summed over all blocks) and the peak memory:
the process's maximum resident set size on the CPU (``getrusage``; it includes
the data set), ``torch.cuda.max_memory_allocated`` on the GPU. ``--set`` overrides
apply to both configs.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import training_setup, training_step  # noqa: E402  (train.py's model and step)
from cnf_prune.config import load_config  # noqa: E402
from cnf_prune.commands import report_user_errors  # noqa: E402
from cnf.errors import ConfigError  # noqa: E402


def bench(config_path: str, overrides: list[str], device: torch.device, iterations: int, warmup: int) -> None:
    config = load_config(config_path, overrides)
    data, model, opt, ema = training_setup(config, device)
    params = sum(p.numel() for p in model.parameters())
    blocks = len(model.blocks)
    print(f"{config_path} on {device}: {blocks} blocks, {params} parameters, batch {config.train.batch_size}, "
          f"solver {model.blocks[0].solver.describe()}, torch threads {torch.get_num_threads()}"
          + (f", TF32 {'allowed' if config.train.tf32 else 'off'}" if device.type == "cuda" else ""))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, nfe_f, nfe_b, nll_sum = [], [], [], 0.0
    for it in range(warmup + iterations):
        x = data.train_batch(config.train.batch_size).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        nll, trace = training_step(model, data, opt, ema, config, x, it)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if it >= warmup:
            seconds.append(time.perf_counter() - start)
            nfe_f.append(trace.nfe_forward)
            nfe_b.append(trace.nfe_backward)
            nll_sum += nll.item()
    n = len(seconds)
    bpd = data.metrics(nll_sum / n).get("bits_per_dim", float("nan"))
    if device.type == "cuda":
        memory = f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    else:
        memory = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    print(f"  {n} iterations after {warmup} warm-up: {sum(seconds) / n:.2f} s/iter "
          f"(min {min(seconds):.2f}, max {max(seconds):.2f}); NFE {sum(nfe_f) / n:.1f} forward / "
          f"{sum(nfe_b) / n:.1f} backward per iteration; {memory}; train bits/dim {bpd:.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mnist_cpu.yaml", help="config benchmarked on the CPU")
    p.add_argument("--gpu-config", default="configs/mnist.yaml", help="config benchmarked on the GPU")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU benchmark")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU benchmark")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return report_user_errors(bench_all, args)


def bench_all(args: argparse.Namespace) -> int:
    if args.iterations < 1 or args.warmup < 0:
        raise ConfigError("--iterations must be positive and --warmup at least 0")
    if not args.no_cpu:
        bench(args.config, [*args.overrides, "train.device=cpu"], torch.device("cpu"), args.iterations, args.warmup)
    if torch.cuda.is_available() and not args.no_gpu:
        bench(args.gpu_config, args.overrides, torch.device("cuda"), args.iterations, args.warmup)
    elif not args.no_gpu:
        print(f"no CUDA device: {args.gpu_config} not benchmarked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
