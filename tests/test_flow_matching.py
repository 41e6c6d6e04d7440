import itertools
import math

import numpy as np
import pytest
import torch

from cnf.conv import ConvField
from cnf.divergence import Exact
from cnf.errors import ConfigError
from cnf.fields import MLPField, VectorField
from cnf.flow import Flow
from cnf.flow_matching import (
    StraightPath,
    evaluate_field,
    flow_matching_loss,
    gaussian_minimal_loss,
    gaussian_optimal_field,
    minibatch_ot_coupling,
    sample_times,
)
from cnf.odeblock import CNFBlock
from cnf.solver import Solver
from cnf.toy import sample_toy


class GaussianOptimalField(VectorField):
    """``u*(t, y) = A(t) y + c(t)`` of :func:`gaussian_optimal_field`, plus an optional
    fixed perturbation ``ε (E y + e)``; ``J = A(t) + ε E``."""

    def __init__(self, path, mean, cov, *, direction=None, offset=None, eps=0.0):
        super().__init__()
        self.path, self.mean, self.cov, self.eps = path, mean, cov, eps
        d = mean.shape[0]
        self.direction = torch.zeros(d, d, dtype=mean.dtype) if direction is None else direction
        self.offset = torch.zeros(d, dtype=mean.dtype) if offset is None else offset
        self.event_shape = (d,)

    def forward(self, t, z, tangents=None, weights=None):
        a, c = gaussian_optimal_field(self.path, self.mean, self.cov, t)
        a = a + self.eps * self.direction
        f = z @ a.mT + c + self.eps * self.offset
        return f, (None if tangents is None else tangents @ a.mT)


