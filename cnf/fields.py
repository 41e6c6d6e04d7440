"""Vector fields ``f(t, z)`` that also return Jacobian-vector products.

A field's ``forward(t, z, tangents, weights)`` returns ``(f, J·tangents)``, where
``J = ∂f/∂z`` at ``(t, z)``. The products are propagated layer by layer with the
chain rule (``J_l v = σ'(h_l) ⊙ (W_l J_{l-1} v)``) rather than by a second
backward pass, so the exact divergence (tangents = the identity) and the
Hutchinson estimate (one random tangent) cost only first-order autograd when
training. ``weights`` maps each prunable weight's name to the tensor to use in
its place; the ODE block passes ``weight * mask * gate`` computed once per solve.

Image fields (convolutional) follow the same contract with ``z`` of shape
``(B, C, H, W)`` and tangents of shape ``(B, K, C, H, W)``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from cnf.activations import make_activation
from cnf.errors import ConfigError
from cnf.layers import LAYERS
from cnf.mlp_paired import paired_forward, paired_kind, time_parameters


class VectorField(nn.Module):
    """Base class of vector fields: holds prunable weights and their masks.

    Subclasses set ``event_shape`` and implement
    ``forward(t, z, tangents=None, weights=None) -> (f, J·tangents or None)``.
    ``per_example_time``: whether ``t`` may also be a batch of times, shape ``(B,)``,
    one per example (otherwise ``t`` is one time for the whole batch).
    """

    event_shape: tuple[int, ...]
    per_example_time: bool = False

    def prunable_weights(self) -> dict[str, nn.Parameter]:
        """Parameters that masks and gates act on, keyed by their name in the field."""
        return {
            f"{name}.weight": module.weight
            for name, module in self.named_modules()
            if hasattr(module, "weight_mask")
        }

    def masked_weights(self) -> dict[str, Tensor]:
        """``weight * weight_mask`` for every prunable weight, keyed like :meth:`prunable_weights`."""
        return {
            f"{name}.weight": module.weight * module.weight_mask
            for name, module in self.named_modules()
            if hasattr(module, "weight_mask")
        }

    def solve_inputs(self, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """What every evaluation of one solve reads, computed once per solve from the
        effective prunable ``weights`` (keyed like :meth:`prunable_weights`) and the
        parameters: by default the weights as they are. A field may convert them to
        the layout its products use or add terms that depend on parameters alone
        (under other keys); ``forward`` accepts the result as its ``weights``."""
        return dict(weights)


class LayeredField(VectorField):
    """A chain of time-conditioned layers with a nonlinearity between them.

    Subclasses build ``self.layers`` (each ``layer(t, x, v, weight) -> (y, J·v)``)
    and ``self.activations`` (one per hidden layer); the forward pass and the
    chain rule for ``J·v`` are shared: ``J_l v = σ'(h_l) ⊙ (W_l J_{l-1} v)``.
    ``weights`` may be the field's :meth:`solve_inputs`; an entry
    ``layers.{i}.time_map`` is passed on to layer ``i``.
    """

    layers: nn.ModuleList
    activations: nn.ModuleList

    def forward(
        self,
        t: Tensor,
        z: Tensor,
        tangents: Tensor | None = None,
        weights: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``f(t, z)`` of shape ``(B, *event)`` and ``J·tangents`` of shape ``(B, K, *event)``."""
        if weights is None:
            weights = self.masked_weights()
        h, v = z, tangents
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            time_map = weights.get(f"layers.{i}.time_map")  # per-solve term of some conv layers
            w = weights[f"layers.{i}.weight"]
            h, v = layer(t, h, v, w) if time_map is None else layer(t, h, v, w, time_map)
            if i < last and v is None:
                h = self.activations[i].value(h)
            elif i < last:
                h, slope = self.activations[i](h)
                v = v * slope.unsqueeze(1)
        return h, v


class MLPField(LayeredField):
    """FFJORD's MLP vector field on flat data of dimension ``dim``.

    ``dim -> hidden_dims[0] -> ... -> hidden_dims[-1] -> dim`` with time-conditioned
    layers (``layer_type``: ``concat`` or ``concatsquash``) and a nonlinearity after
    every layer but the last, each layer with its own activation module.

    ``t`` may be one time for the batch or ``(B,)``, one per example.

    References: FFJORD, Grathwohl et al. 2019.
    """

    per_example_time = True

    def __init__(
        self,
        dim: int,
        hidden_dims: Sequence[int],
        *,
        layer_type: str = "concatsquash",
        nonlinearity: str = "tanh",
    ) -> None:
        super().__init__()
        if layer_type not in LAYERS:
            raise ConfigError(
                f"unknown layer_type {layer_type!r}; valid: {', '.join(sorted(LAYERS))}"
            )
        dims = [dim, *hidden_dims, dim]
        self.event_shape = (dim,)
        self.layers = nn.ModuleList(
            LAYERS[layer_type](a, b) for a, b in zip(dims[:-1], dims[1:])
        )
        self.activations = nn.ModuleList(
            make_activation(nonlinearity) for _ in hidden_dims
        )
        self._paired = paired_kind(self.layers, self.activations)

    def solve_inputs(self, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The weights, and for the stacked evaluation (:mod:`cnf.mlp_paired`) the
        layers' time parameters concatenated once per solve."""
        inputs = dict(weights)
        if self._paired is not None:
            inputs.update(time_parameters(self.layers))
        return inputs

    def forward(
        self,
        t: Tensor,
        z: Tensor,
        tangents: Tensor | None = None,
        weights: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """As :meth:`LayeredField.forward`; with tangents and one time for the batch,
        ``z`` and the tangents go through the layers as one stacked batch in a single
        autograd node (:mod:`cnf.mlp_paired`; not while torch.compile traces, which
        fuses the layer-by-layer form itself)."""
        if tangents is None or t.dim() != 0 or self._paired is None or torch.compiler.is_compiling():
            return super().forward(t, z, tangents, weights)
        if weights is None:
            weights = self.masked_weights()
        return paired_forward(self.layers, self._paired, t, z, tangents, weights)
