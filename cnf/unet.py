"""A small time-conditioned U-Net vector field for images, with exact Jacobian-vector products.

The field follows the contract of :mod:`cnf.fields`:
``forward(t, z, tangents, weights) -> (f, J·tangents)`` with ``z`` of shape
``(B, C, H, W)`` and tangents of shape ``(B, K, C, H, W)``. Every convolution
kernel is a prunable ``weight`` with a ``weight_mask`` buffer from construction,
and ``weights`` maps each kernel's name to its effective value (``weight * mask
* gate``), so masks, pruning-at-initialization scores and L0 gates apply as to
the other fields. Group-norm parameters, biases and the time network stay dense.

Layout for ``channels = (c_0, ..., c_{L-1})`` (resolution halved ``L - 1`` times;
for MNIST ``(32, 64, 64)``: 28 -> 14 -> 7)::

    input 3x3 conv C -> c_0
    down.l      residual block c_l -> c_l at level l, kept as a skip; then
    downsample.l  3x3 conv, stride 2, c_l -> c_{l+1}            (l < L - 1)
    middle      residual block at the lowest level
    up.l        residual block on [h, skip_l]: 2 c_l -> c_l, then
    upsample.l  nearest x2 and 3x3 conv c_l -> c_{l-1}          (l > 0)
    output      group norm, nonlinearity, 3x3 conv c_0 -> C

A residual block is ``h ↦ skip(h) + conv2(σ(γ(t) ⊙ conv1(σ(GN(h))) + β(t)))``,
``skip`` the identity or a 1x1 convolution, ``(γ, β) = 1 + scale, shift`` from an
MLP on a sinusoidal embedding of ``t``. The ``width`` channels between ``conv1``
and ``conv2`` see no normalization, so each is a *hidden unit* in the sense of
:mod:`pruning.structured`: masking its outgoing column of ``conv2.weight``
removes it exactly (:meth:`UNetField.hidden_units`, :meth:`UNetField.compacted`).
Group norm is per example (no batch statistics), so examples never interact.

Jacobian-vector products go through every layer by the chain rule: convolutions,
resampling, concatenation and sums are linear; a nonlinearity multiplies by
``σ'``; the time modulation by ``γ(t)``; group norm, with ``x̂ = (x − μ)/s`` and
``s = √(var + ε)`` over a group of ``n`` entries, maps a tangent ``v`` to
``g ⊙ (v − mean(v) − x̂ mean(x̂ v)) / s``.

References: Ronneberger et al. 2015 (U-Net); Ho et al. 2020 (the DDPM U-Net's
residual blocks with time embeddings); Wu and He 2018 (group normalization);
Lipman et al. 2023 (a U-Net field trained by flow matching).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnf.activations import Activation, make_activation
from cnf.errors import ConfigError
from cnf.fields import VectorField

Pair = tuple[Tensor, Tensor | None]


def _scope(weights: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``weights`` under ``prefix.``, with the prefix removed."""
    start = len(prefix) + 1
    return {k[start:]: w for k, w in weights.items() if k.startswith(prefix + ".")}


def _fold(v: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``fn`` (a map on ``(N, C, H, W)``) to tangents ``(B, K, C, H, W)``."""
    b, k = v.shape[:2]
    return fn(v.flatten(0, 1)).unflatten(0, (b, k))


def _activate(act: Activation, x: Tensor, v: Tensor | None) -> Pair:
    """``(σ(x), σ'(x) ⊙ v)``; ``σ(x)`` alone when there are no tangents."""
    if v is None:
        return act.value(x), None
    y, slope = act(x)
    return y, v * slope.unsqueeze(1)


class MaskedConv2d(nn.Module):
    """A 2-D convolution (zero padding ``kernel_size // 2``) with a prunable ``weight``
    ``(out, in, k, k)``, its ``weight_mask`` buffer and a dense ``bias``.

    ``forward(x, v, weight) -> (y, J v)``: the convolution is linear, so ``J v`` is
    the same convolution without bias applied to every tangent.
    """

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int = 3, *, stride: int = 1) -> None:
        super().__init__()
        self.stride, self.padding = stride, kernel_size // 2
        shape = (dim_out, dim_in, kernel_size, kernel_size)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(dim_out))
        self.register_buffer("weight_mask", torch.ones(shape))
        bound = 1.0 / math.sqrt(dim_in * kernel_size**2)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, v: Tensor | None, weight: Tensor) -> Pair:
        y = F.conv2d(x, weight, self.bias, stride=self.stride, padding=self.padding)
        if v is None:
            return y, None
        return y, _fold(v, lambda u: F.conv2d(u, weight, stride=self.stride, padding=self.padding))


