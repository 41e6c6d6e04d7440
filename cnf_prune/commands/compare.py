"""Compare pruning-at-initialization methods on the same data, seeds and budget.

    cnf-compare configs/compare_toy.yaml [--out DIR] [--set KEY=VALUE ...]   (or python -m cnf_prune.commands.compare)

The comparison file names a base training config and what to vary::

    base:
      config: configs/toy.yaml          # a train.py config (relative to the cwd or this file)
      set: [train.iterations=400]       # overrides applied to every run
    methods: [dense, random, jacobian_spectrum]   # dense = no pruning (sparsity 0)
    sparsities: [0.8]
    seeds: [0, 1]
    sweeps:                             # optional: more methods x sparsities
      - methods: [random, jacobian_spectrum]
        sparsities: [0.5, 0.95]
    runs:                               # optional extra runs, one per seed (and sparsity)
      - label: l0
        set: [regularization.l0=0.01]
      - label: js_rounds
        set: [pruning.method=jacobian_spectrum, pruning.rounds=10]
        sparsities: [0.8, 0.95]
    threads: 1                          # optional: torch CPU threads (small models: 1 is fastest)

Runs train in the file's order, every seed of a method and sparsity before the
next one. ``--set`` adds overrides to every run. Each run trains (the trainer of ``train.py``) into
``OUT/<method>_s<sparsity>_seed<seed>/``, so ``tensorboard --logdir OUT`` overlays
their curves. A run that finished is skipped and an interrupted one resumed, so
rerunning the command continues a comparison. ``--only PATTERN`` (repeatable,
shell-style, matched against the run names) trains just those runs, so one
comparison can be spread over several processes or machines sharing OUT; the
tables are written once every planned run has finished. ``--only '*'`` in several
processes makes them a work queue: each trains the next run no other process holds
(a run another process is training is skipped, and finished ones are skipped).
At the end OUT holds

* ``results.md``, ``results.csv``: per method and sparsity the final validation
  NLL, test NLL, test cumulative Jacobian norm R and test NFE (test solver), the
  NFE change against dense at matched validation NLL, achieved sparsity and
  training wall time, mean ± standard error over seeds (``results.csv`` also has
  the standard deviation); ``runs.csv``: the same per run;
* ``jacobian_norm.png``: R during training, mean over seeds, one panel per sparsity;
  ``nfe_forward.png``: the forward NFE during training, likewise;
* ``pareto.png``: test NLL against test NFE and against test R, one marker per
  method, one point per sparsity, ± standard-error bars, with the Pareto front;
* ``tradeoff.png``: test NLL against test R, coloured by test NFE, one point per
  method and sparsity.

Sweeps: ``methods × sparsities × seeds`` plus ``runs`` (e.g. RNODE or L0 baselines,
or a pruning variant with its own overrides and ``sparsities``).
"""

from __future__ import annotations

import argparse
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
from cnf_prune.comparison_figures import curve_figure, pareto_figure, tradeoff_figure
from cnf_prune.comparison_stats import DENSE, RunResult, RunSpec, markdown_table, summarize, write_tables
from cnf_prune.config import Config, from_dict, load_config, to_dict
from cnf_prune.rundir import locked_run_directory
from pruning.config import PRUNING_METHODS

CURVES = ("jacobian/cumulative_norm", "nfe/forward", "val/nll", "val/nfe")
STATUS_FILE = "compare.json"
SCORER_NAMES = tuple(m for m in PRUNING_METHODS if m != "none")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Comparison:
    """A parsed comparison file: the base config, its overrides, the runs and the
    number of torch CPU threads (``None``: torch's default)."""

    base: Path
    overrides: list[str]
    runs: list[RunSpec]
    threads: int | None = None


# --- the comparison file ---------------------------------------------------------


@dataclass
class BaseSection:
    """``base``: the training config every run starts from, and overrides for all."""

    config: str = ""
    set: list[str] = field(default_factory=list)


