import copy
import math

import pytest
import torch

from cnf_prune.build import build_model
from cnf_prune.setup import make_optimizer, regroup_optimizer_state
from cnf_prune.config import from_dict
from cnf.errors import ConfigError
from cnf.fields import MLPField
from cnf.odeblock import CNFBlock
from cnf.solver import Solver
from pruning.gates import HardConcreteGates, expected_l0, gate_factory, gate_histograms
from pruning.tracking import regularization_terms, sparsity_scalars

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1


def make_gates(log_alpha: torch.Tensor, **kwargs) -> HardConcreteGates:
    gates = HardConcreteGates({"w": log_alpha.shape}, **kwargs)
    with torch.no_grad():
        gates.log_alpha[0].copy_(log_alpha)
    return gates


def open_probability_from_cdf(log_alpha, beta=BETA, gamma=GAMMA, zeta=ZETA):
    """1 − Q(s ≤ 0) from the binary concrete CDF F(x) = sigmoid(β logit x − log α)
    at x = −γ/(ζ − γ), the point the stretch maps to s = 0."""
    x = -gamma / (zeta - gamma)
    return 1 - torch.sigmoid(beta * math.log(x / (1 - x)) - log_alpha)


def gated_config(**regularization):
    return from_dict({
        "model": {"hidden_dims": [8, 8]},
        "solver": {"method": "dopri5", "rtol": 1e-6, "atol": 1e-6, "adjoint": False},
        "regularization": {"l0": 1.0, **regularization},
    })


def test_open_probability_matches_cdf_closed_form(float64):
    log_alpha = torch.linspace(-6, 6, 25)
    gates = make_gates(log_alpha)
    torch.testing.assert_close(gates.open_probabilities()["w"], open_probability_from_cdf(log_alpha))
    torch.testing.assert_close(gates.expected_l0(), open_probability_from_cdf(log_alpha).sum())


@pytest.mark.parametrize("beta,gamma,zeta", [(BETA, GAMMA, ZETA), (0.3, -0.5, 1.3)])
def test_expected_l0_matches_monte_carlo_two_sided(beta, gamma, zeta, float64):
    torch.manual_seed(0)
    log_alpha = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0, 4.0])
    gates = make_gates(log_alpha, temperature=beta, stretch_low=gamma, stretch_high=zeta)
    n = 20000
    draws = torch.stack([gates.sample()["w"] for _ in range(n)])
    open_frac = (draws != 0).double().mean(0)
    exact = gates.open_probabilities()["w"]
    se = (exact * (1 - exact) / n).sqrt()
    assert ((open_frac - exact).abs() <= 5 * se + 1e-12).all(), (open_frac, exact)
    # the summed penalty as well: its Monte-Carlo standard error is the per-gate one added in quadrature
    total = (draws != 0).double().sum(1)
    assert abs(total.mean() - gates.expected_l0()) <= 5 * total.std() / math.sqrt(n)


def test_gates_stay_in_unit_interval_and_reach_both_ends():
    torch.manual_seed(0)
    gates = make_gates(torch.linspace(-4, 4, 200))
    for _ in range(20):
        g = gates.sample()["w"]
        assert (g >= 0).all() and (g <= 1).all()
    draws = torch.stack([gates.sample()["w"] for _ in range(50)])
    assert (draws == 0).any() and (draws == 1).any()
    d = gates.deterministic()["w"]
    assert (d >= 0).all() and (d <= 1).all() and (d == 0).any() and (d == 1).any()


