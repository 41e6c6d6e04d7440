import math

import pytest
import torch
import torch.nn.functional as F

from cnf.activations import ACTIVATIONS, Swish, make_activation
from cnf.conv import ConcatConv2d, ConcatSquashConv2d
from cnf.divergence import Exact, make_divergence
from cnf.errors import ConfigError
from cnf.fields import LayeredField, MLPField
from cnf.layers import ConcatLinear, ConcatSquashLinear


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_derivative_matches_autograd(name, float64):
    act = make_activation(name)
    x = torch.linspace(-3, 3, 41, requires_grad=True)
    y, slope = act(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(slope, grad)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_value_is_the_forward_without_the_derivative(name, float64):
    act = make_activation(name)
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(act.value(x), act(x)[0])


def test_swish_parameters_are_not_shared():
    field = MLPField(2, [4, 4, 4], nonlinearity="swish")
    betas = [m.beta for m in field.activations]
    assert len({id(b) for b in betas}) == 3


@pytest.mark.parametrize("layer_type", ["concat", "concatsquash"])
@pytest.mark.parametrize("nonlinearity", sorted(ACTIVATIONS))
def test_exact_jacobian_and_divergence_match_autograd(layer_type, nonlinearity, float64):
    torch.manual_seed(0)
    field = MLPField(3, [7, 5], layer_type=layer_type, nonlinearity=nonlinearity)
    z = torch.randn(4, 3)
    t = torch.tensor(0.37)
    est = Exact()
    v = est.tangents(z)
    f, jv = field(t, z, v)
    div, fro_sq = est.reduce(v, jv)
    for i in range(z.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda y: field(t, y[None])[0][0], z[i])
        torch.testing.assert_close(jv[i].T, jac)  # row k of jv is J e_k
        torch.testing.assert_close(div[i], jac.trace())
        torch.testing.assert_close(fro_sq[i], jac.pow(2).sum())
    torch.testing.assert_close(f, field(t, z)[0])


@pytest.mark.parametrize("layer_type", ["concat", "concatsquash"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "softplus"])
@pytest.mark.parametrize("tangents", ["exact", 1, 3])
def test_paired_mlp_field_equals_the_layer_by_layer_field(layer_type, nonlinearity, tangents, float64):
    # With tangents and one time for the batch, an MLP field runs z and its tangents as
    # one stacked batch in one autograd node with a hand-written backward: values, J v,
    # first derivatives (z, t, effective weights, every parameter) and second
    # derivatives must be those of the layer-by-layer forward.
    torch.manual_seed(5)
    field = MLPField(3, [6, 5, 4], layer_type=layer_type, nonlinearity=nonlinearity)
    assert field._paired == nonlinearity
    field.layers[1].weight_mask[0, :2] = 0.0  # a pruned weight
    z = torch.randn(4, 3, requires_grad=True)
    t = torch.tensor(0.45, requires_grad=True)
    v = Exact().tangents(z) if tangents == "exact" else torch.randn(4, tangents, 3)
    masked = field.masked_weights()
    weights = {name: w.detach().requires_grad_() for name, w in masked.items()}
    paired = field(t, z, v, field.solve_inputs(weights))
    layered = LayeredField.forward(field, t, z, v, weights)
    torch.testing.assert_close(paired, layered)
    wrt = (z, t, *weights.values(), *field.parameters())
    g = (torch.randn_like(paired[0]), torch.randn_like(paired[1]))
    expected = torch.autograd.grad(layered, wrt, g, create_graph=True, allow_unused=True)
    used = [i for i, e in enumerate(expected) if e is not None]  # layer weights enter via `weights`
    expected = [expected[i] for i in used]
    # the hand-written backward (first derivatives only) ...
    fast = torch.autograd.grad(paired, wrt, g, allow_unused=True)
    assert [i for i, d in enumerate(fast) if d is not None] == used
    torch.testing.assert_close([fast[i] for i in used], expected)
    # ... and the differentiable one, taken when a graph of the gradient is built
    paired = field(t, z, v, field.solve_inputs(weights))
    first = torch.autograd.grad(paired, wrt, g, create_graph=True, allow_unused=True)
    first = [first[i] for i in used]
    torch.testing.assert_close(first, expected)
    probe = [torch.randn_like(x) for x in expected]

    def second(grads):  # d/d(wrt) of sum_i <grads_i, probe_i>
        pairs = [(x, p) for x, p in zip(grads, probe) if x.requires_grad]
        out = torch.autograd.grad([x for x, _ in pairs], wrt, [p for _, p in pairs], retain_graph=True,
                                  allow_unused=True)
        return [torch.zeros_like(w) if d is None else d for d, w in zip(out, wrt)]

    torch.testing.assert_close(second(first), second(expected))


def test_paired_mlp_field_applies_to_its_layers_and_nonlinearities_only():
    assert MLPField(2, [4], nonlinearity="swish")._paired is None
    assert MLPField(2, [4], nonlinearity="elu")._paired is None
    assert MLPField(2, [4], layer_type="concat", nonlinearity="softplus")._paired == "softplus"
    # times per example (flow matching) take the layer-by-layer forward, with the same result
    field = MLPField(2, [4, 4])
    z, v, t = torch.randn(3, 2), torch.randn(3, 1, 2), torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(field(t, z, v), LayeredField.forward(field, t, z, v, None))


def test_masked_weights_enter_the_field(float64):
    field = MLPField(2, [4])
    z, t = torch.randn(3, 2), torch.tensor(0.0)
    before = field(t, z)[0]
    field.layers[0].weight_mask.zero_()
    after = field(t, z)[0]
    assert not torch.allclose(before, after)
    # with the first layer fully masked, f no longer depends on z
    torch.testing.assert_close(after[0], field(t, torch.randn(3, 2))[0][0])


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="valid: elu, softplus, swish, tanh"):
        make_activation("relu6")
    with pytest.raises(ConfigError, match="concat"):
        MLPField(2, [4], layer_type="hyper")
    with pytest.raises(ConfigError, match="exact, hutchinson"):
        make_divergence("trace")


