"""The config boundary: how config keys become the flow's architecture, solvers and
data, and the single-process behaviour of the data-parallel helpers."""

from __future__ import annotations

import pytest
import torch

from cnf_prune.build import load_model
from cnf.activations import ELU, Softplus
from cnf_prune.checkpoint import save_checkpoint
from cnf_prune.config import Config, DataConfig, from_dict, to_dict
from cnf.conv import ConcatSquashConv2d
from cnf.data import ArrayData, ToyData, make_data
from cnf_prune.distributed import Context, check_batch_size, resolve_device, shard
from cnf.divergence import Exact, Hutchinson
from cnf.errors import CheckpointError, ConfigError, SolverError
from cnf.layers import ConcatLinear, ConcatSquashLinear
from cnf_prune.build import build_model as build_flow
from cnf.solver import Solver, integrate, solver_failure


def config(**sections) -> Config:
    return from_dict(sections)


# --- architecture ----------------------------------------------------------------------


@pytest.mark.parametrize("layer_type, layer_cls, nonlinearity, act_cls", [
    ("concat", ConcatLinear, "softplus", Softplus),
    ("concatsquash", ConcatSquashLinear, "elu", ELU),
])
def test_mlp_blocks_have_the_configured_widths_layers_and_activations(layer_type, layer_cls, nonlinearity, act_cls):
    cfg = config(model={"hidden_dims": [8, 5], "layer_type": layer_type, "nonlinearity": nonlinearity,
                        "num_blocks": 3})
    flow = build_flow(cfg, (2,))
    assert len(flow.blocks) == 3
    for block in flow.blocks:
        layers = block.field.layers
        assert [(l.dim_in, l.dim_out) for l in layers] == [(2, 8), (8, 5), (5, 2)]
        assert all(type(l) is layer_cls for l in layers)
        assert [type(a) for a in block.field.activations] == [act_cls, act_cls]
    # every block owns its own field (and activation modules)
    assert len({id(b.field) for b in flow.blocks}) == 3


def test_block_hidden_dims_give_each_block_its_own_widths_in_order():
    cfg = config(model={"hidden_dims": [8, 8], "num_blocks": 2, "block_hidden_dims": [[3, 4], [5, 6]]})
    flow = build_flow(cfg, (2,))
    widths = [[l.dim_out for l in b.field.layers[:-1]] for b in flow.blocks]
    assert widths == [[3, 4], [5, 6]]


@pytest.mark.parametrize("lists", [[[3, 4]], [[3, 4], [5, 6], [7, 8]]])
def test_block_hidden_dims_must_list_one_entry_per_block(lists):
    cfg = config(model={"hidden_dims": [8, 8], "num_blocks": 2, "block_hidden_dims": lists})
    with pytest.raises(ConfigError, match="block_hidden_dims lists"):
        build_flow(cfg, (2,))


@pytest.mark.parametrize("trainable", [True, False])
def test_end_time_and_its_trainability_come_from_the_config(trainable):
    flow = build_flow(config(model={"end_time": 0.7, "train_end_time": trainable, "num_blocks": 2}), (2,))
    for block in flow.blocks:
        assert float(block.end_time.detach()) == pytest.approx(0.7)
        assert isinstance(block.sqrt_end_time, torch.nn.Parameter) == trainable
        assert any(p is block.sqrt_end_time for p in block.parameters()) == trainable


def test_divergence_noise_and_test_divergence_come_from_the_config():
    cfg = config(model={"divergence": "hutchinson", "noise": "rademacher", "test_divergence": "exact"})
    (block,) = build_flow(cfg, (2,)).blocks
    assert block.divergence == Hutchinson("rademacher")
    assert block.test_divergence == Exact()

    cfg = config(model={"divergence": "exact", "noise": "rademacher", "test_divergence": "hutchinson"})
    (block,) = build_flow(cfg, (2,)).blocks
    assert block.divergence == Exact()
    assert block.test_divergence == Hutchinson("rademacher")

    # unset: evaluation uses the training estimator
    (block,) = build_flow(config(model={"divergence": "hutchinson"}), (2,)).blocks
    assert block.test_divergence == Hutchinson("gaussian")


@pytest.mark.parametrize("kinetic, frobenius", [(0.1, 0.0), (0.0, 0.1), (0.0, 0.0)])
def test_rnode_penalties_are_on_exactly_when_their_weight_is_positive(kinetic, frobenius):
    cfg = config(regularization={"kinetic": kinetic, "jacobian_frobenius": frobenius})
    (block,) = build_flow(cfg, (2,)).blocks
    assert block.kinetic == (kinetic > 0)
    assert block.jacobian_frobenius == (frobenius > 0)


