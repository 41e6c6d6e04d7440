import pytest
import torch

from helpers import score_args, prune
from cnf_prune.build import build_model
from cnf_prune.config import Config, from_dict, to_dict
from cnf.data import make_data
from cnf.divergence import Exact
from cnf.errors import ConfigError
from cnf.fields import MLPField
from cnf.flow import Flow
from cnf.odeblock import CNFBlock
from cnf.solver import Solver
from pruning.apply import scoring_batches
from pruning.masks import apply_masks, mask_buffer, prunable_weights
from pruning.scores import (
    SCORERS,
    get_scorer,
    grasp_scores,
    jacobian_spectrum_abs_scores,
    jacobian_spectrum_scores,
    jacobian_spectrum_snip_scores,
    magnitude_scores,
    objective_gradients,
    random_scores,
    snip_scores,
    synflow_scores,
)

CPU = torch.device("cpu")


def tiny_flow(solver: Solver, layer_type: str = "concatsquash") -> Flow:
    field = MLPField(2, [6, 5], layer_type=layer_type, nonlinearity="tanh")
    return Flow([CNFBlock(field, end_time=0.6, divergence=Exact(), solver=solver)], event_shape=(2,))


def pruning_config(seed: int = 0, **pruning) -> Config:
    return from_dict({
        "seed": seed,
        "data": {"name": "checkerboard", "val_size": 50, "test_size": 50},
        "model": {"hidden_dims": [8, 8], "end_time": 0.5},
        "solver": {"rtol": 1e-4, "atol": 1e-4},
        "train": {"batch_size": 64},
        "pruning": pruning,
    })


