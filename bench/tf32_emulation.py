"""What TF32 convolutions do to a conv flow's solver, emulated on the CPU.

    python bench/tf32_emulation.py CHECKPOINT [--n 500] [--samples 64] [--threads N]

NVIDIA GPUs from Ampere on run float32 convolutions on TF32 tensor cores when
PyTorch allows it, and PyTorch allows it for cuDNN convolutions by default. TF32
keeps 10 of float32's 23 mantissa bits. This script emulates that on the CPU: it
rounds both inputs of every ``conv2d`` to a 10-bit mantissa (round to nearest) and
accumulates in float32. Then it evaluates the checkpoint's test set and draws
samples with its test solver, once in float32 and once emulated, and prints the
bits/dim, R and NFE of each.

The GPU's own rounding, and which kernels cuDNN picks, may differ from this
emulation, so treat its figures as an estimate of the effect, not a GPU
measurement. ``train.tf32`` (default false) decides what the training and
sampling scripts allow on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnf_prune.build import load_model  # noqa: E402
from cnf.data import make_data  # noqa: E402
from cnf_prune.commands import report_user_errors  # noqa: E402
from cnf.errors import ConfigError  # noqa: E402
from cnf_prune.evaluate import evaluate  # noqa: E402

_MANTISSA_DROP = 23 - 10  # float32 keeps 23 mantissa bits, TF32 10


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) rounded to the nearest value with a 10-bit mantissa."""
    bits = x.contiguous().view(torch.int32)
    half = 1 << (_MANTISSA_DROP - 1)
    return ((bits + half) & ~((1 << _MANTISSA_DROP) - 1)).view(torch.float32)


@contextlib.contextmanager
def tf32_convolutions():
    """Within the block, ``F.conv2d`` rounds its input and weight as TF32 does."""
    exact = F.conv2d

    def conv2d(x, weight, *args, **kwargs):
        return exact(round_to_tf32(x), round_to_tf32(weight), *args, **kwargs)

    F.conv2d = conv2d
    try:
        yield
    finally:
        F.conv2d = exact


def measure(model, data, n: int, samples: int) -> str:
    start = time.perf_counter()
    test = evaluate(model, data.test[:n], batch_size=250, preprocess=data.preprocess)
    bpd = data.metrics(test.nll).get("bits_per_dim", float("nan"))
    torch.manual_seed(0)
    with torch.no_grad():
        drawn = model.trace(model.base_noise(samples), reverse=True, density=False)
    return (f"test bits/dim {bpd:.4f} (nll {test.nll:.3f}), R {test.jac_norm:.3f}, NFE {test.nfe:.0f}; "
            f"sampling {samples}: NFE {drawn.nfe_forward}; {time.perf_counter() - start:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="best.pt / checkpoint.pt of a conv (image) flow")
    p.add_argument("--n", type=int, default=500, help="test images evaluated (default 500)")
    p.add_argument("--samples", type=int, default=64, help="samples drawn (default 64)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args(argv)
    return report_user_errors(report, args)


def report(args: argparse.Namespace) -> int:
    if args.n < 1 or args.samples < 1:
        raise ConfigError("--n and --samples must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, config, _ = load_model(args.checkpoint, map_location="cpu")
    data = make_data(config.data, config.seed)
    if len(data.event_shape) != 3:
        raise ConfigError(f"{args.checkpoint} is not an image model: it has no convolutions to emulate")
    model.eval()
    print(f"{args.checkpoint}: test solver {model.blocks[0].test_solver.describe()}, {len(model.blocks)} blocks")
    print(f"  float32:           {measure(model, data, args.n, args.samples)}", flush=True)
    with tf32_convolutions():
        print(f"  TF32 convolutions: {measure(model, data, args.n, args.samples)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
