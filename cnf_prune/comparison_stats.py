"""What a comparison's runs measured, summarized per method and sparsity.

Each (method, sparsity) row reports the mean over the seeds that finished and the
standard error of that mean (sample standard deviation / √n), and the solver-cost
change against dense training **at matched likelihood**: a pruned run whose final
validation NLL is ℓ is compared with the dense runs at the point of their training
where their validation NLL first reached ℓ (linear interpolation between the two
validations around that point), both NFE taken from the same validation solve. A
likelihood that no dense seed reached leaves the change undefined (the pruned run
is better than dense there) and is counted instead.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

DENSE = "dense"

Curve = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class RunSpec:
    """One training run of the comparison."""

    label: str
    sparsity: float
    seed: int
    overrides: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.label}_s{self.sparsity:g}_seed{self.seed}"


@dataclass
class RunResult:
    """What one run measured (NaN where it failed or did not log a value).
    ``curves`` maps TensorBoard tags to ``(steps, values)``."""

    spec: RunSpec
    status: str
    wall_seconds: float = math.nan
    val_nll: float = math.nan
    test_nll: float = math.nan
    test_jac_norm: float = math.nan
    test_nfe: float = math.nan
    train_jac_norm: float = math.nan
    sparsity: float = math.nan
    curves: dict[str, Curve] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status == "done"


METRICS = (
    ("val_nll", "val NLL"),
    ("test_nll", "test NLL"),
    ("test_jac_norm", "R (test)"),
    ("test_nfe", "test NFE"),
    ("nfe_change", "NFE vs dense at matched NLL"),
    ("sparsity", "achieved sparsity"),
    ("wall_seconds", "wall time (s)"),
)


@dataclass
class Row:
    """Mean, standard error and standard deviation over the seeds that finished, for
    one method and sparsity. ``unmatched``: seeds whose NLL no dense run reached."""

    label: str
    sparsity: float
    seeds: int
    failed: int
    mean: dict[str, float]
    se: dict[str, float]
    std: dict[str, float]
    unmatched: int = 0


def dense_nfe_at(nll: float, curve_nll: Curve, curve_nfe: Curve) -> float:
    """The validation NFE of one dense run where its validation NLL first reached
    ``nll``, interpolated linearly in NLL between neighbouring validations (NaN if
    it never did)."""
    steps, values = curve_nll
    nfe = np.interp(steps, *curve_nfe)  # the NFE at the NLL's validation steps
    reached = np.flatnonzero(values <= nll)
    if not len(reached):
        return math.nan
    i = int(reached[0])
    if i == 0 or values[i - 1] == values[i]:
        return float(nfe[i])
    w = (values[i - 1] - nll) / (values[i - 1] - values[i])
    return float(nfe[i - 1] + w * (nfe[i] - nfe[i - 1]))


def nfe_change_at_matched_nll(run: RunResult, dense: Sequence[RunResult]) -> float:
    """``NFE_run / NFE_dense(ℓ) − 1`` with ``ℓ`` the run's final validation NLL and
    ``NFE_dense(ℓ)`` the mean over dense seeds of :func:`dense_nfe_at` (NaN when a
    dense seed never reached ``ℓ`` or a curve is missing)."""
    tags = ("val/nll", "val/nfe")
    if not all(t in run.curves for t in tags) or not dense:
        return math.nan
    nll, nfe = float(run.curves["val/nll"][1][-1]), float(run.curves["val/nfe"][1][-1])
    matched = [dense_nfe_at(nll, d.curves["val/nll"], d.curves["val/nfe"])
               for d in dense if all(t in d.curves for t in tags)]
    if not matched or any(math.isnan(m) for m in matched):
        return math.nan
    return nfe / float(np.mean(matched)) - 1.0


def _stats(values: np.ndarray) -> tuple[float, float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan, math.nan
    if len(values) == 1:
        return float(values[0]), math.nan, math.nan
    std = float(values.std(ddof=1))
    return float(values.mean()), std / math.sqrt(len(values)), std


def summarize(results: Sequence[RunResult]) -> list[Row]:
    """One row per (label, sparsity), in the order the runs were planned."""
    groups: dict[tuple[str, float], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.spec.label, r.spec.sparsity), []).append(r)
    dense = [r for r in results if r.done and r.spec.label == DENSE]
    rows = []
    for (label, sparsity), group in groups.items():
        done = [r for r in group if r.done]
        change = np.array([math.nan if label == DENSE else nfe_change_at_matched_nll(r, dense) for r in done])
        unmatched = 0 if label == DENSE or not dense else int(np.isnan(change).sum())
        columns = {k: np.array([getattr(r, k) for r in done], dtype=float) for k, _ in METRICS if k != "nfe_change"}
        columns["nfe_change"] = change
        stats = {k: _stats(v) for k, v in columns.items()}
        rows.append(Row(label, sparsity, len(done), len(group) - len(done),
                        {k: s[0] for k, s in stats.items()}, {k: s[1] for k, s in stats.items()},
                        {k: s[2] for k, s in stats.items()}, unmatched))
    return rows


# --- tables ---------------------------------------------------------------------------


def _cell(key: str, row: Row) -> str:
    mean, se = row.mean[key], row.se[key]
    if key == "nfe_change":
        note = f" ({row.unmatched} beyond dense)" if row.unmatched else ""
        if math.isnan(mean):
            return ("NLL below dense's" if row.unmatched else "–") + (note if row.unmatched and row.seeds > 1 else "")
        return (f"{100 * mean:+.0f}%" + ("" if math.isnan(se) else f" ± {100 * se:.0f}%")) + note
    digits = {"test_nfe": 1, "wall_seconds": 0, "sparsity": 3}.get(key, 3)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(se) else f"{mean:.{digits}f} ± {se:.{digits}f}"


def markdown_table(rows: Sequence[Row]) -> str:
    """Mean ± standard error over seeds per method and sparsity."""
    head = ["method", "sparsity", *(title for _, title in METRICS), "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.label, f"{row.sparsity:g}", *(_cell(k, row) for k, _ in METRICS)]
        cells.append(f"{row.seeds}" + (f" ({row.failed} failed)" if row.failed else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(results: Sequence[RunResult], rows: Sequence[Row], out: Path) -> None:
    """``results.md``, ``results.csv`` (per method and sparsity) and ``runs.csv`` (per run)."""
    (out / "results.md").write_text(
        "Mean ± standard error over seeds. NFE vs dense at matched NLL: a run's final validation NFE "
        "against the dense runs' validation NFE where their validation NLL first reached the run's "
        "final one (\"NLL below dense's\": no dense seed got that far).\n\n"
        + markdown_table(rows))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "sparsity", "seeds", "failed", "unmatched",
                    *(f"{k}_{s}" for k, _ in METRICS for s in ("mean", "se", "std"))])
        for row in rows:
            w.writerow([row.label, row.sparsity, row.seeds, row.failed, row.unmatched,
                        *(v for k, _ in METRICS for v in (row.mean[k], row.se[k], row.std[k]))])
    dense = [r for r in results if r.done and r.spec.label == DENSE]
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "method", "sparsity", "seed", "status", "train_jac_norm",
                    *(k for k, _ in METRICS)])
        for r in results:
            change = nfe_change_at_matched_nll(r, dense) if r.done and r.spec.label != DENSE else math.nan
            w.writerow([r.spec.name, r.spec.label, r.spec.sparsity, r.spec.seed, r.status, r.train_jac_norm,
                        *(change if k == "nfe_change" else getattr(r, k) for k, _ in METRICS)])
