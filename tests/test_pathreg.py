import itertools

import pytest
import torch

from cnf_prune.build import build_model
from cnf_prune.config import from_dict
from cnf.conv import ConvField
from cnf.errors import ConfigError
from cnf.flow import Flow
from cnf.odeblock import CNFBlock
from pruning.gates import gate_factory
from pruning.pathreg import (
    gate_path_norm, path_norm, path_sparsity, pathreg, reachability, weight_path_norm,
)
from pruning.tracking import regularization_terms, sparsity_scalars


def model_with(dim=3, hidden=(4, 5), blocks=1, **regularization):
    config = from_dict({
        "model": {"hidden_dims": list(hidden), "num_blocks": blocks},
        "regularization": {"l0": 1.0, **regularization},
    })
    torch.manual_seed(0)
    model = build_model(config, (dim,)).double()
    with torch.no_grad():
        for block in model.blocks:
            for a in block.gates.log_alpha:
                a.copy_(torch.randn_like(a) * 2)
    return model


def brute_force_paths(matrices):
    """Σ over every input->output path (one index per layer boundary) of the
    product of the entries on it; conv weights also pick one kernel entry per layer."""
    sizes = [matrices[0].shape[1]] + [m.shape[0] for m in matrices]
    kernels = [list(itertools.product(*(range(k) for k in m.shape[2:]))) for m in matrices]
    total = 0.0
    for nodes in itertools.product(*(range(s) for s in sizes)):
        for taps in itertools.product(*kernels):
            prod = 1.0
            for m, (a, b), tap in zip(matrices, zip(nodes[:-1], nodes[1:]), taps):
                prod *= float(m[(b, a, *tap)])
            total += prod
    return total


def brute_force_reach(matrices):
    """(out, in) booleans: whether some path has all entries non-zero."""
    sizes = [matrices[0].shape[1]] + [m.shape[0] for m in matrices]
    reach = torch.zeros(sizes[-1], sizes[0], dtype=torch.bool)
    for nodes in itertools.product(*(range(s) for s in sizes)):
        if all((m[b, a] != 0).any() for m, a, b in zip(matrices, nodes[:-1], nodes[1:])):
            reach[nodes[-1], nodes[0]] = True
    return reach


def test_pathreg_equals_brute_force_sum_over_paths():
    model = model_with()
    block = model.blocks[0]
    masks = {n: (torch.rand_like(p) > 0.3).double() for n, p in block.field.prunable_weights().items()}
    for name, m in masks.items():
        block.field.get_buffer(f"{name}_mask").copy_(m)
    probs = [p * masks[n] for n, p in block.gates.open_probabilities().items()]
    expected = brute_force_paths([p.detach() for p in probs])
    assert pathreg(model).item() == pytest.approx(expected, rel=1e-10)
    assert gate_path_norm(block.gates).item() == pytest.approx(
        brute_force_paths([p.detach() for p in block.gates.open_probabilities().values()]), rel=1e-10
    )


def test_weight_path_norm_equals_brute_force_over_masked_weights():
    model = model_with()
    field = model.blocks[0].field
    field.layers[1].weight_mask[:, :2] = 0
    expected = brute_force_paths([w.detach().abs() for w in field.masked_weights().values()])
    assert weight_path_norm(model).item() == pytest.approx(expected, rel=1e-10)


def test_conv_weights_are_summed_over_kernel_entries():
    torch.manual_seed(0)
    weights = [torch.randn(3, 2, 3, 3), torch.randn(4, 3, 3, 3), torch.randn(2, 4, 1, 1)]
    matrices = [w.double().abs() for w in weights]
    assert path_norm(matrices).item() == pytest.approx(brute_force_paths(matrices), rel=1e-10)
    # channel reachability: a channel pair is joined when any kernel entry is non-zero,
    # even if the signed entries cancel
    sparse = [w.clone() for w in weights]
    sparse[0][:, 1] = 0  # input channel 1 feeds nothing
    sparse[1][0, 0] = torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.equal(reachability(sparse), brute_force_reach(sparse))
    assert not reachability(sparse)[:, 1].any()


def test_path_sparsity_equals_brute_force():
    torch.manual_seed(1)
    model = model_with(dim=3, hidden=(3, 3))
    with torch.no_grad():
        for a in model.blocks[0].gates.log_alpha:
            a.copy_(torch.where(torch.rand_like(a) < 0.55, -20.0, 20.0))
    weights = [w for w in model.blocks[0].gates.deterministic().values()]
    expected = brute_force_reach(weights)
    assert 0 < int(expected.sum()) < expected.numel()  # a non-trivial case
    assert path_sparsity(model) == pytest.approx(1 - expected.double().mean().item())
    assert sparsity_scalars(model)["sparsity/paths"] == pytest.approx(path_sparsity(model))


