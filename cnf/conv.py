"""Time-conditioned convolutions and FFJORD's convolutional vector field for images.

The layers follow the contract of :mod:`cnf.layers` on image tensors: a prunable
data kernel ``weight`` of shape ``(out, in, k, k)`` with a ``weight_mask`` buffer
from construction, small time-conditioning parameters beside it, and
``forward(t, x, v, weight) -> (y, J v)`` with ``x`` of shape ``(B, in, H, W)``
and tangents ``v`` of shape ``(B, K, in, H, W)``. A convolution is linear in its
input, so ``J v`` is the same convolution, without bias or time terms, applied to
every tangent (the ``K`` tangents are folded into the batch).

References: FFJORD, Grathwohl et al. 2019 (``ConcatConv2d`` and the ODE net of
its multiscale image model: 3x3 convolutions, stride 1, padding 1).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnf.activations import make_activation
from cnf.conv_paired import paired_forward
from cnf.errors import ConfigError
from cnf.fields import LayeredField
from cnf.layers import per_example


class TimeConv2d(nn.Module):
    """Base class of time-conditioned 2-D convolutions (stride 1, "same" padding).

    Subclasses implement ``forward(t, x, v, weight) -> (y, J v)``; ``y`` keeps the
    spatial size of ``x`` (odd ``kernel_size``, zero padding ``kernel_size // 2``).
    """

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int = 3, *, fan_in_extra: int = 0) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be a positive odd number (got {kernel_size})")
        self.dim_in, self.dim_out = dim_in, dim_out
        self.padding = kernel_size // 2
        shape = (dim_out, dim_in, kernel_size, kernel_size)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(dim_out))
        self.register_buffer("weight_mask", torch.ones(shape))
        # torch's Conv2d default, with the fan-in of the layer FFJORD builds
        # (a concat layer convolves one extra input channel holding t).
        bound = 1.0 / math.sqrt((dim_in + fan_in_extra) * kernel_size**2)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def masked_weight(self) -> Tensor:
        return self.weight * self.weight_mask

    @staticmethod
    def layout(x: Tensor) -> Tensor:
        """``x`` in the memory layout the layer's convolutions use: channels-last
        (NHWC) on a CPU, where oneDNN's convolutions and their backward passes run
        faster on it (outputs stay channels-last, and so do the nonlinearities and
        tangent products after them); as it is elsewhere or if already so."""
        return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x

    def convolve(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """``weight * x + bias`` (stride 1, "same" padding), by the fastest of the
        kernels below for the channel counts on a CPU."""
        if x.device.type == "cpu" and x.shape[1] == 1:
            return _conv_one_channel(x, weight, bias, self.padding)
        if x.device.type == "cpu" and weight.shape[0] == 1:
            return _conv_to_one_channel(self.layout(x), weight, bias, self.padding)
        return F.conv2d(self.layout(x), self.layout(weight), bias, padding=self.padding)

    def solve_inputs(self, weight: Tensor, size: Sequence[int]) -> dict[str, Tensor]:
        """What the layer's evaluations in one solve read, computed once, keyed by
        the name of the ``forward`` argument: the effective ``weight`` in the
        layout the convolutions use (subclasses add parameter-only terms for
        images of spatial ``size``)."""
        return {"weight": self.layout(weight)}

    def _tangents(self, v: Tensor | None, weight: Tensor) -> Tensor | None:
        """``W * v`` for tangents of shape ``(B, K, in, H, W)`` -> ``(B, K, out, H, W)``."""
        if v is None:
            return None
        b, k = v.shape[:2]
        return self.convolve(v.flatten(0, 1), weight).unflatten(0, (b, k))


class ConcatConv2d(TimeConv2d):
    """``y = W * x + K_t * (t 1) + b``: a convolution of ``[t 1, x]`` (FFJORD's
    ``ConcatConv2d``) with the time channel's kernel ``K_t`` kept as its own
    parameter ``time_weight`` of shape ``(out, 1, k, k)``, so that only the data
    kernel is prunable. ``K_t * 1`` is not constant near the border (zero
    padding), exactly as in FFJORD."""

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int = 3) -> None:
        super().__init__(dim_in, dim_out, kernel_size, fan_in_extra=1)
        self.time_weight = nn.Parameter(torch.empty(dim_out, 1, kernel_size, kernel_size))
        bound = 1.0 / math.sqrt((dim_in + 1) * kernel_size**2)
        nn.init.uniform_(self.time_weight, -bound, bound)

    def time_map(self, size: Sequence[int]) -> Tensor:
        """``K_t * 1`` on an image of spatial ``size``, shape ``(1, out, *size)``:
        the time channel's contribution per unit of time, a function of the
        parameters alone (computed once per solve by :meth:`solve_inputs`)."""
        return self.convolve(self.time_weight.new_ones(1, 1, *size), self.time_weight)

    def solve_inputs(self, weight: Tensor, size: Sequence[int]) -> dict[str, Tensor]:
        return {**super().solve_inputs(weight, size), "time_map": self.time_map(size)}

    def forward(
        self, t: Tensor, x: Tensor, v: Tensor | None, weight: Tensor, time_map: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        weight = self.layout(weight)  # once for both convolutions below (no copy if it already is)
        if time_map is None:
            time_map = self.time_map(x.shape[2:])
        y = _add_time_map(self.convolve(x, weight, self.bias), per_example(t, 3), time_map)
        return y, self._tangents(v, weight)


class ConcatSquashConv2d(TimeConv2d):
    """``y = (W * x + b) ⊙ σ(a t + c) + d t`` with per-channel ``a, c, d``: the
    concatsquash layer of :mod:`cnf.layers` as a convolution."""

    def __init__(self, dim_in: int, dim_out: int, kernel_size: int = 3) -> None:
        super().__init__(dim_in, dim_out, kernel_size)
        self.gate_weight = nn.Parameter(torch.empty(dim_out))
        self.gate_bias = nn.Parameter(torch.empty(dim_out))
        self.time_bias = nn.Parameter(torch.empty(dim_out))
        for p in (self.gate_weight, self.gate_bias, self.time_bias):
            nn.init.uniform_(p, -1.0, 1.0)

    def forward(self, t: Tensor, x: Tensor, v: Tensor | None, weight: Tensor) -> tuple[Tensor, Tensor | None]:
        t = per_example(t, 3)  # () or (B, 1, 1, 1)
        weight = self.layout(weight)  # once for both convolutions below
        gate = torch.sigmoid(t * self.gate_weight.view(-1, 1, 1) + self.gate_bias.view(-1, 1, 1))
        y = self.convolve(x, weight, self.bias) * gate + t * self.time_bias.view(-1, 1, 1)
        jv = self._tangents(v, weight)
        return y, (None if jv is None else jv * gate.unsqueeze(-4))


def _conv_one_channel(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int) -> Tensor:
    """The convolution of a one-channel input as a matrix product of its
    ``k x k`` patches with the kernels; the result is channels-last.

    On a CPU, oneDNN handles one input channel badly (its backward pass takes
    several times as long as this product's, and its output comes back in the
    channels-first layout that the next layer must then copy).
    """
    b, _, h, w = x.shape
    k = weight.shape[-1]
    patches = F.unfold(x, k, padding=padding).transpose(1, 2).reshape(b * h * w, k * k)
    kernels = weight.reshape(weight.shape[0], k * k).t()
    out = patches @ kernels if bias is None else torch.addmm(bias, patches, kernels)
    return out.view(b, h, w, -1).permute(0, 3, 1, 2)


def _conv_to_one_channel(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int) -> Tensor:
    """The convolution of a channels-last input with one output kernel, as one
    matrix product of every pixel's channels with the ``k x k`` kernel taps
    followed by ``F.fold``, which sums each tap's products into the output pixel
    it contributes to; the result is ``(B, 1, H, W)``.

    On a CPU, oneDNN computes a convolution to one channel more slowly than
    this, forward and backward (``bench/conv_kernels.py`` times both).
    """
    b, c, h, w = x.shape
    k = weight.shape[-1]
    # Pixel p contributes weight[..., i, j] * x[p] to output pixel p - (i, j) + padding;
    # F.fold puts column (i', j') of pixel p's block at p + (i', j') - padding, so the
    # kernel enters flipped: (i', j') = (k-1-i, k-1-j).
    taps = weight.flip(-2, -1).reshape(c, k * k)
    products = x.permute(0, 2, 3, 1).reshape(b * h * w, c) @ taps  # (B*H*W, k*k)
    y = F.fold(products.view(b, h * w, k * k).transpose(1, 2), (h, w), k, padding=padding)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def _add_time_map(y: Tensor, t: Tensor, time_map: Tensor) -> Tensor:
    """``y + t * time_map`` for ``y`` of shape ``(B, C, H, W)`` and a map of shape
    ``(1, C, H, W)``, in the order of ``y``'s memory.

    The backward pass sums the gradient over the batch. For a channels-last
    ``y``, torch sums over the batch dimension of the ``(B, C, H, W)`` view
    about 50 times slower than over the same numbers viewed as ``(B, H, W, C)``,
    so a channels-last ``y`` is added in that view.
    """
    if y.is_contiguous() or not y.is_contiguous(memory_format=torch.channels_last):
        return y + t * time_map
    nhwc = (0, 2, 3, 1)
    return (y.permute(nhwc) + t * time_map.permute(nhwc)).permute(0, 3, 1, 2)


CONV_LAYERS: dict[str, type[TimeConv2d]] = {
    "concat": ConcatConv2d,
    "concatsquash": ConcatSquashConv2d,
}


class ConvField(LayeredField):
    """FFJORD's convolutional ODE net on images of shape ``event_shape = (C, H, W)``.

    ``C -> hidden_channels[0] -> ... -> hidden_channels[-1] -> C`` with
    time-conditioned ``kernel_size`` convolutions (stride 1, size-preserving) and
    a nonlinearity after every layer but the last. FFJORD's MNIST model uses
    ``hidden_channels = (64, 64, 64)``, ``concat`` layers and softplus.

    ``t`` may be one time for the batch or ``(B,)``, one per example.

    References: FFJORD, Grathwohl et al. 2019.
    """

    per_example_time = True

    def __init__(
        self,
        event_shape: Sequence[int],
        hidden_channels: Sequence[int],
        *,
        layer_type: str = "concat",
        nonlinearity: str = "softplus",
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if len(event_shape) != 3:
            raise ConfigError(f"ConvField needs an image shape (C, H, W) (got {tuple(event_shape)})")
        if layer_type not in CONV_LAYERS:
            raise ConfigError(f"unknown layer_type {layer_type!r}; valid: {', '.join(sorted(CONV_LAYERS))}")
        self.event_shape = tuple(event_shape)
        channels = [event_shape[0], *hidden_channels, event_shape[0]]
        self.layers = nn.ModuleList(
            CONV_LAYERS[layer_type](a, b, kernel_size) for a, b in zip(channels[:-1], channels[1:])
        )
        self.activations = nn.ModuleList(make_activation(nonlinearity) for _ in hidden_channels)
        self._pairs = layer_type == "concat" and nonlinearity == "softplus"

    def solve_inputs(self, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
        size = self.event_shape[1:]
        return {
            f"layers.{i}.{name}": value
            for i, layer in enumerate(self.layers)
            for name, value in layer.solve_inputs(weights[f"layers.{i}.weight"], size).items()
        }

    def forward(
        self,
        t: Tensor,
        z: Tensor,
        tangents: Tensor | None = None,
        weights: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``(f, J·tangents)`` as :meth:`LayeredField.forward` computes them; on a CPU,
        for concat layers with softplus, ``z`` and the tangents go through the layers
        as one batch (:mod:`cnf.conv_paired`; not while torch.compile traces, which
        fuses the layer-by-layer form itself)."""
        if tangents is None or not self._pairs or z.device.type != "cpu" or torch.compiler.is_compiling():
            return super().forward(t, z, tangents, weights)
        return paired_forward(self.layers, t, z, tangents, self.masked_weights() if weights is None else weights)