def _gaussian(d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    root = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = root @ root.T / d + 0.3 * torch.eye(d, dtype=torch.float64)
    return mean, cov


def _draw(mean, cov, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = mean + torch.randn(n, len(mean), generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    return x, torch.randn(n, len(mean), generator=g, dtype=torch.float64)


# --- the path --------------------------------------------------------------------------


@pytest.mark.parametrize("end_time", [1.0, 0.5])
@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
def test_path_ends_at_data_and_base(end_time, sigma_min, float64):
    """``x_0 = x + σ_min z`` and ``x_T = z`` exactly."""
    path = StraightPath(end_time, sigma_min)
    x, z = torch.randn(5, 3), torch.randn(5, 3)
    torch.testing.assert_close(path.sample(x, z, torch.zeros(5)), x + sigma_min * z)
    torch.testing.assert_close(path.sample(x, z, torch.full((5,), end_time)), z)


@pytest.mark.parametrize("end_time", [1.0, 0.5, 2.0])
def test_target_velocity_is_the_time_derivative_of_the_path(end_time, float64):
    """``u_t = d x_t / dt`` by central differences, on images too; it scales with ``1/T``."""
    path = StraightPath(end_time, sigma_min=0.05)
    x, z = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    t, h = torch.rand(4) * end_time, 1e-6
    fd = (path.sample(x, z, t + h) - path.sample(x, z, t - h)) / (2 * h)
    torch.testing.assert_close(path.velocity(x, z, t), fd)
    torch.testing.assert_close(path.velocity(x, z, t), ((1 - 0.05) * z - x) / end_time)


def test_scalar_time_broadcasts_and_wrong_shapes_raise(float64):
    path = StraightPath()
    x, z = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(path.sample(x, z, torch.tensor(0.3)), path.sample(x, z, torch.full((4,), 0.3)))
    with pytest.raises(ValueError, match="batch of 4"):
        path.sample(x, z, torch.rand(3))
    with pytest.raises(ValueError, match="same shape"):
        flow_matching_loss(MLPField(3, [4]), x, torch.randn(4, 2), torch.rand(4))
    with pytest.raises(ConfigError, match="sigma_min"):
        StraightPath(sigma_min=1.0)
    with pytest.raises(ConfigError, match="end_time"):
        StraightPath(end_time=0.0)


def test_sample_times_are_uniform_on_zero_to_t_and_seeded():
    t = sample_times(20000, 0.5, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 0.5
    assert abs(t.mean().item() - 0.25) < 5 * 0.5 / math.sqrt(12 * 20000)
    again = sample_times(20000, 0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t, again)


# --- the coupling ----------------------------------------------------------------------


def _cost(x, z):
    return (x - z).pow(2).flatten(1).sum(1).sum().item()


@pytest.mark.parametrize("shape", [(64, 3), (32, 1, 3, 3)])
def test_ot_coupling_is_a_permutation_that_lowers_the_cost(shape, float64):
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(shape, generator=g) + 1.0, torch.randn(shape, generator=g)
    perm = minibatch_ot_coupling(x, z)
    assert perm.dtype == torch.long and sorted(perm.tolist()) == list(range(shape[0]))
    best = _cost(x, z[perm])
    assert best <= _cost(x, z)
    for _ in range(100):
        assert best <= _cost(x, z[torch.randperm(shape[0], generator=g)])


def test_ot_coupling_is_the_exact_optimum_on_a_small_batch(float64):
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    brute = min(_cost(x, z[list(p)]) for p in itertools.permutations(range(6)))
    assert _cost(x, z[minibatch_ot_coupling(x, z)]) == pytest.approx(brute, rel=1e-12)
    with pytest.raises(ValueError, match="equal batches"):
        minibatch_ot_coupling(x, z[:5])


# --- the loss --------------------------------------------------------------------------


PER_EXAMPLE_FIELDS = [MLPField(2, [8, 8]), MLPField(3, [8], layer_type="concat"),
                      ConvField((1, 4, 4), [4], layer_type="concatsquash"), ConvField((2, 4, 4), [4], layer_type="concat")]


@pytest.mark.parametrize("field", PER_EXAMPLE_FIELDS)
def test_evaluate_field_uses_one_time_per_example(field, float64):
    field = field.double()
    x, t = torch.randn(5, *field.event_shape), torch.rand(5)
    loop = torch.stack([field(t[i], x[i : i + 1])[0][0] for i in range(5)])
    torch.testing.assert_close(evaluate_field(field, t, x), loop)


@pytest.mark.parametrize("field", PER_EXAMPLE_FIELDS)
def test_fields_with_one_time_per_example_give_each_examples_jacobian_products(field, float64):
    """Values and ``J v`` with times of shape ``(B,)`` equal those of one call per example
    (the one-time path folds the concatsquash gate into the weights; this one cannot)."""
    field = field.double()
    assert field.per_example_time
    x, t = torch.randn(4, *field.event_shape), torch.rand(4)
    v = torch.randn(4, 2, *field.event_shape)
    f, jv = field(t, x, v)
    for i in range(4):
        fi, jvi = field(t[i], x[i : i + 1], v[i : i + 1])
        torch.testing.assert_close(f[i], fi[0])
        torch.testing.assert_close(jv[i], jvi[0])


def test_loss_sums_over_dimensions_and_averages_over_the_batch(float64):
    """A field that is zero everywhere has loss ``mean_i ‖u_i‖²``."""
    field = MLPField(3, [4])
    with torch.no_grad():
        field.layers[-1].weight.zero_()
        field.layers[-1].bias.zero_()
        field.layers[-1].time_bias.zero_()
    path = StraightPath(0.5, 0.1)
    x, z, t = torch.randn(7, 3), torch.randn(7, 3), torch.rand(7) * 0.5
    expected = path.velocity(x, z, t).pow(2).sum(1).mean()
    torch.testing.assert_close(flow_matching_loss(field, x, z, t, path=path), expected)


def test_loss_uses_the_given_effective_weights(float64):
    """Masked weights get no gradient; an explicit ``weights`` map (e.g. with gates) is used as given."""
    field = MLPField(2, [6])
    field.layers[0].weight_mask[:3] = 0
    x, z, t = torch.randn(8, 2), torch.randn(8, 2), torch.rand(8)
    flow_matching_loss(field, x, z, t).backward()
    assert (field.layers[0].weight.grad[:3] == 0).all() and (field.layers[0].weight.grad[3:] != 0).any()
    gated = {n: 0.5 * w for n, w in field.masked_weights().items()}
    assert flow_matching_loss(field, x, z, t, weights=gated) != flow_matching_loss(field, x, z, t)


@pytest.mark.parametrize("sigma_min", [0.0, 0.2])
@pytest.mark.parametrize("s", [0.0, 0.4, 0.9])
def test_gaussian_optimal_field_attains_the_minimal_loss(s, sigma_min, float64):
    """For ``x ~ N(μ, Σ)``: at a fixed time, the Monte-Carlo loss of the closed-form
    field matches :func:`gaussian_minimal_loss` within 5 standard errors, its
    derivative along random perturbations of ``(A, c)`` is zero within 5 standard
    errors, and finite perturbations raise it by their closed-form excess."""
    end_time, n = 0.7, 100_000
    path = StraightPath(end_time, sigma_min)
    mean, cov = _gaussian()
    x, z = _draw(mean, cov, n, seed=1)
    t = torch.full((n,), s * end_time)
    optimum = GaussianOptimalField(path, mean, cov)
    residual = evaluate_field(optimum, t, path.sample(x, z, t)) - path.velocity(x, z, t)
    per_example = residual.pow(2).sum(1)
    minimal = gaussian_minimal_loss(path, mean, cov, t[0])
    se = per_example.std() / math.sqrt(n)
    assert abs(per_example.mean() - minimal) <= 5 * se
    torch.testing.assert_close(flow_matching_loss(optimum, x, z, t, path=path), per_example.mean())

    g = torch.Generator().manual_seed(2)
    y = path.sample(x, z, t)
    a, _ = gaussian_optimal_field(path, mean, cov, t[0])
    for _ in range(3):
        direction = torch.randn(3, 3, generator=g, dtype=torch.float64)
        offset = torch.randn(3, generator=g, dtype=torch.float64)
        shift = y @ direction.T + offset
        slope = 2 * (residual * shift).sum(1)  # d/dε ‖r + ε shift‖² at ε = 0
        assert abs(slope.mean()) <= 5 * slope.std() / math.sqrt(n)
        perturbed = GaussianOptimalField(path, mean, cov, direction=direction, offset=offset, eps=0.1)
        excess = flow_matching_loss(perturbed, x, z, t, path=path) - per_example.mean()
        # E‖ε (E y + e)‖² with y ~ N(a μ, S): the only change in expectation
        am, s_cov = (1 - s) * mean, (1 - s) ** 2 * cov + path.coefficients(t[0])[1] ** 2 * torch.eye(3)
        closed = 0.01 * ((direction @ am + offset).pow(2).sum() + (direction @ s_cov @ direction.T).trace())
        assert excess > 0
        assert excess.item() == pytest.approx(closed.item(), rel=0.1)


@pytest.mark.parametrize("end_time, sigma_min", [(1.0, 0.0), (0.5, 0.0), (1.0, 0.2)])
def test_cnf_of_the_gaussian_optimal_field_has_the_data_density(end_time, sigma_min, float64):
    """Integrating ``u*`` with the CNF block maps ``N(μ, Σ + σ_min² I)`` to ``N(0, I)``:
    ``log_prob`` equals that Gaussian's density, and reversed base draws have its moments."""
    path = StraightPath(end_time, sigma_min)
    mean, cov = _gaussian()
    smoothed = cov + sigma_min**2 * torch.eye(3)
    block = CNFBlock(
        GaussianOptimalField(path, mean, cov), end_time=end_time, divergence=Exact(),
        solver=Solver(method="dopri5", rtol=1e-9, atol=1e-9, adjoint=False),
    )
    flow = Flow([block], (3,))
    x, _ = _draw(mean, cov, 50, seed=3)
    expected = torch.distributions.MultivariateNormal(mean, smoothed).log_prob(x)
    torch.testing.assert_close(flow.log_prob(x), expected, rtol=1e-6, atol=1e-6)

    n = 20_000
    back = flow.trace(torch.randn(n, 3, generator=torch.Generator().manual_seed(4)), reverse=True,
                      density=False).out
    torch.testing.assert_close(back.mean(0), mean, atol=5 * smoothed.diagonal().max().sqrt() / math.sqrt(n),
                               rtol=0)
    torch.testing.assert_close(torch.cov(back.T), smoothed, atol=0.05, rtol=0.05)


# --- a short training run --------------------------------------------------------------


def eight_gaussians_log_prob(x: torch.Tensor) -> torch.Tensor:
    """The closed-form density of ``cnf.toy``'s 8gaussians: an equal mixture of
    ``N(4 (cos kπ/4, sin kπ/4) / 1.414, (0.5 / 1.414)² I)``, ``k = 0..7``."""
    angles = torch.arange(8, dtype=x.dtype) * (math.pi / 4)
    centres = 4.0 * torch.stack([angles.cos(), angles.sin()], 1) / 1.414
    std = 0.5 / 1.414
    sq = (x[:, None, :] - centres).pow(2).sum(-1)
    return (-sq / (2 * std**2) - math.log(2 * math.pi * std**2)).logsumexp(1) - math.log(8)


def test_eight_gaussians_density_is_normalized_and_fits_samples(float64):
    grid = torch.linspace(-5, 5, 401)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    p = eight_gaussians_log_prob(torch.stack([xx.flatten(), yy.flatten()], 1)).exp()
    assert p.sum().item() * (grid[1] - grid[0]).item() ** 2 == pytest.approx(1.0, abs=1e-3)
    x = torch.from_numpy(sample_toy("8gaussians", 20000, np.random.default_rng(0))).double()
    # E log p = −H ≈ −(log 8 + log(2πe σ²)) for well-separated components
    std = 0.5 / 1.414
    assert eight_gaussians_log_prob(x).mean().item() == pytest.approx(
        -(math.log(8) + math.log(2 * math.pi * math.e * std**2)), abs=0.03)


@pytest.mark.slow
def test_flow_matching_learns_eight_gaussians():
    """OT flow matching of an MLP field on 8gaussians: the CNF's mean log-likelihood of
    held-out data is within 0.3 nats of the true density's, and reversed base draws
    land on the eight modes in about equal shares."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    end_time = 1.0
    path = StraightPath(end_time, sigma_min=0.0)
    field = MLPField(2, [64, 64, 64], layer_type="concatsquash", nonlinearity="tanh")
    opt = torch.optim.Adam(field.parameters(), lr=2e-3)
    steps = 3000
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.from_numpy(sample_toy("8gaussians", 256, rng))
        z = torch.randn(256, 2, generator=g)
        z = z[minibatch_ot_coupling(x, z)]
        loss = flow_matching_loss(field, x, z, sample_times(256, end_time, generator=g), path=path)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()

    block = CNFBlock(field, end_time=end_time, divergence=Exact(),
                     solver=Solver(method="dopri5", rtol=1e-5, atol=1e-5, adjoint=False)).eval()
    flow = Flow([block], (2,))
    test = torch.from_numpy(sample_toy("8gaussians", 2000, np.random.default_rng(1)))
    with torch.no_grad():
        gap = (eight_gaussians_log_prob(test.double()) - flow.log_prob(test).double()).mean().item()
        samples = flow.trace(torch.randn(4000, 2, generator=g), reverse=True, density=False).out
    assert -0.05 < gap < 0.3
    angles = torch.arange(8) * (math.pi / 4)
    centres = 4.0 * torch.stack([angles.cos(), angles.sin()], 1) / 1.414
    dist, mode = torch.cdist(samples, centres).min(1)
    assert (dist < 3 * 0.5 / 1.414).float().mean() > 0.9
    shares = torch.bincount(mode, minlength=8) / len(mode)
    assert shares.min() > 0.08 and shares.max() < 0.17
