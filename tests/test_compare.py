import csv
import json
from pathlib import Path

import pytest
import yaml

from cnf.errors import ConfigError
from helpers import scalar_events
from cnf_prune.commands import compare

TOY = str(Path(__file__).resolve().parents[1] / "configs" / "toy.yaml")
TINY = [
    "data.val_size=64", "data.test_size=64", "model.hidden_dims=[8,8]", "solver.rtol=1e-3",
    "solver.atol=1e-3", "train.iterations=3", "train.val_every=3", "train.log_every=1", "train.batch_size=32",
]


def write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def test_tiny_comparison_writes_tables_and_figures_and_resumes(tmp_path):
    spec = write(tmp_path / "cmp.yaml", {
        "base": {"config": TOY, "set": TINY},
        "methods": ["dense", "jacobian_spectrum"],
        "sparsities": [0.5],
        "seeds": [0],
        "runs": [{"label": "kinetic", "set": ["regularization.kinetic=0.01"]}],
        "threads": 1,
    })
    out = tmp_path / "out"
    assert compare.main([str(spec), "--out", str(out)]) == 0

    for name in ("results.md", "results.csv", "runs.csv", "jacobian_norm.png", "nfe_forward.png", "tradeoff.png",
                 "pareto.png"):
        assert (out / name).stat().st_size > 0, name
    runs = ["dense_s0_seed0", "jacobian_spectrum_s0.5_seed0", "kinetic_s0_seed0"]
    for run in runs:
        assert json.loads((out / run / "compare.json").read_text())["status"] == "done"
        assert list((out / run).glob("events.out.tfevents.*")), run  # one TensorBoard run per method

    with open(out / "results.csv") as f:
        rows = {(r["method"], float(r["sparsity"])): r for r in csv.DictReader(f)}
    assert set(rows) == {("dense", 0.0), ("jacobian_spectrum", 0.5), ("kinetic", 0.0)}
    for row in rows.values():
        for key in ("val_nll_mean", "test_nll_mean", "test_jac_norm_mean", "test_nfe_mean", "wall_seconds_mean"):
            assert float(row[key]) == float(row[key]), key  # not NaN
    assert float(rows[("jacobian_spectrum", 0.5)]["sparsity_mean"]) == pytest.approx(0.5, abs=1e-3)
    assert float(rows[("dense", 0.0)]["sparsity_mean"]) == 0.0
    table = (out / "results.md").read_text()
    assert "| jacobian_spectrum | 0.5 |" in table and "| dense | 0 |" in table

    # a rerun skips the finished runs; a run whose status was lost is resumed, not retrained
    stamps = {run: (out / run / "checkpoint.pt").stat().st_mtime_ns for run in runs}
    (out / "kinetic_s0_seed0" / "compare.json").unlink()
    assert compare.main([str(spec), "--out", str(out)]) == 0
    assert all((out / r / "checkpoint.pt").stat().st_mtime_ns == stamps[r] for r in runs[:2])
    assert json.loads((out / "kinetic_s0_seed0" / "compare.json").read_text())["status"] == "done"


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"methods": ["dense", "prune_it"], "sparsities": [0.5]}, "unknown method 'prune_it'"),
        ({"methods": ["random"], "sparsities": [1.0]}, r"sparsities must be numbers in \(0, 1\)"),
        ({"methods": ["random"]}, "need sparsities"),
        ({"methods": ["dense"], "seed": [0]}, "unknown config key 'seed'; valid keys in config: base, methods"),
        ({"methods": ["dense"], "runs": [{"label": "random", "set": []}]}, "not a method name"),
        ({"methods": ["dense"], "runs": [{"label": "x", "set": ["model.width=3"]}]}, "unknown config key"),
        ({"methods": ["dense"], "seeds": [0, 0]}, "share the directory dense_s0_seed0"),
        ({"methods": ["dense"], "sweeps": [{"methods": ["snip"]}]}, "sparsities for methods other than dense"),
        ({"methods": ["dense"], "sweeps": [{"methods": ["lasso"], "sparsities": [0.5]}]}, "unknown method 'lasso'"),
        ({"methods": ["dense"], "runs": [{"label": "x", "sparsities": [1.5]}]}, r"runs\[\]\.sparsities must be"),
        ({"methods": ["dense"], "runs": [{"label": "x"}, {"label": "x"}]}, "share the directory x_s0_seed0"),
    ],
)
def test_bad_comparison_files_are_clear_errors(tmp_path, spec, message):
    path = write(tmp_path / "bad.yaml", {"base": {"config": TOY}, **spec})
    with pytest.raises(ConfigError, match=message):
        compare.load_comparison(path)
    assert compare.main([str(path), "--out", str(tmp_path / "out")]) == 2


