"""Flow-matching training through the trainer: what it logs, what it refuses, and that
pruning scores it with its own loss."""

from __future__ import annotations

import pytest
import torch

import sample
import train
from cnf.data import make_data
from cnf.errors import ConfigError
from cnf_prune.build import build_model
from cnf_prune.config import load_config
from cnf_prune.objectives import FlowMatching
from cnf_prune.setup import scoring_loss
from helpers import scalar_events
from pruning.apply import scoring_batches
from pruning.masks import prunable_weights
from pruning.scores import objective_gradients

FM_QUICK = ["train.iterations=6", "train.val_every=3", "train.log_every=1", "model.hidden_dims=[16,16]",
            "data.val_size=100", "data.test_size=100", "solver.rtol=1e-3", "solver.atol=1e-3",
            "train.batch_size=32"]


def test_a_flow_matching_run_logs_its_loss_and_validation_r_and_nfe(tmp_path, capsys):
    run = tmp_path / "fm"
    assert train.main(["configs/toy_fm.yaml", "--out", str(run), "--set", *FM_QUICK]) == 0
    out = capsys.readouterr().out
    assert "done: 6 steps" in out and "NFE" in out
    assert len(scalar_events(run, "train/fm_loss")) == 6
    for tag in ("val/nll", "val/jacobian_norm", "val/nfe", "jacobian/cumulative_norm", "nfe/forward"):
        events = scalar_events(run, tag)
        assert [e.step for e in events] == [3, 6], tag  # validation steps only: no training solve
        assert all(e.value > 0 for e in events), tag
    assert scalar_events(run, "test/nll")
    assert sample.main([str(run / "best.pt"), "--out", str(tmp_path / "s.npy"), "--n", "50"]) == 0


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.train_end_time=true"], "holds the end time T fixed"),
    (["regularization.kinetic=0.01"], "RNODE penalties"),
    (["model.num_blocks=2"], "set model.num_blocks=1"),
    (["data.name=synthetic8", "model.scales=2"], "cannot train the multiscale flow"),
    (["model.field_type=unet"], "model.field_type 'unet' is an image field"),
    (["train.fm_coupling=sinkhorn"], "unknown train.fm_coupling 'sinkhorn'; valid: independent, ot"),
    (["train.objective=score_matching"], "unknown train.objective 'score_matching'; valid: likelihood, flow_matching"),
    (["train.fm_precision=float16"], "unknown train.fm_precision 'float16'; valid: float32, bfloat16"),
    (["train.objective=likelihood", "train.fm_precision=bfloat16"], "applies to train.objective flow_matching only"),
])
def test_what_flow_matching_cannot_train_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/toy_fm.yaml", overrides)


def test_the_unet_image_flow_trains_by_flow_matching(tmp_path, capsys):
    run = tmp_path / "unet"
    assert train.main(["configs/toy_fm.yaml", "--out", str(run), "--set", *FM_QUICK, "data.name=synthetic8",
                       "model.field_type=unet", "model.unet_channels=[8,8]", "model.nonlinearity=swish",
                       "model.divergence=hutchinson", "data.val_size=20", "data.test_size=20",
                       "train.batch_size=8"]) == 0
    assert "bits_per_dim" in capsys.readouterr().out
    assert scalar_events(run, "val/bits_per_dim")


def test_bfloat16_regression_step_is_the_float32_loss_to_bfloat16_rounding():
    """``train.fm_precision: bfloat16`` autocasts the field (convolutions and products in
    bfloat16) and keeps the loss, weights and gradients in float32."""
    config = load_config("configs/toy_fm.yaml", [
        "data.name=synthetic8", "model.field_type=unet", "model.unet_channels=[8,8]", "model.nonlinearity=swish",
        "model.divergence=hutchinson", "data.val_size=20", "data.test_size=20", "train.batch_size=16"])
    torch.manual_seed(0)
    data = make_data(config.data, config.seed)
    model = build_model(config, data.event_shape)
    x, _ = data.preprocess(data.train_batch(16))
    losses, grads = {}, {}
    for precision in ("float32", "bfloat16"):
        objective = FlowMatching(config.regularization, precision=precision)
        loss = objective.regression_loss(model, x, torch.Generator().manual_seed(1))
        assert loss.dtype == torch.float32
        grads[precision] = torch.autograd.grad(loss, model.blocks[0].field.input.weight)[0]
        losses[precision] = float(loss.detach())
    assert losses["bfloat16"] != losses["float32"]  # the field did run in bfloat16
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=3e-2)
    cosine = torch.nn.functional.cosine_similarity(grads["bfloat16"].flatten(), grads["float32"].flatten(), dim=0)
    assert cosine > 0.99


