"""train.py's loop: the loss it minimizes, when it validates, skips, stops and
resumes, and what it logs (each test fails if the loop drops the behaviour)."""

import dataclasses
import math

import pytest
import torch

from cnf_prune.build import build_model, load_model
from cnf_prune.checkpoint import load_checkpoint
from cnf_prune.config import load_config
from cnf.data import ToyData, make_data
from cnf_prune.evaluate import evaluate
from cnf_prune.objectives import Likelihood
from helpers import run_train, scalar_events
from pruning.gates import expected_l0, flow_gates
from pruning.pathreg import pathreg, weight_path_norm


def scalar_steps(run, tag: str) -> list[int]:
    return [e.step for e in scalar_events(run, tag)]


def test_the_loss_is_the_nll_plus_each_penalty_times_its_own_weight():
    """Distinct weights, none equal to 1, for the five penalties: the loss is the NLL
    plus each term, computed on its own, times its weight."""
    weights = {"kinetic": 0.3, "jacobian_frobenius": 0.7, "l0": 0.02, "pathreg": 0.05, "path_weights": 0.011}
    config = load_config("configs/toy.yaml", [
        "model.hidden_dims=[8,8]", "solver.method=rk4", "solver.step_size=0.25", "solver.adjoint=false",
        *(f"regularization.{k}={v}" for k, v in weights.items()),
    ])
    data = make_data(config.data, config.seed)
    torch.manual_seed(0)
    model = build_model(config, data.event_shape)
    with torch.no_grad():  # a stronger field than at initialization, so every term counts
        for name, p in model.named_parameters():
            if name.endswith("weight"):
                p.mul_(4.0)
    x = data.train_batch(16)
    torch.manual_seed(1)  # the same gate draws for the loss and the reference trace
    batch = Likelihood(config.regularization)(model.trace, model, data, x)
    nll, loss = batch.nll, batch.loss
    torch.manual_seed(1)
    reference = model.trace(x)
    terms = {
        "kinetic": reference.kinetic.mean(),
        "jacobian_frobenius": reference.jac_frobenius.mean(),
        "l0": expected_l0(model),
        "pathreg": pathreg(model),
        "path_weights": weight_path_norm(model),
    }
    for name, term in terms.items():  # each one is far above the comparison's tolerance
        assert float(weights[name] * term.detach()) > 1e-3, name
    torch.testing.assert_close(loss, nll + sum(weights[name] * term for name, term in terms.items()))


def test_a_pathreg_only_run_is_gated_and_trains(tmp_path, capsys):
    config = load_config("configs/toy.yaml", ["regularization.pathreg=0.01"])
    assert flow_gates(build_model(config, (2,)))  # PathReg alone needs the gates too
    assert run_train(tmp_path / "r", "--set", "regularization.pathreg=0.01") == 0, capsys.readouterr().err


@pytest.mark.parametrize("setting", ["pruning.sparsity=0.3", "pruning.method=random"])
def test_resume_refuses_changed_pruning(tmp_path, capsys, setting):
    """The masks come from the first run's pruning: a resume cannot change it."""
    pruned = ("--set", "pruning.method=magnitude", "--set", "pruning.sparsity=0.5")
    assert run_train(tmp_path / "r", *pruned) == 0
    code = run_train(tmp_path / "r", *pruned, "--resume", "--set", setting)
    assert code != 0
    assert "'pruning' differs from the checkpoint" in capsys.readouterr().err


def test_the_last_step_is_validated_even_off_the_validation_grid(tmp_path):
    run = tmp_path / "r"
    assert run_train(run, "--set", "train.iterations=5", "--set", "train.val_every=2") == 0
    assert scalar_steps(run, "val/nll") == [2, 4, 5]


def test_a_resume_keeps_the_events_of_the_checkpoint_step(tmp_path):
    run = tmp_path / "r"
    assert run_train(run, "--set", "train.iterations=3") == 0
    assert run_train(run, "--resume", "--set", "train.iterations=6") == 0
    assert scalar_steps(run, "train/nll") == [1, 2, 3, 4, 5, 6]