def test_image_fields_use_the_configured_kernel_and_scales():
    cfg = config(model={"hidden_dims": [4], "kernel_size": 5, "scales": 1, "num_blocks": 1})
    flow = build_flow(cfg, (1, 8, 8))
    assert len(flow.blocks) == 1  # default_scales((1, 8, 8)) would be 2 scales, 3 blocks
    (block,) = flow.blocks
    assert all(type(l) is ConcatSquashConv2d for l in block.field.layers)
    assert [tuple(l.weight.shape) for l in block.field.layers] == [(4, 1, 5, 5), (1, 4, 5, 5)]
    assert len(build_flow(config(model={"hidden_dims": [4], "num_blocks": 1}), (1, 8, 8)).blocks) == 3


# --- solvers ---------------------------------------------------------------------------


def test_training_and_test_solvers_come_from_their_config_keys():
    cfg = config(solver={"method": "bosh3", "rtol": 1e-3, "atol": 2e-3, "adjoint": False,
                         "adjoint_seminorm": True, "max_num_steps": 50,
                         "test_method": "dopri5", "test_rtol": 1e-6, "test_atol": 2e-6})
    (block,) = build_flow(cfg, (2,)).blocks
    assert block.solver == Solver(method="bosh3", rtol=1e-3, atol=2e-3, adjoint=False,
                                  adjoint_seminorm=True, max_num_steps=50)
    assert block.test_solver == Solver(method="dopri5", rtol=1e-6, atol=2e-6, adjoint=False, max_num_steps=50)


def test_test_solver_inherits_unset_keys_and_never_uses_the_adjoint():
    cfg = config(solver={"method": "bosh3", "rtol": 1e-3, "atol": 2e-3, "adjoint": True})
    (block,) = build_flow(cfg, (2,)).blocks
    assert block.solver == Solver(method="bosh3", rtol=1e-3, atol=2e-3, adjoint=True)
    assert block.test_solver == Solver(method="bosh3", rtol=1e-3, atol=2e-3, adjoint=False)


def test_default_config_builds_the_default_solver():
    (block,) = build_flow(Config(), (2,)).blocks
    assert block.solver == Solver()


def test_eval_mode_uses_the_test_solver_and_train_mode_the_training_solver():
    """rk4 takes T/h steps of 4 evaluations: T=1, h=0.5 in training, h=0.25 at test time."""
    cfg = config(model={"hidden_dims": [4], "end_time": 1.0, "train_end_time": False},
                 solver={"method": "rk4", "step_size": 0.5, "adjoint": False, "test_step_size": 0.25})
    flow = build_flow(cfg, (2,))
    x = torch.randn(3, 2)
    flow.train()
    assert flow.trace(x).nfe_forward == 8
    flow.eval()
    with torch.no_grad():
        assert flow.trace(x).nfe_forward == 16


def test_fixed_step_solve_takes_exactly_T_over_h_steps():
    calls = []

    def dynamics(t, state):
        calls.append(float(t))
        return (-state[0],)

    x = torch.ones(1, 1, dtype=torch.float64)
    (z,) = integrate(Solver(method="euler", step_size=0.125, adjoint=False), dynamics, (x,),
                     torch.tensor([0.0, 1.0], dtype=torch.float64), [], n_controlled=1)
    assert len(calls) == 8
    assert float(z) == pytest.approx((1 - 0.125) ** 8)


def test_max_num_steps_bounds_an_adaptive_solve():
    def dynamics(t, state):
        return (torch.cos(50 * t) * 50 * torch.ones_like(state[0]),)

    solver = Solver(method="dopri5", rtol=1e-9, atol=1e-9, adjoint=False, max_num_steps=3)
    with pytest.raises(SolverError, match=r"dopri5 \(rtol=1e-09, atol=1e-09\) step limit exceeded"):
        integrate(solver, dynamics, (torch.zeros(2, 1, dtype=torch.float64),),
                  torch.tensor([0.0, 1.0], dtype=torch.float64), [], n_controlled=1)


def test_solver_failure_names_the_failure_and_passes_other_errors_through():
    solver = Solver(method="rk4", step_size=0.05)
    err = solver_failure(AssertionError("underflow in dt 0.0"), solver, " at t=0.3")
    assert isinstance(err, SolverError)
    assert str(err).startswith("ODE solver rk4 (step_size=0.05) step size underflowed at t=0.3:")
    other = AssertionError("something else")
    assert solver_failure(other, solver) is other


def test_describe_reports_the_settings_that_apply():
    assert Solver(method="dopri5", rtol=1e-4, atol=3e-6).describe() == "dopri5 (rtol=0.0001, atol=3e-06)"
    assert Solver(method="rk4", step_size=0.05).describe() == "rk4 (step_size=0.05)"


@pytest.mark.parametrize("kwargs, message", [
    (dict(rtol=1e-5, atol=0.0), "tolerances must be positive"),
    (dict(rtol=0.0, atol=1e-5), "tolerances must be positive"),
    (dict(max_num_steps=0), "max_num_steps must be positive"),
    (dict(method="rk4", step_size=-0.1), "needs a positive step_size"),
    (dict(method="rk4"), "needs a positive step_size"),
    (dict(method="dopri6"), "unknown solver method"),
])
def test_invalid_solver_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Solver(**kwargs)


