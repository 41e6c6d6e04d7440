"""Compare pruning-at-initialization methods on the same data, seeds and budget.

    cnf-compare configs/compare_toy.yaml [--out DIR] [--set KEY=VALUE ...]   (or python -m cnf_prune.commands.compare)

The comparison file names a base training config and what to vary::

    base:
      config: configs/toy.yaml          # a train.py config (relative to the cwd or this file)
      set: [train.iterations=400]       # overrides applied to every run
    methods: [dense, random, jacobian_spectrum]   # dense = no pruning (sparsity 0)
    sparsities: [0.8]
    seeds: [0, 1]
    runs:                               # optional extra runs, one per seed
      - label: l0
        set: [regularization.l0=0.01]
    threads: 1                          # optional: torch CPU threads (small models: 1 is fastest)

``--set`` adds overrides to every run. Each run trains (the trainer of ``train.py``) into
``OUT/<method>_s<sparsity>_seed<seed>/``, so ``tensorboard --logdir OUT`` overlays
their curves. A run that finished is skipped and an interrupted one resumed, so
rerunning the command continues a comparison. ``--only PATTERN`` (repeatable,
shell-style, matched against the run names) trains just those runs, so one
comparison can be spread over several processes or machines sharing OUT; the
tables are written once every planned run has finished. At the end OUT holds

* ``results.md``, ``results.csv``: per method and sparsity the final validation
  NLL, test NLL, test cumulative Jacobian norm R and test NFE (test solver),
  achieved sparsity and training wall time, mean ± std over seeds;
  ``runs.csv``: the same per run;
* ``jacobian_norm.png``: R during training, mean over seeds, one panel per sparsity;
  ``nfe_forward.png``: the forward NFE during training, likewise;
* ``tradeoff.png``: test NLL against test R, coloured by test NFE, one point per
  method and sparsity.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import yaml

from cnf.config import build_section
from cnf_prune.commands import report_user_errors
from cnf.errors import ConfigError
from cnf_prune.commands.train import train
from cnf_prune.config import Config, from_dict, load_config, to_dict
from cnf_prune.rundir import locked_run_directory
from pruning.config import PRUNING_METHODS

DENSE = "dense"
CURVES = ("jacobian/cumulative_norm", "nfe/forward")
STATUS_FILE = "compare.json"
SCORER_NAMES = tuple(m for m in PRUNING_METHODS if m != "none")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
class Comparison:
    """A parsed comparison file: the base config, its overrides, the runs and the
    number of torch CPU threads (``None``: torch's default)."""

    base: Path
    overrides: list[str]
    runs: list[RunSpec]
    threads: int | None = None


@dataclass
class RunResult:
    """What one run measured (NaN where it failed or did not log a value)."""

    spec: RunSpec
    status: str
    wall_seconds: float = math.nan
    val_nll: float = math.nan
    test_nll: float = math.nan
    test_jac_norm: float = math.nan
    test_nfe: float = math.nan
    train_jac_norm: float = math.nan
    sparsity: float = math.nan
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


# --- the comparison file ---------------------------------------------------------


@dataclass
class BaseSection:
    """``base``: the training config every run starts from, and overrides for all."""

    config: str = ""
    set: list[str] = field(default_factory=list)


@dataclass
class ExtraRun:
    """An entry of ``runs``: a labelled run per seed with its own overrides."""

    label: str = ""
    set: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not _LABEL.match(self.label) or self.label in (DENSE, *PRUNING_METHODS):
            raise ConfigError(
                "runs[].label must be a name of letters, digits, '_', '.', '-' that is "
                f"not a method name (got {self.label!r})"
            )


@dataclass
class ComparisonFile:
    """The comparison file's schema, checked by the config loader of training configs."""

    base: BaseSection = field(default_factory=BaseSection)
    methods: list[str] = field(default_factory=list)
    sparsities: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    runs: list[ExtraRun] = field(default_factory=list)
    threads: int | None = None

    def __post_init__(self) -> None:
        valid = (DENSE, *SCORER_NAMES)
        for m in self.methods:
            if m not in valid:
                raise ConfigError(f"unknown method {m!r} in methods; valid: {', '.join(valid)}")
        for s in self.sparsities:
            if not 0 < s < 1:
                raise ConfigError(f"sparsities must be numbers in (0, 1) (got {s!r})")
        if not self.seeds:
            raise ConfigError(f"seeds must be a non-empty list of integers (got {self.seeds!r})")
        if not self.base.config:
            raise ConfigError("base.config must name a training config, e.g. configs/toy.yaml")
        if not self.methods and not self.runs:
            raise ConfigError("the comparison has no runs: give methods (and sparsities) or runs")
        if any(m != DENSE for m in self.methods) and not self.sparsities:
            raise ConfigError("methods other than dense need sparsities, e.g. sparsities: [0.8]")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be a positive integer or absent (got {self.threads!r})")


def _resolve(path: str, relative_to: Path) -> Path:
    for candidate in (Path(path), relative_to / path):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"base config {path!r} not found (looked in the working directory and {relative_to})")


