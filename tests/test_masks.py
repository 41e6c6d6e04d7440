import copy
from pathlib import Path

import pytest
import torch

import cnf_prune.build as build
import sample
import train
from helpers import prune
from cnf_prune.build import build_model
from cnf_prune.checkpoint import load_checkpoint, save_checkpoint
from cnf_prune.config import from_dict, load_config, to_dict
from cnf.data import make_data
from cnf.errors import ConfigError
from cnf.base import standard_normal_log_prob
from pruning.masks import mask_buffer, prunable_weights, select_top
from pruning.scores import SCORERS
from pruning.tracking import sparsity_scalars

CPU = torch.device("cpu")
TOY = str(Path(__file__).resolve().parents[1] / "configs" / "toy.yaml")


def small_config(**pruning):
    return from_dict({
        "seed": 0,
        "data": {"name": "checkerboard", "val_size": 64, "test_size": 64},
        "model": {"hidden_dims": [16, 16], "end_time": 0.5},
        "solver": {"method": "rk4", "step_size": 0.25, "adjoint": False},
        "train": {"batch_size": 32},
        "pruning": pruning,
    })


def fresh(config, seed: int = 0):
    torch.manual_seed(seed)
    data = make_data(config.data, config.seed)
    return build_model(config, data.event_shape), data


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.83, 0.99])
def test_achieved_sparsity_equals_the_request(scope, sparsity):
    model, _ = fresh(small_config())
    weights = prunable_weights(model)
    scores = {n: torch.rand(p.shape) for n, p in weights.items()}
    keep = select_top(scores, sparsity, scope)
    if scope == "global":
        total = sum(p.numel() for p in weights.values())
        assert sum(int(k.sum()) for k in keep.values()) == round((1 - sparsity) * total)
    else:
        assert all(int(keep[n].sum()) == round((1 - sparsity) * p.numel()) for n, p in weights.items())


@pytest.mark.parametrize("scale", [1.0, 1e-50, 1e39])
def test_select_top_keeps_float64_scores_in_order(scale):
    # Differences of 1e-12 and magnitudes outside float32's range (SynFlow's scores)
    descending = scale * torch.tensor([1 + 3e-12, 1 + 2e-12, 1 + 1e-12, 1.0], dtype=torch.float64)
    for scores in (descending, descending.flip(0)):
        keep = select_top({"w": scores}, 0.5)["w"]
        assert torch.equal(keep, scores >= scores.sort(descending=True).values[1])


def test_select_top_breaks_ties_by_position():
    keep = select_top({"a": torch.zeros(6), "b": torch.zeros(4)}, 0.7)
    assert keep["a"].tolist() == [True, True, True, False, False, False]
    assert not keep["b"].any()


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_select_top_breaks_ties_by_position_in_large_weights(scope):
    # all-zero scores (a dead layer's gradients): the sort must be stable at any size
    keep = select_top({"a": torch.zeros(600, 4), "b": torch.zeros(1000)}, 0.7, scope)
    if scope == "global":
        assert torch.equal(keep["a"].flatten(), torch.arange(2400) < 1020)
        assert not keep["b"].any()
    else:
        assert torch.equal(keep["a"].flatten(), torch.arange(2400) < 720)
        assert torch.equal(keep["b"], torch.arange(1000) < 300)


def test_a_gated_model_is_scored_without_its_gates():
    """With L0 gates, the mask is the one the ungated weights get, whatever the global
    generator (a sampled gate draw would zero some gradients and reorder the scores)."""
    config = to_dict(small_config(method="jacobian_spectrum", sparsity=0.4))
    config["regularization"]["l0"] = 0.01
    config = from_dict(config)
    model, data = fresh(config)
    gates = [block.gates for block in model.blocks]
    assert all(g is not None for g in gates)
    ungated = copy.deepcopy(model)
    for block in ungated.blocks:
        block.gates = None
    prune(ungated, data, config)
    expected = {n: mask_buffer(ungated, n).clone() for n in prunable_weights(model)}
    for seed in (1, 2):
        pruned = copy.deepcopy(model)
        torch.manual_seed(seed)
        prune(pruned, data, config)
        assert all(torch.equal(mask_buffer(pruned, n), m) for n, m in expected.items())
        assert all(block.gates is not None for block in pruned.blocks)  # put back


