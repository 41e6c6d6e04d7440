"""Reusable test pieces: a linear vector field with closed-form flow."""

from __future__ import annotations

from torch import Tensor, nn

from cnf.fields import VectorField


class LinearField(VectorField):
    """``f(t, z) = A z``: the flow is ``z(T) = e^{AT} z(0)`` and ``J = A`` everywhere."""

    def __init__(self, a: Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())
        self.event_shape = (a.shape[0],)

    def forward(self, t, z, tangents=None, weights=None):
        jv = None if tangents is None else tangents @ self.a.T
        return z @ self.a.T, jv


def count_calls(field: nn.Module) -> list[int]:
    """Wrap ``field.forward`` to count its calls; returns the one-element counter."""
    calls = [0]
    inner = field.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    field.forward = counted
    return calls