def test_max_num_steps_of_one_is_allowed():
    assert Solver(max_num_steps=1).max_num_steps == 1


# --- data ------------------------------------------------------------------------------


def test_make_data_builds_toy_data_with_the_configured_sizes_and_seed():
    data = make_data(DataConfig(name="8gaussians", val_size=30, test_size=40), seed=3)
    assert isinstance(data, ToyData) and data.event_shape == (2,)
    assert data.val.shape == (30, 2) and data.test.shape == (40, 2)
    same = ToyData("8gaussians", seed=3, val_size=30, test_size=40)
    assert torch.equal(data.train_batch(5), same.train_batch(5))
    assert torch.equal(data.val, same.val) and torch.equal(data.test, same.test)
    other = make_data(DataConfig(name="8gaussians", val_size=30, test_size=40), seed=4)
    assert not torch.equal(other.val, data.val)


def test_toy_held_out_sets_are_not_drawn_from_the_training_stream():
    data = ToyData("8gaussians", seed=0, val_size=50, test_size=50)
    first = data.train_batch(50)
    assert not torch.equal(first, data.val)
    assert not torch.equal(first, data.test)
    assert not torch.equal(data.val, data.test)


def test_toy_data_resumed_from_state_dict_draws_the_same_batches():
    data = ToyData("checkerboard", seed=1, val_size=10, test_size=10)
    data.train_batch(7)
    state = data.state_dict()
    expected = [data.train_batch(5) for _ in range(3)]
    resumed = ToyData("checkerboard", seed=2, val_size=10, test_size=10)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [resumed.train_batch(5) for _ in range(3)]))


def test_array_data_walks_every_row_once_per_epoch_and_resumes_mid_epoch():
    rows = torch.arange(12.0).unsqueeze(1)
    data = ArrayData(rows.numpy(), rows[:2].numpy(), rows[:2].numpy(), seed=0)
    epoch = torch.cat([data.train_batch(4) for _ in range(3)])
    assert sorted(epoch.squeeze(1).tolist()) == rows.squeeze(1).tolist()
    data.train_batch(4)
    state = data.state_dict()
    expected = [data.train_batch(4) for _ in range(4)]
    resumed = ArrayData(rows.numpy(), rows[:2].numpy(), rows[:2].numpy(), seed=5)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [resumed.train_batch(4) for _ in range(4)]))


def test_non_image_data_refuses_image_options():
    with pytest.raises(ConfigError, match="data.subset applies to images only"):
        make_data(DataConfig(name="8gaussians", subset=10), seed=0)
    with pytest.raises(ConfigError, match="data.downsample applies to images only"):
        make_data(DataConfig(name="8gaussians", downsample=2), seed=0)


def test_flat_data_preprocess_is_the_identity_with_zero_logdet():
    x = torch.randn(6, 2)
    y, logdet = ToyData("8gaussians", seed=0, val_size=2, test_size=2).preprocess(x)
    assert y is x
    assert torch.equal(logdet, torch.zeros(6))


# --- distributed helpers (single process) ----------------------------------------------


def test_a_single_process_is_not_distributed():
    assert not Context().distributed and Context().main
    assert Context(rank=0, world_size=2).distributed
    batch = torch.arange(6)
    assert shard(batch, Context()) is batch


def test_shards_are_contiguous_equal_slices_that_tile_the_batch():
    batch = torch.arange(12)
    shards = [shard(batch, Context(rank=r, world_size=3)) for r in range(3)]
    assert [s.tolist() for s in shards] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_batch_size_must_divide_over_ranks():
    check_batch_size(12, Context(world_size=3))
    check_batch_size(7, Context())
    with pytest.raises(ConfigError, match="divisible by the number of processes"):
        check_batch_size(10, Context(world_size=4))


def test_resolve_device_names_the_option_it_checks():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="sample.device 'gpu0' is not a device"):
        resolve_device("gpu0", option="sample.device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_resolve_device_without_a_gpu():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no GPU is available; use --device cpu"):
        resolve_device("cuda", option="--device", use_cpu="--device cpu")


# --- load_model ------------------------------------------------------------------------


def test_load_model_rebuilds_the_stored_weights(tmp_path):
    cfg = config(model={"hidden_dims": [6]})
    flow = build_flow(cfg, (2,))
    path = tmp_path / "m.pt"
    save_checkpoint({"config": to_dict(cfg), "event_shape": [2], "model": flow.state_dict()}, path)
    model, loaded, _ = load_model(path)
    assert loaded == cfg
    for (k, a), (k2, b) in zip(flow.state_dict().items(), model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_load_model_refuses_weights_that_do_not_fit_the_stored_config(tmp_path):
    wrong = build_flow(config(model={"hidden_dims": [7]}), (2,))
    path = tmp_path / "m.pt"
    save_checkpoint({"config": to_dict(config(model={"hidden_dims": [6]})), "event_shape": [2],
                     "model": wrong.state_dict()}, path)
    with pytest.raises(CheckpointError, match="does not rebuild a model"):
        load_model(path)
