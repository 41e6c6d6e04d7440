"""The adjoint (backward) solve: its gradients equal direct backpropagation's, and
its step-size control looks at the states that need it (``cnf.solver.adjoint_norm``)."""

import pytest
import torch

from cnf.conv import ConvField
from cnf.divergence import Exact, Hutchinson
from cnf.errors import ConfigError
from cnf.fields import MLPField
from cnf.flow import Flow
from cnf.odeblock import CNFBlock
from cnf.solver import Solver, adjoint_norm
from helpers import LinearField


def flow_grads(adjoint: bool, seminorm: bool, reverse: bool, penalties: bool, conv: bool = False,
               checkpoint: bool = False, nfe: list | None = None) -> dict[str, torch.Tensor]:
    """Gradients of a loss using every output of one solve (z, log-det, R, K, F) on a
    concatsquash MLP (or a concat/softplus conv field, whose evaluations read per-solve
    inputs and run z and its tangents as one batch) with a trainable end time, plus
    the input's gradient."""
    torch.manual_seed(0)
    if conv:
        field = ConvField((2, 3, 3), [3])
        x = torch.linspace(-1.0, 1.2, 36).view(2, 2, 3, 3).requires_grad_(True)
    else:
        field = MLPField(2, [8, 8], layer_type="concatsquash", nonlinearity="tanh")
        x = torch.linspace(-1.0, 1.2, 12).view(6, 2).requires_grad_(True)
    solver = Solver(rtol=1e-10, atol=1e-10, adjoint=adjoint, adjoint_seminorm=seminorm, checkpoint=checkpoint)
    block = CNFBlock(field, end_time=0.6, train_end_time=True, solver=solver,
                     kinetic=penalties, jacobian_frobenius=penalties)
    out = block(x, reverse=reverse)
    loss = out.z.pow(2).sum() + out.logabsdet.sum() + 0.3 * out.jac_norm.sum()
    if penalties:
        loss = loss + 0.1 * out.kinetic.sum() + 0.2 * out.jac_frobenius.sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters()}
    grads["x"] = x.grad.clone()
    if nfe is not None:
        nfe.append((out.nfe.forward, out.nfe.backward))
    return grads


