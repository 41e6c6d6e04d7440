"""FFJORD's MLP field with ``z`` and its tangents in one batch, as one autograd node.

A toy or tabular field evaluation does little arithmetic (a few 64x64 products on
a few hundred rows), so its cost is the number of operations the autograd graph
records and replays, not the arithmetic. :func:`paired_forward` evaluates the
whole chain of layers as a single :class:`_PairedMLP` node with a hand-written
backward pass:

* ``z`` (``B`` rows) and its tangents (``B*K`` rows) are one stacked matrix, so
  each layer is one matrix product ``X Wᵀ``; only the ``z`` rows get the shift;
* with one time ``t`` for the batch, a layer is ``y = g ⊙ (W x) + c`` with the gate
  ``g`` (concatsquash: ``σ(a t + c_g)``; concat: ``1``) and shift ``c`` (concatsquash:
  ``g ⊙ b + d t``; concat: ``b + w_t t``); ``g`` and ``c`` of all layers are computed
  inside the node from per-solve concatenations of the layers' time parameters
  (:func:`time_parameters`), and its backward pass returns the gradients of ``t`` and
  of those parameters;
* a hidden layer's nonlinearity maps the stack ``[a; u]`` to ``[σ(a); σ'(a) ⊙ u]``.

The backward pass of the stack, with ``s = σ'(a)`` and ``σ''`` from ``(σ(a), s)``
(tanh: ``σ'' = -2 σ s``; softplus: ``σ'' = s (1 - s)``), is
``∂a = ∂h ⊙ s + (Σ_k ∂u'_k ⊙ u_k) ⊙ σ''`` and ``∂u = ∂u' ⊙ s``; a layer's
``∂(gW) = ∂Pᵀ X`` and ``∂X = ∂P (gW)``. Values, ``J v`` and all first derivatives
are those of :class:`cnf.fields.LayeredField` up to floating-point rounding;
second derivatives (GraSP scores build a graph of the gradient) recompute the
stack with differentiable operations.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from cnf.activations import Activation, Softplus, Tanh
from cnf.layers import ConcatLinear, ConcatSquashLinear

_KINDS = {Tanh: "tanh", Softplus: "softplus"}


def paired_kind(layers: Sequence[nn.Module], activations: Sequence[Activation]) -> str | None:
    """``"tanh"`` or ``"softplus"`` if the stacked evaluation applies to this chain
    (all concatsquash or all concat layers, one of those two nonlinearities
    throughout), else ``None``."""
    kinds = {_KINDS.get(type(a)) for a in activations}
    if len(kinds) != 1 or None in kinds:
        return None
    types = {type(layer) for layer in layers}
    if types not in ({ConcatSquashLinear}, {ConcatLinear}):
        return None
    return kinds.pop()


def time_parameters(layers: Sequence[nn.Module]) -> dict[str, Tensor]:
    """The layers' time-conditioning parameters, each concatenated over the layers
    (computed once per solve; :func:`paired_forward` reads them under these keys)."""
    if isinstance(layers[0], ConcatSquashLinear):
        names = ("gate_weight", "gate_bias", "bias", "time_bias")
    else:
        names = ("bias", "time_weight")
    return {f"paired.{n}": torch.cat([getattr(layer, n) for layer in layers]) for n in names}


def paired_forward(
    layers: Sequence[nn.Module], kind: str, t: Tensor, z: Tensor, tangents: Tensor,
    weights: Mapping[str, Tensor],
) -> tuple[Tensor, Tensor]:
    """``(f, J·tangents)`` for one time ``t`` (shape ``()``), ``z`` of shape ``(B, D)``
    and tangents ``(B, K, D)``; ``weights`` holds ``layers.{i}.weight`` and,
    when computed per solve, :func:`time_parameters`."""
    if "paired.bias" not in weights:
        weights = {**weights, **time_parameters(layers)}
    if "paired.gate_weight" in weights:
        time = [weights[f"paired.{n}"] for n in ("gate_weight", "gate_bias", "bias", "time_bias")]
    else:
        time = [None, None, weights["paired.bias"], weights["paired.time_weight"]]
    ws = [weights[f"layers.{i}.weight"] for i in range(len(layers))]
    return _PairedMLP.apply(kind, t, z, tangents, *time, *ws)


def _time_terms(t: Tensor, gate_weight, gate_bias, bias: Tensor, time_weight: Tensor):
    """Every layer's gate (``None`` for concat layers) and shift at time ``t``."""
    if gate_weight is None:
        return None, torch.addcmul(bias, t, time_weight)
    gate = torch.sigmoid(torch.addcmul(gate_bias, t, gate_weight))
    return gate, torch.addcmul(t * time_weight, bias, gate)


