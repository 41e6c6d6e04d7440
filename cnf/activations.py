"""Nonlinearities that also return their elementwise derivative.

The vector fields propagate Jacobian-vector products alongside the forward pass
(see :mod:`cnf.fields`), so every nonlinearity provides ``σ(x)`` and ``σ'(x)``
together. Each layer gets its own instance: :func:`make_activation` builds a new
module on every call, so a learnable parameter (swish's β) is never shared.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnf.errors import ConfigError


class Activation(nn.Module):
    """Base class: subclasses implement ``forward(x) -> (σ(x), σ'(x))`` and
    ``value(x) -> σ(x)``, the cheaper call for passes without tangents (sampling,
    flow-matching training)."""

    def value(self, x: Tensor) -> Tensor:
        return self(x)[0]


class Tanh(Activation):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = torch.tanh(x)
        return y, 1.0 - y * y

    def value(self, x: Tensor) -> Tensor:
        return torch.tanh(x)


class Softplus(Activation):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return F.softplus(x), torch.sigmoid(x)

    def value(self, x: Tensor) -> Tensor:
        return F.softplus(x)


class ELU(Activation):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = F.elu(x)
        return y, torch.where(x > 0, torch.ones_like(x), y + 1.0)

    def value(self, x: Tensor) -> Tensor:
        return F.elu(x)


class Swish(Activation):
    """``x σ(βx)`` with a learnable β of its own (Ramachandran et al. 2017).

    References: Searching for Activation Functions, Ramachandran et al. 2017.
    """

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(float(beta)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        bx = self.beta * x
        s = torch.sigmoid(bx)
        y = x * s
        return y, s + bx * s * (1.0 - s)

    def value(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.beta * x)


ACTIVATIONS: dict[str, Callable[[], Activation]] = {
    "tanh": Tanh,
    "softplus": Softplus,
    "elu": ELU,
    "swish": Swish,
}


def make_activation(name: str) -> Activation:
    """A new activation module for ``name`` (one of :data:`ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(
            f"unknown nonlinearity {name!r}; valid: {', '.join(sorted(ACTIVATIONS))}"
        ) from None
