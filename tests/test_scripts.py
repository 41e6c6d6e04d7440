"""End-to-end: train.py and sample.py through their ``main`` entry points."""

import os
import re

import numpy as np
import pytest
import torch

import sample
import train
from cnf.errors import ConfigError
from cnf_prune.checkpoint import load_checkpoint, save_checkpoint
from cnf_prune.config import TrainConfig
from cnf_prune.trainer import GAP_WARNING_NATS_PER_DIM, learning_rate, solver_gap_warning
from helpers import run_train



def test_train_resume_sample(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(out) == 0
    for name in ("checkpoint.pt", "best.pt", "config.yaml"):
        assert (out / name).is_file(), name
    assert list(out.glob("events.out.tfevents.*"))
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4
    assert run_train(out, "--resume", "--set", "train.iterations=6") == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 6
    assert sample.main([str(out / "checkpoint.pt"), "--out", str(tmp_path / "s.npy"), "--n", "50"]) == 0
    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (50, 2) and np.isfinite(samples).all()
    assert sample.main([str(out / "best.pt"), "--out", str(tmp_path / "s.png"), "--n", "50"]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    assert "NFE" in capsys.readouterr().out


def test_sample_tol_sets_the_accuracy_of_the_samples(tmp_path, capsys):
    """Samples integrate z alone; --tol is the adaptive solver's rtol = atol, so a
    tighter one costs more evaluations and lands closer to a near-exact solve."""
    out = tmp_path / "run"
    assert run_train(out, "--set", "train.iterations=30") == 0
    capsys.readouterr()

    def draw(tol):
        assert sample.main([str(out / "best.pt"), "--out", str(tmp_path / "s.npy"), "--n", "300",
                            "--tol", tol]) == 0
        nfe = int(re.search(r"NFE (\d+) per batch", capsys.readouterr().out).group(1))
        return np.load(tmp_path / "s.npy"), nfe

    exact, _ = draw("1e-10")
    (loose, nfe_loose), (tight, nfe_tight) = draw("1e-3"), draw("1e-7")
    assert nfe_tight > nfe_loose
    assert np.abs(tight - exact).max() < 5e-5 < np.abs(loose - exact).max()  # measured 6e-6 and 3e-4


def test_resume_continues_exactly(tmp_path):
    """Six steps straight equal three steps, stop, resume, three more (Hutchinson: RNG matters)."""
    hutch = ["--set", "model.divergence=hutchinson", "--set", "model.test_divergence=exact",
             "--set", "train.checkpoint_every=3"]
    assert run_train(tmp_path / "a", *hutch, "--set", "train.iterations=6") == 0
    assert run_train(tmp_path / "b", *hutch, "--set", "train.iterations=3") == 0
    assert run_train(tmp_path / "b", *hutch, "--set", "train.iterations=6", "--resume") == 0
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_cosine_learning_rate_schedule():
    from cnf_prune.config import TrainConfig

    cosine = TrainConfig(iterations=100, lr=2e-3, lr_schedule="cosine")
    assert learning_rate(cosine, 0) == pytest.approx(2e-3)
    assert learning_rate(cosine, 50) == pytest.approx(1e-3)
    assert learning_rate(cosine, 25) == pytest.approx(1e-3 * (1 + 2 ** -0.5))
    assert learning_rate(cosine, 100) == pytest.approx(0.0, abs=1e-15)
    rates = [learning_rate(cosine, s) for s in range(101)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    constant = TrainConfig(iterations=100, lr=2e-3)
    assert {learning_rate(constant, s) for s in range(101)} == {2e-3}


def test_an_interrupted_cosine_run_resumes_on_the_same_curve(tmp_path, monkeypatch):
    import os
    import signal

    from cnf.data import ToyData

    cosine = ["--set", "train.lr_schedule=cosine", "--set", "train.iterations=6"]
    assert run_train(tmp_path / "a", *cosine) == 0
    real, calls = ToyData.train_batch, [0]

    def batch_then_sigterm(self, n):
        calls[0] += 1
        if calls[0] == 3:  # stop after the third step, as Ctrl-C would
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, n)

    monkeypatch.setattr(ToyData, "train_batch", batch_then_sigterm)
    assert run_train(tmp_path / "b", *cosine) == 128 + signal.SIGTERM
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 3
    monkeypatch.setattr(ToyData, "train_batch", real)
    assert run_train(tmp_path / "b", *cosine, "--resume") == 0
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_linear_warmup_scales_the_schedule_as_ffjord_does():
    # FFJORD's train_cnf.py: lr * min(1, (itr + 1) / warmup_iters), itr counted from 0.
    warm = TrainConfig(lr=2e-3, warmup_iterations=4)
    assert [learning_rate(warm, s) for s in range(6)] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3, 2e-3])
    both = TrainConfig(lr=2e-3, iterations=100, lr_schedule="cosine", warmup_iterations=10)
    cosine = TrainConfig(lr=2e-3, iterations=100, lr_schedule="cosine")
    assert learning_rate(both, 4) == pytest.approx(0.5 * learning_rate(cosine, 4))
    assert learning_rate(both, 10) == learning_rate(cosine, 10)
    with pytest.raises(ConfigError, match="warmup_iterations"):
        TrainConfig(warmup_iterations=-1)


