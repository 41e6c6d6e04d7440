"""Base distributions (cnf/base.py): the standard normal, the Gaussian mixture, its
EM fit, a flow over a mixture in closed form, and the mixture base in train.py."""

import math

import pytest
import torch

import cnf.base
import train
from cnf_prune.objectives import Likelihood
from cnf_prune.build import build_model, load_model
from cnf.base import GaussianMixture, StandardNormal, fit_base, fit_gaussian_mixture, standard_normal_log_prob
from cnf_prune.config import load_config
from cnf.data import make_data
from cnf.divergence import Exact
from cnf.errors import ConfigError, TrainingError
from cnf.flow import Flow
from cnf.odeblock import CNFBlock
from cnf.solver import Solver
from helpers import LinearField, run_train
from pruning.scores import OBJECTIVES

TIGHT = Solver(method="dopri5", rtol=1e-10, atol=1e-10, adjoint=False)


def two_cluster_mixture(dims: int = 2) -> GaussianMixture:
    """Weights 0.3 / 0.7, distinct means and correlated covariances."""
    base = GaussianMixture(dims, 2).double()
    means = torch.stack([torch.full((dims,), -4.0), torch.linspace(3.0, 4.0, dims)]).double()
    a = torch.eye(dims, dtype=torch.float64) + 0.4 * torch.ones(dims, dims, dtype=torch.float64).tril(-1)
    covariances = torch.stack([a @ a.T, 0.25 * a.T @ a])
    base.set(torch.tensor([0.3, 0.7], dtype=torch.float64).log(), means, covariances)
    return base


def written_out_log_prob(base: GaussianMixture, z: torch.Tensor) -> torch.Tensor:
    covariances = base.scale_tril @ base.scale_tril.transpose(1, 2)
    density = sum(
        base.log_weights[k].exp() * torch.distributions.MultivariateNormal(base.means[k], covariances[k]).log_prob(z).exp()
        for k in range(base.components)
    )
    return density.log()


def test_an_unfitted_mixture_is_the_standard_normal():
    z = torch.randn(7, 3, 2, dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(StandardNormal(6).log_prob(z), expected)
    torch.testing.assert_close(standard_normal_log_prob(z), expected)
    torch.testing.assert_close(GaussianMixture(6, 4).double().log_prob(z), expected)


def test_the_mixture_log_prob_is_the_weighted_sum_of_its_gaussians():
    base = two_cluster_mixture(3)
    z = torch.randn(20, 3, dtype=torch.float64) * 2
    torch.testing.assert_close(base.log_prob(z), written_out_log_prob(base, z))
    torch.testing.assert_close(base.log_weights.exp().sum(), torch.tensor(1.0, dtype=torch.float64))


def test_mixture_draws_pick_components_by_weight_and_scale_their_spread_by_the_temperature():
    base = two_cluster_mixture(2)
    n = 40000
    for temperature in (1.0, 0.5):
        draws = base.sample(n, generator=torch.Generator().manual_seed(3), temperature=temperature,
                            dtype=torch.float64)
        first = draws[:, 0] < 0.0  # the clusters are 4 standard deviations from 0
        assert abs(first.double().mean().item() - 0.3) < 0.015
        for k, rows in ((0, first), (1, ~first)):
            cov = base.scale_tril[k] @ base.scale_tril[k].T
            torch.testing.assert_close(draws[rows].mean(0), base.means[k], atol=0.05, rtol=0)
            torch.testing.assert_close(torch.cov(draws[rows].T), temperature**2 * cov, atol=0.05 * cov.max(), rtol=0)
    again = base.sample(5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(again, base.sample(5, generator=torch.Generator().manual_seed(3), dtype=torch.float64))


def test_one_component_em_is_the_maximum_likelihood_gaussian():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 3, generator=gen, dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.0, 0.0], [0.5, 2.0, 0.0], [-1.0, 0.3, 0.5]], dtype=torch.float64) + 4.0
    (log_weights, means, covariances), _ = fit_gaussian_mixture(x, 1, iterations=1, seed=0, ridge=1e-3)
    mean, cov = x.mean(0), torch.cov(x.T, correction=0) + 1e-3 * torch.eye(3, dtype=x.dtype)
    torch.testing.assert_close(log_weights, torch.zeros(1, dtype=x.dtype))
    torch.testing.assert_close(means[0], mean)
    torch.testing.assert_close(covariances[0], cov)
    base = GaussianMixture(3, 1).double()
    base.set(log_weights, means, covariances)
    torch.testing.assert_close(base.log_prob(x), torch.distributions.MultivariateNormal(mean, cov).log_prob(x))