class _PairedMLP(torch.autograd.Function):
    """The stacked chain: inputs ``(kind, t, z, v, gate_weight, gate_bias, bias,
    time_weight, W_0, ..., W_L)`` (the first two ``None`` for concat layers; each time
    parameter concatenated over the layers), outputs ``(f, J v)``; see the module
    docstring for the formulas."""

    @staticmethod
    def forward(ctx, kind: str, t: Tensor, z: Tensor, v: Tensor, gate_weight, gate_bias, bias, time_weight, *ws):
        saved: list[Tensor] = []
        f, jv, gate = _stacked(kind, t, z, v, gate_weight, gate_bias, bias, time_weight, *ws, saved=saved)
        ctx.save_for_backward(t, z, v, gate_weight, gate_bias, bias, time_weight, gate, *ws, *saved)
        ctx.kind, ctx.b, ctx.k, ctx.layers = kind, v.shape[0], v.shape[1], len(ws)
        return f, jv

    @staticmethod
    def backward(ctx, grad_f: Tensor, grad_jv: Tensor):
        kind, b, k, count = ctx.kind, ctx.b, ctx.k, ctx.layers
        t, z, v, gate_weight, gate_bias, bias, time_weight, gate, *rest = ctx.saved_tensors
        ws, saved = rest[:count], rest[count:]
        if torch.is_grad_enabled():
            inputs = (t, z, v, gate_weight, gate_bias, bias, time_weight, *ws)
            return _second_order_backward(ctx, kind, inputs, grad_f, grad_jv)
        dp = grad_f.new_empty(b + b * k, grad_f.shape[1])
        dp[:b].copy_(grad_f)
        dp[b:].view(b, k, -1).copy_(grad_jv)
        grad_ws: list[Tensor] = [None] * count  # type: ignore[list-item]
        grad_gates: list[Tensor] = []
        grad_shifts: list[Tensor] = []
        gates = [None] * count if gate is None else gate.split([w.shape[0] for w in ws])
        for i in reversed(range(count)):
            x, wg = saved[4 * i], saved[4 * i + 1]
            grad_wg = dp.T @ x
            grad_shifts.append(dp[:b].sum(0))
            if gate is None:
                grad_ws[i] = grad_wg
            else:
                grad_ws[i] = grad_wg * gates[i].unsqueeze(1)
                grad_gates.append((grad_wg * ws[i]).sum(1))
            dx = dp @ wg
            if i == 0:
                break
            u, s = saved[4 * i - 2], saved[4 * i - 1]
            m = s.shape[1]
            dxv = dx[b:].view(b, k, m)
            dp = torch.empty_like(dx)
            torch.mul(dxv, s.unsqueeze(1), out=dp[b:].view(b, k, m))
            du = (dxv * u).sum(1)  # ∂ of the loss with respect to the slope s
            if kind == "tanh":  # ∂a = s ⊙ (∂h - 2 h ⊙ ∂s)
                h = x[:b]
                torch.mul(torch.add(dx[:b], h * du, alpha=-2.0), s, out=dp[:b])
            else:  # ∂a = ∂h ⊙ s + ∂s ⊙ s (1 - s)
                torch.addcmul(torch.ops.aten.sigmoid_backward(du, s), dx[:b], s, out=dp[:b])
        grad_shift = torch.cat(grad_shifts[::-1])
        grad_v = dx[b:].view(b, k, -1) if ctx.needs_input_grad[3] else None
        # the time terms: shift = gate ⊙ bias + t d (concat: bias + t w_t), gate = σ(a t + c)
        grad_time_weight = grad_shift * t
        grad_t = (grad_shift * time_weight).sum()
        if gate is None:
            grad_gw = grad_gb = None
            grad_bias = grad_shift
        else:
            grad_bias = grad_shift * gate
            grad_gate = torch.cat(grad_gates[::-1]).addcmul_(grad_shift, bias)
            grad_gb = torch.ops.aten.sigmoid_backward(grad_gate, gate)
            grad_gw = grad_gb * t
            grad_t = grad_t + (grad_gb * gate_weight).sum()
        return (None, grad_t.view_as(t), dx[:b], grad_v, grad_gw, grad_gb, grad_bias, grad_time_weight, *grad_ws)


def _stacked(kind: str, t, z, v, gate_weight, gate_bias, bias, time_weight, *ws: Tensor,
             saved: list[Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(f, J v, gate)`` of the stacked chain, in plain (differentiable) operations: run
    without a graph inside :class:`_PairedMLP`, which passes ``saved`` to collect what its
    backward pass reads (per layer its stacked input and gated weight; per hidden layer
    the tangent rows ``u`` of its product and the slope ``s``), and with a graph for
    second derivatives."""
    gate, shift = _time_terms(t, gate_weight, gate_bias, bias, time_weight)
    b, k = v.shape[:2]
    x = torch.cat([z, v.flatten(0, 1)])
    sizes = [w.shape[0] for w in ws]
    gates = [None] * len(ws) if gate is None else gate.split(sizes)
    for i, (w, g, c) in enumerate(zip(ws, gates, shift.split(sizes))):
        wg = w if g is None else w * g.unsqueeze(1)
        p = x @ wg.T
        if saved is not None:
            saved += [x, wg]
        a = p[:b] + c
        u = p[b:].view(b, k, -1)
        if i == len(ws) - 1:
            return a, u, gate
        if kind == "tanh":
            h = torch.tanh(a)
            s = 1.0 - h * h  # as cnf.activations.Tanh rounds it
        else:
            h = torch.nn.functional.softplus(a)
            s = torch.sigmoid(a)
        if saved is not None:
            saved += [u, s]
        x = torch.cat([h, (u * s.unsqueeze(1)).flatten(0, 1)])
    raise AssertionError("unreachable")


def _second_order_backward(ctx, kind: str, inputs: tuple, grad_f: Tensor, grad_jv: Tensor):
    """First derivatives as a differentiable graph (for a second backward pass)."""
    wanted = [i for i, need in enumerate(ctx.needs_input_grad[1:]) if need]
    with torch.enable_grad():
        # Differentiate with respect to fresh aliases of the inputs, so that each gradient
        # counts only the uses inside this node (an input may also enter another input).
        aliases = [None if x is None else x.view_as(x) for x in inputs]
        outputs = _stacked(kind, *aliases)[:2]
        grads = torch.autograd.grad(
            outputs, [aliases[i] for i in wanted], (grad_f, grad_jv), create_graph=True, allow_unused=True
        )
    result: list[Tensor | None] = [None] * len(inputs)
    for i, g in zip(wanted, grads):
        result[i] = g
    return None, *result
