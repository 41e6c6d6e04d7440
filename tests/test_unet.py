import pytest
import torch

from cnf.divergence import Exact, Hutchinson
from cnf.errors import ConfigError
from cnf.flow import Flow
from cnf.flow_matching import StraightPath, evaluate_field, flow_matching_loss
from cnf.odeblock import CNFBlock
from cnf.solver import Solver
from cnf.unet import GroupNorm, MaskedConv2d, UNetField

SHAPE = (2, 4, 4)


def tiny(**kwargs) -> UNetField:
    """Two levels (4x4 -> 2x2 -> 1x1 with three), a few channels: cheap exact Jacobians."""
    options = dict(channels=(4, 6, 6), groups=2, time_dim=8, nonlinearity="softplus")
    return UNetField(SHAPE, **{**options, **kwargs})


def test_output_shape_and_prunable_weights_are_the_convolutions():
    field = UNetField((1, 28, 28))
    f, jv = field(torch.tensor(0.3), torch.randn(2, 1, 28, 28), torch.randn(2, 1, 1, 28, 28))
    assert f.shape == (2, 1, 28, 28) and jv.shape == (2, 1, 1, 28, 28)
    names = set(field.prunable_weights())
    assert {"input.weight", "output.weight", "downsample.1.weight", "upsample.0.weight", "middle.conv1.weight",
            "up.0.skip.weight"} <= names
    convs = {f"{n}.weight" for n, m in field.named_modules() if isinstance(m, MaskedConv2d)}
    assert names == convs
    assert all(not n.startswith("time_embedding") and ".norm." not in n for n in names)


@pytest.mark.parametrize("nonlinearity", ["softplus", "swish", "tanh", "elu"])
def test_exact_jacobian_and_divergence_match_autograd(nonlinearity, float64):
    torch.manual_seed(0)
    field = tiny(nonlinearity=nonlinearity)
    with torch.no_grad():  # move group norms and time modulation off their initial values
        for p in field.parameters():
            p.add_(0.1 * torch.randn_like(p))
    z, t = torch.randn(3, *SHAPE), torch.tensor(0.37)
    est = Exact()
    v = est.tangents(z)
    f, jv = field(t, z, v)
    div, fro_sq = est.reduce(v, jv)
    d = z[0].numel()
    for i in range(z.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda y: field(t, y[None])[0][0], z[i]).reshape(d, d)
        torch.testing.assert_close(jv[i].reshape(d, d).T, jac)
        torch.testing.assert_close(div[i], jac.trace())
        torch.testing.assert_close(fro_sq[i], jac.pow(2).sum())
    torch.testing.assert_close(f, field(t, z)[0])


def test_jvp_matches_forward_mode_autograd_with_per_example_times(float64):
    """One random tangent per example and one time per example (as in flow matching)."""
    torch.manual_seed(1)
    field = tiny()
    z, v, t = torch.randn(4, *SHAPE), torch.randn(4, *SHAPE), torch.rand(4)
    f, jv = field(t, z, v[:, None])
    _, expected = torch.autograd.functional.jvp(lambda y: field(t, y)[0], z, v)
    torch.testing.assert_close(jv[:, 0], expected)
    loop = torch.cat([field(t[i], z[i : i + 1])[0] for i in range(4)])
    torch.testing.assert_close(f, loop)
    torch.testing.assert_close(evaluate_field(field, t, z), loop)