def test_flow_matching_pruning_scores_use_the_regression_loss():
    """dL of a flow-matching run is the gradient of its regression loss on the scoring
    batches (the same base draws and times for the same seed), not of the NLL."""
    config = load_config("configs/toy_fm.yaml", [*FM_QUICK, "pruning.method=snip", "pruning.sparsity=0.5"])
    torch.manual_seed(0)
    data = make_data(config.data, config.seed)
    model = build_model(config, data.event_shape)
    batches = scoring_batches(data, 1, config.train.batch_size, config.seed)
    weights = prunable_weights(model)
    d_fm = objective_gradients(model, batches, weights, ("nll",), scoring_loss(config))["nll"]
    generator = torch.Generator().manual_seed(config.seed)
    expected = torch.autograd.grad(
        FlowMatching(config.regularization, coupling="ot").regression_loss(model, batches[0], generator),
        list(weights.values()))
    for name, grad in zip(weights, expected):
        torch.testing.assert_close(d_fm[name], grad)
    d_nll = objective_gradients(model, batches, weights, ("nll",))["nll"]
    assert not torch.allclose(d_nll[name], d_fm[name])
    assert scoring_loss(load_config("configs/toy.yaml")) is None  # likelihood: the NLL


def test_unit_pruning_reaches_the_unet_hidden_channels_and_compaction_refuses_it_clearly():
    from cnf_prune.build import compact_model
    from helpers import prune

    config = load_config("configs/toy_fm.yaml", [
        "data.name=synthetic8", "model.field_type=unet", "model.unet_channels=[8,8]", "model.nonlinearity=swish",
        "model.divergence=hutchinson", "pruning.method=magnitude", "pruning.sparsity=0.5",
        "pruning.granularity=unit", "pruning.scope=layer", "data.val_size=20", "data.test_size=20",
        "train.batch_size=8"])
    torch.manual_seed(0)
    data = make_data(config.data, config.seed)
    model = build_model(config, data.event_shape)
    prune(model, data, config)
    field = model.blocks[0].field
    for name, block in field.residual_blocks().items():
        live = block.conv2.weight_mask.abs().sum(dim=(0, 2, 3)) > 0
        assert int(live.sum()) == block.conv2.weight_mask.shape[1] // 2, name  # half of each block's units
        rows = block.conv1.weight_mask.abs().sum(dim=(1, 2, 3)) > 0
        assert torch.equal(rows, live), name  # a pruned unit loses its incoming row too
    with pytest.raises(ConfigError, match="compaction handles layered fields"):
        compact_model(model, config)
    with pytest.raises(ConfigError, match="PathReg and the path norm need fields"):
        load_config("configs/toy_fm.yaml", ["data.name=synthetic8", "model.field_type=unet", "regularization.pathreg=0.1"])


def test_the_comparison_command_accepts_a_flow_matching_config(tmp_path):
    import yaml

    from cnf_prune.commands import compare

    spec = tmp_path / "cmp.yaml"
    spec.write_text(yaml.safe_dump({
        "base": {"config": "configs/toy_fm.yaml", "set": FM_QUICK}, "methods": ["dense", "jacobian_spectrum"],
        "sparsities": [0.5],
    }))
    out = tmp_path / "out"
    assert compare.main([str(spec), "--out", str(out)]) == 0
    table = (out / "results.md").read_text()
    assert "jacobian_spectrum" in table and "dense" in table
    for run in ("dense_s0_seed0", "jacobian_spectrum_s0.5_seed0"):
        assert scalar_events(out / run, "nfe/forward"), run  # validation NFE curves for the figures
