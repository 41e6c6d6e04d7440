"""Figures of a comparison: R and NFE during training, and where each method and
sparsity lands between likelihood and solver cost (mean ± standard error over seeds)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from cnf_prune.comparison_stats import DENSE, Curve, Row, RunResult

HIGHLIGHT = ("random", "jacobian_spectrum")  # the seed's Figure 2 compares these two
MARKERS = "osD^vP*Xph<>"


def mean_curve(curves: Sequence[Curve]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and standard error over seeds on the steps every seed logged."""
    steps = curves[0][0]
    for s, _ in curves[1:]:
        steps = np.intersect1d(steps, s)
    values = np.stack([v[np.searchsorted(s, steps)] for s, v in curves])
    se = values.std(0, ddof=1) / math.sqrt(len(curves)) if len(curves) > 1 else np.zeros(len(steps))
    return steps, values.mean(0), se


def curve_figure(results: Sequence[RunResult], tag: str, ylabel: str, path: Path) -> None:
    """``tag`` against the training step, mean over seeds (band: ± standard error), one
    panel per sparsity; runs at sparsity 0 (dense, unpruned extra runs) appear in every panel."""
    from matplotlib.figure import Figure

    done = [r for r in results if r.done and tag in r.curves]
    sparsities = sorted({r.spec.sparsity for r in done if r.spec.sparsity > 0}) or [0.0]
    labels = list(dict.fromkeys(r.spec.label for r in done))
    colors = {label: method_color(i, len(labels)) for i, label in enumerate(labels)}
    fig = Figure(figsize=(6 * len(sparsities), 4.2), layout="constrained")
    axes = fig.subplots(1, len(sparsities), squeeze=False)[0]
    for ax, sparsity in zip(axes, sparsities):
        for label in labels:
            group = [r for r in done if r.spec.label == label and r.spec.sparsity in (0.0, sparsity)]
            if not group:
                continue
            steps, mean, se = mean_curve([r.curves[tag] for r in group])
            bold = label in HIGHLIGHT
            ax.plot(steps, mean, color=colors[label], lw=2.4 if bold else 1.2, alpha=1.0 if bold else 0.8,
                    ls="--" if label == DENSE else "-", label=f"{label} ({len(group)} seed{'s' * (len(group) > 1)})")
            if len(group) > 1:
                ax.fill_between(steps, mean - se, mean + se, color=colors[label], alpha=0.15, lw=0)
        ax.set_title(f"sparsity {sparsity:g}" if sparsity > 0 else "dense")
        ax.set_xlabel("training iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def tradeoff_figure(rows: Sequence[Row], results: Sequence[RunResult], path: Path) -> None:
    """Test NLL against test R, one large marker per method × sparsity (mean over
    seeds, ± standard error bars) coloured by test NFE, and each run as a small marker."""
    from matplotlib.figure import Figure

    rows = [r for r in rows if r.seeds > 0]
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    if rows:
        nfe = np.array([r.mean["test_nfe"] for r in rows])
        low, high = float(np.nanmin(nfe)), float(np.nanmax(nfe))
        norm = {"vmin": low, "vmax": high if high > low else low + 1}
        for i, row in enumerate(rows):
            marker = MARKERS[i % len(MARKERS)]
            runs = [r for r in results if r.done and (r.spec.label, r.spec.sparsity) == (row.label, row.sparsity)]
            ax.scatter([r.test_jac_norm for r in runs], [r.test_nll for r in runs], marker=marker,
                       s=18, c="0.55", alpha=0.7, zorder=1)
            x, y = row.mean["test_jac_norm"], row.mean["test_nll"]
            ax.errorbar(x, y, xerr=np.nan_to_num(row.se["test_jac_norm"]), yerr=np.nan_to_num(row.se["test_nll"]),
                        fmt="none", ecolor="0.6", lw=1, zorder=2)
            name = f"{row.label} {row.sparsity:g}" if row.sparsity > 0 else row.label
            points = ax.scatter([x], [y], c=[row.mean["test_nfe"]], marker=marker, s=110, cmap="viridis",
                                edgecolors="k", zorder=3, label=name, **norm)
        fig.colorbar(points, ax=ax, label="test NFE per solve (mean)")
        ax.legend(fontsize=8, title="method sparsity (grey: single runs)", title_fontsize=8)
    ax.set_xlabel("cumulative Jacobian norm R (test)")
    ax.set_ylabel("test NLL (nats)")
    ax.set_title("NLL – R – NFE trade-off")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)


