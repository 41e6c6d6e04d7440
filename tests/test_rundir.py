"""Nothing lost when two runs collide, a write fails, or a sampling job is large."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
import train
from cnf_prune.rundir import BusyError, WriteError, locked_run_directory
from helpers import QUICK, run_train

ROOT = Path(__file__).parents[1]

HOLD = """
import sys, time
from pathlib import Path
from cnf_prune.rundir import locked_run_directory
with locked_run_directory(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(60)
"""


def hold_lock(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def one_line_error(capsys) -> str:
    """The one ``error:`` line on stderr, which ends it (progress bars may precede it)."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and err[-1] == errors[0], err
    assert "Traceback" not in "\n".join(err)
    return errors[0][errors[0].index("error:"):]


def test_a_second_run_in_a_locked_directory_stops_at_once_and_changes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        before = sorted(p.name for p in out.iterdir())
        start = time.perf_counter()
        assert train.main(["configs/toy.yaml", "--out", str(out), *QUICK]) == BusyError.exit_code
        assert time.perf_counter() - start < 10
        message = one_line_error(capsys)
        assert str(out) in message and f"process {holder.pid}" in message
        assert sorted(p.name for p in out.iterdir()) == before
    finally:
        holder.kill()
        holder.wait()


def test_resume_while_the_run_is_alive_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(out) == 0
    capsys.readouterr()
    stamp = (out / "checkpoint.pt").stat().st_mtime_ns
    holder = hold_lock(out)
    try:
        assert train.main(["configs/toy.yaml", "--out", str(out), *QUICK, "--resume"]) == BusyError.exit_code
        assert "is in use by process" in one_line_error(capsys)
        assert (out / "checkpoint.pt").stat().st_mtime_ns == stamp
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    holder = hold_lock(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with locked_run_directory(out):
        pass  # the kernel dropped the lock with the process


def test_a_run_that_fails_in_its_setup_leaves_no_directory(tmp_path, capsys):
    out = tmp_path / "run"
    code = train.main(["configs/mnist_cpu.yaml", "--out", str(out), "--set", f"data.root={tmp_path / 'none'}"])
    assert code == 3, capsys.readouterr().err
    assert not out.exists()


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    """The write of step 4's checkpoint fails: one line naming the file, the errno text
    and the intact checkpoint of step 2; no temporary file is left."""
    import cnf_prune.checkpoint as checkpoint

    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        calls["n"] += 1
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    code = train.main(["configs/toy.yaml", "--out", str(out), *QUICK, "--set", "train.checkpoint_every=2"])
    assert code == WriteError.exit_code
    message = one_line_error(capsys)
    assert "No space left on device" in message and "checkpoint.pt of step 2 is intact" in message
    assert "--resume" in message
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not list(out.glob(".*.tmp"))


def test_a_failing_event_write_is_one_line(tmp_path, capsys, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    def broken(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(SummaryWriter, "add_scalar", broken)
    assert train.main(["configs/toy.yaml", "--out", str(tmp_path / "run"), *QUICK]) == WriteError.exit_code
    message = one_line_error(capsys)
    assert "Read-only file system" in message and "events.out.tfevents" in message


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "run"
    assert run_train(out) == 0
    return out / "best.pt"


def test_the_base_noise_does_not_depend_on_the_batch_size(toy_checkpoint, tmp_path):
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert sample.main([str(toy_checkpoint), "--out", str(a), "--n", "700", "--batch-size", "700"]) == 0
    assert sample.main([str(toy_checkpoint), "--out", str(b), "--n", "700", "--batch-size", "97"]) == 0
    np.testing.assert_allclose(np.load(a), np.load(b), atol=1e-3)  # within the solver's tolerance


def test_a_large_job_writes_batch_by_batch_and_a_stopped_one_keeps_a_valid_file(toy_checkpoint, tmp_path,
                                                                                 capsys, monkeypatch):
    from cnf.flow import Flow

    real_trace = Flow.trace
    calls = {"n": 0}

    def trace_then_stop(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # SIGTERM during the third batch
            os.kill(os.getpid(), signal.SIGTERM)
        return real_trace(self, *args, **kwargs)

    monkeypatch.setattr(Flow, "trace", trace_then_stop)
    out = tmp_path / "s.npy"
    code = sample.main([str(toy_checkpoint), "--out", str(out), "--n", "1000", "--batch-size", "100"])
    assert code == 128 + signal.SIGTERM
    assert "wrote 300 of 1000 samples" in capsys.readouterr().err
    kept = np.load(out)
    assert kept.shape == (300, 2) and np.isfinite(kept).all()
    assert not list(tmp_path.glob("*.partial"))


def test_a_failing_sample_write_leaves_no_file(toy_checkpoint, tmp_path, capsys, monkeypatch):
    import cnf_prune.sampling as sampling

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sampling, "open_memmap", full)
    out = tmp_path / "s.npy"
    assert sample.main([str(toy_checkpoint), "--out", str(out), "--n", "10"]) == WriteError.exit_code
    assert "No space left on device" in one_line_error(capsys)
    assert not list(tmp_path.iterdir())