def test_closing_one_input_column_zeroes_its_paths():
    model = model_with(dim=2, hidden=(4, 4))
    with torch.no_grad():
        model.blocks[0].gates.log_alpha[0].fill_(5.0)
        model.blocks[0].gates.log_alpha[0][:, 0] = -20.0
    assert path_sparsity(model) == pytest.approx(0.5)


def test_multi_block_penalties_sum_over_blocks():
    model = model_with(blocks=2, pathreg=1.0, path_weights=1.0)
    per_block = sum(gate_path_norm(b.gates) for b in model.blocks)
    torch.testing.assert_close(pathreg(model), per_block)

    def terms(**weights):
        return regularization_terms(model, from_dict({"regularization": weights}).regularization)

    all_terms = terms(l0=1.0, pathreg=1.0, path_weights=1.0)
    assert set(all_terms) == {"l0", "pathreg", "path_weights"}
    torch.testing.assert_close(all_terms["pathreg"], per_block)
    assert set(terms(pathreg=2.0)) == {"pathreg"}
    assert terms() == {}


def test_path_norm_gradient_matches_finite_differences():
    torch.manual_seed(0)
    probs = tuple(
        torch.rand(shape, dtype=torch.float64, requires_grad=True) for shape in [(3, 2), (4, 3), (2, 4)]
    )
    torch.autograd.gradcheck(lambda *ps: path_norm(ps), probs)
    model = model_with(dim=2, hidden=(3,))
    grads = torch.autograd.grad(pathreg(model), list(model.blocks[0].gates.log_alpha))
    assert all(g.abs().sum() > 0 for g in grads)


def test_weights_that_do_not_chain_are_config_errors():
    with pytest.raises(ConfigError, match="chain"):
        path_norm([torch.ones(3, 2), torch.ones(4, 4)])


def test_conv_field_gates_and_pathreg_sum_over_kernel_entries(float64):
    torch.manual_seed(0)
    field = ConvField((1, 4, 4), [2], kernel_size=3)
    gates = gate_factory(from_dict({"regularization": {"l0": 1.0}}).regularization)(field)
    assert [tuple(a.shape) for a in gates.log_alpha] == [(2, 1, 3, 3), (1, 2, 3, 3)]
    with torch.no_grad():
        for a in gates.log_alpha:
            a.copy_(torch.randn_like(a) * 2)
    model = Flow([CNFBlock(field, gates=gates)], (1, 4, 4))
    probs = [p.detach() for p in gates.open_probabilities().values()]
    assert pathreg(model).item() == pytest.approx(brute_force_paths(probs), rel=1e-10)
    weights = [w.detach().abs() for w in field.masked_weights().values()]
    assert weight_path_norm(model).item() == pytest.approx(brute_force_paths(weights), rel=1e-10)
    expected = brute_force_reach(list(gates.deterministic().values()))
    assert path_sparsity(model) == pytest.approx(1 - expected.double().mean().item())


def test_weight_path_norm_needs_no_gates_but_gate_penalties_do():
    config = from_dict({"model": {"hidden_dims": [4]}, "regularization": {"path_weights": 1.0}})
    model = build_model(config, (2,))
    assert all(block.gates is None for block in model.blocks)
    assert set(regularization_terms(model, config.regularization)) == {"path_weights"}
    with pytest.raises(ConfigError, match="gated model"):
        regularization_terms(model, from_dict({"regularization": {"pathreg": 1.0}}).regularization)
    with pytest.raises(ConfigError, match="gated model"):
        regularization_terms(model, from_dict({"regularization": {"l0": 1.0}}).regularization)


def test_path_sparsity_of_a_training_model_uses_its_eval_gates():
    """Logged during training: the path sparsity is that of the deterministic eval gates,
    draws no gate noise (the training stream is untouched) and leaves the model training."""
    model = model_with(dim=3, hidden=(4, 4))
    with torch.no_grad():
        for a in model.blocks[0].gates.log_alpha:
            # -1: open in eval (gate 0.22) but closed in about a third of the draws; -20: always closed
            a.copy_(torch.where(torch.rand_like(a) < 0.6, -20.0, -1.0))
    expected = 1 - brute_force_reach(list(model.blocks[0].gates.deterministic().values())).double().mean().item()
    assert 0 < expected < 1  # a non-trivial case
    model.train()
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    values = [path_sparsity(model) for _ in range(5)]
    assert values == [pytest.approx(expected)] * 5
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())
    assert path_sparsity(model.eval()) == pytest.approx(expected)