# --- closed forms of the time-conditioned layers and of swish ----------------------


def _set_layer_params(layer, **values):
    with torch.no_grad():
        for name, value in values.items():
            getattr(layer, name).copy_(value)


@pytest.mark.parametrize("t", [0.3, 1.7])
def test_concat_linear_is_closed_form_in_t(t, float64):
    """``y = W x + b + t w_t`` at two times (a layer ignoring t, or using it
    twice, is off at one of them); ``∂y/∂t = w_t``."""
    layer = ConcatLinear(3, 2)
    w = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]])
    b, wt = torch.tensor([0.1, -0.4]), torch.tensor([0.8, -1.3])
    _set_layer_params(layer, weight=w, bias=b, time_weight=wt)
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, -0.5, 3.0]])
    tt = torch.tensor(t, requires_grad=True)
    y, _ = layer(tt, x, None, layer.masked_weight())
    torch.testing.assert_close(y, x @ w.T + b + t * wt)
    (dy_dt,) = torch.autograd.grad(y.sum(), tt)
    torch.testing.assert_close(dy_dt, 2 * wt.sum())


@pytest.mark.parametrize("t", [0.3, 1.7])
def test_concatsquash_linear_is_closed_form_in_t(t, float64):
    """``y = (W x + b) σ(a t + c) + d t`` at two times, and
    ``∂y/∂t = (W x + b) σ'(a t + c) a + d`` by autograd."""
    layer = ConcatSquashLinear(3, 2)
    w = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]])
    b, a = torch.tensor([0.1, -0.4]), torch.tensor([0.9, -1.2])
    c, d = torch.tensor([0.2, 0.6]), torch.tensor([0.7, -1.1])
    _set_layer_params(layer, weight=w, bias=b, gate_weight=a, gate_bias=c, time_bias=d)
    x = torch.tensor([[1.0, 2.0, -1.0], [0.5, -0.5, 3.0]])
    tt = torch.tensor(t, requires_grad=True)
    y, _ = layer(tt, x, None, layer.masked_weight())
    pre, g = x @ w.T + b, torch.sigmoid(a * t + c)
    torch.testing.assert_close(y, pre * g + d * t)
    (dy_dt,) = torch.autograd.grad(y.sum(), tt)
    torch.testing.assert_close(dy_dt, (pre * g * (1 - g) * a + d).sum())


@pytest.mark.parametrize("t", [0.3, 1.7])
def test_concatsquash_conv_is_closed_form_in_t(t, float64):
    """``y = conv(x; W, b) σ(a t + c) + d t`` per output channel at two times."""
    g = torch.Generator().manual_seed(0)
    layer = ConcatSquashConv2d(2, 3)
    a, c, d = torch.tensor([0.9, -1.2, 0.4]), torch.tensor([0.2, 0.6, -0.3]), torch.tensor([0.7, -1.1, 0.5])
    _set_layer_params(layer, gate_weight=a, gate_bias=c, time_bias=d)
    x = torch.randn(2, 2, 4, 4, generator=g)
    y, _ = layer(torch.tensor(t), x, None, layer.masked_weight())
    conv = F.conv2d(x, layer.weight, layer.bias, padding=1)
    expected = conv * torch.sigmoid(a * t + c).view(1, 3, 1, 1) + (d * t).view(1, 3, 1, 1)
    torch.testing.assert_close(y, expected)


def test_concat_conv_init_bound_counts_the_time_channel():
    """FFJORD's ConcatConv2d convolves ``[t, x]``: the default init bound is
    ``1/√((in + 1) k²)``, and a wide layer's weights fill it."""
    torch.manual_seed(0)
    layer = ConcatConv2d(2, 128, kernel_size=3)
    bound = 1.0 / math.sqrt((2 + 1) * 9)
    for p in (layer.weight, layer.time_weight):
        assert p.abs().max() <= bound
        assert p.abs().max() >= 0.98 * bound  # 2304 (weight) / 1152 draws: close to the edge
    assert layer.bias.abs().max() <= bound


@pytest.mark.parametrize("beta", [0.3, 1.7])
def test_swish_with_beta_is_x_sigmoid_beta_x(beta, float64):
    """``y = x σ(βx)`` and ``y' = σ(βx) + βx σ(βx)(1 − σ(βx))`` (= autograd) for β ≠ 1."""
    act = Swish(beta)
    x = torch.linspace(-4, 4, 33, requires_grad=True)
    y, slope = act(x)
    torch.testing.assert_close(y, x * torch.sigmoid(beta * x))
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(slope, grad)
    s = torch.sigmoid(beta * x)
    torch.testing.assert_close(slope, s + beta * x * s * (1 - s))
