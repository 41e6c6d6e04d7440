"""Prune a freshly built model before its first training step.

The trainer calls :func:`prune_at_init` when the ``pruning`` section's method is
not ``none``. Pruning must not change anything else about the run, so that a pruned
run and a dense run with the same seed see the same training batches and the
same random numbers: the scoring batches come from a copy of the data source
with its own generator, and the global torch generator is restored afterwards.

With ``warmup_steps`` > 0 the scores are those of a copy of the model trained for
that many Adam steps on the training loss (on batches of their own); the mask they
select is applied to the untrained model, so training still starts from the
initial weights (pruning early in training, rewound to initialization).

A model built with L0 or PathReg gates is scored with its gates taken out: the
scores are those of the ungated weights, so the mask does not depend on one
random gate draw (a closed gate would zero a weight's gradients and its score).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import numpy as np
import torch
from torch import Tensor

from cnf.data import DataSource
from cnf.flow import Flow
from pruning.config import PruningConfig
from pruning.masks import apply_masks, mask_buffer, prunable_weights, select_top, sparsity_table
from pruning.scores import SCORERS, Loss, get_scorer, objective_value
from pruning.structured import select_units

# Scores that depend on the current weights, so that pruning.rounds > 1 rescores the
# masked model (SynFlow iterates on its own with synflow_iterations; random ignores the model).
ITERABLE = tuple(m for m in SCORERS if m not in ("random", "synflow"))

# Spawn keys that separate the scoring and warm-up streams from the data source's own.
_SCORING_STREAM = 0x5C0E
_WARMUP_STREAM = 0x3A2F


def scoring_batches(data: DataSource, count: int, batch_size: int, seed: int,
                    stream: int = _SCORING_STREAM) -> list[Tensor]:
    """``count`` training batches of ``batch_size``, drawn from a copy of ``data``
    whose generator is seeded from ``seed``.

    ``data`` itself is untouched, so the run's training stream is the same as a
    dense run's. (For toy data these are fresh samples; array data draws from its
    current epoch order with the new generator.)
    """
    scoring = copy.copy(data)
    scoring.rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))
    # What the flow models (images: dequantized and logit-transformed, with noise
    # from a generator of their own, leaving the global one alone).
    noise = torch.Generator().manual_seed(seed)
    return [scoring.preprocess(scoring.train_batch(batch_size), noise)[0] for _ in range(count)]


def prune_at_init(
    model: Flow, data: DataSource, settings: PruningConfig, *, batch_size: int, seed: int,
    loss: Loss | None = None,
) -> str:
    """Score, select and mask the prunable weights of ``model`` as the ``pruning``
    section ``settings`` says, on ``settings.batches`` batches of ``batch_size``
    drawn from ``data`` with ``seed`` (which also seeds the random scores).
    ``loss(model, x, trace)``: the training loss ``L`` whose gradient ``dL`` data-driven
    scores use (default: the NLL; a flow-matching run passes its regression loss).

    Returns the per-weight sparsity table (for the console). Sparsity 0 leaves the
    model unchanged. Raises :class:`~cnf.errors.ConfigError` for an unknown
    method, a layer pattern that matches nothing, or degenerate scores.
    """
    p = settings
    scorer = get_scorer(p.method)
    prunable_weights(model, p.layers)  # reject patterns that match nothing up front
    header = f"pruning at initialization: {p.method}, sparsity {p.sparsity:g} ({p.scope})"
    if p.sparsity == 0:
        return f"{header}: nothing to prune\n{sparsity_table(model)}"
    reference = next(model.parameters())
    device = reference.device
    batches = [x.to(device=device, dtype=reference.dtype)
               for x in scoring_batches(data, p.batches, batch_size, seed)]
    scored = model
    if p.warmup_steps:
        warmup = [x.to(device=device, dtype=reference.dtype)
                  for x in scoring_batches(data, p.warmup_steps, batch_size, seed, _WARMUP_STREAM)]
        scored = warmed_up(model, warmup, p.warmup_lr, loss)
        header = f"{header}, scored after {p.warmup_steps} warm-up steps (lr {p.warmup_lr:g})"
    if p.granularity == "unit":
        masks = select_units(scored, _scores(scored, scorer, batches, p, seed, loss), p.sparsity, p.scope)
        apply_masks(model, masks)
        header = f"{header}, whole units"
    else:
        rounds = p.rounds if p.method in ITERABLE else 1
        for k in range(1, rounds + 1):  # iterative: rescore the masked model, prune a little more
            target = 1.0 - (1.0 - p.sparsity) ** (k / rounds)
            scores = _scores(scored, scorer, batches, dataclasses.replace(p, sparsity=target), seed, loss)
            pruned = {n: s.masked_fill(mask_buffer(scored, n) == 0, -torch.inf) for n, s in scores.items()}
            masks = select_top(pruned, target, p.scope)
            apply_masks(model, masks)
            if scored is not model:
                apply_masks(scored, masks)
        header = f"{header}, {rounds} rounds" if rounds > 1 else header
    return f"{header}, scored on {len(batches)} batch(es) of {batch_size}\n{sparsity_table(model)}"


def warmed_up(model: Flow, batches: list[Tensor], lr: float, loss: Loss | None) -> Flow:
    """A copy of ``model`` (gates out) after one Adam step at ``lr`` per batch on the
    training loss (the NLL, or ``loss``); ``model`` and the global RNG are untouched."""
    copy_ = copy.deepcopy(model)
    device = batches[0].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _gates_removed(copy_):
        copy_.train()
        optimizer = torch.optim.Adam(copy_.parameters(), lr=lr)
        for x in batches:
            trace = copy_.trace(x)
            value = objective_value("nll", copy_, x, trace, loss)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
    return copy_


def _scores(model: Flow, scorer, batches: list[Tensor], settings: PruningConfig, seed: int,
            loss: Loss | None) -> dict[str, Tensor]:
    """The scorer's scores of ``model`` with its gates out, leaving the global RNG as it was."""
    device = batches[0].device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _gates_removed(model):
        return scorer(model, batches, settings, seed, loss=loss)


@contextlib.contextmanager
def _gates_removed(model: Flow):
    """Take every block's weight gates out for the duration, and put them back."""
    saved = [block.gates for block in model.blocks]
    try:
        for block in model.blocks:
            block.gates = None
        yield
    finally:
        for block, gates in zip(model.blocks, saved):
            block.gates = gates
