"""One contract for every kind of model the tool builds: shapes, gradients reach every
parameter, ``inverse(forward(x)) ≈ x``, ``log_prob`` against a brute-force ``slogdet``
of the autograd Jacobian, and a strict state-dict round trip."""

from __future__ import annotations

import math

import pytest
import torch

from cnf.data import make_data
from cnf.divergence import Exact
from cnf_prune.build import build_model, compact_model
from cnf_prune.config import load_config
from helpers import prune

TINY = ["solver.rtol=1e-7", "solver.atol=1e-7", "train.batch_size=16", "data.val_size=16", "data.test_size=16"]

KINDS = {
    "toy MLP": ["model.hidden_dims=[8,8]", "model.num_blocks=2"],
    "gated (L0)": ["model.hidden_dims=[8,8]", "regularization.l0=0.01"],
    "gated (PathReg)": ["model.hidden_dims=[8,8]", "regularization.pathreg=0.01"],
    "pruned": ["model.hidden_dims=[8,8]", "pruning.method=snip", "pruning.sparsity=0.5"],
    "unit-pruned, compacted": ["model.hidden_dims=[8,8]", "pruning.method=magnitude", "pruning.sparsity=0.5",
                               "pruning.granularity=unit", "pruning.scope=layer"],
    "multiscale conv": ["data.name=synthetic8", "data.downsample=2", "model.hidden_dims=[4]", "model.scales=2",
                        "model.layer_type=concat", "model.nonlinearity=softplus"],
    "mixture base": ["model.hidden_dims=[8,8]", "model.base_components=2"],
}


def built(kind: str):
    config = load_config("configs/toy.yaml", [*TINY, *KINDS[kind]])
    torch.manual_seed(0)
    data = make_data(config.data, config.seed)
    model = build_model(config, data.event_shape).double()
    if config.pruning.method != "none":
        prune(model, data, config)
    if config.pruning.granularity == "unit":
        model, config = compact_model(model, config)
    if config.model.base_components:
        with torch.no_grad():  # a fixed, non-trivial mixture
            model.base.means.copy_(torch.tensor([[-1.0, 0.5], [1.0, -0.5]], dtype=torch.float64))
    return model, config


def points(model, n: int) -> torch.Tensor:
    return torch.randn(n, *model.event_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.fixture(params=list(KINDS), ids=str)
def kind(request):
    return request.param


def test_shapes_and_inverse(kind):
    model, _ = built(kind)
    model.eval()
    x = points(model, 5)
    with torch.no_grad():
        z, logdet = model(x)
        back, inv_logdet = model.inverse(z)
    assert z.shape == x.shape and logdet.shape == (5,) and model.log_prob(x).shape == (5,)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inv_logdet, -logdet, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter(kind):
    model, _ = built(kind)
    model.train()
    model.log_prob(points(model, 4)).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, missing


def test_log_prob_is_the_brute_force_change_of_variables(kind):
    """log p(x) = log p_base(z) + log|det ∂z/∂x| with the determinant of the full
    autograd Jacobian (exact divergence in eval mode, tight tolerances)."""
    model, _ = built(kind)
    model.eval()
    for block in model.blocks:
        block.test_divergence = Exact()  # the exact trace, whatever the training estimator
    x = points(model, 2)
    flat = math.prod(model.event_shape)
    for xi in x:
        def forward(v):
            return model(v.reshape(1, *model.event_shape))[0].reshape(flat)

        jac = torch.autograd.functional.jacobian(forward, xi.reshape(flat))
        z = forward(xi.reshape(flat)).reshape(1, *model.event_shape)
        expected = model.base.log_prob(z) + torch.linalg.slogdet(jac)[1]
        with torch.no_grad():
            torch.testing.assert_close(model.log_prob(xi[None]), expected, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_is_strict(kind):
    model, config = built(kind)
    fresh = build_model(config, model.event_shape).double()
    fresh.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    fresh.eval()
    x = points(model, 3)
    with torch.no_grad():
        torch.testing.assert_close(fresh.log_prob(x), model.log_prob(x))
