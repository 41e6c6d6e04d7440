"""Unit-level pruning (pruning/structured.py) and compaction (pruning/compact.py)."""

import numpy as np
import pytest
import torch

import sample
from helpers import prune
from cnf_prune.build import build_model
from cnf_prune.checkpoint import save_checkpoint
from cnf_prune.config import load_config, to_dict
from cnf.data import make_data
from cnf.errors import ConfigError
from cnf_prune.commands import compact as compact_cli
from cnf_prune.build import compact_model as compact
from pruning.compact import field_cost
from pruning.masks import apply_masks, mask_buffer, prunable_weights
from pruning.structured import hidden_layers, select_units, unit_scores, unit_sparsity


def mlp_config(*overrides: str):
    base = [
        "model.hidden_dims=[7,6]", "model.num_blocks=2", "model.end_time=0.5", "model.divergence=exact",
        "solver.rtol=1e-9", "solver.atol=1e-9", "solver.adjoint=false", "train.batch_size=16",
        "pruning.method=random", "pruning.sparsity=0.5", "pruning.scope=layer", "pruning.granularity=unit",
    ]
    return load_config(None, [*base, *overrides])


def conv_config(*overrides: str):
    base = [
        "model.layer_type=concatsquash", "model.nonlinearity=softplus", "model.hidden_dims=[5,4]",
        "model.num_blocks=1", "model.scales=2", "model.end_time=0.5", "model.train_end_time=false",
        "model.divergence=exact", "solver.rtol=1e-9", "solver.atol=1e-9", "solver.adjoint=false",
    ]
    return load_config(None, [*base, *overrides])


def random_scores(model, config):
    generator = torch.Generator().manual_seed(1)
    return {n: torch.randn(p.shape, generator=generator, dtype=p.dtype) for n, p in prunable_weights(model).items()}


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_unit_scores_are_the_sum_over_incoming_and_outgoing_weights(kind, float64):
    config = mlp_config() if kind == "mlp" else conv_config()
    model = build_model(config, (2,) if kind == "mlp" else (1, 4, 4))
    scores = random_scores(model, config)
    units = unit_scores(model, scores)
    assert set(units) == set(hidden_layers(model))
    for layer, (incoming, outgoing) in hidden_layers(model).items():
        s_in, s_out = scores[incoming], scores[outgoing]
        for j in range(s_in.shape[0]):  # brute force, weight by weight
            expected = sum(float(v) for v in s_in[j].flatten()) + sum(float(v) for v in s_out[:, j].flatten())
            assert units[layer][j].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_unit_scores_skip_unscored_weights_and_minus_infinity():
    model = build_model(mlp_config(), (2,))
    names = list(prunable_weights(model))
    scores = {names[0]: torch.full((7, 2), -torch.inf)}
    scores[names[0]][:, 0] = 1.0  # one finite incoming weight per unit of layers.0
    units = unit_scores(model, scores)
    assert list(units) == ["blocks.0.field.layers.0"]
    assert torch.equal(units["blocks.0.field.layers.0"], torch.ones(7))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_unit_masks_remove_the_lowest_units_and_whole_rows_and_columns(scope):
    model = build_model(mlp_config(), (2,))
    scores = random_scores(model, None)
    units = unit_scores(model, scores)
    apply_masks(model, select_units(model, scores, 0.5, scope))
    total = sum(u.numel() for u in units.values())
    if scope == "global":
        threshold = torch.cat(list(units.values())).sort(descending=True).values[round(0.5 * total) - 1]
    kept = {layer: mask_buffer(model, incoming).bool().any(dim=1) for layer, (incoming, _) in hidden_layers(model).items()}
    for layer, (incoming, outgoing) in hidden_layers(model).items():
        if scope == "layer":
            assert int(kept[layer].sum()) == round(0.5 * kept[layer].numel())
            assert units[layer][kept[layer]].min() >= units[layer][~kept[layer]].max()
        else:
            assert bool((units[layer][kept[layer]] >= threshold).all())
            assert bool((units[layer][~kept[layer]] < threshold).all())
    for name in prunable_weights(model):  # a unit is either whole or gone: mask = outer(kept out, kept in)
        prefix, index = name.rsplit(".", 2)[0], int(name.rsplit(".", 2)[1])
        mask = mask_buffer(model, name).bool()
        rows = kept.get(f"{prefix}.{index}", torch.ones(mask.shape[0], dtype=torch.bool))
        cols = kept.get(f"{prefix}.{index - 1}", torch.ones(mask.shape[1], dtype=torch.bool))
        assert torch.equal(mask, rows[:, None] & cols[None, :])
    n_kept = sum(int(k.sum()) for k in kept.values())
    assert unit_sparsity(model) == pytest.approx(1 - n_kept / total)
    if scope == "global":
        assert n_kept == round(0.5 * total)