def load_comparison(path: str | Path, overrides: Sequence[str] = ()) -> Comparison:
    """Parse and validate a comparison file; every run's config is built once to
    catch mistakes before anything trains. ``overrides`` apply to every run."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"comparison file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    spec: ComparisonFile = build_section(ComparisonFile, values)
    base_path = _resolve(spec.base.config, path.parent)
    common = list(spec.base.set) + list(overrides)
    runs: list[RunSpec] = []
    for seed in spec.seeds:
        for m in spec.methods:
            for s in [0.0] if m == DENSE else spec.sparsities:
                method = "none" if m == DENSE else m
                runs.append(RunSpec(m, float(s), seed, (f"pruning.method={method}", f"pruning.sparsity={s}", f"seed={seed}")))
        for run in spec.runs:
            extra_set = (*run.set, f"seed={seed}")
            sparsity = load_config(base_path, [*common, *extra_set]).pruning.sparsity
            runs.append(RunSpec(run.label, sparsity, seed, extra_set))
    names = [r.name for r in runs]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ConfigError(f"two runs would share the directory {clashes[0]}: make the run labels "
                          "(and seeds) unique")
    comparison = Comparison(base_path, common, runs, spec.threads)
    for run in runs:
        run_config(comparison, run)
    return comparison


def run_config(comparison: Comparison, run: RunSpec) -> Config:
    """The training config of ``run``."""
    return load_config(comparison.base, [*comparison.overrides, *run.overrides])


# --- running ----------------------------------------------------------------------


def _status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_status(run_dir: Path, status: str, seconds: float, exit_code: int) -> None:
    (run_dir / STATUS_FILE).write_text(
        json.dumps({"status": status, "wall_seconds": seconds, "exit_code": exit_code}) + "\n"
    )


def train_run(comparison: Comparison, run: RunSpec, out: Path, log: Callable[[str], None]) -> int:
    """Train ``run`` into ``out/run.name`` unless it finished; resume it if it was
    interrupted. Returns the training exit code (0 for a skipped run)."""
    run_dir = out / run.name
    config = run_config(comparison, run)
    status = _status(run_dir)
    if (run_dir / "config.yaml").is_file():
        saved = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
        if status.get("status") == "done" and to_dict(saved) != to_dict(config):
            raise ConfigError(
                f"{run_dir} holds a finished run with another config; use another --out or remove it"
            )
    if status.get("status") == "done":
        log(f"{run.name}: finished before, skipped")
        return 0
    resume = (run_dir / "checkpoint.pt").is_file()
    log(f"{run.name}: {'resuming' if resume else 'training'}")
    start = time.perf_counter()
    code = train(config, run_dir, resume=resume)
    seconds = status.get("wall_seconds", 0.0) + time.perf_counter() - start
    if run_dir.is_dir() and code != 7:  # 7: another process holds the run; its status is its own
        # a signal (exit > 128) leaves a checkpoint to resume: the run is not finished, nor failed
        state = "done" if code == 0 else "interrupted" if code > 128 else "unfinished"
        _write_status(run_dir, state, seconds, code)
    return code


def _scalars(run_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        out[tag] = (np.array([e.step for e in events]), np.array([e.value for e in events]))
    return out


def read_run(run: RunSpec, out: Path) -> RunResult:
    """The measurements of a run from its TensorBoard events and status file."""
    run_dir = out / run.name
    status = _status(run_dir)
    result = RunResult(run, status.get("status", "missing"), status.get("wall_seconds", math.nan))
    if result.status not in ("done", "missing", "interrupted"):
        result.status = f"failed (exit {status['exit_code']})" if "exit_code" in status else result.status
    if result.status != "done":
        return result
    scalars = _scalars(run_dir)

    def last(tag: str) -> float:
        return float(scalars[tag][1][-1]) if tag in scalars and len(scalars[tag][1]) else math.nan

    result.val_nll, result.test_nll = last("val/nll"), last("test/nll")
    result.test_jac_norm, result.test_nfe = last("test/jacobian_norm"), last("test/nfe")
    result.train_jac_norm, result.sparsity = last("jacobian/cumulative_norm"), last("sparsity/weights")
    if math.isnan(result.sparsity) and "sparsity/weights" not in scalars:
        result.sparsity = 0.0  # dense runs (neither pruned nor gated) log no sparsity
    result.curves = {tag: scalars[tag] for tag in CURVES if tag in scalars and len(scalars[tag][0])}
    return result


# --- tables -------------------------------------------------------------------------

METRICS = (
    ("val_nll", "val NLL"),
    ("test_nll", "test NLL"),
    ("test_jac_norm", "R (test)"),
    ("test_nfe", "test NFE"),
    ("sparsity", "achieved sparsity"),
    ("wall_seconds", "wall time (s)"),
)


@dataclass
class Row:
    """Mean and std over the seeds that finished, for one method and sparsity."""

    label: str
    sparsity: float
    seeds: int
    failed: int
    mean: dict[str, float]
    std: dict[str, float]


def summarize(results: Sequence[RunResult]) -> list[Row]:
    """One row per (label, sparsity), in the order the runs were planned."""
    groups: dict[tuple[str, float], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.spec.label, r.spec.sparsity), []).append(r)
    rows = []
    for (label, sparsity), group in groups.items():
        done = [r for r in group if r.status == "done"]
        values = {k: np.array([getattr(r, k) for r in done], dtype=float) for k, _ in METRICS}
        rows.append(Row(
            label, sparsity, len(done), len(group) - len(done),
            {k: float(v.mean()) if len(v) else math.nan for k, v in values.items()},
            {k: float(v.std(ddof=1)) if len(v) > 1 else math.nan for k, v in values.items()},
        ))
    return rows


def _cell(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(rows: Sequence[Row]) -> str:
    digits = {"test_nfe": 1, "wall_seconds": 0, "sparsity": 3}
    head = ["method", "sparsity", *(title for _, title in METRICS), "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.label, f"{row.sparsity:g}"]
        cells += [_cell(row.mean[k], row.std[k], digits.get(k, 3)) for k, _ in METRICS]
        cells.append(f"{row.seeds}" + (f" ({row.failed} failed)" if row.failed else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(results: Sequence[RunResult], rows: Sequence[Row], out: Path) -> None:
    """``results.md``, ``results.csv`` (per method and sparsity) and ``runs.csv`` (per run)."""
    (out / "results.md").write_text(markdown_table(rows))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "sparsity", "seeds", "failed", *(f"{k}_{s}" for k, _ in METRICS for s in ("mean", "std"))])
        for row in rows:
            w.writerow([row.label, row.sparsity, row.seeds, row.failed,
                        *(v for k, _ in METRICS for v in (row.mean[k], row.std[k]))])
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "method", "sparsity", "seed", "status", "train_jac_norm", *(k for k, _ in METRICS)])
        for r in results:
            w.writerow([r.spec.name, r.spec.label, r.spec.sparsity, r.spec.seed, r.status, r.train_jac_norm,
                        *(getattr(r, k) for k, _ in METRICS)])


# --- figures --------------------------------------------------------------------------

_HIGHLIGHT = ("random", "jacobian_spectrum")  # the seed's Figure 2 compares these two


def _mean_curve(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std over seeds on the steps every seed logged."""
    steps = curves[0][0]
    for s, _ in curves[1:]:
        steps = np.intersect1d(steps, s)
    values = np.stack([v[np.searchsorted(s, steps)] for s, v in curves])
    return steps, values.mean(0), values.std(0)


