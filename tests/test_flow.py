import math

import pytest
import torch

from cnf.divergence import Exact, Hutchinson
from cnf_prune.evaluate import evaluate
from cnf.fields import MLPField
from cnf.flow import Flow
from cnf.odeblock import CNFBlock
from cnf.solver import Solver
from helpers import LinearField, count_calls
from pruning.gates import HardConcreteGates

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


# --- RNODE penalties, step control, gates ----------------------------------------


def test_rnode_penalties_of_a_diagonal_linear_field_are_closed_form(float64):
    """For ``f = A z`` with ``A = diag(a)``, ``z(t) = e^{at} x``:
    kinetic ``∫_0^T ‖f‖² dt = Σ_i a_i x_i² (e^{2 a_i T} − 1) / 2`` and
    Frobenius ``∫_0^T ‖A‖_F² dt = T ‖a‖²`` (exact divergence, training mode)."""
    T = 0.6
    a = torch.tensor([0.9, -0.5, 0.3])
    block = CNFBlock(LinearField(torch.diag(a)), end_time=T, solver=TIGHT, kinetic=True, jacobian_frobenius=True)
    flow = Flow([block], event_shape=(3,)).train()
    x = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.5]])
    trace = flow.trace(x)
    kinetic = (a * x.pow(2) * torch.expm1(2 * a * T) / 2).sum(1)
    torch.testing.assert_close(trace.kinetic, kinetic, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(trace.jac_frobenius, torch.full((2,), T * a.pow(2).sum().item()), rtol=1e-8, atol=1e-10)


def test_rnode_penalties_do_not_change_the_adaptive_steps(float64):
    """Only (z, Δ) control the step size: integrating the kinetic and Frobenius
    penalties alongside (‖f‖² grows like e^{2λt}, faster than z) leaves the NFE
    and the solution unchanged."""
    a = torch.tensor([[0.9, 0.4, 0.0], [-0.3, -0.5, 0.2], [0.1, 0.0, 0.3]])
    x = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.5]])
    traces = []
    for penalties in (False, True):
        block = CNFBlock(LinearField(a), end_time=1.0, solver=Solver(rtol=1e-7, atol=1e-7, adjoint=False),
                         kinetic=penalties, jacobian_frobenius=penalties)
        with torch.no_grad():
            traces.append(Flow([block], (3,)).train().trace(x))
    plain, penalized = traces
    assert penalized.kinetic is not None and plain.kinetic is None
    assert penalized.nfe_forward == plain.nfe_forward
    torch.testing.assert_close(penalized.out, plain.out, rtol=0, atol=1e-12)
    torch.testing.assert_close(penalized.logabsdet, plain.logabsdet, rtol=0, atol=1e-12)