def test_sweeps_and_extra_runs_plan_one_run_per_method_sparsity_and_seed(tmp_path):
    spec = write(tmp_path / "cmp.yaml", {
        "base": {"config": TOY, "set": TINY},
        "methods": ["dense", "random", "snip"], "sparsities": [0.9], "seeds": [0, 1],
        "sweeps": [{"methods": ["random", "jacobian_spectrum"], "sparsities": [0.5, 0.9]}],
        "runs": [{"label": "js_rounds", "set": ["pruning.method=jacobian_spectrum", "pruning.rounds=3"],
                  "sparsities": [0.8, 0.95]},
                 {"label": "rnode", "set": ["regularization.kinetic=0.01"]}],
    })
    comparison = compare.load_comparison(spec)
    names = [r.name for r in comparison.runs]
    per_seed = ["dense_s0", "random_s0.9", "snip_s0.9", "random_s0.5", "jacobian_spectrum_s0.5",
                "jacobian_spectrum_s0.9", "js_rounds_s0.8", "js_rounds_s0.95", "rnode_s0"]
    assert names == [f"{n}_seed{seed}" for n in per_seed for seed in (0, 1)]  # random 0.9 once per seed
    rounds = next(r for r in comparison.runs if r.name == "js_rounds_s0.95_seed1")
    config = compare.run_config(comparison, rounds)
    assert (config.pruning.method, config.pruning.sparsity, config.pruning.rounds, config.seed) == \
        ("jacobian_spectrum", 0.95, 3, 1)


def test_finished_run_with_another_config_is_refused(tmp_path):
    spec = write(tmp_path / "cmp.yaml", {"base": {"config": TOY, "set": TINY}, "methods": ["dense"], "threads": 1})
    out = tmp_path / "out"
    assert compare.main([str(spec), "--out", str(out)]) == 0
    assert compare.main([str(spec), "--out", str(out), "--set", "train.lr=0.01"]) == 2


def test_only_trains_the_matching_runs_and_tables_wait_for_the_rest(tmp_path, capsys):
    spec = write(tmp_path / "cmp.yaml", {
        "base": {"config": TOY, "set": TINY}, "methods": ["dense", "random"], "sparsities": [0.5], "threads": 1,
    })
    out = tmp_path / "out"
    assert compare.main([str(spec), "--out", str(out), "--only", "random_*"]) == 0
    assert (out / "random_s0.5_seed0" / "compare.json").is_file()
    assert not (out / "dense_s0_seed0").exists() and not (out / "results.md").exists()
    assert "still to finish: dense_s0_seed0" in capsys.readouterr().out

    assert compare.main([str(spec), "--out", str(out), "--only", "dense_*"]) == 0  # the last one: tables
    with open(out / "results.csv") as f:
        assert {r["method"] for r in csv.DictReader(f)} == {"dense", "random"}

    assert compare.main([str(spec), "--out", str(out), "--only", "snip_*"]) == 2  # matches nothing
    assert "matches none of the planned runs" in capsys.readouterr().err


