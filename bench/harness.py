"""What train.py builds and does in one step, for the benchmarks to time.

The same data, model (pruned at initialization when ``pruning.method`` is set),
optimizer and parameter average as ``train.py``, and the same step: the training
loss, backward pass, gradient clipping (``train.grad_clip``) and update (learning
rate schedule, Adam, ``train.ema_decay``). Only train.py's bookkeeping (logging,
validation, checkpoints, NaN skipping) is left out.
"""

from __future__ import annotations

import math
import sys

import torch

from build import build_model
from cnf.data import make_data
from cnf.distributed import use_tf32
from cnf.ema import ParameterAverage
from train import apply_update, make_optimizer, training_loss


def training_setup(config, device: torch.device):
    """``(data, model, optimizer, average or None)`` as train.py builds them."""
    use_tf32(config.train.tf32)
    torch.manual_seed(config.seed)
    data = make_data(config.data, config.seed)
    model = build_model(config, data.event_shape).to(device)
    if config.pruning.method != "none":
        from pruning.apply import prune_at_init

        print(prune_at_init(model, data, config, device), file=sys.stderr)
    optimizer = make_optimizer(model, config.train)
    ema = ParameterAverage(model, config.train.ema_decay) if config.train.ema_decay > 0 else None
    return data, model, optimizer, ema


def training_step(model, data, optimizer, ema, config, x: torch.Tensor, step: int):
    """One optimization step on the batch ``x``; returns ``(nll, trace)``."""
    nll, loss, trace, _ = training_loss(model.trace, model, data, x, config)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip or math.inf)
    apply_update(model, optimizer, ema, config.train, step)
    return nll, trace