def _check_sparsities(values: list[float], key: str) -> None:
    for s in values:
        if not 0 < s < 1:
            raise ConfigError(f"{key} must be numbers in (0, 1) (got {s!r})")


def _check_methods(values: list[str], key: str) -> None:
    valid = (DENSE, *SCORER_NAMES)
    for m in values:
        if m not in valid:
            raise ConfigError(f"unknown method {m!r} in {key}; valid: {', '.join(valid)}")


@dataclass
class ExtraRun:
    """An entry of ``runs``: a labelled run per seed with its own overrides, once at
    the sparsity its overrides give, or once per entry of ``sparsities``."""

    label: str = ""
    set: list[str] = field(default_factory=list)
    sparsities: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not _LABEL.match(self.label) or self.label in (DENSE, *PRUNING_METHODS):
            raise ConfigError(
                "runs[].label must be a name of letters, digits, '_', '.', '-' that is "
                f"not a method name (got {self.label!r})"
            )
        _check_sparsities(self.sparsities, "runs[].sparsities")


@dataclass
class Sweep:
    """An entry of ``sweeps``: more methods × sparsities beside the main ones."""

    methods: list[str] = field(default_factory=list)
    sparsities: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_methods(self.methods, "sweeps[].methods")
        _check_sparsities(self.sparsities, "sweeps[].sparsities")
        if not self.methods or (any(m != DENSE for m in self.methods) and not self.sparsities):
            raise ConfigError("each of sweeps needs methods, and sparsities for methods other than dense")


@dataclass
class ComparisonFile:
    """The comparison file's schema, checked by the config loader of training configs."""

    base: BaseSection = field(default_factory=BaseSection)
    methods: list[str] = field(default_factory=list)
    sparsities: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    sweeps: list[Sweep] = field(default_factory=list)
    runs: list[ExtraRun] = field(default_factory=list)
    threads: int | None = None

    def __post_init__(self) -> None:
        _check_methods(self.methods, "methods")
        _check_sparsities(self.sparsities, "sparsities")
        if not self.seeds:
            raise ConfigError(f"seeds must be a non-empty list of integers (got {self.seeds!r})")
        if not self.base.config:
            raise ConfigError("base.config must name a training config, e.g. configs/toy.yaml")
        if not self.methods and not self.runs and not self.sweeps:
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
        swept: list[RunSpec] = []
        for sweep in [Sweep(spec.methods, spec.sparsities)] * bool(spec.methods) + spec.sweeps:
            for m in sweep.methods:
                for s in [0.0] if m == DENSE else sweep.sparsities:
                    method = "none" if m == DENSE else m
                    run = RunSpec(m, float(s), seed, (f"pruning.method={method}", f"pruning.sparsity={s}", f"seed={seed}"))
                    if run not in swept:  # a method and sparsity in two sweeps runs once
                        swept.append(run)
        runs += swept
        for extra in spec.runs:
            for s in extra.sparsities or [None]:
                extra_set = (*extra.set, *([f"pruning.sparsity={s}"] if s is not None else []), f"seed={seed}")
                sparsity = load_config(base_path, [*common, *extra_set]).pruning.sparsity
                runs.append(RunSpec(extra.label, sparsity, seed, extra_set))
    # every seed of a setting before the next setting: a comparison cut short by time
    # loses settings, not seeds (sorted is stable: the file's order otherwise)
    order = list(dict.fromkeys((r.label, r.sparsity) for r in runs))
    runs.sort(key=lambda r: order.index((r.label, r.sparsity)))
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
            if code == 7:  # BusyError: another process trains it (see --only)
                log(f"{run.name}: another process is training it; skipped here")
            elif code != 0:
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
    pareto_figure(rows, out / "pareto.png", title=f"{out.name}: likelihood against solver cost "
                  "(mean ± s.e. over seeds; lower-left is better)")
    print(markdown_table(rows))
    print(f"wrote results.md, results.csv, runs.csv, jacobian_norm.png, nfe_forward.png, tradeoff.png, "
          f"pareto.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
