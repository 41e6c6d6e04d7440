"""Draw samples from a trained flow.

    python sample.py CHECKPOINT --out PATH [--n N] [--batch-size B] [--temperature T] [--seed S]
                     [--tol TOL] [--device D] [--compact]

PATH ending in ``.npy`` or ``.pt`` gets the raw samples; ``.png`` gets a figure
(2-D data: model density and samples; images: a grid of the samples). Samples of
image models are pixel intensities in [0, 1] (the logit transform undone). The
model is rebuilt from the config stored in the checkpoint; the NFE and wall time
of sampling are printed (per image for image models).

Only the samples are integrated (no log-density), with the checkpoint's test
solver; as only they control an adaptive solver's steps, ``--tol`` (rtol = atol)
tightens it where samples must be accurate to a given error.

Large jobs: ``.npy`` output is written batch by batch (memory bounded by the
batch, not by N), with a progress bar. A job stopped part-way (Ctrl-C, SIGTERM)
keeps a valid ``.npy`` of the samples drawn so far and says how many. The base
noise of sample ``i`` depends only on ``--seed`` and ``i``, so a batch size
changes the samples only within the solver's tolerance.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cnf_prune.commands import report_user_errors
from cnf.errors import ConfigError
from cnf.data import make_data
from cnf.flow import Flow
from cnf.images import logit_inverse
from cnf.toy import TOY_DATASETS
from cnf_prune import allocator
from cnf_prune.build import compact_model, load_model
from cnf_prune.config import Config
from cnf_prune.distributed import resolve_device, use_tf32
from cnf_prune.rundir import writing
from cnf_prune.sampling import NpyWriter, SampleNoise, default_batch_size
from cnf_prune.trainer import stop_on_signal

SUFFIXES = (".npy", ".pt", ".png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint.pt or best.pt written by train.py")
    p.add_argument("--out", required=True, help="output file: .npy, .pt or .png")
    p.add_argument("--n", type=int, default=2000, help="number of samples (default 2000)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="samples per solve (default: measured per kind of model, see docs/performance.md)")
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
    out = check_args(args)
    device = resolve_device(args.device, "--device", "--device cpu")
    model, config, _ = load_model(args.checkpoint, map_location=device, test_tolerance=args.tol)
    if device.type == "cpu" and allocator.enabled_for(config):
        allocator.keep_freed_memory()  # see cnf_prune.allocator
    use_tf32(config.train.tf32)
    if args.compact:
        model = compact_model(model, config)[0]
    model = model.to(device).eval()
    image = len(model.event_shape) == 3
    batch_size = args.batch_size or default_batch_size(model)
    noise = SampleNoise(model, args.seed, args.temperature)
    sink = NpyWriter(out, (args.n, *model.event_shape)) if out.suffix == ".npy" else None
    chunks, nfe, done, start = [], 0, 0, time.perf_counter()
    bar = tqdm(total=args.n, desc="sample", unit="sample", dynamic_ncols=True, mininterval=1.0,
               disable=args.n <= batch_size)
    with stop_on_signal() as stop, torch.no_grad():
        while done < args.n and stop.signal is None:
            trace = model.trace(noise.draw(done, min(batch_size, args.n - done)), reverse=True, density=False)
            x = trace.out.cpu()
            if image:
                x = logit_inverse(x, config.data.logit_alpha).clamp(0.0, 1.0)
            if sink is not None:
                sink.write(done, x)
            else:
                chunks.append(x)
            done, nfe = done + len(x), nfe + trace.nfe_forward
            bar.update(len(x))
    bar.close()
    seconds = time.perf_counter() - start
    if stop.signal is not None:
        return stopped(sink, out, done, args.n, stop.signal)
    if sink is not None:
        sink.finish()
    else:
        write_samples(model, config, torch.cat(chunks), out)
    solves = -(-args.n // batch_size)
    per = f"{seconds / args.n:.4f} s per image" if image else f"{1e3 * seconds / args.n:.3f} ms per sample"
    print(f"wrote {args.n} samples to {out}; NFE {nfe / solves:.0f} per batch, summed over blocks "
          f"({solves} batch{'' if solves == 1 else 'es'} of {batch_size}); {seconds:.2f} s ({per})")
    return 0


def check_args(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if out.suffix not in SUFFIXES:
        raise ConfigError(f"--out must end in one of {', '.join(SUFFIXES)} (got {out.name!r})")
    if args.n < 1 or (args.batch_size is not None and args.batch_size < 1) or not args.temperature > 0:
        raise ConfigError("--n and --batch-size must be positive and --temperature > 0")
    if args.tol is not None and not args.tol > 0:
        raise ConfigError(f"--tol must be positive (got {args.tol})")
    if not out.parent.exists() or not out.parent.is_dir():
        raise ConfigError(f"output directory {str(out.parent)!r} does not exist")
    return out


def stopped(sink: NpyWriter | None, out: Path, done: int, n: int, signum: int) -> int:
    """Keep what a stopped job drew: a valid ``.npy`` of the first ``done`` samples."""
    if sink is not None and done > 0:
        sink.finish(rows=done)
        print(f"stopped by signal {signum}: wrote {done} of {n} samples to {out}", file=sys.stderr)
    else:
        if sink is not None:
            sink.discard()
        print(f"stopped by signal {signum} after {done} of {n} samples; nothing was written", file=sys.stderr)
    return 128 + signum


def write_samples(model: Flow, config: Config, samples: torch.Tensor, out: Path) -> None:
    """Samples as ``.pt`` or a ``.png`` figure."""
    with writing(out, "nothing else was changed"):
        if out.suffix == ".pt":
            torch.save(samples, out)
        else:
            write_figure(model, config, samples, out)


def write_figure(model: Flow, config: Config, samples: torch.Tensor, out: Path) -> None:
    if len(model.event_shape) == 3:
        from torchvision.utils import save_image

        # enlarged to at least 112 px per image, so a grid of 14x14 or 28x28 digits is legible
        scale = -(-112 // model.event_shape[-1])
        big = torch.nn.functional.interpolate(samples, scale_factor=scale, mode="nearest")
        save_image(big, out, nrow=math.ceil(math.sqrt(len(samples))), padding=2 * scale, pad_value=1.0)
        return
    if model.event_shape != (2,):
        raise ConfigError("a .png output needs 2-D data or images; use .npy or .pt")
    from cnf_prune.figures import density_grid, flow_figure

    # a toy model's figure shows its data set beside the density and samples
    data = make_data(config.data, config.seed).val if config.data.name in TOY_DATASETS else None
    fig = flow_figure(density_grid(model), samples, data)
    fig.savefig(out, dpi=100)
