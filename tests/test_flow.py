import math

import pytest
import torch

from cnf.divergence import Exact, Hutchinson
from cnf.evaluate import evaluate
from cnf.fields import MLPField
from cnf.flow import Flow
from cnf.odeblock import CNFBlock
from cnf.solver import Solver
from helpers import LinearField, count_calls

TIGHT = Solver(method="dopri5", rtol=1e-10, atol=1e-10, adjoint=False)


def linear_flow(a: torch.Tensor, end_time: float, divergence=Exact(), solver=TIGHT) -> Flow:
    block = CNFBlock(LinearField(a), end_time=end_time, divergence=divergence, solver=solver)
    return Flow([block], event_shape=(a.shape[0],)).double()


@pytest.fixture
def a_matrix(float64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.7


def test_linear_log_prob_is_closed_form_gaussian(a_matrix):
    T = 0.8
    flow = linear_flow(a_matrix, T)
    x = torch.randn(16, 3, dtype=torch.float64)
    m = torch.linalg.matrix_exp(-a_matrix * T)  # x = M z with z ~ N(0, I)
    expected = torch.distributions.MultivariateNormal(
        torch.zeros(3, dtype=torch.float64), covariance_matrix=m @ m.T
    ).log_prob(x)
    torch.testing.assert_close(flow.log_prob(x), expected, rtol=1e-7, atol=1e-7)


def test_linear_latent_and_logdet(a_matrix):
    T = 0.5
    flow = linear_flow(a_matrix, T)
    x = torch.randn(8, 3, dtype=torch.float64)
    z, logdet = flow(x)
    torch.testing.assert_close(z, x @ torch.linalg.matrix_exp(a_matrix * T).T, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(logdet, torch.full((8,), T * a_matrix.trace().item(), dtype=torch.float64))


def test_linear_cumulative_jacobian_norm_is_T_times_frobenius(a_matrix):
    T = 0.7
    trace = linear_flow(a_matrix, T).trace(torch.randn(5, 3, dtype=torch.float64))
    expected = T * torch.linalg.matrix_norm(a_matrix).item()
    torch.testing.assert_close(trace.jac_norm, torch.full((5,), expected, dtype=torch.float64))


def test_linear_inverse_recovers_input(a_matrix):
    flow = linear_flow(a_matrix, 1.0)
    x = torch.randn(8, 3, dtype=torch.float64)
    z, ld = flow(x)
    x_back, ld_back = flow.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(ld_back, -ld, rtol=1e-8, atol=1e-8)


def test_reverse_jac_norm_is_positive(a_matrix):
    flow = linear_flow(a_matrix, 0.5)
    trace = flow.trace(torch.randn(4, 3, dtype=torch.float64), reverse=True)
    assert (trace.jac_norm > 0).all()


def test_hutchinson_is_unbiased_two_sided():
    torch.manual_seed(0)
    field = MLPField(4, [16, 16], nonlinearity="softplus").double()
    z = torch.randn(1, 4, dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda y: field(t, y)[0], z).reshape(4, 4)
    exact_div, exact_fro = jac.trace(), jac.pow(2).sum()
    for noise in ("gaussian", "rademacher"):
        est = Hutchinson(noise)
        zz = z.expand(20000, 4)
        v = est.tangents(zz)
        div, fro_sq = est.reduce(v, field(t, zz, v)[1])
        for sample, exact in ((div, exact_div), (fro_sq, exact_fro)):
            se = sample.std() / math.sqrt(sample.numel())
            assert abs(sample.mean() - exact) <= 5 * se, (noise, sample.mean(), exact)
            assert se < 0.05 * exact.abs() + 1e-3  # the test has power


def test_nfe_counts_match_vector_field_calls():
    torch.manual_seed(0)
    field = MLPField(2, [8], nonlinearity="tanh")
    calls = count_calls(field)
    flow = Flow([CNFBlock(field, end_time=1.0, solver=Solver(rtol=1e-5, atol=1e-5, adjoint=True))], (2,))
    trace = flow.trace(torch.randn(10, 2))
    assert trace.nfe_forward == calls[0] > 0
    before = calls[0]
    (trace.out.sum() + trace.logabsdet.sum()).backward()
    assert trace.nfe_backward == calls[0] - before > 0
    assert trace.nfe_forward == before


@pytest.mark.parametrize("divergence", [Exact(), Hutchinson("rademacher")])
def test_sampling_without_density_takes_the_same_path_without_tangents(divergence):
    """``density=False`` integrates z alone: with a fixed-step solver the result is
    the full solve's z, the field never sees a tangent, and nothing else is made."""
    torch.manual_seed(0)
    field = MLPField(2, [8, 8], nonlinearity="tanh")
    flow = Flow([CNFBlock(field, end_time=0.7, divergence=divergence,
                          solver=Solver(method="rk4", step_size=0.1, adjoint=False))], (2,))
    z = torch.randn(16, 2)
    full = flow.trace(z, reverse=True)
    seen, inner = [], field.forward

    def recording(t, x, tangents=None, weights=None):
        seen.append(tangents)
        return inner(t, x, tangents, weights)

    field.forward = recording
    light = flow.trace(z, reverse=True, density=False)
    torch.testing.assert_close(light.out, full.out, rtol=0, atol=1e-6)
    assert light.nfe_forward == full.nfe_forward == len(seen) == 28 and all(v is None for v in seen)
    assert light.logabsdet is None and light.jac_norm is None and light.kinetic is None
    assert flow.sample(16, temperature=0.5).shape == (16, 2)


def test_adaptive_sampling_without_density_lands_within_tolerance(a_matrix):
    """With dopri5 only z controls the steps; the end point is still exp(-T A) z."""
    T = 0.8
    flow = linear_flow(a_matrix, T, solver=Solver(method="dopri5", rtol=1e-8, atol=1e-8, adjoint=False))
    z = torch.randn(5, 3, dtype=torch.float64)
    x = flow.trace(z, reverse=True, density=False).out
    torch.testing.assert_close(x, z @ torch.linalg.matrix_exp(-T * a_matrix).T, rtol=1e-6, atol=1e-6)


def test_gradients_through_samples_alone_agree_between_adjoint_and_backprop(float64):
    """Differentiating samples (for example a reverse-KL objective) works on the
    z-only solve, with the adjoint as with direct backpropagation."""
    grads = []
    for adjoint in (True, False):
        torch.manual_seed(0)
        field = MLPField(2, [8], nonlinearity="tanh").double()
        solver = Solver(rtol=1e-10, atol=1e-10, adjoint=adjoint)
        flow = Flow([CNFBlock(field, end_time=0.5, train_end_time=True, solver=solver)], (2,)).double()
        x = flow.trace(torch.randn(5, 2, dtype=torch.float64), reverse=True, density=False).out
        x.pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in flow.named_parameters()})
    for name in grads[0]:
        assert grads[0][name].abs().sum() > 0, name
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.parametrize("adjoint", [True, False])
def test_every_parameter_receives_a_gradient(adjoint):
    torch.manual_seed(0)
    blocks = [
        CNFBlock(
            MLPField(2, [8, 8], layer_type=lt, nonlinearity="swish"),
            end_time=0.5, train_end_time=True,
            solver=Solver(rtol=1e-4, atol=1e-4, adjoint=adjoint),
        )
        for lt in ("concat", "concatsquash")
    ]
    flow = Flow(blocks, (2,))
    flow.log_prob(torch.randn(6, 2)).mean().backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_adjoint_gradients_match_direct_backprop(float64):
    torch.manual_seed(0)
    field = MLPField(2, [8, 8], nonlinearity="tanh").double()
    grads = []
    for adjoint in (True, False):
        solver = Solver(rtol=1e-10, atol=1e-10, adjoint=adjoint)
        flow = Flow([CNFBlock(field, end_time=0.7, train_end_time=True, solver=solver)], (2,)).double()
        flow.zero_grad()
        x = torch.linspace(-1, 1, 12, dtype=torch.float64).view(6, 2)
        flow.log_prob(x).sum().backward()
        grads.append({n: p.grad.clone() for n, p in flow.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_evaluation_with_hutchinson_probes_is_repeatable_and_leaves_the_rng_alone(a_matrix):
    """A stochastic test divergence is evaluated on the same probes every time
    (validations of one model agree, and models are compared on the same noise)."""
    flow = linear_flow(a_matrix, 0.8, divergence=Hutchinson("rademacher"))
    data = torch.randn(64, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        before = torch.get_rng_state()
        results.append(evaluate(flow, data, batch_size=16))
        assert torch.equal(torch.get_rng_state(), before)
    assert results[0] == results[1]
    exact = evaluate(linear_flow(a_matrix, 0.8), data)
    assert results[0].nll != exact.nll  # the probes are random: the estimate is not the exact one
    assert results[0].nll == pytest.approx(exact.nll, abs=0.5)
