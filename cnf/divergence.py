"""Divergence ``tr(∂f/∂z)`` and squared Jacobian Frobenius norm estimators.

Both estimators work from Jacobian-vector products ``J v`` returned by the vector
field for a set of tangents ``v`` (see :mod:`cnf.fields`):

* :class:`Exact` uses the ``D`` standard basis vectors, so ``J v`` is the full
  Jacobian: ``tr J`` and ``‖J‖_F²`` are exact. Cost grows with ``D``: for low ``D``.
* :class:`Hutchinson` uses one probe ``ε`` with ``E[ε εᵀ] = I`` (Gaussian or
  Rademacher), drawn once per ODE solve: ``εᵀ J ε`` is an unbiased estimate of
  ``tr J`` and ``‖J ε‖²`` an unbiased estimate of ``‖J‖_F²``.

References: FFJORD, Grathwohl et al. 2019; Hutchinson 1989.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cnf.errors import ConfigError


@dataclass(frozen=True)
class Exact:
    """Exact divergence from the full Jacobian (one tangent per dimension)."""

    def tangents(self, z: Tensor) -> Tensor:
        """Basis tangents of shape ``(B, D, *event)`` (an expanded view, no copy)."""
        event = z.shape[1:]
        d = event.numel()
        eye = torch.eye(d, dtype=z.dtype, device=z.device).view(1, d, *event)
        return eye.expand(z.shape[0], d, *event)

    def reduce(self, tangents: Tensor, jv: Tensor) -> tuple[Tensor, Tensor]:
        """``(tr J, ‖J‖_F²)`` per sample, each of shape ``(B,)``."""
        b, d = jv.shape[:2]
        jac = jv.reshape(b, d, d)
        return jac.diagonal(dim1=1, dim2=2).sum(-1), jac.pow(2).sum((1, 2))


@dataclass(frozen=True)
class Hutchinson:
    """Hutchinson's estimator with one probe per sample, ``noise`` ∈ {gaussian, rademacher}."""

    noise: str = "gaussian"

    def __post_init__(self) -> None:
        if self.noise not in ("gaussian", "rademacher"):
            raise ConfigError(
                f"unknown Hutchinson noise {self.noise!r}; valid: gaussian, rademacher"
            )

    def tangents(self, z: Tensor) -> Tensor:
        """One probe per sample, shape ``(B, 1, *event)``."""
        shape = (z.shape[0], 1, *z.shape[1:])
        if self.noise == "gaussian":
            return torch.randn(shape, dtype=z.dtype, device=z.device)
        return torch.randint(0, 2, shape, device=z.device).to(z.dtype) * 2 - 1

    def reduce(self, tangents: Tensor, jv: Tensor) -> tuple[Tensor, Tensor]:
        """Estimates of ``(tr J, ‖J‖_F²)`` per sample, each of shape ``(B,)``."""
        return (tangents * jv).flatten(1).sum(1), jv.pow(2).flatten(1).sum(1)


Divergence = Exact | Hutchinson


def make_divergence(name: str, noise: str = "gaussian") -> Divergence:
    """``exact`` or ``hutchinson`` (with ``noise``) from their config names."""
    if name == "exact":
        return Exact()
    if name == "hutchinson":
        return Hutchinson(noise)
    raise ConfigError(f"unknown divergence {name!r}; valid: exact, hutchinson")