def test_masked_weights_stay_exactly_zero_under_adam_with_weight_decay():
    config = small_config(method="random", sparsity=0.6)
    model, data = fresh(config)
    prune(model, data, config)
    weights = prunable_weights(model)
    pruned = {n: mask_buffer(model, n) == 0 for n in weights}
    start = {n: p.detach().clone() for n, p in weights.items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(40):
        trace = model.trace(data.train_batch(32))
        loss = -(standard_normal_log_prob(trace.out) + trace.logabsdet).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    effective = model.blocks[0].solve_weights()
    for name, p in weights.items():
        assert torch.all(p.detach()[pruned[name]] == 0), name
        assert torch.all(effective[name.split("field.", 1)[1]].detach()[pruned[name]] == 0), name
        assert torch.all(optimizer.state[p]["exp_avg"][pruned[name]] == 0), name
        assert not torch.equal(p.detach()[~pruned[name]], start[name][~pruned[name]])  # the rest trains
    assert sparsity_scalars(model)["sparsity/weights"] == pytest.approx(0.6, abs=0.5 / 1000)


def test_masks_survive_a_checkpoint_round_trip(tmp_path):
    config = small_config(method="magnitude", sparsity=0.7)
    model, data = fresh(config)
    prune(model, data, config)
    save_checkpoint({"model": model.state_dict()}, tmp_path / "ckpt.pt")

    loaded, _ = fresh(config, seed=1)  # different initial weights, dense masks
    loaded.load_state_dict(load_checkpoint(tmp_path / "ckpt.pt")["model"], strict=True)
    for name in prunable_weights(model):
        assert torch.equal(mask_buffer(loaded, name), mask_buffer(model, name))
    assert sparsity_scalars(loaded) == sparsity_scalars(model)
    x = data.val[:16]
    torch.testing.assert_close(loaded.log_prob(x), model.log_prob(x))


@pytest.mark.parametrize("method", sorted(SCORERS))
def test_sparsity_zero_leaves_the_model_unchanged(method):
    config = small_config(method=method, sparsity=0.0)
    model, data = fresh(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune(model, data, config)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_pruning_does_not_shift_the_training_stream(divergence):
    """Scoring solves (with Hutchinson: random probes) leave the global generator and the data alone."""
    config = to_dict(small_config(method="snip", sparsity=0.5, batches=2))
    config["model"]["divergence"] = divergence
    config = from_dict(config)
    model, data = fresh(config)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    prune(model, data, config)
    assert torch.equal(torch.get_rng_state(), rng)
    _, untouched = fresh(config)
    assert torch.equal(data.train_batch(32), untouched.train_batch(32))


def test_bad_pruning_input_is_a_clear_error():
    for sparsity in (1.0, -0.1):
        with pytest.raises(ConfigError, match=r"pruning.sparsity must be in \[0, 1\)"):
            small_config(method="random", sparsity=sparsity)
    with pytest.raises(ConfigError, match="sparsity must be in"):
        select_top({"w": torch.rand(3)}, 1.0)
    with pytest.raises(ConfigError, match="method is 'none'"):
        small_config(sparsity=0.5)
    model, data = fresh(small_config())
    with pytest.raises(ConfigError, match="unknown pruning.method 'prune_it'; valid: none, random"):
        prune(model, data, small_config(method="prune_it", sparsity=0.5))
    with pytest.raises(ConfigError, match="matches no prunable weight"):
        prune(model, data, small_config(method="random", sparsity=0.5, layers=["*.conv*"]))


def test_train_prunes_and_sample_reloads_the_masks(tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [
        "data.val_size=64", "data.test_size=64", "model.hidden_dims=[16,16]", "solver.rtol=1e-3",
        "solver.atol=1e-3", "train.iterations=3", "train.val_every=3", "train.batch_size=32",
        "pruning.method=jacobian_spectrum", "pruning.sparsity=0.75", "pruning.layers=['*.layers.1.*','*.layers.2.*']",
    ]
    args = [TOY, "--out", str(run)] + [a for o in overrides for a in ("--set", o)]
    assert train.main(args) == 0
    assert "pruning at initialization: jacobian_spectrum" in capsys.readouterr().err

    config = load_config(run / "config.yaml")
    model = build.load_model(run / "checkpoint.pt", CPU)[0].eval()
    sparsity = sparsity_scalars(model)
    assert sparsity["sparsity/weights"] == pytest.approx(0.75 * (256 + 32) / (32 + 256 + 32), abs=1e-3)
    assert sparsity["sparsity/layer/blocks.0.field.layers.0.weight"] == 0.0  # not in pruning.layers
    assert config.pruning.sparsity == 0.75
    assert sample.main([str(run / "checkpoint.pt"), "--out", str(tmp_path / "x.npy"), "--n", "10"]) == 0
