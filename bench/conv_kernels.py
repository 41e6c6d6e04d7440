"""Benchmark: the CPU kernels behind the concat-conv fields' layout choices.

    python bench/conv_kernels.py [--batch 20] [--threads N]

Times, on the shapes of FFJORD's MNIST model (64 hidden channels, 3x3 kernels),
the operations whose speed decided how ``cnf/conv.py`` lays out its tensors on a
CPU, and prints the best of several repeats of each:

* a 64 -> 64 convolution at 28x28: forward, backward to the input, backward to the
  weight, channels-first (NCHW) against channels-last (NHWC), in GFLOP/s;
* a convolution of one input channel (the first layer of the 28x28 blocks, and the
  time channel): oneDNN against the patch product that ``cnf/conv.py`` uses,
  forward and forward + backward;
* a convolution to one output channel (the last layer of the 28x28 blocks): oneDNN
  against the tap product and ``F.fold`` that ``cnf/conv.py`` uses;
* the sum over the batch that the backward pass of the time-map addition takes:
  over a channels-last gradient viewed as ``(B, C, H, W)`` and as ``(B, H, W, C)``;
* an elementwise product into fresh 4 MB outputs (40 alive at once, as in an
  evaluation) under glibc's default malloc, then with the setting of
  ``cnf_prune/allocator.py``, which keeps freed memory for reuse (applied last: it
  cannot be undone in the process).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_model  # noqa: E402
from cnf.conv import _conv_one_channel, _conv_to_one_channel  # noqa: E402  (what the layers use)
from cnf_prune.allocator import keep_freed_memory  # noqa: E402

CL = torch.channels_last


def best_ms(fn, repeats: int = 5, calls: int = 10) -> float:
    """Best mean time of ``calls`` calls over ``repeats`` repeats, in milliseconds."""
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def conv_passes(batch: int, channels_last: bool) -> dict[str, float]:
    x = torch.randn(batch, 64, 28, 28)
    w = torch.randn(64, 64, 3, 3)
    g = torch.randn(batch, 64, 28, 28)
    if channels_last:
        x, w, g = (a.contiguous(memory_format=CL) for a in (x, w, g))

    def backward(mask):
        return torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)

    return {
        "forward": best_ms(lambda: F.conv2d(x, w, padding=1)),
        "backward to input": best_ms(lambda: backward([True, False, False])),
        "backward to weight": best_ms(lambda: backward([False, True, False])),
    }


def one_channel(batch: int) -> dict[str, tuple[float, float]]:
    x = torch.randn(batch, 1, 28, 28, requires_grad=True)
    w = torch.randn(64, 1, 3, 3, requires_grad=True)
    g = torch.randn(batch, 64, 28, 28).contiguous(memory_format=CL)
    out = {}
    for name, conv in (("oneDNN (F.conv2d)", lambda: F.conv2d(x.contiguous(memory_format=CL),
                                                              w.contiguous(memory_format=CL), padding=1)),
                       ("patch product", lambda: _conv_one_channel(x, w, None, 1))):
        with torch.no_grad():
            forward = best_ms(conv)
        both = best_ms(lambda: torch.autograd.grad(conv(), (x, w), g))
        out[name] = (forward, both)
    return out


def to_one_channel(batch: int) -> dict[str, tuple[float, float]]:
    x = torch.randn(batch, 64, 28, 28).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(1, 64, 3, 3, requires_grad=True)
    g = torch.randn(batch, 1, 28, 28)
    out = {}
    for name, conv in (("oneDNN (F.conv2d)", lambda: F.conv2d(x, w.contiguous(memory_format=CL), padding=1)),
                       ("tap product + fold", lambda: _conv_to_one_channel(x, w, None, 1))):
        with torch.no_grad():
            forward = best_ms(conv)
        both = best_ms(lambda: torch.autograd.grad(conv(), (x, w), g))
        out[name] = (forward, both)
    return out


def fresh_products(batch: int) -> float:
    """ms per product ``a * b`` into a new tensor, 40 results alive at once."""
    a, b = (torch.randn(batch, 64, 28, 28).contiguous(memory_format=CL) for _ in range(2))

    def forty():
        outs = [a * b for _ in range(40)]
        del outs

    return best_ms(forty) / 40


def batch_sums(batch: int) -> dict[str, float]:
    g = torch.randn(batch, 64, 28, 28).contiguous(memory_format=CL)
    return {
        "(B, C, H, W) view": best_ms(lambda: g.sum(0, keepdim=True)),
        "(B, H, W, C) view": best_ms(lambda: g.permute(0, 2, 3, 1).sum(0, keepdim=True)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"bench/conv_kernels.py: {datetime.datetime.now().isoformat(timespec='seconds')}; "
          f"{cpu_model()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; batch {args.batch}")
    flop = 2 * args.batch * 28 * 28 * 64 * 64 * 9 / 1e9
    print(f"64 -> 64 conv, 3x3, 28x28 ({flop:.2f} GFLOP per pass): ms (GFLOP/s)")
    for channels_last in (False, True):
        row = conv_passes(args.batch, channels_last)
        cells = ", ".join(f"{k} {v:.2f} ({flop / v * 1e3:.0f})" for k, v in row.items())
        print(f"  {'channels-last ' if channels_last else 'channels-first'}: {cells}")
    print("1 -> 64 conv, 3x3, 28x28: ms forward / forward + backward")
    for name, (forward, both) in one_channel(args.batch).items():
        print(f"  {name:18s}: {forward:.2f} / {both:.2f}")
    print("64 -> 1 conv, 3x3, 28x28: ms forward / forward + backward")
    for name, (forward, both) in to_one_channel(args.batch).items():
        print(f"  {name:18s}: {forward:.2f} / {both:.2f}")
    print("sum over the batch of a channels-last gradient (64x28x28): ms")
    for name, ms in batch_sums(args.batch).items():
        print(f"  {name}: {ms:.3f}")
    print(f"elementwise product into a fresh ({args.batch}, 64, 28, 28) tensor, 40 alive at once: ms")
    print(f"  glibc's default malloc: {fresh_products(args.batch):.3f}")
    if keep_freed_memory():
        print(f"  freed memory kept (cnf_prune/allocator.py): {fresh_products(args.batch):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