def test_an_interrupted_run_is_waited_for_not_reported_as_failed(tmp_path, capsys, monkeypatch):
    """A run stopped by a signal resumes on the next call; the tables wait for it."""
    spec = write(tmp_path / "cmp.yaml", {
        "base": {"config": TOY, "set": TINY}, "methods": ["dense", "random"], "sparsities": [0.5], "threads": 1,
    })
    out = tmp_path / "out"
    real_train = compare.train

    def interrupted(config, out, *, resume=False):
        Path(out).mkdir(parents=True)
        return 130  # what training returns after Ctrl-C

    monkeypatch.setattr(compare, "train", interrupted)
    assert compare.main([str(spec), "--out", str(out), "--only", "dense_*"]) == 130
    assert json.loads((out / "dense_s0_seed0" / "compare.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(compare, "train", real_train)
    capsys.readouterr()
    assert compare.main([str(spec), "--out", str(out), "--only", "random_*"]) == 0
    assert "still to finish: dense_s0_seed0" in capsys.readouterr().out
    assert not (out / "results.md").exists()
    assert compare.main([str(spec), "--out", str(out), "--only", "dense_*"]) == 0
    with open(out / "runs.csv") as f:
        assert {r["status"] for r in csv.DictReader(f)} == {"done"}


def test_seeds_train_their_own_runs_and_tables_report_final_values_and_sample_std(tmp_path):
    spec = write(tmp_path / "cmp.yaml", {
        "base": {"config": TOY, "set": [*TINY, "train.iterations=4", "train.val_every=2"]},
        "methods": ["dense"], "seeds": [0, 1], "threads": 1,
    })
    out = tmp_path / "out"
    assert compare.main([str(spec), "--out", str(out)]) == 0
    with open(out / "runs.csv") as f:
        runs = {int(r["seed"]): r for r in csv.DictReader(f)}
    assert set(runs) == {0, 1}
    for seed, row in runs.items():
        run_dir = out / row["run"]
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed"] == seed
        val = [e.value for e in scalar_events(run_dir, "val/nll")]
        assert len(val) == 2 and val[0] != val[-1]  # two validations: the table has the final one
        assert float(row["val_nll"]) == pytest.approx(val[-1])
        assert float(row["test_nll"]) == pytest.approx(scalar_events(run_dir, "test/nll")[-1].value)
    test_nll = [float(runs[s]["test_nll"]) for s in (0, 1)]
    assert test_nll[0] != test_nll[1]  # another seed: other data, weights and results
    with open(out / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert int(row["seeds"]) == 2 and int(row["failed"]) == 0
    assert float(row["test_nll_mean"]) == pytest.approx(sum(test_nll) / 2)
    # the sample standard deviation (ddof=1) of two values is |a - b| / √2
    assert float(row["test_nll_std"]) == pytest.approx(abs(test_nll[0] - test_nll[1]) / 2 ** 0.5)


def test_a_failed_seed_is_counted_as_failed_not_averaged_in(tmp_path, monkeypatch):
    spec = write(tmp_path / "cmp.yaml", {
        "base": {"config": TOY, "set": TINY}, "methods": ["dense"], "seeds": [0, 1], "threads": 1,
    })
    out = tmp_path / "out"
    real_train = compare.train

    def failing_seed_1(config, out, *, resume=False):
        if config.seed == 1:
            Path(out).mkdir(parents=True)
            return 1
        return real_train(config, out, resume=resume)

    monkeypatch.setattr(compare, "train", failing_seed_1)
    assert compare.main([str(spec), "--out", str(out)]) == 0
    with open(out / "runs.csv") as f:
        runs = {int(r["seed"]): r for r in csv.DictReader(f)}
    assert runs[0]["status"] == "done" and runs[1]["status"] == "failed (exit 1)"
    with open(out / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert int(row["seeds"]) == 1 and int(row["failed"]) == 1
    for key in ("val_nll", "test_nll", "test_jac_norm", "test_nfe", "wall_seconds"):
        assert float(row[f"{key}_mean"]) == pytest.approx(float(runs[0][key])), key
    assert "| 1 (1 failed) |" in (out / "results.md").read_text()


def test_a_resumed_run_reports_the_wall_time_of_all_its_pieces(tmp_path, monkeypatch):
    """100 s until a signal stopped the run, 5 s to resume and finish it: 105 s."""
    import types

    spec = write(tmp_path / "cmp.yaml", {"base": {"config": TOY, "set": TINY}, "methods": ["dense"], "threads": 1})
    out = tmp_path / "out"
    clock = [1000.0]
    monkeypatch.setattr(compare, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    real_train = compare.train

    def first_piece(config, out, *, resume=False):
        assert real_train(config, out, resume=resume) == 0  # leaves checkpoint.pt; the signal came just after it
        clock[0] += 100.0
        return 130

    def second_piece(config, out, *, resume=False):
        assert resume
        clock[0] += 5.0
        return real_train(config, out, resume=resume)

    monkeypatch.setattr(compare, "train", first_piece)
    assert compare.main([str(spec), "--out", str(out)]) == 130
    status = json.loads((out / "dense_s0_seed0" / "compare.json").read_text())
    assert status["status"] == "interrupted" and status["wall_seconds"] == 100.0
    monkeypatch.setattr(compare, "train", second_piece)
    assert compare.main([str(spec), "--out", str(out)]) == 0
    status = json.loads((out / "dense_s0_seed0" / "compare.json").read_text())
    assert status["status"] == "done" and status["wall_seconds"] == 105.0
    with open(out / "runs.csv") as f:
        assert float(next(csv.DictReader(f))["wall_seconds"]) == 105.0


def test_processes_sharing_out_skip_the_run_another_one_holds(tmp_path, capsys):
    """--only '*' in several processes is a work queue: a held run is left to its holder."""
    from cnf_prune.rundir import locked_run_directory

    spec = write(tmp_path / "cmp.yaml", {
        "base": {"config": TOY, "set": TINY}, "methods": ["dense", "random"], "sparsities": [0.5], "threads": 1,
    })
    out = tmp_path / "out"
    with locked_run_directory(out / "dense_s0_seed0"):  # as if another process were training it
        assert compare.main([str(spec), "--out", str(out), "--only", "*"]) == 0
    captured = capsys.readouterr()
    assert "dense_s0_seed0: another process is training it; skipped here" in captured.err
    assert "still to finish: dense_s0_seed0" in captured.out
    assert not (out / "dense_s0_seed0" / "compare.json").exists()
    assert json.loads((out / "random_s0.5_seed0" / "compare.json").read_text())["status"] == "done"
    assert compare.main([str(spec), "--out", str(out), "--only", "*"]) == 0
    assert (out / "results.md").is_file()