def test_group_norm_matches_torch_and_its_tangent_map_matches_autograd(float64):
    norm = GroupNorm(3, 6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x, v = torch.randn(2, 6, 3, 3), torch.randn(2, 6, 3, 3)
    y, jv = norm(x, v[:, None])
    torch.testing.assert_close(y, torch.nn.functional.group_norm(x, 3, norm.weight, norm.bias))
    _, expected = torch.autograd.functional.jvp(lambda u: norm(u, None)[0], x, v)
    torch.testing.assert_close(jv[:, 0], expected)
    torch.testing.assert_close(norm(x, None)[0], y)  # the fused path without tangents


@pytest.mark.parametrize("nonlinearity", ["swish", "tanh"])
def test_the_field_without_tangents_is_the_field_with_them(nonlinearity, float64):
    field = tiny(nonlinearity=nonlinearity).double()
    z, v, t = torch.randn(3, *SHAPE), torch.randn(3, 2, *SHAPE), torch.rand(3)
    f, _ = field(t, z, v)
    torch.testing.assert_close(field(t, z)[0], f)


def test_examples_do_not_interact():
    field = tiny()
    z, t = torch.randn(3, *SHAPE), torch.tensor(0.5)
    torch.testing.assert_close(field(t, z)[0][:1], field(t, z[:1])[0])


def test_gradients_reach_every_parameter():
    field = tiny(nonlinearity="swish")
    z = torch.randn(3, *SHAPE)
    loss = flow_matching_loss(field, z, torch.randn_like(z), torch.rand(3))
    loss.backward()
    missing = [n for n, p in field.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_masked_weights_are_zero_in_the_forward_and_stay_zero_under_training():
    torch.manual_seed(0)
    field = tiny()
    masks = {}
    for name, w in field.prunable_weights().items():
        mask = torch.rand_like(w) > 0.5
        field.get_buffer(f"{name}_mask").copy_(mask)
        with torch.no_grad():
            w.mul_(mask)
        masks[name] = mask
    # the forward sees weight * mask: changing a masked entry of the raw weight changes nothing
    z, t = torch.randn(2, *SHAPE), torch.tensor(0.2)
    before = field(t, z)[0]
    with torch.no_grad():
        for name, w in field.prunable_weights().items():
            w.add_(~masks[name] * 5.0)
    torch.testing.assert_close(field(t, z)[0], before)
    with torch.no_grad():
        for name, w in field.prunable_weights().items():
            w.mul_(masks[name])
    opt = torch.optim.Adam(field.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(3):
        x = torch.randn(4, *SHAPE)
        opt.zero_grad()
        flow_matching_loss(field, x, torch.randn_like(x), torch.rand(4)).backward()
        opt.step()
    for name, w in field.prunable_weights().items():
        assert (w[~masks[name]] == 0).all(), name


def test_cnf_block_integrates_the_unet_with_both_divergences(float64):
    """The block's exact log-determinant equals the Hutchinson one on average (unbiased),
    and reversing the solve recovers the input."""
    torch.manual_seed(0)
    field = tiny()
    solver = Solver(method="dopri5", rtol=1e-7, atol=1e-7, adjoint=False)
    flow = Flow([CNFBlock(field, end_time=0.5, divergence=Exact(), solver=solver)], SHAPE)
    x = torch.randn(2, *SHAPE)
    z, logdet = flow(x)
    back, back_logdet = flow.inverse(z)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back_logdet, -logdet, rtol=1e-5, atol=1e-5)
    loose = Solver(method="dopri5", rtol=1e-5, atol=1e-5, adjoint=False)
    hutch = Flow([CNFBlock(field, end_time=0.5, divergence=Hutchinson("rademacher"), solver=loose)], SHAPE)
    draws = torch.stack([hutch(x.repeat(32, 1, 1, 1))[1] for _ in range(4)]).view(-1, 2)
    se = draws.std(0) / draws.shape[0] ** 0.5
    assert ((draws.mean(0) - logdet).abs() <= 5 * se + 1e-6).all()


def test_hidden_units_and_compaction_keep_the_function(float64):
    """Masking a hidden channel's outgoing column removes it exactly: the compacted
    field is smaller and computes the same f and J v as the masked one."""
    torch.manual_seed(0)
    field = tiny()
    units = field.hidden_units()
    assert set(units) == {"down.0", "down.1", "down.2", "middle", "up.0", "up.1", "up.2"}
    for incoming, outgoing in units.values():
        assert field.get_parameter(incoming).shape[0] == field.get_parameter(outgoing).shape[1]
    field.get_buffer("down.0.conv2.weight_mask")[:, [0, 2]] = 0
    field.get_buffer("middle.conv2.weight_mask")[:, 1] = 0
    field.get_buffer("middle.conv1.weight_mask")[1] = 0  # the row too, as unit pruning masks it
    small = field.compacted()
    assert small.inner_widths == (2, 6, 6, 5, 4, 6, 6)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in field.parameters())
    z, v, t = torch.randn(3, *SHAPE), torch.randn(3, 2, *SHAPE), torch.tensor(0.7)
    f, jv = field(t, z, v)
    f_small, jv_small = small(t, z, v)
    torch.testing.assert_close(f_small, f)
    torch.testing.assert_close(jv_small, jv)
    rebuilt = UNetField(SHAPE, (4, 6, 6), groups=2, time_dim=8, nonlinearity="softplus",
                        inner_widths=small.inner_widths)
    rebuilt.load_state_dict(small.state_dict(), strict=True)


def test_a_block_without_live_units_cannot_be_compacted():
    field = tiny()
    field.get_buffer("up.1.conv2.weight_mask").zero_()
    with pytest.raises(ConfigError, match="up.1"):
        field.compacted()


def test_invalid_shapes_are_config_errors():
    with pytest.raises(ConfigError, match="divisible by 4"):
        UNetField((1, 6, 6), (4, 4, 4), groups=2)
    with pytest.raises(ConfigError, match="groups"):
        UNetField((1, 8, 8), (6, 6), groups=4)
    with pytest.raises(ConfigError, match="image shape"):
        UNetField((4,), (4,))
    with pytest.raises(ConfigError, match="inner_widths"):
        UNetField((1, 8, 8), (4, 4), groups=2, inner_widths=[4, 4])


def test_masks_and_gates_of_the_pruning_library_apply_and_path_penalties_refuse():
    """Weight masks (keyed by full name), L0 gates and scores from gradients need nothing
    field-specific; the path penalties need a chain of weights, which a U-Net is not."""
    from pruning.gates import HardConcreteGates
    from pruning.masks import apply_masks, prunable_weights, select_top
    from pruning.pathreg import path_norm

    torch.manual_seed(0)
    field = tiny()
    gates = HardConcreteGates({n: p.shape for n, p in field.prunable_weights().items()})
    solver = Solver(method="dopri5", rtol=1e-3, atol=1e-3, adjoint=True)
    flow = Flow([CNFBlock(field, end_time=0.5, divergence=Hutchinson(), solver=solver, gates=gates)], SHAPE)
    weights = prunable_weights(flow)
    assert set(weights) == {f"blocks.0.field.{n}" for n in field.prunable_weights()}
    x = torch.randn(4, *SHAPE)
    trace = flow.trace(x)
    nll = -(flow.base.log_prob(trace.out) + trace.logabsdet).mean()
    grads = torch.autograd.grad(nll, list(weights.values()) + list(gates.log_alpha))
    assert all(g.abs().sum() > 0 for g in grads)
    snip = {n: (p * g).abs() for (n, p), g in zip(weights.items(), grads)}
    apply_masks(flow, select_top(snip, 0.7))
    kept = sum(int(field.get_buffer(f"{n}_mask").sum()) for n in field.prunable_weights())
    assert kept == round(0.3 * sum(p.numel() for p in weights.values()))
    assert torch.isfinite(flow.log_prob(x)).all()
    with pytest.raises(ConfigError, match="chain"):
        path_norm(list(field.masked_weights().values()))