def curve_figure(results: Sequence[RunResult], tag: str, ylabel: str, path: Path) -> None:
    """``tag`` against the training step, mean over seeds (band: ± std), one panel
    per sparsity; runs at sparsity 0 (dense, unpruned extra runs) appear in every panel."""
    from matplotlib.figure import Figure

    done = [r for r in results if r.status == "done" and tag in r.curves]
    sparsities = sorted({r.spec.sparsity for r in done if r.spec.sparsity > 0}) or [0.0]
    labels = list(dict.fromkeys(r.spec.label for r in done))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    fig = Figure(figsize=(6 * len(sparsities), 4.2), layout="constrained")
    axes = fig.subplots(1, len(sparsities), squeeze=False)[0]
    for ax, sparsity in zip(axes, sparsities):
        for label in labels:
            group = [r for r in done if r.spec.label == label and r.spec.sparsity in (0.0, sparsity)]
            if not group:
                continue
            steps, mean, std = _mean_curve([r.curves[tag] for r in group])
            bold = label in _HIGHLIGHT
            ax.plot(steps, mean, color=colors[label], lw=2.4 if bold else 1.2, alpha=1.0 if bold else 0.8,
                    ls="--" if label == DENSE else "-", label=f"{label} ({len(group)} seed{'s' * (len(group) > 1)})")
            if len(group) > 1:
                ax.fill_between(steps, mean - std, mean + std, color=colors[label], alpha=0.15, lw=0)
        ax.set_title(f"sparsity {sparsity:g}" if sparsity > 0 else "dense")
        ax.set_xlabel("training iteration")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