def test_eval_gates_are_deterministic_and_follow_the_formula(float64):
    log_alpha = torch.linspace(-5, 5, 11)
    gates = make_gates(log_alpha).eval()
    first, second = gates()["w"], gates()["w"]
    assert torch.equal(first, second)
    expected = (torch.sigmoid(log_alpha) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
    torch.testing.assert_close(first, expected)
    gates.train()
    assert not torch.equal(gates()["w"], gates()["w"])


def test_initial_open_probability_is_config_value():
    gates = HardConcreteGates({"a": (3, 2), "b": (4,)}, init_open=0.7)
    for p in gates.open_probabilities().values():
        torch.testing.assert_close(p, torch.full_like(p, 0.7))


def test_gradients_reach_log_alpha(float64):
    gates = make_gates(torch.linspace(-1, 1, 5))
    torch.autograd.gradcheck(
        lambda a: torch.sigmoid(a - BETA * math.log(-GAMMA / ZETA)),
        (torch.linspace(-1, 1, 5).requires_grad_(),),
    )
    (grad,) = torch.autograd.grad(gates.expected_l0(), gates.log_alpha[0])
    p = gates.open_probabilities()["w"].detach()
    torch.testing.assert_close(grad, p * (1 - p))
    torch.manual_seed(0)
    (grad,) = torch.autograd.grad(gates.sample()["w"].sum(), gates.log_alpha[0])
    assert grad.abs().sum() > 0


def test_gates_are_constant_within_one_solve(float64):
    """Inside a training solve the field, evaluated at one fixed (t, z) with the
    weights of every call, always returns the same value; a new solve redraws."""
    torch.manual_seed(0)
    field = MLPField(2, [6, 6])
    gates = gate_factory(gated_config().regularization)(field)
    block = CNFBlock(field, end_time=0.5, solver=Solver(rtol=1e-6, atol=1e-6, adjoint=False), gates=gates)
    t_fixed, z_fixed = torch.tensor(0.2), torch.randn(3, 2)
    outputs: list[torch.Tensor] = []
    inner = field.forward

    def probe(t, z, tangents=None, weights=None):
        outputs.append(inner(t_fixed, z_fixed, None, weights)[0])
        return inner(t, z, tangents, weights)

    field.forward = probe
    block.train()
    block(torch.randn(5, 2))
    first_solve = list(outputs)
    assert len(first_solve) > 6
    for out in first_solve[1:]:
        assert torch.equal(out, first_solve[0])
    outputs.clear()
    block(torch.randn(5, 2))
    assert not torch.equal(outputs[0], first_solve[0])


def test_build_model_gates_every_prunable_weight():
    config = gated_config()
    model = build_model(config, (2,))
    for block in model.blocks:
        shapes = {n: p.shape for n, p in block.field.prunable_weights().items()}
        assert {n: tuple(s) for n, s in shapes.items()} == {
            n: tuple(a.shape) for n, a in zip(block.gates.names, block.gates.log_alpha)
        }
    names = {n for n, _ in model.named_parameters()}
    assert "blocks.0.gates.log_alpha.0" in names
    assert "blocks.0.gates.log_alpha.0" in model.state_dict()


def test_build_model_gates_follow_the_configured_settings(float64):
    """β, γ, ζ and the initial open probability come from the config: the open probability
    of the initial log α under these settings (the CDF closed form) is the configured one,
    and the eval gates stretch by (γ, ζ)."""
    beta, gamma, zeta, init_open = 0.5, -0.2, 1.3, 0.8
    config = gated_config(gate_temperature=beta, gate_stretch_low=gamma, gate_stretch_high=zeta,
                          gate_init_open=init_open)
    model = build_model(config, (2,))
    for block in model.blocks:
        gates = block.gates
        for a in gates.log_alpha:
            a = a.detach()
            torch.testing.assert_close(open_probability_from_cdf(a, beta, gamma, zeta), torch.full_like(a, init_open))
        with torch.no_grad():
            for a in gates.log_alpha:
                a.copy_(torch.linspace(-4, 4, a.numel()).view_as(a))
        torch.testing.assert_close(
            gates.open_probabilities(),
            {n: open_probability_from_cdf(a.detach(), beta, gamma, zeta) for n, a in zip(gates.names, gates.log_alpha)},
        )
        torch.testing.assert_close(
            gates.eval()(),
            {n: (torch.sigmoid(a.detach()) * (zeta - gamma) + gamma).clamp(0, 1)
             for n, a in zip(gates.names, gates.log_alpha)},
        )


def test_model_l0_ignores_pruned_entries_and_is_a_regularization_term():
    model = build_model(gated_config(), (2,))
    total = model.blocks[0].gates.expected_l0()
    torch.testing.assert_close(regularization_terms(model, gated_config().regularization)["l0"], total)
    model.blocks[0].field.layers[1].weight_mask[:3] = 0
    p = model.blocks[0].gates.open_probabilities()["layers.1.weight"]
    torch.testing.assert_close(expected_l0(model), total - p[:3].sum())


def test_eval_gate_zeros_count_as_weight_sparsity():
    model = build_model(gated_config(), (2,))
    with torch.no_grad():
        model.blocks[0].gates.log_alpha[1][:2] = -20.0  # deterministic gate 0 for two rows
    n_closed = 2 * model.blocks[0].field.layers[1].weight.shape[1]
    n_total = sum(p.numel() for p in model.blocks[0].field.prunable_weights().values())
    scalars = sparsity_scalars(model)
    assert scalars["sparsity/weights"] == pytest.approx(n_closed / n_total)
    assert model.training  # logging does not change the mode


def test_histograms_only_for_gated_models():
    model = build_model(gated_config(), (2,))
    hist = gate_histograms(model)
    n = sum(p.numel() for p in model.blocks[0].field.prunable_weights().values())
    assert hist["gates/open_probability"].numel() == n
    assert "gates/open_probability/blocks.0.field.layers.0.weight" in hist
    assert gate_histograms(build_model(gated_config(l0=0.0), (2,))) == {}


@pytest.mark.parametrize(
    "key,value,match",
    [("l0", -1.0, "l0"), ("pathreg", -0.1, "pathreg"), ("path_weights", -1.0, "path_weights"),
     ("gate_temperature", 0.0, "β"), ("gate_stretch_low", 0.0, "γ"), ("gate_stretch_high", 1.0, "ζ")],
)
def test_bad_settings_are_config_errors(key, value, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({"regularization": {key: value}})


@pytest.mark.parametrize(
    "kwargs,match",
    [({"temperature": -1.0}, "β"), ({"stretch_low": 0.05}, "γ"), ({"stretch_high": 0.9}, "ζ"),
     ({"init_open": 1.0}, "open probability")],
)
def test_bad_gate_arguments_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        HardConcreteGates({"w": (2, 2)}, **kwargs)


def test_weight_decay_leaves_gate_locations_alone():
    """Adam's L2 decay acts on the weights only: with a zero loss, one step moves every
    decayed weight and no log α."""
    from cnf_prune.config import TrainConfig

    torch.manual_seed(0)
    model = build_model(gated_config(), (2,))
    gate_params = {id(p) for g in model.blocks for p in g.gates.parameters()}
    optimizer = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    sum(0.0 * p.sum() for p in model.parameters()).backward()
    optimizer.step()
    for p, old in zip(model.parameters(), before):
        if id(p) in gate_params:
            assert torch.equal(p, old)
        elif old.abs().min() > 0:
            assert (p != old).all()
    assert gate_params and len(optimizer.param_groups) == 2


def test_a_one_group_optimizer_state_of_a_gated_model_resumes_in_two_groups():
    """Checkpoints written before gates had their own group: Adam's moments follow
    their parameters, and the next step is the one the old optimizer would take."""
    from cnf_prune.config import TrainConfig

    torch.manual_seed(0)
    model = build_model(gated_config(), (2,))
    old = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(16, 2)
    for _ in range(3):
        old.zero_grad()
        model.trace(x).logabsdet.mean().backward()
        old.step()
    state = copy.deepcopy(old.state_dict())  # not the live moments, which old.step() updates
    new = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.0))
    new.load_state_dict(regroup_optimizer_state(state, new, model))
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(new.state[p][key], old.state[p][key])
    loss = model.trace(x).logabsdet.mean()
    for opt in (old, new):
        opt.zero_grad()
    loss.backward()
    start = [p.detach().clone() for p in model.parameters()]
    old.step()
    expected = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, s in zip(model.parameters(), start):
            p.copy_(s)
    new.step()
    for p, e in zip(model.parameters(), expected):
        assert torch.equal(p, e)


