"""Parameter averaging (cnf.ema) and its use by train.py."""

import pytest
import torch
from torch import nn

import train
from cnf_prune.build import load_model
from cnf_prune.checkpoint import load_checkpoint
from cnf.data import make_data
from cnf_prune.ema import ParameterAverage, averaging_weight
from cnf_prune.evaluate import evaluate
from helpers import run_train


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.register_buffer("weight_mask", torch.tensor([[1.0, 0, 1, 1]] * 3, dtype=torch.float64))


def test_the_warm_up_then_the_decay_weigh_the_old_average():
    assert averaging_weight(0.999, 1) == pytest.approx(2 / 11)
    assert averaging_weight(0.999, 100) == pytest.approx(101 / 110)
    assert averaging_weight(0.9, 1000) == 0.9


def test_the_average_is_the_exponentially_weighted_sum_of_the_iterates():
    """Past the warm-up, a_n = d^n a_0 + (1 - d) sum_k d^(n-k) p_k."""
    torch.manual_seed(0)
    model, d = Masked(), 0.8
    ema = ParameterAverage(model, d)
    a0 = torch.randn(3, 4, dtype=torch.float64)
    ema.load({"weight": a0}, updates=10_000)  # the warm-up weight is far above d here
    iterates = [torch.randn(3, 4, dtype=torch.float64) for _ in range(7)]
    for p in iterates:
        with torch.no_grad():
            model.weight.copy_(p)
        ema.update(model)
    n = len(iterates)
    expected = d**n * a0 + (1 - d) * sum(d ** (n - k) * p for k, p in enumerate(iterates, start=1))
    torch.testing.assert_close(ema.average["weight"], expected, rtol=1e-12, atol=1e-12)
    assert ema.updates == 10_000 + n


def test_a_constant_iterate_is_a_fixed_point_from_the_first_update():
    model = Masked()
    ema = ParameterAverage(model, 0.999)
    start = model.weight.detach().clone()
    for _ in range(5):
        ema.update(model)
    torch.testing.assert_close(ema.average["weight"], start, rtol=0, atol=1e-15)


def test_applied_swaps_the_average_in_and_restores_the_iterate_even_on_error():
    model = Masked()
    ema = ParameterAverage(model, 0.5)
    own, mask = model.weight.detach().clone(), model.weight_mask.clone()
    ema.average["weight"].fill_(3.0)
    with ema.applied(model):
        assert torch.equal(model.weight, torch.full((3, 4), 3.0, dtype=torch.float64))
        assert torch.equal(model.weight_mask, mask)  # buffers are never averaged
    assert torch.equal(model.weight, own)
    with pytest.raises(RuntimeError, match="inside"):
        with ema.applied(model):
            raise RuntimeError("inside")
    assert torch.equal(model.weight, own)
    state = ema.averaged_state(model)
    assert torch.equal(state["weight"], ema.average["weight"]) and torch.equal(state["weight_mask"], mask)
    assert torch.equal(model.weight, own)


def test_a_decay_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match="decay"):
        ParameterAverage(Masked(), 1.0)
    assert train.main(["configs/toy.yaml", "--out", "/nonexistent/x", "--set", "train.ema_decay=1.5"]) != 0


EMA = ["--set", "train.ema_decay=0.9", "--set", "model.divergence=hutchinson",
       "--set", "model.test_divergence=exact", "--set", "train.checkpoint_every=3"]


def test_checkpoints_hold_the_average_and_validation_uses_it(tmp_path):
    assert run_train(tmp_path / "r", *EMA, "--set", "train.val_every=4") == 0
    saved = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert saved["ema_updates"] == 4
    differs = [k for k in saved["model"] if not torch.equal(saved["model"][k], saved["training_model"][k])]
    assert differs  # the average lags the iterate
    # the validation NLL recorded in best.pt is that of the averaged weights best.pt holds
    model, config, best = load_model(tmp_path / "r" / "best.pt")
    data = make_data(config.data, config.seed)
    val = evaluate(model, data.val, batch_size=config.train.val_batch_size, preprocess=data.preprocess)
    assert val.nll == pytest.approx(best["best_val"], rel=1e-6)


def test_an_averaged_run_resumes_exactly(tmp_path):
    assert run_train(tmp_path / "a", *EMA, "--set", "train.iterations=6") == 0
    assert run_train(tmp_path / "b", *EMA, "--set", "train.iterations=3") == 0
    assert run_train(tmp_path / "b", *EMA, "--set", "train.iterations=6", "--resume") == 0
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert a["ema_updates"] == b["ema_updates"] == 6
    for weights in ("model", "training_model"):
        for key in a[weights]:
            assert torch.equal(a[weights][key], b[weights][key]), (weights, key)


def test_switching_averaging_on_at_a_resume_starts_from_the_iterate(tmp_path):
    """One update after the switch the average is d_1 w_4 + (1 - d_1) w_5, d_1 = 2/11,
    whatever the initial weights were."""
    assert run_train(tmp_path / "r", "--set", "train.checkpoint_every=1") == 0
    w4 = load_checkpoint(tmp_path / "r" / "checkpoint.pt")["model"]
    assert run_train(tmp_path / "r", "--resume", "--set", "train.iterations=5",
                     "--set", "train.ema_decay=0.999") == 0
    saved = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert saved["ema_updates"] == 1
    w5, d = saved["training_model"], averaging_weight(0.999, 1)
    for key, value in saved["model"].items():
        if key.endswith("_mask"):
            continue
        torch.testing.assert_close(value, d * w4[key] + (1 - d) * w5[key], rtol=1e-5, atol=1e-7, msg=key)
