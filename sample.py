"""Draw samples from a trained flow.

    python sample.py CHECKPOINT --out PATH [--n N] [--temperature T] [--seed S] [--tol TOL] [--device D] [--compact]

PATH ending in ``.npy`` or ``.pt`` gets the raw samples; ``.png`` gets a figure
(2-D data: model density and samples; images: a grid of the samples). Samples of
image models are pixel intensities in [0, 1] (the logit transform undone). The
model is rebuilt from the config stored in the checkpoint; the NFE and wall time
of sampling are printed (per image for image models).

Only the samples are integrated (no log-density), with the checkpoint's test
solver; as only they control an adaptive solver's steps, ``--tol`` (rtol = atol)
tightens it where samples must be accurate to a given error.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from build import load_model
from cnf.distributed import resolve_device, use_tf32
from cnf.errors import ConfigError, report_user_errors
from cnf.flow import Flow
from cnf.images import logit_inverse

SUFFIXES = (".npy", ".pt", ".png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint.pt or best.pt written by train.py")
    p.add_argument("--out", required=True, help="output file: .npy, .pt or .png")
    p.add_argument("--n", type=int, default=2000, help="number of samples (default 2000)")
    p.add_argument("--batch-size", type=int, default=1000, help="samples per solve (default 1000)")
    p.add_argument("--temperature", type=float, default=1.0, help="scale of the base noise (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--tol", type=float, default=None,
                   help="rtol = atol of the adaptive sampling solver (default: the checkpoint's test tolerances)")
    p.add_argument("--compact", action="store_true",
                   help="remove pruned units first (pruning.granularity=unit): same samples, smaller model")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return report_user_errors(sample, args)


def sample(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix not in SUFFIXES:
        raise ConfigError(f"--out must end in one of {', '.join(SUFFIXES)} (got {out.name!r})")
    if args.n < 1 or args.batch_size < 1 or not args.temperature > 0:
        raise ConfigError("--n and --batch-size must be positive and --temperature > 0")
    if args.tol is not None and not args.tol > 0:
        raise ConfigError(f"--tol must be positive (got {args.tol})")
    if not out.parent.exists() or not out.parent.is_dir():
        raise ConfigError(f"output directory {str(out.parent)!r} does not exist")
    device = resolve_device(args.device, "--device", "--device cpu")
    model, config, _ = load_model(args.checkpoint, map_location=device)
    use_tf32(config.train.tf32)
    if args.compact:
        from pruning.compact import compact

        model = compact(model, config)[0]
    model = model.to(device).eval()
    if args.tol is not None:
        set_sampling_tolerance(model, args.tol)
    torch.manual_seed(args.seed)

    chunks, nfe, start = [], 0, time.perf_counter()
    with torch.no_grad():
        for begin in range(0, args.n, args.batch_size):
            z = model.base_noise(min(args.batch_size, args.n - begin), temperature=args.temperature)
            trace = model.trace(z, reverse=True, density=False)
            chunks.append(trace.out.cpu())
            nfe += trace.nfe_forward
    seconds = time.perf_counter() - start
    samples = torch.cat(chunks)
    image = len(model.event_shape) == 3
    if image:
        samples = logit_inverse(samples, config.data.logit_alpha).clamp(0.0, 1.0)

    try:
        if out.suffix == ".npy":
            np.save(out, samples.numpy())
        elif out.suffix == ".pt":
            torch.save(samples, out)
        else:
            write_figure(model, samples, out)
    except OSError as exc:
        raise ConfigError(f"cannot write {str(out)!r}: {exc.strerror}") from None
    solves = -(-args.n // args.batch_size)
    per = f"{seconds / args.n:.4f} s per image" if image else f"{1e3 * seconds / args.n:.3f} ms per sample"
    print(f"wrote {args.n} samples to {out}; NFE {nfe / solves:.0f} per batch, summed over blocks "
          f"({solves} batch{'' if solves == 1 else 'es'}); {seconds:.2f} s ({per})")
    return 0


def set_sampling_tolerance(model: Flow, tol: float) -> None:
    """Use ``rtol = atol = tol`` in every block's eval-mode (sampling) solver."""
    for block in model.blocks:
        if not block.test_solver.adaptive:
            raise ConfigError(f"--tol needs an adaptive solver; this checkpoint samples with "
                              f"{block.test_solver.describe()}")
        block.test_solver = dataclasses.replace(block.test_solver, rtol=tol, atol=tol)


def write_figure(model: Flow, samples: torch.Tensor, out: Path) -> None:
    if len(model.event_shape) == 3:
        from torchvision.utils import save_image

        save_image(samples, out, nrow=math.ceil(math.sqrt(len(samples))), padding=2, pad_value=1.0)
        return
    if model.event_shape != (2,):
        raise ConfigError("a .png output needs 2-D data or images; use .npy or .pt")
    from cnf.plots import density_grid, flow_figure

    fig = flow_figure(density_grid(model), samples)
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
