"""Data-parallel training helpers for ``torchrun`` (one process per device).

Every rank draws the same global batch from the same seeded data stream and
trains on its own contiguous shard of it, so ``R`` ranks with per-rank batch
``B/R`` see exactly the batches one process would see with batch ``B``. Rank 0
alone writes checkpoints, TensorBoard events and figures; scalars are averaged
over ranks before logging (ranks may take different numbers of adaptive steps).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from cnf.errors import ConfigError
from cnf.flow import Flow, FlowTrace


@dataclass(frozen=True)
class Context:
    """Where this process sits: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, option: str = "train.device", use_cpu: str = "--set train.device=cpu") -> torch.device:
    """``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N`` as a
    device; a ConfigError naming ``option`` (and how to ``use_cpu``) otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{option} {name!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option} is {name} but no GPU is available; use {use_cpu}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{option} is {name} but there are {torch.cuda.device_count()} GPU(s)")
    return device


def use_tf32(enabled: bool) -> None:
    """Allow, or forbid, TF32 tensor cores in float32 convolutions and matrix
    products on NVIDIA GPUs (Ampere and later); no effect elsewhere.

    PyTorch allows TF32 in cuDNN convolutions by default. TF32 keeps 10 of the 23
    mantissa bits of each input, so every evaluation of a conv field carries a
    relative rounding error of about 1e-3, different from stage to stage. An
    adaptive solver at ``rtol = atol = 1e-5`` reads that noise as local error and
    shrinks its steps. In a CPU emulation of TF32 convolutions (round-to-nearest),
    the dopri5 NFE of the trained 14x14 MNIST flow went from 117 to 384 with the
    same bits/dim (``bench/tf32_emulation.py``). Training and sampling scripts
    therefore call this with ``train.tf32``, which is false by default.

    Only the legacy flags are written: setting PyTorch's newer ``fp32_precision``
    API as well would make ``torch.backends.cudnn.flags()`` fail on mixed APIs.
    Turning the legacy cuDNN flag off leaves the convolutions' precision unset, so
    they inherit a ``"tf32"`` that the caller set at ``torch.backends.fp32_precision``
    or ``torch.backends.cudnn.fp32_precision``; only in that case, where the APIs
    are mixed already, are the cuDNN operations set to ``"ieee"`` explicitly.
    """
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled
    cudnn = torch.backends.cudnn
    if not enabled and getattr(getattr(cudnn, "conv", None), "fp32_precision", None) == "tf32":
        cudnn.conv.fp32_precision = "ieee"
        cudnn.rnn.fp32_precision = "ieee"  # the legacy getter wants conv and rnn to agree


def setup(device_name: str) -> Context:
    """Initialise the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1):
    NCCL on GPUs, Gloo on CPUs. ``device_name`` is ``train.device`` (auto, cpu, cuda)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world == 1:
        return Context(device=device)
    use_cuda = device.type == "cuda"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Context(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


@contextlib.contextmanager
def session(device_name: str) -> Iterator[Context]:
    """:func:`setup` for the duration, then :func:`teardown`."""
    ctx = setup(device_name)
    try:
        yield ctx
    finally:
        teardown(ctx)


def teardown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


class _Traced(nn.Module):
    """``forward(x) = flow.trace(x)``, so DistributedDataParallel can wrap the call
    that training makes (DDP hooks the module's ``forward``)."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor) -> FlowTrace:
        return self.flow.trace(x)


def wrap(flow: Flow, ctx: Context) -> Callable[[Tensor], FlowTrace]:
    """The training call ``x -> flow.trace(x)``: under ``torchrun`` through
    DistributedDataParallel (gradients averaged over ranks in ``backward``)."""
    if not ctx.distributed:
        return flow.trace
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(_Traced(flow), device_ids=device_ids)


def shard(batch: Tensor, ctx: Context) -> Tensor:
    """This rank's contiguous slice of a global batch (whose size ``R`` divides)."""
    if not ctx.distributed:
        return batch
    size = batch.shape[0] // ctx.world_size
    return batch[ctx.rank * size : (ctx.rank + 1) * size]


def check_batch_size(batch_size: int, ctx: Context) -> None:
    if batch_size % ctx.world_size:
        raise ConfigError(
            f"train.batch_size {batch_size} must be divisible by the number of processes "
            f"({ctx.world_size}): it is the global batch, split evenly across ranks"
        )


def mean_over_ranks(values: Sequence[float], ctx: Context) -> list[float]:
    """Average a few scalars over all ranks (identity in a single process)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return (t / ctx.world_size).tolist()


def any_rank(flag: bool, ctx: Context) -> bool:
    """True on every rank if ``flag`` is true on any rank (for stop requests)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj: object, ctx: Context) -> list[object]:
    """Every rank's ``obj`` (for example RNG states), on every rank."""
    if not ctx.distributed:
        return [obj]
    out: list[object] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, ctx: Context) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