def flat(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([s.flatten() for s in scores.values()])


@pytest.fixture
def setup():
    """A small toy model, its data and config, and the scoring batches prune_at_init uses."""
    config = pruning_config(method="jacobian_spectrum", sparsity=0.6, batches=2)
    torch.manual_seed(0)
    data = make_data(config.data, config.seed)
    model = build_model(config, data.event_shape)
    return model, data, config, scoring_batches(data, config.pruning.batches, config.train.batch_size, config.seed)


@pytest.mark.parametrize("adjoint", [False, True])
def test_loss_and_jacobian_gradients_match_finite_differences(adjoint, float64):
    torch.manual_seed(0)
    flow = tiny_flow(Solver(method="dopri5", rtol=1e-10, atol=1e-10, adjoint=adjoint))
    x = torch.randn(6, 2)
    weights = prunable_weights(flow)
    grads = objective_gradients(flow, [x], weights)

    def objectives() -> tuple[float, float]:
        with torch.no_grad():
            return -flow.log_prob(x).mean().item(), flow.trace(x).jac_norm.mean().item()

    g = torch.Generator().manual_seed(1)
    eps = 1e-5
    for name, p in weights.items():
        for _ in range(2):
            index = tuple(int(torch.randint(0, n, (), generator=g)) for n in p.shape)
            with torch.no_grad():
                p[index] += eps
                plus = objectives()
                p[index] -= 2 * eps
                minus = objectives()
                p[index] += eps
            fd_loss, fd_jac = ((a - b) / (2 * eps) for a, b in zip(plus, minus))
            assert grads["nll"][name][index].item() == pytest.approx(fd_loss, rel=1e-5, abs=1e-7)
            assert grads["jac_norm"][name][index].item() == pytest.approx(fd_jac, rel=1e-5, abs=1e-7)


def test_objective_gradients_average_over_the_scoring_batches(setup):
    """dL/dθ and dR/dθ over several batches are the means of the per-batch gradients
    (a sum would scale the scores with pruning.batches, which matters where scores of
    different origins are mixed, as in jacobian_spectrum_snip)."""
    model, _, _, batches = setup
    assert len(batches) == 2
    weights = prunable_weights(model)
    both = objective_gradients(model, batches, weights)
    single = [objective_gradients(model, [x], weights) for x in batches]
    for objective in ("nll", "jac_norm"):
        torch.testing.assert_close(
            both[objective], {n: (single[0][objective][n] + single[1][objective][n]) / 2 for n in weights}
        )


def test_jacobian_spectrum_scores_and_variants_follow_their_formulas(setup):
    model, _, config, batches = setup
    weights = prunable_weights(model)
    grads = objective_gradients(model, batches, weights)
    d_loss, d_jac = grads["nll"], grads["jac_norm"]
    js = {n: d_jac[n] * d_loss[n] for n in weights}
    snip = {n: (p.detach() * d_loss[n]).abs() for n, p in weights.items()}

    torch.testing.assert_close(jacobian_spectrum_scores(model, batches, config.pruning, config.seed), js)
    torch.testing.assert_close(jacobian_spectrum_abs_scores(model, batches, config.pruning, config.seed),
                               {n: s.abs() for n, s in js.items()})
    torch.testing.assert_close(snip_scores(model, batches, config.pruning, config.seed), snip)
    mixed = pruning_config(method="jacobian_spectrum_snip", snip_mix=0.3)
    js_l1, snip_l1 = flat(js).abs().sum(), flat(snip).abs().sum()
    torch.testing.assert_close(
        jacobian_spectrum_snip_scores(model, batches, mixed.pruning, mixed.seed),
        {n: 0.7 * js[n] / js_l1 + 0.3 * snip[n] / snip_l1 for n in weights},
    )
    assert (flat(js) < 0).any() and (flat(js) > 0).any()  # signed, as the method defines


def test_prune_at_init_keeps_exactly_the_top_k_of_dr_times_dl(setup):
    model, data, config, batches = setup
    weights = prunable_weights(model)
    grads = objective_gradients(model, batches, weights)
    s = flat({n: grads["jac_norm"][n] * grads["nll"][n] for n in weights})
    k = round(0.4 * s.numel())
    expected = torch.zeros(s.numel(), dtype=torch.bool)
    expected[s.argsort(descending=True)[:k]] = True

    prune(model, data, config)
    kept = flat({n: mask_buffer(model, n).bool() for n in weights})
    assert torch.equal(kept, expected)
    assert all(torch.equal(p.detach() == 0, mask_buffer(model, n) == 0) for n, p in weights.items())


def test_layer_scope_keeps_the_top_fraction_of_each_weight(setup):
    model, data, _, _ = setup
    config = pruning_config(method="magnitude", sparsity=0.7, scope="layer")
    before = {n: p.detach().abs().clone() for n, p in prunable_weights(model).items()}
    prune(model, data, config)
    for name, magnitude in before.items():
        k = round(0.3 * magnitude.numel())
        expected = torch.zeros(magnitude.numel(), dtype=torch.bool)
        expected[magnitude.flatten().argsort(descending=True)[:k]] = True
        assert torch.equal(mask_buffer(model, name).flatten().bool(), expected)


def test_magnitude_is_absolute_weight(setup):
    model, _, config, batches = setup
    torch.testing.assert_close(
        magnitude_scores(model, batches, config.pruning, config.seed), {n: p.detach().abs() for n, p in prunable_weights(model).items()}
    )


def test_random_scores_are_seeded_uniform(setup):
    model, _, config, batches = setup
    a = random_scores(model, batches, config.pruning, config.seed)
    b = random_scores(model, batches, config.pruning, config.seed)
    c = random_scores(model, batches, *score_args(pruning_config(seed=1)))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(flat(a), flat(c))
    u = flat(a)
    assert 0 <= u.min() and u.max() < 1
    # uniform: the mean of n draws is within 5 standard errors of 1/2
    assert abs(u.mean().item() - 0.5) < 5 * (1 / 12 / u.numel()) ** 0.5


def test_scorers_leave_the_model_unchanged(setup):
    model, _, config, batches = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for method in SCORERS:
        get_scorer(method)(model, batches[:1], *score_args(pruning_config(method=method, sparsity=0.6, synflow_iterations=5)))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_zero_initialized_last_layer_is_a_clear_error(setup):
    model, data, config, _ = setup
    with torch.no_grad():
        model.blocks[0].field.layers[-1].weight.zero_()
    with pytest.raises(ConfigError, match="identically zero"):
        prune(model, data, config)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="jacobian_spectrum_snip"):
        get_scorer("jacobian")