def test_the_schedule_sets_the_optimizer_learning_rate(tmp_path):
    assert run_train(tmp_path / "c", "--set", "train.lr_schedule=cosine") == 0
    saved = load_checkpoint(tmp_path / "c" / "checkpoint.pt")
    # the last of 4 steps was taken after 3: lr * (1 + cos(3 pi / 4)) / 2
    expected = 0.5 * saved["config"]["train"]["lr"] * (1 + np.cos(3 * np.pi / 4))
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(expected)


def test_resume_keeps_a_best_pt_that_is_ahead_of_checkpoint_pt(tmp_path, capsys):
    """best.pt is written at every better validation, checkpoint.pt every
    checkpoint_every steps: after a kill in between, the resumed run must not replace
    the better best.pt with a worse model."""
    run = tmp_path / "r"
    assert run_train(run, "--set", "train.iterations=2") == 0
    best = load_checkpoint(run / "best.pt")
    best["best_val"] = -1e9  # stands for a better model validated after checkpoint.pt
    save_checkpoint(best, run / "best.pt")
    assert run_train(run, "--set", "train.iterations=4", "--resume") == 0
    kept = load_checkpoint(run / "best.pt")
    assert kept["step"] == 2 and kept["best_val"] == -1e9
    assert load_checkpoint(run / "checkpoint.pt")["best_val"] == -1e9

    (run / "best.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert run_train(run, "--set", "train.iterations=6", "--resume") == 0
    assert "warning: ignoring" in capsys.readouterr().err
    assert load_checkpoint(run / "best.pt")["step"] == 6  # replaced at the next validation


def test_a_finished_run_without_a_readable_best_pt_tests_its_last_model(tmp_path, capsys):
    run = tmp_path / "r"
    assert run_train(run) == 0
    (run / "best.pt").write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert run_train(run, "--resume") == 0
    captured = capsys.readouterr()
    assert "cannot read" in captured.err and "testing the model of step 4 instead" in captured.err
    assert "ignoring" not in captured.err  # no validation is left to replace it
    assert "done: 4 steps; model of step 4; test NLL" in captured.out
    (run / "best.pt").unlink()
    assert run_train(run, "--resume") == 0
    captured = capsys.readouterr()
    assert f"there is no {run / 'best.pt'}" in captured.err and "best val NLL" not in captured.out


def test_resume_refuses_a_changed_architecture(tmp_path, capsys):
    assert run_train(tmp_path / "r") == 0
    code = run_train(tmp_path / "r", "--resume", "--set", "model.hidden_dims=[8]")
    assert code != 0
    assert "differs from the checkpoint" in capsys.readouterr().err


def test_resume_reports_what_it_changes(tmp_path, capsys):
    assert run_train(tmp_path / "r") == 0
    capsys.readouterr()
    assert run_train(tmp_path / "r", "--resume", "--set", "train.iterations=6",
                     "--set", "regularization.kinetic=0.5") == 0
    err = capsys.readouterr().err
    assert "resuming at step 4 with changed settings" in err
    assert "regularization.kinetic: 0.0 -> 0.5" in err and "train.iterations: 4 -> 6" in err
    assert "already reached" not in err
    # the saved config is the one the run now uses
    assert "kinetic: 0.5" in (tmp_path / "r" / "config.yaml").read_text()


def test_resuming_a_finished_run_only_evaluates_it(tmp_path, capsys):
    assert run_train(tmp_path / "r") == 0
    before = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    capsys.readouterr()
    assert run_train(tmp_path / "r", "--resume") == 0
    captured = capsys.readouterr()
    assert "changed settings" not in captured.err
    assert "already reached train.iterations=4" in captured.err and "test NLL" in captured.out
    after = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    for key in before["model"]:
        assert torch.equal(before["model"][key], after["model"][key]), key


def test_a_signal_stops_the_test_evaluation_with_a_message(tmp_path, capsys, monkeypatch):
    """Training is checkpointed by then, so a signal ends the (possibly long) test
    evaluation at once instead of being deferred to a step that never comes."""
    import os
    import signal

    assert run_train(tmp_path / "r") == 0
    capsys.readouterr()

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal should have stopped the evaluation")

    monkeypatch.setattr("cnf_prune.trainer.evaluate", interrupted)
    before = signal.getsignal(signal.SIGTERM)
    assert run_train(tmp_path / "r", "--resume") == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "during the test evaluation" in err and "--resume" in err
    assert signal.getsignal(signal.SIGTERM) is before  # main() restores the caller's handlers


@pytest.mark.parametrize(
    "argv, match, code",
    [
        (["configs/missing.yaml"], "does not exist", 2),
        (["configs/toy.yaml", "--set", "data.name=spiral"], "unknown dataset 'spiral'", 3),
        (["configs/toy.yaml", "--set", "solver.rtol=0"], "tolerances must be positive", 2),
        (["configs/toy.yaml", "--set", "solver.method=rk5"], "unknown solver method", 2),
        (["configs/toy.yaml", "--set", "solver.method=rk4"], "needs a positive step_size", 2),
        (["configs/toy.yaml", "--resume"], "nothing|no .*checkpoint.pt", 4),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys, argv, match, code):
    assert train.main([argv[0], "--out", str(tmp_path / "x"), *argv[1:]]) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert __import__("re").search(match, err), err


def test_checkpoints_get_the_permissions_of_an_ordinary_file(tmp_path):
    """The atomic write goes through a private temporary file; the checkpoint it
    becomes is readable as the umask allows, like config.yaml beside it."""
    old = os.umask(0o022)
    try:
        save_checkpoint({"x": torch.zeros(1)}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left


def test_sample_refuses_bad_checkpoints(tmp_path, capsys):
    fake = tmp_path / "fake.pt"
    fake.write_bytes(b"not a checkpoint at all")
    assert sample.main([str(fake), "--out", str(tmp_path / "s.npy")]) == 4
    assert "corrupt" in capsys.readouterr().err

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "cnf-checkpoint/1", "x": Evil()}, evil)
    assert sample.main([str(evil), "--out", str(tmp_path / "s.npy")]) == 4
    err = capsys.readouterr()
    assert "refused" in err.err and "pwned" not in err.out


def test_solver_underflow_is_explained(tmp_path, capsys):
    code = run_train(tmp_path / "u", "--set", "solver.rtol=1e-30", "--set", "solver.atol=1e-30",
                     "--set", "solver.max_num_steps=50")
    err = capsys.readouterr().err
    assert code == 5, err
    assert "block 0" in err and "failed at" in err and "rk4" in err


def test_a_failing_backward_solve_names_its_block(tmp_path, capsys):
    """The adjoint solves run from the last block to the first: the message names the
    first block that evaluated any (here the forward solves fit in two steps)."""
    code = run_train(tmp_path / "b", "--set", "solver.adjoint=true", "--set", "solver.max_num_steps=2",
                     "--set", "model.num_blocks=2",
                     "--set", "solver.rtol=1e-5", "--set", "solver.atol=1e-5",
                     "--set", "regularization.kinetic=1.0")  # a backward solve that needs more steps
    err = capsys.readouterr().err
    assert code == 5, err
    assert re.search(r"step limit exceeded in the backward \(adjoint\) solve of block [01], at t=0\.\d+", err), err
    assert (tmp_path / "b" / "checkpoint.pt").is_file()  # written before stopping


def test_solver_gap_warning_only_for_a_fixed_step_solver_past_the_threshold():
    from cnf.solver import Solver

    rk4, dopri5 = Solver(method="rk4", step_size=0.5), Solver(method="dopri5")
    limit = GAP_WARNING_NATS_PER_DIM * 784
    assert solver_gap_warning(0.9 * limit, 784, rk4) is None  # ordinary generalization gap
    assert solver_gap_warning(-5 * limit, 784, rk4) is None  # validation better than training
    assert solver_gap_warning(50 * limit, 784, dopri5) is None  # adaptive: error controlled
    warning = solver_gap_warning(1.1 * limit, 784, rk4)
    assert "0.110 nats/dim" in warning and "rk4 (step_size=0.5)" in warning and "solver.step_size" in warning


def test_sample_temperature_scales_the_base_noise(tmp_path):
    """--temperature T: the flow's inverse at T times the base noise that --seed draws."""
    import cnf_prune.build as build
    from cnf_prune.sampling import SampleNoise

    out = tmp_path / "run"
    assert run_train(out) == 0
    model = build.load_model(out / "best.pt")[0].eval()

    def expected(temperature):
        z = SampleNoise(model, 3, 1.0).draw(0, 40)
        with torch.no_grad():
            return model.trace(temperature * z, reverse=True, density=False).out.numpy()

    samples = {}
    for t in ("1", "0.5"):
        assert sample.main([str(out / "best.pt"), "--out", str(tmp_path / "s.npy"), "--n", "40", "--seed", "3",
                            "--temperature", t]) == 0
        samples[t] = np.load(tmp_path / "s.npy")
        np.testing.assert_allclose(samples[t], expected(float(t)), rtol=1e-5, atol=1e-6)
    assert np.abs(samples["0.5"] - samples["1"]).max() > 0.1


def test_image_samples_are_the_pixels_of_the_flows_samples(tmp_path):
    """sample.py undoes the logit transform: pixels = (σ(x) − α) / (1 − 2α) of the flow's
    samples x, in [0, 1] and, for an untrained flow, rarely at either end."""
    import cnf_prune.build as build
    from cnf_prune.config import load_config, to_dict
    from cnf.images import logit_inverse

    config = load_config(None, [
        "data.name=synthetic8", "model.layer_type=concat", "model.nonlinearity=softplus", "model.hidden_dims=[4]",
        "model.num_blocks=1", "model.scales=1", "model.end_time=0.5", "solver.method=rk4", "solver.step_size=0.25",
    ])
    torch.manual_seed(0)
    model = build.build_model(config, (1, 8, 8))
    ckpt = tmp_path / "image.pt"
    save_checkpoint({"config": to_dict(config), "event_shape": [1, 8, 8], "model": model.state_dict()}, ckpt)
    assert sample.main([str(ckpt), "--out", str(tmp_path / "s.npy"), "--n", "6", "--seed", "2"]) == 0
    pixels = np.load(tmp_path / "s.npy")

    from cnf_prune.sampling import SampleNoise

    with torch.no_grad():
        x = model.eval().trace(SampleNoise(model, 2, 1.0).draw(0, 6), reverse=True, density=False).out
    assert pixels.shape == (6, 1, 8, 8)
    np.testing.assert_allclose(pixels, logit_inverse(x, config.data.logit_alpha).numpy(), rtol=1e-5, atol=1e-6)
    assert ((pixels == 0) | (pixels == 1)).mean() < 0.01