@pytest.mark.parametrize("seminorm", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("penalties", [False, True])
@pytest.mark.parametrize("conv", [False, True])
def test_adjoint_gradients_equal_direct_backprop(seminorm, reverse, penalties, conv, float64):
    """Leaving a_t (forward solves), the parameter adjoints (seminorm) and the
    measurement states out of the backward error control keeps every gradient,
    the end time's included, in both directions."""
    adjoint = flow_grads(True, seminorm, reverse, penalties, conv)
    direct = flow_grads(False, seminorm, reverse, penalties, conv)
    assert adjoint["sqrt_end_time"].abs() > 0
    for name in direct:
        torch.testing.assert_close(adjoint[name], direct[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("penalties", [False, True])
@pytest.mark.parametrize("conv", [False, True])
def test_checkpointed_backprop_equals_direct_backprop(reverse, penalties, conv, float64):
    """Recomputing the evaluations in the backward pass (solver.checkpoint) gives
    direct backpropagation's gradients to rounding: the same forward solve, and the
    backward recomputes the evaluations the loss depends on (not the initial step's
    probe, not rejected steps)."""
    nfe: list = []
    checkpointed = flow_grads(False, False, reverse, penalties, conv, checkpoint=True, nfe=nfe)
    direct = flow_grads(False, False, reverse, penalties, conv, nfe=nfe)
    (fwd, recomputed), (fwd_direct, none) = nfe
    assert fwd == fwd_direct and none == 0
    assert 0 < recomputed < fwd
    assert checkpointed["sqrt_end_time"].abs() > 0
    for name in direct:
        torch.testing.assert_close(checkpointed[name], direct[name], rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_backprop_end_time_gradient_matches_finite_differences(method, checkpoint, float64):
    """dL/d√T by backpropagation equals the finite difference of the discrete solve,
    for a fixed grid too, whose last step ends at T (its stage times then depend on T)."""
    torch.manual_seed(0)
    field = MLPField(2, [8, 8], layer_type="concatsquash", nonlinearity="tanh")
    solver = Solver(method=method, step_size=0.1 if method == "rk4" else None, rtol=1e-10, atol=1e-10,
                    adjoint=False, checkpoint=checkpoint)
    block = CNFBlock(field, end_time=0.55, train_end_time=True, solver=solver)
    x = torch.linspace(-1.0, 1.2, 12).view(6, 2)

    def loss() -> torch.Tensor:
        out = block(x)
        return out.z.pow(2).sum() + out.logabsdet.sum() + 0.3 * out.jac_norm.sum()

    loss().backward()
    eps = 1e-6
    with torch.no_grad():
        block.sqrt_end_time += eps
        plus = loss()
        block.sqrt_end_time -= 2 * eps
        minus = loss()
        block.sqrt_end_time += eps
    torch.testing.assert_close(block.sqrt_end_time.grad, (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-8)


def test_checkpoint_needs_backprop():
    with pytest.raises(ConfigError, match="solver.adjoint: false"):
        Solver(adjoint=True, checkpoint=True)


def test_norm_reads_z_and_its_adjoint_and_what_the_gradient_needs():
    """Ratios laid out as torchdiffeq passes them: (a_t, z, Δ, R, a_z, a_Δ, a_R, a_θ)."""
    big, small = torch.full((4,), 100.0), torch.full((4,), 0.5)
    a_t, z, a_z = torch.tensor(50.0), small, torch.full((4,), 0.7)
    ratios = (a_t, z, big, big, a_z, big, big, torch.full((3,), 9.0))
    assert adjoint_norm(3, 1, start_time_grad=False, param_adjoints=False)(ratios) == pytest.approx(0.7)
    assert adjoint_norm(3, 1, start_time_grad=False, param_adjoints=True)(ratios) == pytest.approx(9.0)
    assert adjoint_norm(3, 1, start_time_grad=True, param_adjoints=True)(ratios) == pytest.approx(50.0)
    assert adjoint_norm(3, 2, start_time_grad=False, param_adjoints=False)(ratios) == pytest.approx(100.0)


@pytest.mark.parametrize("seminorm", [False, True])
def test_backward_nfe_of_a_linear_field_is_bounded_by_the_forward(seminorm, float64):
    """For ``f = A z`` the adjoint ``a' = -Aᵀ a`` is as smooth as ``z``: the backward
    solve (z back in time and a_z together) takes about the forward's steps, plus
    one evaluation at T for the end time's gradient. With the parameter adjoint
    ``a_A' = -a zᵀ`` in control it may take more, but not twice as many."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.7
    solver = Solver(rtol=1e-8, atol=1e-8, adjoint_seminorm=seminorm)
    flow = Flow([CNFBlock(LinearField(a), end_time=1.0, train_end_time=True, solver=solver)], (3,))
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    trace = flow.trace(x)
    (-(flow.base.log_prob(trace.out) + trace.logabsdet).mean()).backward()
    bound = trace.nfe_forward + 1 if seminorm else 1.5 * trace.nfe_forward
    assert 0 < trace.nfe_backward <= bound


@pytest.mark.parametrize("divergence", [Exact(), Hutchinson("rademacher")])
def test_measurement_states_leave_the_backward_steps_alone(divergence, float64):
    """Integrating R, K and F alongside (large, rough integrands whose values the
    backward solve re-integrates and discards) takes the backward solve no more
    evaluations. (Putting them in the loss does change a_z, and so the steps.)"""
    counts = []
    for penalties in (False, True):
        torch.manual_seed(0)
        field = MLPField(2, [16, 16], nonlinearity="tanh")
        block = CNFBlock(field, end_time=0.5, divergence=divergence, solver=Solver(rtol=1e-6, atol=1e-6),
                         kinetic=penalties, jacobian_frobenius=penalties)
        out = block(torch.randn(32, 2) * 2)
        (out.z.pow(2).sum() + out.logabsdet.sum()).backward()
        counts.append((out.nfe.forward, out.nfe.backward))
    assert counts[0] == counts[1]


@pytest.mark.parametrize("seminorm", [False, True])
def test_seminorm_setting_reaches_the_adjoint_solve(seminorm, monkeypatch):
    """``Solver.adjoint_seminorm`` decides whether the parameter adjoints enter the
    norm that torchdiffeq's backward solve is given."""
    import cnf.solver
    from cnf.solver import integrate

    seen = {}

    def fake_adjoint(dynamics, state, times, *, adjoint_params, adjoint_options, **kwargs):
        seen.update(adjoint_options)
        return tuple(s.unsqueeze(0) for s in state)

    monkeypatch.setattr(cnf.solver, "odeint_adjoint", fake_adjoint)
    state = (torch.zeros(2, 1), torch.zeros(2))
    integrate(Solver(adjoint=True, adjoint_seminorm=seminorm), lambda t, s: s, state, torch.tensor([0.0, 1.0]),
              [torch.zeros(3, requires_grad=True)], n_controlled=2, n_coupled=1)
    ratios = (torch.tensor(0.0), torch.zeros(2, 1), torch.zeros(2), torch.zeros(2, 1), torch.zeros(2),
              torch.full((3,), 4.0))
    assert set(seen) == {"norm"}
    assert float(seen["norm"](ratios)) == (0.0 if seminorm else 4.0)


@pytest.mark.parametrize("adjoint", [False, True])
def test_a_field_cut_off_from_its_input_gets_finite_gradients(adjoint):
    """Pruning can cut every weight out of the input layer (it did at 95% random
    sparsity): f then depends on t alone and the divergence is exactly 0, so its state's
    difference in the solver's initial-step estimate is 0. Backpropagating through that
    estimate (``adjoint: false``) must not turn sqrt's slope at 0 into NaN gradients.
    The log-determinant is 0 and z moves by ∫ f(t) dt, the same for every example."""
    torch.manual_seed(0)
    field = MLPField(2, [8, 8], layer_type="concatsquash", nonlinearity="tanh")
    with torch.no_grad():
        field.layers[0].weight.zero_()
    block = CNFBlock(field, end_time=0.5, divergence=Exact(), solver=Solver(adjoint=adjoint))
    x = torch.randn(16, 2)
    out = block(x)
    assert float(out.logabsdet.detach().abs().max()) == 0.0
    shift = (out.z - x).detach()
    torch.testing.assert_close(shift, shift[:1].expand_as(shift))
    assert float(shift.abs().max()) > 1e-3
    out.z.pow(2).sum().backward()
    grads = {n: p.grad for n, p in block.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values()), grads


def test_direct_backprop_holds_the_step_sizes_fixed(float64):
    """Backpropagating through the solver (``adjoint: false``) differentiates the steps
    taken, not the controller's choice of their sizes: with constant integration times,
    no stage time the field sees carries a gradient, as in the adjoint method."""
    torch.manual_seed(0)
    field = MLPField(2, [8], layer_type="concatsquash", nonlinearity="tanh")
    seen = []

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = field

        def forward(self, t, z, tangents=None, weights=None):
            seen.append(t.requires_grad)
            return self.inner(t, z, tangents, weights)

    recording = Recording()
    recording.event_shape = field.event_shape
    recording.masked_weights = field.masked_weights
    recording.solve_inputs = field.solve_inputs
    block = CNFBlock(recording, end_time=0.5, divergence=Exact(), solver=Solver(rtol=1e-6, atol=1e-6))
    out = block(torch.randn(8, 2))
    out.z.pow(2).sum().backward()
    assert len(seen) > 10 and not any(seen)
    assert all(torch.isfinite(p.grad).all() for p in field.parameters() if p.grad is not None)
