"""Tabular benchmarks: test-time exact divergence and a real-data smoke run."""

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
import train
from cnf_prune.checkpoint import load_checkpoint
from cnf_prune.config import load_config
from cnf.divergence import Exact, Hutchinson
from cnf.fields import MLPField
from cnf.flow import Flow
from cnf_prune.build import build_model as build_flow
from cnf.odeblock import CNFBlock
from cnf.solver import Solver

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name, dim", [("power", 6), ("gas", 8), ("hepmass", 21), ("miniboone", 43), ("bsds300", 63)])
def test_tabular_configs_train_with_hutchinson_and_test_exactly(name, dim):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.model.divergence == "hutchinson" and config.model.test_divergence == "exact"
    flow = build_flow(config, (dim,))
    block = flow.blocks[0]
    assert isinstance(block.divergence, Hutchinson) and isinstance(block.test_divergence, Exact)
    assert block.solver.rtol == 1e-6 and block.solver.atol == 1e-8
    assert all(h % dim == 0 for h in config.model.hidden_dims)


def test_exact_test_divergence_matches_hutchinson_in_expectation(float64):
    torch.manual_seed(0)
    field = MLPField(5, [16, 16], nonlinearity="softplus")
    solver = Solver(rtol=1e-8, atol=1e-8, adjoint=False)
    block = CNFBlock(field, end_time=0.5, divergence=Hutchinson("gaussian"),
                     test_divergence=Exact(), solver=solver)
    flow = Flow([block], (5,))
    x = torch.randn(1, 5).expand(4000, 5)
    with torch.no_grad():
        flow.train()
        hutch = flow.trace(x).logabsdet
        flow.eval()
        exact = flow.trace(x[:1]).logabsdet
        again = flow.trace(x[:1]).logabsdet
    torch.testing.assert_close(exact, again)  # eval mode: deterministic
    se = hutch.std() / math.sqrt(len(hutch))
    assert abs(hutch.mean() - exact[0]) <= 5 * se
    assert hutch.std() > 0  # training really used random probes


@pytest.mark.skipif(not (SHARED / "miniboone" / "val.npy").is_file(),
                    reason="../shared/data/miniboone not present")
def test_miniboone_real_rows_smoke(tmp_path):
    root = tmp_path / "data"
    (root / "miniboone").mkdir(parents=True)
    shutil.copy(SHARED / "miniboone" / "val.npy", root / "miniboone" / "train.npy")
    for split in ("val", "test"):
        shutil.copy(SHARED / "miniboone" / f"{split}.npy", root / "miniboone" / f"{split}.npy")
    out = tmp_path / "run"
    code = train.main([
        str(CONFIGS / "miniboone.yaml"), "--out", str(out), "--set", f"data.root={root}",
        "--set", "model.hidden_dims=[64,64]", "--set", "train.iterations=3", "--set", "train.batch_size=200",
        "--set", "train.val_every=3", "--set", "train.val_batch_size=4000",
        "--set", "solver.rtol=1e-4", "--set", "solver.atol=1e-4", "--set", "solver.test_rtol=1e-3",
        "--set", "solver.test_atol=1e-3", "--set", "model.test_divergence=hutchinson",  # fast eval
    ])
    assert code == 0
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["event_shape"] == [43] and ckpt["step"] == 3
    assert sample.main([str(out / "best.pt"), "--out", str(tmp_path / "s.npy"), "--n", "20"]) == 0
    s = np.load(tmp_path / "s.npy")
    assert s.shape == (20, 43) and np.isfinite(s).all()


def test_early_stopping_stops(tmp_path):
    # lr 0 never improves on the first validation, so training stops after 2 more
    code = train.main(["configs/toy.yaml", "--out", str(tmp_path / "r"), "--set", "train.lr=1e-12",
                       "--set", "train.iterations=100", "--set", "train.val_every=1",
                       "--set", "train.early_stopping=2", "--set", "model.hidden_dims=[8]", "--set", "train.figures=false",
                       "--set", "data.val_size=100", "--set", "data.test_size=100"])
    assert code == 0
    stopped = load_checkpoint(tmp_path / "r" / "checkpoint.pt")["step"]
    assert stopped < 100


def test_resuming_an_early_stopped_run_only_evaluates_it(tmp_path, capsys):
    args = ["configs/toy.yaml", "--out", str(tmp_path / "r"), "--set", "train.lr=1e-12",
            "--set", "train.iterations=100", "--set", "train.val_every=1", "--set", "train.early_stopping=2",
            "--set", "model.hidden_dims=[8]", "--set", "train.figures=false",
            "--set", "data.val_size=100", "--set", "data.test_size=100"]
    assert train.main(args) == 0
    stopped = load_checkpoint(tmp_path / "r" / "checkpoint.pt")["step"]
    capsys.readouterr()
    assert train.main([*args, "--resume"]) == 0
    captured = capsys.readouterr()
    assert f"the run stopped early at step {stopped}" in captured.err and "test NLL" in captured.out
    assert load_checkpoint(tmp_path / "r" / "checkpoint.pt")["step"] == stopped
    assert train.main([*args, "--resume", "--set", "train.early_stopping=0",
                       "--set", f"train.iterations={stopped + 2}"]) == 0  # switched off: it trains on
    assert load_checkpoint(tmp_path / "r" / "checkpoint.pt")["step"] == stopped + 2
