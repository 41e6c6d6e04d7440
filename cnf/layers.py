"""Time-conditioned linear layers with a weight mask.

Each layer maps ``(t, x) -> y`` with a *data weight* ``weight`` of shape
``(out, in)`` acting on ``x`` and small time-conditioning parts acting on ``t``.
Only the data weight is prunable; its mask ``weight_mask`` is a buffer that
exists from construction, so a checkpoint has the same keys pruned or not.

The weight is passed in explicitly (``forward(t, x, weight)``): the ODE block
computes the effective weight ``weight * weight_mask * gate`` once per solve
instead of once per function evaluation.

References: FFJORD, Grathwohl et al. 2019 (concat and concatsquash layers).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class TimeLinear(nn.Module):
    """Base class for time-conditioned linear layers with a prunable ``weight``.

    Subclasses implement ``forward(t, x, v, weight) -> (y, J v)``: ``x`` has shape
    ``(B, in)``, the optional tangents ``v`` have shape ``(B, K, in)`` and ``J v``
    is the layer's Jacobian ``∂y/∂x`` applied to each of them, shape ``(B, K, out)``.
    ``t`` is one time for the batch (shape ``()``) or one per example (``(B,)``).
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.dim_in, self.dim_out = dim_in, dim_out
        self.weight = nn.Parameter(torch.empty(dim_out, dim_in))
        self.bias = nn.Parameter(torch.empty(dim_out))
        self.register_buffer("weight_mask", torch.ones(dim_out, dim_in))
        bound = 1.0 / math.sqrt(dim_in)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def masked_weight(self) -> Tensor:
        return self.weight * self.weight_mask


class ConcatLinear(TimeLinear):
    """``y = W x + w_t t + b`` (a linear layer on the concatenation ``[t, x]``)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__(dim_in, dim_out)
        self.time_weight = nn.Parameter(torch.empty(dim_out))
        bound = 1.0 / math.sqrt(dim_in + 1)
        nn.init.uniform_(self.time_weight, -bound, bound)

    def forward(
        self, t: Tensor, x: Tensor, v: Tensor | None, weight: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        # fused products (addmm, addcmul): fewer autograd nodes, which is what a small field's step costs
        y = torch.addmm(torch.addcmul(self.bias, per_example(t), self.time_weight), x, weight.T)
        return y, (None if v is None else v @ weight.T)


class ConcatSquashLinear(TimeLinear):
    """``y = (W x + b) ⊙ σ(a t + c) + d t``: FFJORD's concatsquash layer."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__(dim_in, dim_out)
        self.gate_weight = nn.Parameter(torch.empty(dim_out))
        self.gate_bias = nn.Parameter(torch.empty(dim_out))
        self.time_bias = nn.Parameter(torch.empty(dim_out))
        for p in (self.gate_weight, self.gate_bias, self.time_bias):
            nn.init.uniform_(p, -1.0, 1.0)

    def _gate(self, t: Tensor) -> Tensor:
        return torch.sigmoid(torch.addcmul(self.gate_bias, t, self.gate_weight))

    def forward(
        self, t: Tensor, x: Tensor, v: Tensor | None, weight: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        t = per_example(t)
        g = self._gate(t)  # (out,), or (B, out) with one time per example
        if t.dim() > 0:
            y = torch.addcmul(t * self.time_bias, torch.addmm(self.bias, x, weight.T), g)
            return y, (None if v is None else (v @ weight.T) * g.unsqueeze(1))
        # One time for the batch: the gate scales whole output rows, so it is folded into
        # the weight and bias, (W x + b) ⊙ g = (g ⊙ W) x + g ⊙ b. The batch-sized tensors
        # then see only the two products, and the backward pass no longer sums gate
        # gradients over the batch: fewer and smaller operations, which is what a small
        # field's step costs.
        gated = weight * g.unsqueeze(-1)
        y = torch.addmm(torch.addcmul(t * self.time_bias, self.bias, g), x, gated.T)
        return y, (None if v is None else v @ gated.T)


def per_example(t: Tensor, event_dims: int = 1) -> Tensor:
    """One time for the batch (shape ``()``) as it is; times of shape ``(B,)`` as
    ``(B, 1, ..., 1)`` with ``event_dims`` ones, to broadcast against ``(B, *event)``."""
    return t if t.dim() == 0 else t.view(-1, *(1,) * event_dims)


LAYERS: dict[str, type[TimeLinear]] = {
    "concat": ConcatLinear,
    "concatsquash": ConcatSquashLinear,
}
