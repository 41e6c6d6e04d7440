"""Evaluation of a flow on a fixed data set (eval mode: test solver, no gradients)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from cnf.flow import Flow


@dataclass(frozen=True)
class Evaluation:
    """Mean NLL (nats per example), mean cumulative Jacobian norm, and mean NFE of a
    pass through the flow (summed over its blocks)."""

    nll: float
    jac_norm: float
    nfe: float


Preprocess = Callable[[Tensor, torch.Generator], tuple[Tensor, Tensor]]


@torch.no_grad()
def evaluate(
    flow: Flow, data: Tensor, *, batch_size: int = 1000, preprocess: Preprocess | None = None
) -> Evaluation:
    """NLL, R and NFE of ``flow`` on ``data`` in eval mode (restores the previous mode).

    ``preprocess(x, generator) -> (x_model, logdet)`` (a data source's
    :meth:`~cnf.data.DataSource.preprocess`) maps data to what the flow models;
    the NLL is then the data's, ``-log p(x_model) - logdet``. Its randomness (image
    dequantization) comes from a generator seeded afresh on every call, and so do
    the probes of a Hutchinson test divergence (the global generators are seeded
    for the call and restored afterwards): repeated evaluations of one model agree,
    and two models are compared on the same noise.
    """
    generator = torch.Generator().manual_seed(0)
    was_training = flow.training
    flow.eval()
    device = next(flow.parameters()).device
    nll = jac = nfe = 0.0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        _seed_probes(device)
        try:
            for start in range(0, len(data), batch_size):
                x = data[start : start + batch_size].to(device)
                logdet = 0.0
                if preprocess is not None:
                    x, logdet = preprocess(x, generator)
                trace = flow.trace(x)
                nll -= (flow.base.log_prob(trace.out) + trace.logabsdet + logdet).sum().item()
                jac += trace.jac_norm.sum().item()
                nfe += trace.nfe_forward * len(x)
        finally:
            flow.train(was_training)
    n = len(data)
    return Evaluation(nll / n, jac / n, nfe / n)


def _seed_probes(device: torch.device) -> None:
    """Seed the generator that Hutchinson probes on ``device`` are drawn from."""
    torch.default_generator.manual_seed(0)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(0)