def method_color(i: int, count: int):
    """The i-th of ``count`` method colours: matplotlib's ten-colour cycle, or tab20
    when there are more methods than it has colours (no two methods share one): its
    ten strong colours first, then their pale partners."""
    if count <= 10:
        return f"C{i}"
    import matplotlib

    i %= 20
    return matplotlib.colormaps["tab20"](2 * i if i < 10 else 2 * (i - 10) + 1)


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats in both ``x`` and ``y`` (lower is
    better), sorted by ``x``."""
    finite = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    order = finite[np.lexsort((y[finite], x[finite]))]
    front, best = [], math.inf
    for i in order:
        if y[i] < best:
            front.append(i)
            best = y[i]
    return np.array(front, dtype=int)


def pareto_figure(rows: Sequence[Row], path: Path, *, title: str = "", nll_label: str = "test NLL (nats)") -> None:
    """Test NLL against test NFE (left) and against test R (right): one marker and
    colour per method, one point per sparsity (annotated) with ± standard-error bars
    in both directions, a method's sparsities joined in order, and the Pareto front
    of the means (lower-left is better) as a grey step line."""
    from matplotlib.figure import Figure

    rows = [r for r in rows if r.seeds > 0]
    labels = list(dict.fromkeys(r.label for r in rows))
    style = {label: (method_color(i, len(labels)), MARKERS[i % len(MARKERS)]) for i, label in enumerate(labels)}
    fig = Figure(figsize=(15, 5.6), layout="constrained")
    for ax, key, xlabel in zip(fig.subplots(1, 2), ("test_nfe", "test_jac_norm"),
                               ("test NFE per solve", "cumulative Jacobian norm R (test)")):
        x = np.array([r.mean[key] for r in rows])
        y = np.array([r.mean["test_nll"] for r in rows])
        front = pareto_front(x, y)
        if len(front) > 1:
            ax.step(x[front], y[front], where="post", color="0.6", ls=":", lw=1.5, zorder=1, label="Pareto front")
        for label in labels:
            color, marker = style[label]
            group = sorted((r for r in rows if r.label == label), key=lambda r: r.sparsity)
            gx = [r.mean[key] for r in group]
            gy = [r.mean["test_nll"] for r in group]
            if len(group) > 1:
                ax.plot(gx, gy, color=color, lw=1, alpha=0.6, zorder=2)
            ax.errorbar(gx, gy, xerr=[np.nan_to_num(r.se[key]) for r in group],
                        yerr=[np.nan_to_num(r.se["test_nll"]) for r in group], fmt=marker, color=color,
                        ms=9 if label in HIGHLIGHT else 7, mec="k", mew=0.6, capsize=2, lw=1, zorder=3,
                        label=f"{label} ({max(r.seeds for r in group)} seeds)")
            for r, px, py in zip(group, gx, gy):
                if r.sparsity > 0 and math.isfinite(px) and math.isfinite(py):
                    ax.annotate(f"{r.sparsity:g}", (px, py), xytext=(4, 4), textcoords="offset points",
                                fontsize=7, color=color)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(nll_label)
        ax.grid(alpha=0.3)
    fig.axes[1].legend(fontsize=8, title="method (numbers: sparsity)", title_fontsize=8,
                       loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title or "likelihood against solver cost (mean ± s.e. over seeds; lower-left is better)")
    fig.savefig(path, dpi=120)