def test_em_recovers_two_clusters_and_never_lowers_the_likelihood():
    gen = torch.Generator().manual_seed(1)
    n = 4000
    first = torch.rand(n, generator=gen) < 0.3
    centres = torch.where(first[:, None], torch.tensor([-3.0, 0.0]), torch.tensor([3.0, 1.0])).double()
    x = centres + 0.5 * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    (log_weights, means, _), history = fit_gaussian_mixture(x, 2, iterations=20, seed=0, ridge=0.0)
    assert all(b >= a - 1e-12 for a, b in zip(history, history[1:]))  # EM's guarantee
    order = means[:, 0].argsort()
    torch.testing.assert_close(log_weights[order].exp(), torch.tensor([0.3, 0.7], dtype=x.dtype), atol=0.02, rtol=0)
    torch.testing.assert_close(means[order], torch.tensor([[-3.0, 0.0], [3.0, 1.0]], dtype=x.dtype), atol=0.05, rtol=0)
    with pytest.raises(ConfigError, match="needs 1 to 4000 points"):
        fit_gaussian_mixture(x, 4001, iterations=1, seed=0)


def test_a_flow_over_a_mixture_is_the_mixture_pushed_through_the_map(float64):
    """dz/dt = A z for time T maps data x to z = e^{AT} x, so x = M z with M = e^{-AT}:
    p(x) = Σ_k w_k N(x; M μ_k, M Σ_k Mᵀ), and samples are M times the base's."""
    a = torch.randn(2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.7
    base = two_cluster_mixture(2)
    flow = Flow([CNFBlock(LinearField(a), end_time=0.8, divergence=Exact(), solver=TIGHT)], (2,), base).double()
    m = torch.linalg.matrix_exp(-a * 0.8)
    x = torch.randn(16, 2, dtype=torch.float64) * 2
    covariances = base.scale_tril @ base.scale_tril.transpose(1, 2)
    expected = sum(
        base.log_weights[k].exp() * torch.distributions.MultivariateNormal(
            m @ base.means[k], m @ covariances[k] @ m.T).log_prob(x).exp()
        for k in range(2)
    ).log()
    torch.testing.assert_close(flow.log_prob(x), expected, rtol=1e-7, atol=1e-7)
    z = flow.base_noise(8, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(z, base.sample(8, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    torch.testing.assert_close(flow.trace(z, reverse=True, density=False).out, z @ m.T, rtol=1e-7, atol=1e-7)


def test_fit_base_fits_the_untrained_flows_latents_and_leaves_the_training_stream_alone():
    config = load_config("configs/toy.yaml", ["model.hidden_dims=[8,8]", "model.base_components=3"])
    data = make_data(config.data, config.seed)
    torch.manual_seed(0)
    model = build_model(config, data.event_shape)
    stream = data.state_dict()
    history, used = fit_base(model, data, size=600, seed=4)
    assert used == 600 and data.state_dict() == stream
    with torch.no_grad():
        latents = model.trace(data.training_sample(600, 4), density=False).out.double()
    (log_weights, means, covariances), expected = fit_gaussian_mixture(latents, 3, iterations=30, seed=4)
    assert history == pytest.approx(expected)
    torch.testing.assert_close(model.base.means.double(), means, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.base.log_weights.double(), log_weights, rtol=1e-5, atol=1e-5)
    # the fitted base describes the latents better than N(0, I) does
    assert model.base.log_prob(latents.float()).mean() > standard_normal_log_prob(latents).mean() + 0.1


def test_the_training_nll_and_the_pruning_loss_use_the_base():
    config = load_config("configs/toy.yaml", ["model.hidden_dims=[8,8]", "model.base_components=2",
                                               "solver.method=rk4", "solver.step_size=0.25", "solver.adjoint=false"])
    data = make_data(config.data, config.seed)
    torch.manual_seed(0)
    model = build_model(config, data.event_shape)
    model.base.set(*fit_gaussian_mixture(torch.randn(200, 2, dtype=torch.float64) * 2 + 1, 2,
                                         iterations=5, seed=0)[0])
    x = data.train_batch(32)
    torch.manual_seed(1)
    nll = Likelihood(config.regularization)(model.trace, model, data, x).nll
    torch.manual_seed(1)
    expected = -model.log_prob(x).mean()
    torch.testing.assert_close(nll, expected)
    torch.testing.assert_close(OBJECTIVES["nll"](model, model.trace(x)), expected)
    assert abs(expected.item() + standard_normal_log_prob(model.trace(x).out).mean().item()
               + model.trace(x).logabsdet.mean().item()) > 0.01  # not the standard normal's


@pytest.mark.parametrize("pruning", [[], ["--set", "pruning.method=random", "--set", "pruning.sparsity=0.5"]])
def test_train_fits_the_base_once_checkpoints_it_and_resumes_without_refitting(tmp_path, capsys, pruning):
    base_settings = ["--set", "model.base_components=3", "--set", "model.base_fit_size=500"]
    assert run_train(tmp_path / "r", *base_settings, *pruning) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert err.count("base: 3-component Gaussian mixture fitted by EM to the latents of 500 training") == \
        (2 if pruning else 1)  # refitted after pruning
    model, config, _ = load_model(tmp_path / "r" / "best.pt")
    assert config.model.base_components == 3
    assert not torch.equal(model.base.means, torch.zeros_like(model.base.means))
    before = model.base.state_dict()
    assert run_train(tmp_path / "r", *base_settings, *pruning, "--resume", "--set", "train.iterations=6") == 0
    assert "fitted by EM" not in capsys.readouterr().err
    resumed, _, _ = load_model(tmp_path / "r" / "checkpoint.pt")
    for name, value in before.items():
        assert torch.equal(resumed.base.state_dict()[name], value), name


@pytest.mark.parametrize("setting, message", [
    ("model.base_components=-1", "model.base_components must be 0"),
    ("model.base_fit_size=2", "model.base_fit_size must be at least model.base_components"),
])
def test_bad_base_settings_are_config_errors(setting, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/toy.yaml", ["model.base_components=3", setting])


def test_a_base_with_more_components_than_training_examples_is_refused():
    config = load_config("configs/toy.yaml", ["model.hidden_dims=[8,8]", "model.base_components=5"])
    model = build_model(config, (2,))
    data = make_data(config.data, config.seed)
    data.training_sample = lambda n, seed: torch.randn(4, 2)  # a training set of 4 examples
    with pytest.raises(ConfigError, match="needs at least as many training examples"):
        fit_base(model, data, size=10, seed=0)


def test_a_base_that_cannot_be_fitted_is_a_training_error(monkeypatch):
    # a fixed-step solver passes NaN through (an adaptive one stops on it itself)
    config = load_config("configs/toy.yaml", ["model.hidden_dims=[8,8]", "model.base_components=2",
                                               "solver.method=rk4", "solver.step_size=0.25"])
    model = build_model(config, (2,))
    data = make_data(config.data, config.seed)
    data.training_sample = lambda n, seed: torch.tensor([[0.0, float("nan")]] * 10)
    with pytest.raises(TrainingError, match="non-finite latents"):
        fit_base(model, data, size=10, seed=0)
    data.training_sample = lambda n, seed: torch.randn(10, 2)
    broken = (torch.zeros(2), torch.zeros(2, 2), -torch.eye(2).expand(2, 2, 2))  # what EM could leave behind
    monkeypatch.setattr(cnf.base, "fit_gaussian_mixture", lambda *a, **k: (broken, [0.0]))
    with pytest.raises(TrainingError, match="without a valid covariance"):
        fit_base(model, data, size=10, seed=0)


def test_setting_a_mixture_of_another_shape_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        GaussianMixture(2, 2).set(torch.zeros(3), torch.zeros(3, 2), torch.eye(2).expand(3, 2, 2))
    with pytest.raises(ValueError, match="not positive definite"):
        GaussianMixture(2, 1).set(torch.zeros(1), torch.zeros(1, 2), -torch.eye(2)[None])
    assert math.isclose(GaussianMixture(2, 4).log_weights.exp().sum().item(), 1.0, rel_tol=1e-6)


def test_image_scripts_sample_from_the_fitted_mixture(tmp_path, capsys, monkeypatch):
    """sample.py and bench/figure2_mnist.py decode draws of the run's own mixture
    (a script drawing N(0, I) noise instead would pass everything else)."""
    import importlib.util
    from pathlib import Path

    import numpy as np
    import yaml

    import sample
    from cnf.images import logit_inverse
    from test_images import SMOKE

    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump({**SMOKE, "model": {**SMOKE["model"], "base_components": 2,
                                                        "base_fit_size": 64}}))
    run = tmp_path / "run"
    assert train.main([str(path), "--out", str(run)]) == 0, capsys.readouterr().err
    model, config, _ = load_model(run / "best.pt")
    assert model.base.means.abs().max() > 0.5  # fitted, not N(0, I)

    npy = tmp_path / "samples.npy"
    assert sample.main([str(run / "best.pt"), "--out", str(npy), "--n", "6", "--temperature", "0.5"]) == 0
    from cnf_prune.sampling import SampleNoise

    model.eval()
    with torch.no_grad():  # sample.py's default --seed is 0
        expected = model.trace(SampleNoise(model, 0, 0.5).draw(0, 6), reverse=True, density=False).out
    expected = logit_inverse(expected, config.data.logit_alpha).clamp(0, 1)
    np.testing.assert_allclose(np.load(npy), expected.numpy(), atol=1e-5)

    spec = importlib.util.spec_from_file_location("figure2_mnist", Path(__file__).parents[1] / "bench" / "figure2_mnist.py")
    figure2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figure2)
    drawn = []
    original = figure2.sample_grid
    monkeypatch.setattr(figure2, "sample_grid", lambda m, noise, *a: drawn.append(noise) or original(m, noise, *a))
    assert figure2.main([str(run), "--n", "4", "--temperature", "0.5", "--out", str(tmp_path / "f.png")]) == 0
    torch.testing.assert_close(drawn[0], model.base_noise(4, generator=torch.Generator().manual_seed(0),
                                                          temperature=0.5))