def test_rnode_penalties_are_training_only(a_matrix):
    block = CNFBlock(LinearField(a_matrix), end_time=0.5, solver=TIGHT, kinetic=True, jacobian_frobenius=True)
    flow = Flow([block], event_shape=(3,)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    assert flow.train().trace(x).kinetic is not None
    trace = flow.eval().trace(x)
    assert trace.kinetic is None and trace.jac_frobenius is None


def test_gated_solve_uses_masked_weights(float64):
    """With gates *and* a mask, a pruned entry stays out of the solve: its raw
    value changes neither the output nor gets a gradient."""
    torch.manual_seed(0)
    field = MLPField(2, [6], nonlinearity="tanh")
    gates = HardConcreteGates({n: p.shape for n, p in field.prunable_weights().items()}).eval()
    block = CNFBlock(field, end_time=0.5, solver=Solver(method="rk4", step_size=0.25, adjoint=False), gates=gates)
    first = field.layers[0]
    first.weight_mask[0, :] = 0.0
    x = torch.randn(5, 2)
    before = block(x).z
    with torch.no_grad():
        first.weight[0, :] = 100.0
    out = block(x)
    torch.testing.assert_close(out.z, before, rtol=0, atol=0)
    out.z.pow(2).sum().backward()
    assert torch.equal(first.weight.grad[0], torch.zeros(2))
    assert first.weight.grad[1:].abs().sum() > 0


# --- flow composition and base noise -----------------------------------------------


def test_two_non_commuting_blocks_compose_in_order_and_invert(float64):
    """Forward is ``e^{A2 T} e^{A1 T} x``; the inverse runs the blocks in reverse
    order and recovers ``x``."""
    T = 0.7
    a1 = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    a2 = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    flow = Flow([CNFBlock(LinearField(a), end_time=T, solver=TIGHT) for a in (a1, a2)], (2,))
    x = torch.tensor([[1.0, 2.0], [-0.5, 0.3], [2.0, -1.0]])
    m = torch.linalg.matrix_exp(a2 * T) @ torch.linalg.matrix_exp(a1 * T)
    z, _ = flow(x)
    torch.testing.assert_close(z, x @ m.T, rtol=1e-8, atol=1e-8)
    x_back, _ = flow.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(flow.trace(z, reverse=True, density=False).out, x, rtol=1e-8, atol=1e-8)


def test_base_noise_is_temperature_times_standard_normal(a_matrix):
    flow = linear_flow(a_matrix, 0.5)
    noise = flow.base_noise(6, generator=torch.Generator().manual_seed(3), temperature=0.5)
    expected = 0.5 * torch.randn(6, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(noise, expected)


# --- evaluate --------------------------------------------------------------------


def test_evaluate_nfe_is_per_solve_whatever_the_batch_size(a_matrix):
    """With a fixed-step solver every solve takes the same NFE, so the mean NFE per
    example is that NFE for any batching (10 examples in batches of 3 or 7)."""
    flow = linear_flow(a_matrix, 1.0, solver=Solver(method="rk4", step_size=0.25, adjoint=False))
    data = torch.randn(10, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    per_solve = flow.eval().trace(data[:2]).nfe_forward
    assert per_solve == 16  # 4 rk4 steps of 4 evaluations
    for batch_size in (3, 7, 10):
        assert evaluate(flow, data, batch_size=batch_size).nfe == per_solve


def test_evaluate_jac_norm_is_T_times_frobenius_over_uneven_batches(a_matrix):
    T = 0.6
    flow = linear_flow(a_matrix, T)
    data = torch.randn(10, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = evaluate(flow, data, batch_size=4)
    assert result.jac_norm == pytest.approx(T * torch.linalg.matrix_norm(a_matrix).item(), rel=1e-8)


@pytest.mark.parametrize("training", [False, True])
def test_evaluate_restores_the_mode_it_found(training, a_matrix):
    flow = linear_flow(a_matrix, 0.5, solver=Solver(method="rk4", step_size=0.25, adjoint=False))
    flow.train(training)
    evaluate(flow, torch.randn(4, 3, dtype=torch.float64))
    assert flow.training is training
    assert all(m.training is training for m in flow.modules())


def test_one_hutchinson_probe_per_sample_for_the_whole_solve(float64):
    """FFJORD draws ε once per sample and keeps it along the trajectory. For ``f = A z``
    the estimate ``εᵀ A ε`` is then constant in t, so each sample's log-determinant is
    exactly ``T εᵀ A ε`` for one Rademacher probe, and its R is ``T ‖A ε‖`` for the same
    probe (a probe redrawn at each evaluation would average several of these values)."""
    T = 0.7
    a = torch.tensor([[0.3, 0.8], [-0.5, 0.1]])
    # the integrands are constant in t for a fixed probe: rk4 integrates them exactly
    flow = linear_flow(a, T, divergence=Hutchinson("rademacher"), solver=Solver(method="rk4", step_size=0.1))
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.manual_seed(0)
    trace = flow.trace(x)
    probes = torch.tensor([[1.0, 1.0], [1.0, -1.0]])  # ±ε give the same values
    logdets = T * ((probes @ a.T) * probes).sum(1)
    norms = T * torch.linalg.vector_norm(probes @ a.T, dim=1)
    assert (logdets[0] - logdets[1]).abs() > 0.1 and (norms[0] - norms[1]).abs() > 0.1
    which = (trace.logabsdet[:, None] - logdets).abs().argmin(1)
    torch.testing.assert_close(trace.logabsdet, logdets[which], rtol=0, atol=1e-8)
    torch.testing.assert_close(trace.jac_norm, norms[which], rtol=0, atol=1e-8)
    assert set(which.tolist()) == {0, 1}  # both probes occur in the batch