def test_with_averaging_the_test_figure_is_that_of_best_pt(tmp_path, monkeypatch, capsys):
    """best.pt holds the average of step 3 (step 6 validates worse): the test must
    evaluate it, not the average of the last step."""
    calls = {"n": 0}

    def second_validation_worse(*args, **kwargs):
        calls["n"] += 1
        result = evaluate(*args, **kwargs)
        if calls["n"] == 2:
            result = dataclasses.replace(result, nll=1e9)
        return result

    monkeypatch.setattr("cnf_prune.trainer.evaluate", second_validation_worse)
    run = tmp_path / "r"
    assert run_train(run, "--set", "train.ema_decay=0.5", "--set", "train.iterations=6",
                     "--set", "train.val_every=3") == 0
    assert calls["n"] == 3 and load_checkpoint(run / "best.pt")["step"] == 3
    reported = float(capsys.readouterr().out.split("test NLL ")[1].split()[0])
    model, config, _ = load_model(run / "best.pt")
    data = make_data(config.data, config.seed)
    test = evaluate(model, data.test, batch_size=config.train.val_batch_size, preprocess=data.preprocess)
    last = load_model(run / "checkpoint.pt")[0]
    other = evaluate(last, data.test, batch_size=config.train.val_batch_size, preprocess=data.preprocess)
    assert abs(other.nll - test.nll) > 1e-3  # the two candidates differ
    assert reported == pytest.approx(test.nll, abs=1e-4)


def test_early_stopping_stops_after_exactly_that_many_stale_validations(tmp_path, monkeypatch, capsys):
    flat = type("Result", (), {"nll": 1.0, "jac_norm": 0.0, "nfe": 0.0})()
    monkeypatch.setattr("cnf_prune.trainer.evaluate", lambda *args, **kwargs: flat)  # never improves after step 1
    run = tmp_path / "r"
    assert run_train(run, "--set", "train.val_every=1", "--set", "train.early_stopping=2",
                     "--set", "train.iterations=10", "--set", "train.figures=false") == 0
    assert "early stopping at step 3" in capsys.readouterr().err
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 3


def test_bad_steps_must_be_consecutive_to_stop_a_run(tmp_path, monkeypatch):
    """A NaN batch every other step never makes ``max_bad_steps=2`` in a row."""
    real = ToyData.train_batch
    calls = {"n": 0}

    def every_other_nan(self, batch_size):
        calls["n"] += 1
        x = real(self, batch_size)
        return x * float("nan") if calls["n"] % 2 == 0 else x

    monkeypatch.setattr(ToyData, "train_batch", every_other_nan)
    run = tmp_path / "r"
    assert run_train(run, "--set", "train.max_bad_steps=2", "--set", "train.iterations=4") == 0
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["step"] == 4 and ckpt["skipped_steps"] == 3  # batches 2, 4, 6 were poisoned


def test_a_finite_loss_with_an_infinite_gradient_is_not_stepped(tmp_path, monkeypatch):
    """The first backward pass gives one weight an inf gradient: that step is skipped,
    and neither the weights nor Adam's moments take it in."""
    poisoned = {"left": 1}

    def build_with_a_bad_first_gradient(config, event_shape):
        model = build_model(config, event_shape)
        weight = next(model.parameters())

        def hook(grad):
            if poisoned["left"]:
                poisoned["left"] -= 1
                return torch.full_like(grad, math.inf)
            return grad

        weight.register_hook(hook)
        return model

    monkeypatch.setattr("cnf_prune.setup.build_model", build_with_a_bad_first_gradient)
    run = tmp_path / "r"
    assert run_train(run) == 0
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["skipped_steps"] == 1 and ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    moments = [t for s in ckpt["optimizer"]["state"].values() for t in s.values() if t.is_floating_point()]
    assert moments and all(torch.isfinite(t).all() for t in moments)


def test_grad_clip_bounds_the_gradient_norm_of_each_step(tmp_path, monkeypatch):
    """``train.grad_clip`` rescales the gradients before the Adam step; with Adam's
    scale invariance the loss does not show it, so read the gradients the step uses."""
    norms = []
    real_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    assert run_train(tmp_path / "clipped", "--set", "train.grad_clip=0.01") == 0
    assert len(norms) == 4 and max(norms) <= 0.01 * (1 + 1e-5)
    norms.clear()
    assert run_train(tmp_path / "free") == 0
    assert min(norms) > 0.01  # the bound was active, not already met


@pytest.mark.slow
def test_a_compiled_field_trains_the_same_steps_and_saves_the_same_names(tmp_path):
    """``train.compile: true`` compiles each field in place: the losses of the first
    steps equal the eager run's to float rounding, and the checkpoint keeps the
    eager parameter names (so ``sample.py`` and resumes read it as before)."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert run_train(eager, "--set", "train.iterations=3") == 0
    assert run_train(compiled, "--set", "train.iterations=3", "--set", "train.compile=true") == 0
    for a, b in zip(scalar_events(eager, "train/nll"), scalar_events(compiled, "train/nll")):
        assert b.value == pytest.approx(a.value, rel=1e-4)
    names = set(load_checkpoint(compiled / "checkpoint.pt")["model"])
    assert names == set(load_checkpoint(eager / "checkpoint.pt")["model"])
    assert not any("_orig_mod" in name for name in names)