class GroupNorm(nn.Module):
    """Group normalization with a per-channel affine map, and its exact tangent map.

    ``forward(x, v) -> (y, J v)`` (see the module docstring for ``J v``).
    """

    def __init__(self, groups: int, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        if channels % groups:
            raise ConfigError(f"group norm: {channels} channels do not split into {groups} groups")
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor, v: Tensor | None) -> Pair:
        if v is None:  # torch's fused kernel, same formula
            return F.group_norm(x, self.groups, self.weight, self.bias, self.eps), None
        g = x.reshape(x.shape[0], self.groups, -1)
        mu = g.mean(-1, keepdim=True)
        inv = torch.rsqrt(g.var(-1, unbiased=False, keepdim=True) + self.eps)
        xhat = (g - mu) * inv
        gain = self.weight.view(-1, 1, 1)
        y = xhat.view_as(x) * gain + self.bias.view(-1, 1, 1)
        if v is None:
            return y, None
        u = v.reshape(*v.shape[:2], self.groups, -1)
        xh, iv = xhat.unsqueeze(1), inv.unsqueeze(1)
        u = (u - u.mean(-1, keepdim=True) - xh * (xh * u).mean(-1, keepdim=True)) * iv
        return y, u.view_as(v) * gain


class TimeEmbedding(nn.Module):
    """``t ↦ SiLU(MLP([sin(ω_k t), cos(ω_k t)]_k))``, ``ω_k`` geometric from 1 to
    ``max_frequency`` (``dim / 2`` of them). ``t`` of shape ``()`` or ``(B,)`` gives
    ``(1, dim)`` or ``(B, dim)``. High frequencies make the field vary fast in
    ``t``, which costs an adaptive ODE solver steps: keep ``max_frequency`` modest."""

    def __init__(self, dim: int, max_frequency: float) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ConfigError(f"the time embedding needs an even dimension ≥ 2 (got {dim})")
        half = dim // 2
        self.register_buffer(
            "frequencies", torch.logspace(0.0, math.log10(max_frequency), half), persistent=False
        )
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim), nn.SiLU())

    def forward(self, t: Tensor) -> Tensor:
        angle = t.reshape(-1, 1).to(self.frequencies) * self.frequencies
        return self.mlp(torch.cat([angle.sin(), angle.cos()], -1))


class ResBlock(nn.Module):
    """``h ↦ skip(h) + conv2(σ(γ(t) ⊙ conv1(σ(GN(h))) + β(t)))`` with ``width``
    hidden channels (units) between ``conv1`` and ``conv2``."""

    def __init__(self, dim_in: int, dim_out: int, width: int, time_dim: int, *, groups: int,
                 nonlinearity: str) -> None:
        super().__init__()
        self.width = width
        self.norm = GroupNorm(groups, dim_in)
        self.act_in = make_activation(nonlinearity)
        self.conv1 = MaskedConv2d(dim_in, width)
        self.time = nn.Linear(time_dim, 2 * width)
        self.act_mid = make_activation(nonlinearity)
        self.conv2 = MaskedConv2d(width, dim_out)
        self.skip = MaskedConv2d(dim_in, dim_out, 1) if dim_in != dim_out else None

    def forward(self, h: Tensor, v: Tensor | None, emb: Tensor, weights: Mapping[str, Tensor]) -> Pair:
        a, va = _activate(self.act_in, *self.norm(h, v))
        a, va = self.conv1(a, va, weights["conv1.weight"])
        scale, shift = self.time(emb)[:, :, None, None].chunk(2, dim=1)
        a = torch.addcmul(shift, a, 1.0 + scale)
        va = None if va is None else va * (1.0 + scale).unsqueeze(1)
        a, va = _activate(self.act_mid, a, va)
        a, va = self.conv2(a, va, weights["conv2.weight"])
        if self.skip is None:
            s, vs = h, v
        else:
            s, vs = self.skip(h, v, weights["skip.weight"])
        return a + s, (None if va is None else va + vs)


