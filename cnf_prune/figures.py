"""Figures for 2-D flows: model density, samples and data side by side."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

from cnf.flow import Flow  # noqa: E402

LIMIT = 4.0


@torch.no_grad()
def density_grid(flow: Flow, *, resolution: int = 100, limit: float = LIMIT) -> Tensor:
    """``p(x)`` on a ``resolution²`` grid over ``[-limit, limit]²`` (rows: y, cols: x)."""
    ref = next(flow.parameters())
    axis = torch.linspace(-limit, limit, resolution, device=ref.device, dtype=ref.dtype)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    return flow.log_prob(grid).exp().reshape(resolution, resolution).cpu()


def flow_figure(density: Tensor, samples: Tensor, data: Tensor | None = None, *, limit: float = LIMIT) -> Figure:
    """Model density, model samples and (optionally) data samples in one row."""
    panels = 3 if data is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 4))
    extent = (-limit, limit, -limit, limit)
    axes[0].imshow(density.numpy(), origin="lower", extent=extent, cmap="inferno")
    axes[0].set_title("model density")
    for ax, pts, title in ((axes[1], samples, "model samples"), (axes[-1], data, "data")):
        if pts is None:
            continue
        pts = pts.detach().cpu().numpy()
        ax.hist2d(pts[:, 0], pts[:, 1], bins=100, range=[[-limit, limit], [-limit, limit]], cmap="inferno")
        ax.set_title(title)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.tight_layout()
    return fig