def test_grasp_is_theta_times_hessian_gradient_product(float64):
    torch.manual_seed(0)
    flow = tiny_flow(Solver(method="rk4", step_size=0.1, adjoint=True))  # grasp must bypass the adjoint
    x = torch.randn(8, 2)
    config = pruning_config(method="grasp")
    weights = prunable_weights(flow)
    scores = grasp_scores(flow, [x], config.pruning, config.seed)

    def gradient() -> dict[str, torch.Tensor]:
        return objective_gradients(flow, [x], weights, ("nll",))["nll"]

    g = gradient()
    eps = 1e-5
    with torch.no_grad():
        for n, p in weights.items():
            p.add_(eps * g[n])
    plus = gradient()
    with torch.no_grad():
        for n, p in weights.items():
            p.sub_(2 * eps * g[n])
    minus = gradient()
    with torch.no_grad():
        for n, p in weights.items():
            p.add_(eps * g[n])
    for n, p in weights.items():
        hg = (plus[n] - minus[n]) / (2 * eps)
        torch.testing.assert_close(scores[n], p.detach() * hg, rtol=1e-5, atol=1e-8)


def path_products(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Closed-form SynFlow scores of the linear chain ``1ᵀ |W_L| ··· |W_1| 1``."""
    a = [w.abs() for w in weights]
    out = []
    for i, w in enumerate(a):
        below = torch.ones(a[0].shape[1], dtype=w.dtype)
        for v in a[:i]:
            below = v @ below
        above = torch.ones(a[-1].shape[0], dtype=w.dtype)
        for v in reversed(a[i + 1:]):
            above = above @ v
        out.append(w * above[:, None] * below[None, :])
    return out


def test_synflow_matches_the_closed_form_path_products(float64):
    torch.manual_seed(0)
    flow = tiny_flow(Solver(), layer_type="concat")
    with torch.no_grad():
        for layer in flow.blocks[0].field.layers:
            layer.bias.zero_()  # at t = 0 the concat field is then the chain W_3 σ(W_2 σ(W_1 z))
    weights = prunable_weights(flow)
    expected = dict(zip(weights, path_products([p.detach() for p in weights.values()])))

    dense = synflow_scores(flow, [], *score_args(pruning_config(method="synflow", sparsity=0.0, synflow_iterations=3)))
    torch.testing.assert_close(dense, expected)
    # synaptic flow is conserved: every layer carries the same total score
    totals = torch.stack([s.sum() for s in dense.values()])
    torch.testing.assert_close(totals, totals[:1].expand_as(totals))

    one_shot = synflow_scores(flow, [], *score_args(pruning_config(method="synflow", sparsity=0.75, synflow_iterations=1)))
    s = flat(expected)
    k = round(0.25 * s.numel())
    top = torch.zeros(s.numel(), dtype=torch.bool)
    top[s.argsort(descending=True)[:k]] = True
    assert torch.equal(torch.isfinite(flat(one_shot)), top)


def test_iterative_synflow_reaches_the_target_and_scores_pruned_weights_minus_inf(setup):
    model, _, _, batches = setup
    config = pruning_config(method="synflow", sparsity=0.9, synflow_iterations=20)
    scores = flat(synflow_scores(model, batches, config.pruning, config.seed))
    assert int(torch.isfinite(scores).sum()) == round(0.1 * scores.numel())
    assert (scores[torch.isfinite(scores)] >= 0).all()
    assert torch.equal(scores, flat(synflow_scores(model, [], config.pruning, config.seed)))  # data-free


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries (ties: earlier entries first)."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[scores.flatten().argsort(descending=True, stable=True)[:k]] = True
    return keep.view_as(scores)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_two_round_synflow_prunes_geometrically_within_the_scope(scope, float64):
    """Round k of n prunes to sparsity 1 − (1 − s)^{k/n}: for n = 2, s = 0.75 first to 0.5
    by the closed-form path products, then to 0.75 by those of the surviving weights;
    with scope=layer both rounds keep the same fraction of every weight tensor."""
    torch.manual_seed(0)
    flow = tiny_flow(Solver(), layer_type="concat")
    with torch.no_grad():
        for layer in flow.blocks[0].field.layers:
            layer.bias.zero_()
    weights = prunable_weights(flow)

    def prune(ws: list[torch.Tensor], alive: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
        scores = [s.masked_fill(~a, -torch.inf) for s, a in zip(path_products(ws), alive)]
        if scope == "layer":
            return [top_k(s, round((1 - sparsity) * s.numel())) for s in scores]
        everything = torch.cat([s.flatten() for s in scores])
        keep = top_k(everything, round((1 - sparsity) * everything.numel()))
        return [k.view_as(s) for k, s in zip(keep.split([s.numel() for s in scores]), scores)]

    dense = [p.detach() for p in weights.values()]
    first = prune(dense, [torch.ones_like(w, dtype=torch.bool) for w in dense], 0.5)
    survivors = [w * k for w, k in zip(dense, first)]
    second = prune(survivors, first, 0.75)
    expected = path_products(survivors)

    scores = synflow_scores(flow, [], *score_args(pruning_config(method="synflow", sparsity=0.75, synflow_iterations=2,
                                                       scope=scope)))
    for s, keep, e in zip(scores.values(), second, expected):
        assert torch.equal(torch.isfinite(s), keep)
        torch.testing.assert_close(s[keep], e[keep])
    if scope == "layer":
        assert [int(torch.isfinite(s).sum()) for s in scores.values()] == [
            round(0.25 * p.numel()) for p in weights.values()
        ]


def test_weights_without_a_jacobian_gradient_score_zero_and_the_rest_prune():
    """dR ≡ 0 for some weights only is no error: with the last layer of block 1 zero, that
    field does not depend on its first two weights at all, so they score exactly 0."""
    config = from_dict({
        **to_dict(pruning_config(method="jacobian_spectrum", sparsity=0.6, batches=1)),
        "model": {"hidden_dims": [8, 8], "end_time": 0.5, "num_blocks": 2},
    })
    torch.manual_seed(0)
    data = make_data(config.data, config.seed)
    model = build_model(config, data.event_shape)
    with torch.no_grad():
        model.blocks[1].field.layers[-1].weight.zero_()
    scores = jacobian_spectrum_scores(model, scoring_batches(data, config.pruning.batches, config.train.batch_size, config.seed), config.pruning, config.seed)
    for name in ("blocks.1.field.layers.0.weight", "blocks.1.field.layers.1.weight"):
        assert torch.count_nonzero(scores[name]) == 0, name
    assert all(torch.count_nonzero(scores[f"blocks.0.field.layers.{i}.weight"]) > 0 for i in range(3))
    prune(model, data, config)
    kept = flat({n: mask_buffer(model, n) for n in prunable_weights(model)})
    assert int(kept.sum()) == round(0.4 * kept.numel())


def test_iterative_magnitude_pruning_equals_one_shot(setup):
    """Masking leaves the kept weights' magnitudes unchanged, so rescoring them over
    rounds must select exactly the one-shot mask: a check of the round schedule."""
    model, data, _, _ = setup
    twin = build_model(pruning_config(method="magnitude"), data.event_shape)
    twin.load_state_dict(model.state_dict())
    prune(model, data, pruning_config(method="magnitude", sparsity=0.7))
    prune(twin, data, pruning_config(method="magnitude", sparsity=0.7, rounds=4))
    for name in prunable_weights(model):
        assert torch.equal(mask_buffer(model, name), mask_buffer(twin, name))


def test_iterative_jacobian_spectrum_rescores_the_masked_model(setup):
    """Round 1 of 2 keeps the top sqrt(1 - s) of the dense scores; round 2 keeps the top
    (1 - s) of the masked model's scores among those."""
    model, data, config, batches = setup
    weights = prunable_weights(model)
    twin = build_model(config, data.event_shape)
    twin.load_state_dict(model.state_dict())
    dense = flat(jacobian_spectrum_scores(twin, batches, *score_args(config)))
    first = torch.zeros(dense.numel(), dtype=torch.bool)
    first[dense.argsort(descending=True)[:round((1 - 0.6) ** 0.5 * dense.numel())]] = True
    sizes = [p.numel() for p in weights.values()]
    apply_masks(twin, {n: m.view_as(p) for (n, p), m in zip(weights.items(), first.split(sizes))})
    rescored = flat(jacobian_spectrum_scores(twin, batches, *score_args(config))).masked_fill(~first, -torch.inf)
    expected = torch.zeros(dense.numel(), dtype=torch.bool)
    expected[rescored.argsort(descending=True, stable=True)[:round(0.4 * dense.numel())]] = True

    prune(model, data, pruning_config(method="jacobian_spectrum", sparsity=0.6, batches=2, rounds=2))
    kept = flat({n: mask_buffer(model, n).bool() for n in weights})
    assert torch.equal(kept, expected)
    assert not torch.equal(expected, dense >= dense.sort(descending=True).values[round(0.4 * dense.numel()) - 1])


def test_rounds_are_refused_where_they_mean_nothing():
    with pytest.raises(ConfigError, match="synflow_iterations"):
        pruning_config(method="synflow", sparsity=0.5, rounds=3)
    with pytest.raises(ConfigError, match="granularity"):
        pruning_config(method="snip", sparsity=0.5, rounds=3, granularity="unit")
    with pytest.raises(ConfigError, match="positive"):
        pruning_config(method="snip", sparsity=0.5, rounds=0)


def test_warm_up_scores_a_trained_copy_and_masks_the_initial_weights(setup):
    """With warmup_steps, the mask is the top magnitudes of a copy trained by Adam on
    the warm-up batches (replayed here by hand), while the model keeps its initial
    weights (masked) and the global RNG is left as it was."""
    model, data, config, _ = setup
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = pruning_config(method="magnitude", sparsity=0.5, warmup_steps=5, warmup_lr=1e-2)
    twin = build_model(settings, data.event_shape)
    twin.load_state_dict(model.state_dict())
    optimizer = torch.optim.Adam(twin.parameters(), lr=1e-2)
    warm_batches = scoring_batches(data, 5, settings.train.batch_size, settings.seed, stream=0x3A2F)
    for x in warm_batches:
        trace = twin.trace(x)
        loss = -(twin.base.log_prob(trace.out) + trace.logabsdet).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = flat({n: p.detach().abs() for n, p in prunable_weights(twin).items()})
    expected = torch.zeros(trained.numel(), dtype=torch.bool)
    expected[trained.argsort(descending=True)[:round(0.5 * trained.numel())]] = True

    rng = torch.get_rng_state()
    report = prune(model, data, settings)
    assert torch.equal(torch.get_rng_state(), rng)
    assert "5 warm-up steps" in report
    weights = prunable_weights(model)
    kept = flat({n: mask_buffer(model, n).bool() for n in weights})
    assert torch.equal(kept, expected)
    initial_magnitudes = flat({n: initial[n].abs() for n in weights})
    one_shot = initial_magnitudes >= initial_magnitudes.sort(descending=True).values[round(0.5 * kept.numel()) - 1]
    assert not torch.equal(kept, one_shot)  # the warm-up changed the mask
    for n, p in model.named_parameters():  # training starts from the initial weights, masked
        expected_weight = initial[n] * mask_buffer(model, n) if n in weights else initial[n]
        torch.testing.assert_close(p.detach(), expected_weight)


def test_warm_up_is_refused_for_random_scores_and_bad_values():
    with pytest.raises(ConfigError, match="random scores ignore the model"):
        pruning_config(method="random", sparsity=0.5, warmup_steps=10)
    with pytest.raises(ConfigError, match="warmup_steps"):
        pruning_config(method="snip", sparsity=0.5, warmup_steps=-1)
    with pytest.raises(ConfigError, match="warmup_lr"):
        pruning_config(method="snip", sparsity=0.5, warmup_steps=3, warmup_lr=0)
