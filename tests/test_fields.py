import pytest
import torch

from cnf.activations import ACTIVATIONS, make_activation
from cnf.divergence import Exact, make_divergence
from cnf.errors import ConfigError
from cnf.fields import MLPField


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_derivative_matches_autograd(name, float64):
    act = make_activation(name)
    x = torch.linspace(-3, 3, 41, requires_grad=True)
    y, slope = act(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(slope, grad)


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
