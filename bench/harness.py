"""What train.py builds and does in one step, for the benchmarks to time.

The same setup as the trainer (:func:`cnf_prune.setup.prepare_model`: data, model,
mixture base fitted and weights pruned at initialization as the config says),
optimizer and parameter average, and the same step: the training objective,
backward pass, gradient clipping (``train.grad_clip``) and update (learning rate
schedule, Adam, ``train.ema_decay``). Only the trainer's bookkeeping (logging,
validation, checkpoints, NaN skipping) is left out.
"""

from __future__ import annotations

import math

import torch

from cnf_prune import allocator
from cnf_prune.distributed import Context
from cnf_prune.ema import ParameterAverage
from cnf_prune.objectives import Likelihood
from cnf_prune.setup import make_optimizer, prepare_model
from cnf_prune.trainer import learning_rate


def training_setup(config, device: torch.device):
    """``(data, model, optimizer, average or None)`` as the trainer builds them
    (on a CPU, with train.py's allocator setting, ``train.keep_freed_memory``)."""
    if device.type == "cpu" and allocator.enabled_for(config):
        allocator.keep_freed_memory()
    data, model = prepare_model(config, Context(device=device), fresh=True)
    optimizer = make_optimizer(model, config.train, config.regularization.gate_lr_scale)
    ema = ParameterAverage(model, config.train.ema_decay) if config.train.ema_decay > 0 else None
    return data, model, optimizer, ema


def training_step(model, data, optimizer, ema, config, x: torch.Tensor, step: int):
    """One optimization step on the batch ``x``; returns ``(nll, trace)``."""
    batch = Likelihood(config.regularization)(model.trace, model, data, x)
    optimizer.zero_grad(set_to_none=True)
    batch.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip or math.inf)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config.train, step) * group.get("lr_scale", 1.0)
    optimizer.step()
    if ema is not None:
        ema.update(model)
    return batch.nll, batch.trace

