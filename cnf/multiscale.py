"""FFJORD's multiscale image flow: CNF blocks, squeeze, factor out half the channels.

For an image of shape ``(C, H, W)`` and ``S`` scales, scale ``s < S - 1`` runs its
blocks on ``(C_s, H_s, W_s)``, squeezes to ``(4 C_s, H_s / 2, W_s / 2)``, runs more
blocks there and factors out half of the channels, which go straight to the base
distribution; the other half, ``(2 C_s, H_s / 2, W_s / 2)``, enters scale ``s + 1``.
The last scale only runs its blocks. (FFJORD's ``odenvp`` without its parallel
variant; the logit transform lives in the data preprocessing, see :mod:`cnf.images`.)

The latent keeps the image's shape: the factored-out channels and the output of
the deeper scales are concatenated and unsqueezed back, scale by scale. Squeezing
only permutes entries and factoring out only routes them, so the map is a
bijection onto ``(C, H, W)`` whose log-determinant is the sum of the blocks', and

    log p(x) = log p_base(z) + Σ_blocks ∫_0^T tr(∂f/∂z) dt,

the convention of :class:`cnf.flow.Flow`, whose interface this class keeps.

References: FFJORD, Grathwohl et al. 2019; Real NVP, Dinh et al. 2017 (multiscale
architecture, squeeze and factor-out).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnf.errors import ConfigError
from cnf.flow import Flow, FlowTrace, PassTotals
from cnf.odeblock import CNFBlock


def squeeze(x: Tensor) -> Tensor:
    """Space to depth: ``(B, C, H, W) -> (B, 4C, H/2, W/2)``, each 2x2 patch into channels."""
    return F.pixel_unshuffle(x, 2)


def unsqueeze(x: Tensor) -> Tensor:
    """The inverse of :func:`squeeze`: ``(B, 4C, H, W) -> (B, C, 2H, 2W)``."""
    return F.pixel_shuffle(x, 2)


def default_scales(event_shape: Sequence[int]) -> int:
    """FFJORD's number of scales: one per halving while height and width are at
    least 4 (28x28 MNIST: 3), stopping early at an odd side."""
    _, h, w = event_shape
    scales = 0
    while h >= 4 and w >= 4:
        scales += 1
        if h % 2 or w % 2:
            break
        h, w = h // 2, w // 2
    return max(scales, 1)


def scale_shapes(event_shape: Sequence[int], scales: int) -> list[tuple[tuple[int, ...], tuple[int, ...] | None]]:
    """Per scale, the shape its first blocks act on and the shape after its squeeze
    (``None`` for the last scale). Every squeezed height and width must be even."""
    c, h, w = event_shape
    shapes = []
    for s in range(scales):
        if s == scales - 1:
            shapes.append(((c, h, w), None))
            break
        if h % 2 or w % 2:
            raise ConfigError(
                f"model.scales={scales} does not fit images of shape {tuple(event_shape)}: scale {s} "
                f"would squeeze an odd side ({h}x{w}); use fewer scales (null: {default_scales(event_shape)})"
            )
        shapes.append(((c, h, w), (4 * c, h // 2, w // 2)))
        c, h, w = 2 * c, h // 2, w // 2
    return shapes


class MultiscaleFlow(Flow):
    """A multiscale stack of :class:`CNFBlock` over a base distribution on ``event_shape``.

    Args:
        scales: per scale, ``(blocks before the squeeze, blocks after it)``; the
            last scale has no squeeze and its second list must be empty.
        event_shape: ``(C, H, W)`` of the data.
        base: the distribution of the latents (default ``N(0, I)``), see :mod:`cnf.base`.

    ``blocks`` lists every block once, in data-to-latent order, so code that walks
    ``flow.blocks`` (pruning, tracking) sees all of them.
    """

    def __init__(
        self, scales: Sequence[tuple[Sequence[CNFBlock], Sequence[CNFBlock]]], event_shape: Sequence[int],
        base: nn.Module | None = None,
    ) -> None:
        if not scales or len(scales[-1][1]) > 0:
            raise ConfigError("a multiscale flow needs at least one scale, and none after the last squeeze")
        flat, ranges, start = [], [], 0
        for before, after in scales:
            flat += [*before, *after]
            ranges.append((range(start, start + len(before)), range(start + len(before), len(flat))))
            start = len(flat)
        super().__init__(flat, event_shape, base)
        self._ranges = ranges

    def trace(self, x: Tensor, *, reverse: bool = False, density: bool = True) -> FlowTrace:
        """Push ``x`` through all scales (data -> latent, or latent -> data if ``reverse``).

        ``logabsdet`` is ``log|det ∂out/∂x|`` of the whole map; ``out`` has ``x``'s
        shape. ``density=False`` as in :meth:`Flow.trace`.
        """
        totals = PassTotals(x, density)
        return totals.trace(self._inverse(x, 0, totals) if reverse else self._forward(x, 0, totals))

    def _forward(self, x: Tensor, scale: int, totals: PassTotals) -> Tensor:
        before, after = self._ranges[scale]
        x = totals.run(self, before, x, reverse=False)
        if scale == len(self._ranges) - 1:
            return x
        x = totals.run(self, after, squeeze(x), reverse=False)
        kept, factored = x.chunk(2, dim=1)
        return unsqueeze(torch.cat([self._forward(kept, scale + 1, totals), factored], dim=1))

    def _inverse(self, z: Tensor, scale: int, totals: PassTotals) -> Tensor:
        before, after = self._ranges[scale]
        if scale < len(self._ranges) - 1:
            kept, factored = squeeze(z).chunk(2, dim=1)
            x = torch.cat([self._inverse(kept, scale + 1, totals), factored], dim=1)
            z = unsqueeze(totals.run(self, after, x, reverse=True))
        return totals.run(self, before, z, reverse=True)