class UNetField(VectorField):
    """A time-conditioned U-Net on images of shape ``event_shape = (C, H, W)``.

    Args:
        event_shape: ``(C, H, W)``; ``H`` and ``W`` divisible by ``2^(L-1)``.
        channels: ``(c_0, ..., c_{L-1})``, the residual channels at each level.
        groups: group-norm groups (must divide every ``c_l``).
        nonlinearity: a name from :data:`cnf.activations.ACTIVATIONS`.
        time_dim: size of the time embedding.
        max_frequency: the highest frequency of the sinusoidal time embedding.
        inner_widths: hidden channels of each residual block, in the order of
            :meth:`hidden_units` (``down.0 .. down.{L-1}``, ``middle``, ``up.0 ..
            up.{L-1}``); default ``c_l`` at level ``l``. A compacted field sets them.

    ``t`` may be a scalar (one time for the batch, as in an ODE solve) or ``(B,)``.

    References: Ronneberger et al. 2015; Ho et al. 2020.
    """

    per_example_time = True

    def __init__(
        self,
        event_shape: Sequence[int],
        channels: Sequence[int] = (32, 64, 64),
        *,
        groups: int = 8,
        nonlinearity: str = "swish",
        time_dim: int = 64,
        max_frequency: float = 30.0,
        inner_widths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if len(event_shape) != 3:
            raise ConfigError(f"UNetField needs an image shape (C, H, W) (got {tuple(event_shape)})")
        if not channels:
            raise ConfigError("UNetField needs at least one level of channels")
        levels = len(channels)
        factor = 2 ** (levels - 1)
        if event_shape[1] % factor or event_shape[2] % factor:
            raise ConfigError(f"{levels} U-Net levels halve the image {levels - 1} times: H and W must be "
                              f"divisible by {factor} (got {tuple(event_shape[1:])})")
        default = [*channels, channels[-1], *channels]
        widths = list(default if inner_widths is None else inner_widths)
        if len(widths) != 2 * levels + 1 or min(widths) < 1:
            raise ConfigError(f"inner_widths needs {2 * levels + 1} positive widths (got {widths})")
        self.event_shape = tuple(event_shape)
        self.channels, self.inner_widths = tuple(channels), tuple(widths)
        self.options = dict(groups=groups, nonlinearity=nonlinearity, time_dim=time_dim,
                            max_frequency=max_frequency)
        block = dict(groups=groups, nonlinearity=nonlinearity)
        c = channels
        self.time_embedding = TimeEmbedding(time_dim, max_frequency)
        self.input = MaskedConv2d(event_shape[0], c[0])
        self.down = nn.ModuleList(
            ResBlock(c[k], c[k], widths[k], time_dim, **block) for k in range(levels))
        self.downsample = nn.ModuleList(
            MaskedConv2d(c[k], c[k + 1], stride=2) for k in range(levels - 1))
        self.middle = ResBlock(c[-1], c[-1], widths[levels], time_dim, **block)
        self.up = nn.ModuleList(
            ResBlock(2 * c[k], c[k], widths[levels + 1 + k], time_dim, **block) for k in range(levels))
        self.upsample = nn.ModuleList(MaskedConv2d(c[k], c[k - 1]) for k in range(1, levels))
        self.output_norm = GroupNorm(groups, c[0])
        self.output_act = make_activation(nonlinearity)
        self.output = MaskedConv2d(c[0], event_shape[0])

    def forward(
        self,
        t: Tensor,
        z: Tensor,
        tangents: Tensor | None = None,
        weights: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``f(t, z)`` of shape ``(B, C, H, W)`` and ``J·tangents`` of shape ``(B, K, C, H, W)``."""
        if weights is None:
            weights = self.masked_weights()
        emb = self.time_embedding(t)
        levels = len(self.channels)
        h, v = self.input(z, tangents, weights["input.weight"])
        skips = []
        for k in range(levels):
            h, v = self.down[k](h, v, emb, _scope(weights, f"down.{k}"))
            skips.append((h, v))
            if k < levels - 1:
                h, v = self.downsample[k](h, v, weights[f"downsample.{k}.weight"])
        h, v = self.middle(h, v, emb, _scope(weights, "middle"))
        for k in reversed(range(levels)):
            s, vs = skips[k]
            h = torch.cat([h, s], 1)
            v = None if v is None else torch.cat([v, vs], 2)
            h, v = self.up[k](h, v, emb, _scope(weights, f"up.{k}"))
            if k > 0:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
                v = None if v is None else _fold(v, lambda u: F.interpolate(u, scale_factor=2.0, mode="nearest"))
                h, v = self.upsample[k - 1](h, v, weights[f"upsample.{k - 1}.weight"])
        h, v = _activate(self.output_act, *self.output_norm(h, v))
        return self.output(h, v, weights["output.weight"])

    def residual_blocks(self) -> dict[str, ResBlock]:
        """The residual blocks by name, in the order of ``inner_widths``."""
        levels = len(self.channels)
        return {
            **{f"down.{k}": self.down[k] for k in range(levels)},
            "middle": self.middle,
            **{f"up.{k}": self.up[k] for k in range(levels)},
        }

    def hidden_units(self) -> dict[str, tuple[str, str]]:
        """``{block: (incoming weight, outgoing weight)}`` for the hidden channels of
        every residual block: unit ``j`` is row ``j`` of ``<block>.conv1.weight`` and
        column ``j`` of ``<block>.conv2.weight`` (names relative to the field, as
        in :meth:`prunable_weights`). The residual channels are not units: they
        enter group norms and skip connections."""
        return {name: (f"{name}.conv1.weight", f"{name}.conv2.weight") for name in self.residual_blocks()}

    def live_units(self) -> dict[str, Tensor]:
        """Per residual block, a boolean ``(width,)``: whether the hidden channel has an
        unmasked outgoing weight (a channel without one contributes nothing to ``f``)."""
        return {
            name: block.conv2.weight_mask.abs().sum(dim=(0, 2, 3)) > 0
            for name, block in self.residual_blocks().items()
        }

    @torch.no_grad()
    def compacted_state(self) -> tuple[tuple[int, ...], dict[str, Tensor]]:
        """``(inner_widths, state)``: the hidden widths without the dead channels (see
        :meth:`live_units`) and the state dict of a field built with those widths,
        which computes the same ``f`` and ``J v`` (up to summation order). Dropped per
        dead channel ``j`` of a block: row ``j`` of ``conv1``'s weight, mask and bias,
        rows ``j`` and ``width + j`` (its scale and shift) of ``time``, column ``j``
        of ``conv2``'s weight and mask. ``self`` is unchanged.

        Raises:
            ConfigError: if a residual block has no live hidden channel.
        """
        live = self.live_units()
        for name, keep in live.items():
            if not bool(keep.any()):
                raise ConfigError(f"every hidden channel of {name} is pruned; this field cannot be compacted")
        state = {}
        for key, value in self.state_dict().items():
            block, _, attr = key.rpartition(".")
            owner, _, part = block.rpartition(".")
            if owner in live:
                index = live[owner].nonzero().squeeze(1).to(value.device)
                if part == "conv1":
                    value = value.index_select(0, index)
                elif part == "conv2" and attr in ("weight", "weight_mask"):
                    value = value.index_select(1, index)
                elif part == "time":
                    value = value.index_select(0, torch.cat([index, index + live[owner].numel()]))
            state[key] = value
        return tuple(int(k.sum()) for k in live.values()), state

    def compacted(self) -> UNetField:
        """A new, smaller field from :meth:`compacted_state`, with the device, dtype and
        train/eval mode of ``self``."""
        widths, state = self.compacted_state()
        reference = next(self.parameters())
        new = UNetField(self.event_shape, self.channels, inner_widths=widths, **self.options)
        new = new.to(device=reference.device, dtype=reference.dtype)
        new.load_state_dict(state)
        return new.train(self.training)
