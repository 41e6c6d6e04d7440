"""A continuous normalizing flow: a stack of CNF blocks over a base distribution.

Sign convention (stated once, tested against closed forms): blocks integrate data
``x = z(0)`` to latents ``z(T)``, and

    log p(x) = log p_base(z(T)) + Σ_blocks ∫_0^T tr(∂f/∂z) dt,

with FFJORD's ``p_base = N(0, I)`` unless a fitted mixture is given (:mod:`cnf.base`).

Sampling runs the blocks in reverse order, each from ``T`` back to ``0``.

References: FFJORD, Grathwohl et al. 2019; Neural ODEs, Chen et al. 2018.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from cnf.base import StandardNormal
from cnf.errors import SolverError
from cnf.odeblock import CNFBlock, NFECounter


@dataclass
class FlowTrace:
    """Everything one pass through the flow measured; per-sample tensors are ``(B,)``.

    ``jac_norm`` is the cumulative Jacobian norm ``R = Σ_blocks ∫ ‖∂f/∂z‖_F dt``;
    it and ``logabsdet`` are ``None`` for a pass without density (sampling).
    ``kinetic`` / ``jac_frobenius`` are the RNODE integrals (``None`` unless a block
    integrates them). NFE counts are read from ``counters`` after the fact: the
    backward counts fill in when ``loss.backward()`` runs the adjoint solves.
    """

    out: Tensor
    logabsdet: Tensor | None
    jac_norm: Tensor | None
    kinetic: Tensor | None
    jac_frobenius: Tensor | None
    counters: list[NFECounter]

    @property
    def nfe_forward(self) -> int:
        return sum(c.forward for c in self.counters)

    @property
    def nfe_backward(self) -> int:
        return sum(c.backward for c in self.counters)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


class PassTotals:
    """Running sums of the per-block measurements of one pass through a flow."""

    def __init__(self, x: Tensor, density: bool) -> None:
        self.density = density
        self.logabsdet: Tensor | None = x.new_zeros(x.shape[0]) if density else None
        self.jac_norm: Tensor | None = x.new_zeros(x.shape[0]) if density else None
        self.kinetic: Tensor | None = None
        self.jac_frobenius: Tensor | None = None
        self.counters: list[NFECounter] = []

    def run(self, flow: Flow, indices: range, x: Tensor, reverse: bool) -> Tensor:
        """Push ``x`` through ``flow.blocks[i]`` for ``i`` in ``indices`` (backwards
        if ``reverse``), adding up what each block measured."""
        for index in reversed(indices) if reverse else indices:
            try:
                o = flow.blocks[index](x, reverse=reverse, density=self.density)
            except SolverError as exc:
                raise SolverError(f"block {index}: {exc}") from exc
            x = o.z
            self.logabsdet = _add(self.logabsdet, o.logabsdet)
            self.jac_norm = _add(self.jac_norm, o.jac_norm)
            self.kinetic = _add(self.kinetic, o.kinetic)
            self.jac_frobenius = _add(self.jac_frobenius, o.jac_frobenius)
            self.counters.append(o.nfe)
        return x

    def trace(self, out: Tensor) -> FlowTrace:
        return FlowTrace(out, self.logabsdet, self.jac_norm, self.kinetic, self.jac_frobenius, self.counters)


class Flow(nn.Module):
    """A stack of :class:`CNFBlock` over a base distribution on ``event_shape``.

    ``base`` (default ``N(0, I)``) has ``log_prob`` and ``sample`` as in :mod:`cnf.base`.
    """

    def __init__(self, blocks: Sequence[CNFBlock], event_shape: Sequence[int], base: nn.Module | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.event_shape = tuple(event_shape)
        self.base = base if base is not None else StandardNormal(math.prod(self.event_shape))

    def trace(self, x: Tensor, *, reverse: bool = False, density: bool = True) -> FlowTrace:
        """Push ``x`` through all blocks (data -> latent, or latent -> data if ``reverse``).

        ``logabsdet`` is ``log|det ∂out/∂x|`` of the whole map. ``density=False``
        integrates the states alone (``logabsdet`` and ``jac_norm`` are ``None``):
        the same ``out`` for a fixed-step solver, at a fraction of the cost.
        """
        totals = PassTotals(x, density)
        return totals.trace(totals.run(self, range(len(self.blocks)), x, reverse))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, log|det ∂z/∂x|)``."""
        t = self.trace(x)
        return t.out, t.logabsdet

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, log|det ∂x/∂z|)``."""
        t = self.trace(z, reverse=True)
        return t.out, t.logabsdet

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)`` per sample, shape ``(B,)``."""
        t = self.trace(x)
        return self.base.log_prob(t.out) + t.logabsdet

    def base_noise(
        self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> Tensor:
        """``n`` draws from the base distribution, scaled by ``temperature``.

        Its randomness is drawn on the CPU (with ``generator`` if given, for fixed
        noise), so the same seed gives the same noise on any device.
        """
        ref = next(self.parameters())
        z = self.base.sample(n, generator=generator, temperature=temperature, dtype=ref.dtype, device=ref.device)
        return z.view(n, *self.event_shape)

    def rsample(self, sample_shape: int | Sequence[int] = (), *, temperature: float = 1.0) -> Tensor:
        """Samples of shape ``(*sample_shape, *event_shape)``, differentiable with
        respect to the flow's parameters (backpropagation through the sampling solve;
        no log-density computed). As ``torch.distributions``: ``sample_shape=(n,)``."""
        shape = (sample_shape,) if isinstance(sample_shape, int) else tuple(sample_shape)
        n = math.prod(shape)
        out = self.trace(self.base_noise(n, temperature=temperature), reverse=True, density=False).out
        return out.reshape(*shape, *self.event_shape)

    def sample(self, sample_shape: int | Sequence[int] = (), *, temperature: float = 1.0) -> Tensor:
        """:meth:`rsample` without gradients."""
        with torch.no_grad():
            return self.rsample(sample_shape, temperature=temperature)