def test_gate_lr_scale_sets_the_step_of_the_gate_locations():
    """Adam's first step moves each parameter by its learning rate (times the sign of
    its gradient): log α by lr × gate_lr_scale, the weights by lr."""
    from cnf_prune.config import TrainConfig

    torch.manual_seed(0)
    model = build_model(gated_config(), (2,))
    gates = [p for g in model.blocks for p in g.gates.parameters()]
    optimizer = make_optimizer(model, TrainConfig(lr=1e-3, weight_decay=0.0), gate_lr_scale=20.0)
    before = [p.detach().clone() for p in gates]
    weight = model.blocks[0].field.layers[0].weight
    w_before = weight.detach().clone()
    optimizer.zero_grad()
    model.trace(torch.randn(16, 2)).logabsdet.mean().backward()
    optimizer.step()
    moved = torch.cat([(p - b).abs().flatten() for p, b in zip(gates, before)])
    w_moved = (weight - w_before).abs().flatten()
    for step, lr in ((moved, 2e-2), (w_moved, 1e-3)):  # at most lr; exactly lr unless |g| ~ Adam's eps
        assert step.max() <= lr * (1 + 1e-3)  # float32 rounding of the parameters
        assert step.median().item() == pytest.approx(lr, rel=1e-2)
    assert [g["lr_scale"] for g in optimizer.param_groups] == [1.0, 20.0]
