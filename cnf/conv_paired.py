"""FFJORD's image field with ``z`` and its tangents in one batch.

A concat convolution is linear in its input, so ``W * z`` and the tangent
products ``W * v`` can be one convolution of the stacked batch ``[z; v]``
(``B`` rows, then ``B*K`` tangent rows); only the ``z`` rows get the bias and
the time term. For concat layers with softplus, :func:`paired_forward` keeps
the stack through the whole field: one convolution call per layer instead of
two (oneDNN's CPU kernels run faster on the larger batch, most at the small
images of the later scales), and each nonlinearity writes both halves of the
next stack directly (:class:`_PairedSoftplus`), so no concatenation is copied.
The values, ``J v`` and all gradients are those of the layer-by-layer forward
of :class:`cnf.fields.LayeredField` up to floating-point rounding.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from cnf.layers import per_example


def paired_forward(
    layers: Sequence[nn.Module], t: Tensor, z: Tensor, tangents: Tensor, weights: Mapping[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """``(f, J·tangents)`` of a chain of concat conv ``layers`` with softplus between
    them (the contract of :meth:`cnf.fields.LayeredField.forward`); ``weights``
    holds ``layers.{i}.weight`` and, if computed per solve, ``layers.{i}.time_map``."""
    b = z.shape[0]
    x = torch.cat([z, tangents.flatten(0, 1)])
    t = per_example(t, 3)
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        time_map = weights.get(f"layers.{i}.time_map")
        if time_map is None:
            time_map = layer.time_map(z.shape[2:])
        y = layer.convolve(x, layer.layout(weights[f"layers.{i}.weight"]))
        shift = torch.addcmul(layer.bias.view(1, -1, 1, 1), t, time_map)  # (1 or B, C, H, W)
        if i < last:
            x = _PairedSoftplus.apply(y, shift, b)
    return y[:b] + shift, y[b:].unflatten(0, (b, -1))


class _PairedSoftplus(torch.autograd.Function):
    """A hidden layer's nonlinearity on the stack ``y = [W*h; W*v]``: with
    ``a = y[:B] + shift`` and ``s = sigmoid(a)``, returns ``[softplus(a); s ⊙ y[B:]]``
    (each tangent scaled by the slope) as one new tensor. Backward:
    ``g_a = g_h ⊙ s + (Σ_k g_v ⊙ u) ⊙ s(1 - s)`` and ``g_u = g_v ⊙ s`` for
    ``u = y[B:]``, again written into one tensor."""

    @staticmethod
    def forward(ctx, y: Tensor, shift: Tensor, b: int) -> Tensor:
        a = y[:b] + shift
        s = torch.sigmoid(a)
        out = torch.empty_like(y)
        torch.ops.aten.softplus.out(a, 1, 20, out=out[:b])  # F.softplus's defaults
        torch.mul(y[b:].unflatten(0, (b, -1)), s.unsqueeze(1), out=out[b:].unflatten(0, (b, -1)))
        ctx.save_for_backward(y, shift, s)
        ctx.b = b
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        y, shift, s = ctx.saved_tensors
        b = ctx.b
        u = y[b:].unflatten(0, (b, -1))
        g_h, g_v = grad[:b], grad[b:].unflatten(0, (b, -1))
        if torch.is_grad_enabled():
            # A graph of this gradient is being built (second derivatives, which GraSP
            # scoring takes): the same formulas, in differentiable operations on y.
            s = torch.sigmoid(y[:b] + shift)
            g_a = g_h * s + (g_v * u).sum(1) * s * (1 - s)
            out = torch.cat([g_a, (g_v * s.unsqueeze(1)).flatten(0, 1)])
            return out, _sum_to(g_a, shift.shape), None
        out = torch.empty_like(grad)
        torch.mul(g_v, s.unsqueeze(1), out=out[b:].unflatten(0, (b, -1)))
        g_vu = g_v * u
        g_vu = g_vu.squeeze(1) if g_vu.shape[1] == 1 else g_vu.sum(1)
        torch.addcmul(torch.ops.aten.sigmoid_backward(g_vu, s), g_h, s, out=out[:b])
        return out, _sum_to(out[:b], shift.shape), None


def _sum_to(g: Tensor, shape: torch.Size) -> Tensor:
    """The gradient ``g`` (``(B, C, H, W)``) of a term of ``shape`` ``(1, C, H, W)``
    broadcast over the batch: its batch sum, taken in the order of ``g``'s memory
    (a channels-last batch sum in the ``(B, C, H, W)`` view is many times slower)."""
    if shape[0] != 1 or g.shape[0] == 1:
        return g
    if g.is_contiguous(memory_format=torch.channels_last) and not g.is_contiguous():
        return g.permute(0, 2, 3, 1).sum(0, keepdim=True).permute(0, 3, 1, 2)
    return g.sum(0, keepdim=True)
