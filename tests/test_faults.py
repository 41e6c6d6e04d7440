"""Kill and resume, signals, NaN losses: no run is lost."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import train
from cnf_prune.checkpoint import load_checkpoint
from cnf.data import ToyData
from helpers import scalar_events

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["configs/toy.yaml", "--set", "model.hidden_dims=[16,16]", "--set", "model.divergence=hutchinson",
        "--set", "model.test_divergence=exact", "--set", "data.val_size=100", "--set", "data.test_size=100",
        "--set", "train.val_every=1000", "--set", "train.checkpoint_every=4", "--set", "train.figures=false",
        "--set", "solver.rtol=1e-3", "--set", "solver.atol=1e-3", "--set", "train.device=cpu"]


def start(out, iterations):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py", *ARGS, "--set", f"train.iterations={iterations}", "--out", str(out)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(path, step, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file():
            try:
                if load_checkpoint(path)["step"] >= step:
                    return
            except Exception:  # noqa: BLE001 - being replaced right now; try again
                pass
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


def final_model(out):
    return load_checkpoint(out / "checkpoint.pt")["model"]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    ref = start(tmp_path / "ref", 24)
    assert ref.wait(timeout=300) == 0, ref.communicate()[1][-2000:]

    proc = start(tmp_path / "run", 24)
    wait_for_step(tmp_path / "run" / "checkpoint.pt", 8, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"]  # intact, not corrupt
    assert 8 <= killed_at < 24
    resumed = subprocess.run([sys.executable, "train.py", *ARGS, "--set", "train.iterations=24",
                              "--out", str(tmp_path / "run"), "--resume"], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = final_model(tmp_path / "ref"), final_model(tmp_path / "run")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sigterm_writes_a_checkpoint_and_exits_143(tmp_path):
    proc = start(tmp_path / "run", 100000)
    wait_for_step(tmp_path / "run" / "checkpoint.pt", 4, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "continue with --resume" in err
    stopped_at = int(re.search(r"at step (\d+)", err).group(1))
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == stopped_at  # written at the stop


def test_nan_losses_are_skipped_then_stop_cleanly(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = ToyData.train_batch
    calls = {"n": 0}

    def poisoned(self, batch_size):
        calls["n"] += 1
        x = real(self, batch_size)
        return x if calls["n"] <= 5 else x * float("nan")

    monkeypatch.setattr(ToyData, "train_batch", poisoned)
    code = train.main([*ARGS, "--set", "train.iterations=50", "--set", "train.max_bad_steps=3",
                       "--set", "train.checkpoint_every=5", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 6, err
    assert "3 steps in a row had a NaN/inf loss" in err
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 5 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_nan_losses_before_any_checkpoint_say_to_rerun(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ToyData, "train_batch", lambda self, n: torch.full((n, 2), float("nan")))
    out = tmp_path / "run"
    code = train.main([*ARGS, "--set", "train.iterations=50", "--set", "train.max_bad_steps=3", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 6 and not (out / "checkpoint.pt").exists()
    assert "no checkpoint was written yet" in err and "run again without --resume" in err


def test_a_fresh_run_drops_the_events_of_a_killed_one(tmp_path):
    """A run killed before its first checkpoint leaves events behind; the rerun starts
    from scratch, and TensorBoard (and the comparison tables) must see its curves only."""
    out = tmp_path / "run"
    quick = ["--set", "train.log_every=1", "--set", "train.checkpoint_every=1000", "--set", "train.val_every=3"]
    assert train.main([*ARGS, *quick, "--set", "train.iterations=6", "--out", str(out)]) == 0
    (out / "checkpoint.pt").unlink()  # as if killed before its first checkpoint
    assert train.main([*ARGS, *quick, "--set", "train.iterations=4", "--out", str(out)]) == 0
    assert [e.step for e in scalar_events(out, "train/nll")] == [1, 2, 3, 4]
