import csv
import json
from pathlib import Path

import pytest
import yaml

from cnf.errors import ConfigError
from pruning import compare

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

    for name in ("results.md", "results.csv", "runs.csv", "jacobian_norm.png", "nfe_forward.png", "tradeoff.png"):
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
        ({"methods": ["dense"], "seed": [0]}, "unknown key 'seed'"),
        ({"methods": ["dense"], "runs": [{"label": "random", "set": []}]}, "not a method name"),
        ({"methods": ["dense"], "runs": [{"label": "x", "set": ["model.width=3"]}]}, "unknown config key"),
        ({"methods": ["dense"], "seeds": [0, 0]}, "share the directory dense_s0_seed0"),
    ],
)
def test_bad_comparison_files_are_clear_errors(tmp_path, spec, message):
    path = write(tmp_path / "bad.yaml", {"base": {"config": TOY}, **spec})
    with pytest.raises(ConfigError, match=message):
        compare.load_comparison(path)
    assert compare.main([str(path), "--out", str(tmp_path / "out")]) == 2


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
    import train

    spec = write(tmp_path / "cmp.yaml", {
        "base": {"config": TOY, "set": TINY}, "methods": ["dense", "random"], "sparsities": [0.5], "threads": 1,
    })
    out = tmp_path / "out"
    real_main = train.main

    def interrupted(args):
        Path(args[args.index("--out") + 1]).mkdir(parents=True)
        return 130  # what train.main returns after Ctrl-C

    monkeypatch.setattr(train, "main", interrupted)
    assert compare.main([str(spec), "--out", str(out), "--only", "dense_*"]) == 130
    assert json.loads((out / "dense_s0_seed0" / "compare.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(train, "main", real_main)
    capsys.readouterr()
    assert compare.main([str(spec), "--out", str(out), "--only", "random_*"]) == 0
    assert "still to finish: dense_s0_seed0" in capsys.readouterr().out
    assert not (out / "results.md").exists()
    assert compare.main([str(spec), "--out", str(out), "--only", "dense_*"]) == 0
    with open(out / "runs.csv") as f:
        assert {r["status"] for r in csv.DictReader(f)} == {"done"}