def pruned(config, event_shape, sparsity=0.5):
    model = build_model(config, event_shape)
    apply_masks(model, select_units(model, random_scores(model, config), sparsity, "layer"))
    return model.eval()


@pytest.mark.parametrize("layer_type", ["concat", "concatsquash"])
def test_compacted_mlp_agrees_with_the_masked_one(layer_type, float64):
    config = mlp_config(f"model.layer_type={layer_type}", "model.nonlinearity=swish")
    model = pruned(config, (2,))
    small, smaller = compact(model, config)
    assert smaller.model.block_hidden_dims == [[4, 3], [4, 3]]
    assert small.blocks[0].field.layers[1].weight.shape == (3, 4)
    assert field_cost(small)[1] == 2 * 2 * (2 * 4 + 4 * 3 + 3 * 2) < field_cost(model)[1]
    x = torch.randn(32, 2)
    torch.testing.assert_close(small.log_prob(x), model.log_prob(x), rtol=0, atol=1e-10)
    z = model.base_noise(32)
    torch.testing.assert_close(small.inverse(z)[0], model.inverse(z)[0], rtol=0, atol=1e-10)
    small.train()  # training mode: Jacobian norm and gradients of the smaller model
    assert torch.isfinite(small.trace(x).jac_norm).all()


def test_compacted_conv_flow_agrees_with_the_masked_one(float64):
    config = conv_config()
    model = pruned(config, (1, 4, 4))
    small, smaller = compact(model, config)
    assert smaller.model.block_hidden_dims == [[2, 2]] * len(model.blocks)
    x = torch.randn(3, 1, 4, 4)
    torch.testing.assert_close(small.log_prob(x), model.log_prob(x), rtol=0, atol=1e-9)
    z = model.base_noise(3)
    torch.testing.assert_close(small.inverse(z)[0], model.inverse(z)[0], rtol=0, atol=1e-9)


def test_field_cost_of_a_conv_flow_counts_every_pixel_of_every_layer():
    """``2 · weight.numel()`` multiply-adds per output pixel, at each layer's own resolution
    (measured on one sample while the flow runs; the scales differ in size)."""
    model = build_model(conv_config(), (1, 4, 4))
    pixels = {}

    def record(layer, args, output):
        pixels[layer] = output[0].shape[-2] * output[0].shape[-1]

    layers = [layer for block in model.blocks for layer in block.field.layers]
    hooks = [layer.register_forward_hook(record) for layer in layers]
    with torch.no_grad():
        model.eval().log_prob(torch.randn(1, 1, 4, 4))
    for hook in hooks:
        hook.remove()
    assert set(pixels) == set(layers) and len(set(pixels.values())) > 1
    params = sum(p.numel() for block in model.blocks for p in block.field.parameters())
    flops = sum(2 * layer.weight.numel() * n for layer, n in pixels.items())
    assert field_cost(model) == (params, flops)


@pytest.mark.parametrize("training", [False, True])
def test_compact_keeps_the_train_or_eval_mode(training):
    config = mlp_config()
    model = pruned(config, (2,)).train(training)
    small, _ = compact(model, config)
    assert all(m.training == training for m in small.modules())
    assert all(m.training == training for m in model.modules())  # unchanged