_MARKERS = "osD^vP*Xph<>"


def tradeoff_figure(rows: Sequence[Row], results: Sequence[RunResult], path: Path) -> None:
    """Test NLL against test R, one large marker per method × sparsity (mean over
    seeds, ± std bars) coloured by test NFE, and each run as a small marker."""
    from matplotlib.figure import Figure

    rows = [r for r in rows if r.seeds > 0]
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    if rows:
        nfe = np.array([r.mean["test_nfe"] for r in rows])
        low, high = float(np.nanmin(nfe)), float(np.nanmax(nfe))
        norm = {"vmin": low, "vmax": high if high > low else low + 1}
        for i, row in enumerate(rows):
            marker = _MARKERS[i % len(_MARKERS)]
            runs = [r for r in results if r.status == "done"
                    and (r.spec.label, r.spec.sparsity) == (row.label, row.sparsity)]
            ax.scatter([r.test_jac_norm for r in runs], [r.test_nll for r in runs], marker=marker,
                       s=18, c="0.55", alpha=0.7, zorder=1)
            x, y = row.mean["test_jac_norm"], row.mean["test_nll"]
            ax.errorbar(x, y, xerr=np.nan_to_num(row.std["test_jac_norm"]), yerr=np.nan_to_num(row.std["test_nll"]),
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


# --- command line ---------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cnf-compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("comparison", help="comparison YAML (see configs/compare_toy.yaml)")
    p.add_argument("--out", help="output directory (default: runs/<comparison file name>)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override training config values in every run, e.g. --set train.iterations=200 "
                        "train.lr=5e-4 (repeatable)")
    p.add_argument("--only", action="append", default=[], metavar="PATTERN",
                   help="train only the runs whose name matches this shell-style pattern, for example "
                        "'random_*' (repeatable; run the other runs in other processes with the same --out)")
    return p.parse_args(argv)


def select_runs(comparison: Comparison, patterns: Sequence[str]) -> list[RunSpec]:
    """The runs whose names match any of ``patterns`` (all runs if there are none)."""
    if not patterns:
        return list(comparison.runs)
    chosen = [r for r in comparison.runs if any(fnmatch.fnmatchcase(r.name, p) for p in patterns)]
    if not chosen:
        names = ", ".join(r.name for r in comparison.runs)
        raise ConfigError(f"--only {' '.join(patterns)} matches none of the planned runs: {names}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return report_user_errors(compare, args)


def compare(args: argparse.Namespace) -> int:
    comparison = load_comparison(args.comparison, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.comparison).stem
    # --only processes share OUT (each run directory has its own lock); a full comparison holds it alone
    with locked_run_directory(out, shared=bool(args.only)):
        return run_comparison(args, comparison, out)


def run_comparison(args: argparse.Namespace, comparison: Comparison, out: Path) -> int:
    """Train the chosen runs of ``comparison`` into ``out``, then tabulate and plot."""
    (out / "comparison.yaml").write_text(yaml.safe_dump({
        "base": str(comparison.base), "set": comparison.overrides,
        "runs": [{"name": r.name, "set": list(r.overrides)} for r in comparison.runs],
    }, sort_keys=False))

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(comparison.threads or threads)
    chosen = select_runs(comparison, args.only)
    try:
        for i, run in enumerate(chosen, 1):
            log(f"[{i}/{len(chosen)}] {run.name}")
            code = train_run(comparison, run, out, log)
            if code > 128:  # stopped by a signal: the checkpoint is written, rerun to resume
                log(f"stopped; rerun the same command to resume from {run.name}")
                return code
            if code != 0:
                log(f"{run.name} failed with exit code {code}; it is reported as failed")
    finally:
        torch.set_num_threads(threads)

    results = [read_run(run, out) for run in comparison.runs]
    waiting = [r.spec.name for r in results if r.status in ("missing", "interrupted")]
    if args.only and waiting:
        print(f"trained the runs matching --only; still to finish: {', '.join(waiting)}. The tables are written "
              f"when the command runs after all of them have finished (it skips finished runs)")
        return 0
    rows = summarize(results)
    write_tables(results, rows, out)
    curve_figure(results, "jacobian/cumulative_norm", "cumulative Jacobian norm R (training batch)",
                 out / "jacobian_norm.png")
    curve_figure(results, "nfe/forward", "forward NFE per training solve", out / "nfe_forward.png")
    tradeoff_figure(rows, results, out / "tradeoff.png")
    print(markdown_table(rows))
    print(f"wrote results.md, results.csv, runs.csv, jacobian_norm.png, nfe_forward.png, tradeoff.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