def test_a_unit_whose_outgoing_weights_remain_is_kept(float64):
    """Masking only a unit's incoming row leaves the constant σ(b(t)) flowing on:
    compaction must keep it, and stay exact."""
    config = mlp_config("model.num_blocks=1")
    model = build_model(config, (2,)).eval()
    mask_buffer(model, "blocks.0.field.layers.0.weight")[0].zero_()
    small, smaller = compact(model, config)
    assert smaller.model.block_hidden_dims == [[7, 6]]
    x = torch.randn(8, 2)
    torch.testing.assert_close(small.log_prob(x), model.log_prob(x), rtol=0, atol=1e-12)


def test_pruning_every_unit_of_a_layer_is_a_clear_error():
    config = mlp_config("model.hidden_dims=[7,1]")
    model = build_model(config, (2,))
    with pytest.raises(ConfigError, match="removes all 1 units of blocks.0.field.layers.1"):
        select_units(model, random_scores(model, config), 0.5, "layer")
    mask_buffer(model, "blocks.1.field.layers.2.weight").zero_()
    with pytest.raises(ConfigError, match="every unit of blocks.1.field.layers.1 is pruned"):
        compact(model, config)


def test_prune_at_init_with_unit_granularity():
    config = mlp_config("pruning.method=jacobian_spectrum", "model.divergence=hutchinson", "solver.rtol=1e-5",
                        "solver.atol=1e-5")
    data = make_data(config.data, config.seed)
    model = build_model(config, data.event_shape)
    report = prune(model, data, config)
    assert "whole units" in report
    assert unit_sparsity(model) == pytest.approx(6 / 13)  # round(3.5) = 4 of 7 and 3 of 6 kept per block


def test_bad_granularity_is_rejected():
    with pytest.raises(ConfigError, match="granularity"):
        mlp_config("pruning.granularity=channel")


def test_compact_cli_writes_a_checkpoint_that_samples_like_the_masked_one(tmp_path, capsys):
    config = mlp_config("solver.rtol=1e-7", "solver.atol=1e-7")
    model = pruned(config, (2,))
    masked = tmp_path / "masked.pt"
    save_checkpoint({"config": to_dict(config), "event_shape": [2], "model": model.state_dict()}, masked)
    assert compact_cli.main([str(masked), "--out", str(tmp_path / "small.pt")]) == 0
    assert "compacted" in capsys.readouterr().out
    runs = {
        "masked": [str(masked)],
        "flag": [str(masked), "--compact"],
        "file": [str(tmp_path / "small.pt")],
    }
    samples = {}
    for name, args in runs.items():
        out = tmp_path / f"{name}.npy"
        assert sample.main([*args, "--out", str(out), "--n", "64", "--device", "cpu"]) == 0
        samples[name] = np.load(out)
    np.testing.assert_allclose(samples["flag"], samples["masked"], atol=1e-4)
    np.testing.assert_allclose(samples["file"], samples["flag"], atol=1e-6)
    assert compact_cli.main([str(masked), "--out", str(masked)]) == 2
    # nothing is replaced: not an earlier output, not a run's checkpoint, not a directory
    before = (tmp_path / "small.pt").read_bytes()
    capsys.readouterr()
    assert compact_cli.main([str(masked), "--out", str(tmp_path / "small.pt")]) == 2
    assert "exists" in capsys.readouterr().err and (tmp_path / "small.pt").read_bytes() == before
    assert compact_cli.main([str(masked), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert compact_cli.main([str(tmp_path), "--out", str(tmp_path / "c.pt")]) == 4
    assert f"{str(tmp_path / 'best.pt')!r}" in capsys.readouterr().err  # a run directory: name its checkpoint


def test_block_hidden_dims_must_match_the_blocks_and_the_layers():
    with pytest.raises(ConfigError, match="block_hidden_dims"):
        mlp_config("model.block_hidden_dims=[[3]]")  # one width for two hidden layers
    with pytest.raises(ConfigError, match="lists 1 blocks but the flow has 2"):
        build_model(mlp_config("model.block_hidden_dims=[[3,2]]"), (2,))
    model = build_model(mlp_config("model.block_hidden_dims=[[3,2],[5,4]]"), (2,))
    assert [[layer.dim_out for layer in b.field.layers] for b in model.blocks] == [[3, 2, 2], [5, 4, 2]]
