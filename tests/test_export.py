import copy
from pathlib import Path

import torch

import sample
import train
from cnf_prune.build import build_model
from cnf_prune.checkpoint import load_checkpoint
from cnf_prune.config import from_dict
from cnf.conv import ConvField
from cnf.errors import ConfigError
from cnf.flow import Flow
from cnf.odeblock import CNFBlock
from cnf.solver import Solver
from cnf_prune.commands import export
from pruning.export import harden_gates
from pruning.gates import gate_factory
from pruning.masks import mask_buffer

TOY = str(Path(__file__).resolve().parents[1] / "configs" / "toy.yaml")
CONFIG = {
    "model": {"hidden_dims": [8, 8]},
    "solver": {"rtol": 1e-5, "atol": 1e-5, "adjoint": False},
    "regularization": {"l0": 1.0},
}


def gated_model():
    torch.manual_seed(0)
    model = build_model(from_dict(CONFIG), (2,)).double()
    with torch.no_grad():  # a mix of closed (g = 0), fully open (g = 1) and partial gates
        for a in model.blocks[0].gates.log_alpha:
            a.copy_(torch.randn_like(a) * 4)
    return model.eval()


def test_hardened_model_equals_eval_mode_gated_model():
    gated = gated_model()
    gates = gated.blocks[0].gates.deterministic()
    assert any((g == 0).any() for g in gates.values()) and any((g == 1).any() for g in gates.values())
    hard = harden_gates(copy.deepcopy(gated))
    assert hard.blocks[0].gates is None
    for name, g in gates.items():
        assert torch.equal(mask_buffer(hard.blocks[0].field, name), (g > 0).double())
        torch.testing.assert_close(
            hard.blocks[0].solve_weights()[name], gated.blocks[0].solve_weights()[name], rtol=0, atol=0
        )
    x = torch.randn(64, 2, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(hard.log_prob(x), gated.log_prob(x), rtol=0, atol=0)
        torch.testing.assert_close(hard.inverse(x)[0], gated.inverse(x)[0], rtol=0, atol=0)
    plain = build_model(from_dict({**CONFIG, "regularization": {"l0": 0.0}}), (2,)).double()
    plain.load_state_dict(hard.state_dict(), strict=True)


def test_hardened_conv_model_equals_eval_mode_gated_model(float64):
    torch.manual_seed(0)
    field = ConvField((1, 4, 4), [3], kernel_size=3)
    gates = gate_factory(from_dict(CONFIG).regularization)(field)
    with torch.no_grad():
        for a in gates.log_alpha:
            a.copy_(torch.randn_like(a) * 4)
    block = CNFBlock(field, solver=Solver(rtol=1e-5, atol=1e-5, adjoint=False), gates=gates)
    gated = Flow([block], (1, 4, 4)).eval()
    hard = harden_gates(copy.deepcopy(gated))
    x = torch.randn(8, 1, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(hard.log_prob(x), gated.log_prob(x), rtol=0, atol=0)


def test_train_export_sample_round_trip(tmp_path, capsys):
    run = tmp_path / "run"
    code = train.main([
        TOY, "--out", str(run),
        "--set", "model.hidden_dims=[8,8]", "--set", "train.iterations=3",
        "--set", "train.val_every=3", "--set", "data.val_size=200", "--set", "data.test_size=200",
        "--set", "regularization.l0=0.01", "--set", "regularization.pathreg=0.001",
        "--set", "regularization.path_weights=0.001",
    ])
    assert code == 0
    hard = tmp_path / "hard.pt"
    assert export.main([str(run / "best.pt"), "--out", str(hard)]) == 0
    assert "hardened gates" in capsys.readouterr().out
    ckpt = load_checkpoint(hard)
    assert ckpt["config"]["regularization"]["l0"] == 0.0
    assert ckpt["config"]["regularization"]["pathreg"] == 0.0
    model = build_model(from_dict(ckpt["config"]), ckpt["event_shape"])
    model.load_state_dict(ckpt["model"], strict=True)
    assert all(block.gates is None for block in model.blocks)
    assert sample.main([str(hard), "--out", str(tmp_path / "s.npy"), "--n", "50"]) == 0


def test_export_refuses_ungated_checkpoints_and_overwriting(tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main([
        TOY, "--out", str(run), "--set", "model.hidden_dims=[4]",
        "--set", "train.iterations=1", "--set", "data.val_size=50", "--set", "data.test_size=50",
    ]) == 0
    assert export.main([str(run / "best.pt"), "--out", str(tmp_path / "h.pt")]) == ConfigError.exit_code
    assert "no gates" in capsys.readouterr().err
    assert export.main([str(run / "best.pt"), "--out", str(run / "best.pt")]) == ConfigError.exit_code
    before = (run / "checkpoint.pt").read_bytes()
    assert export.main([str(run / "best.pt"), "--out", str(run / "checkpoint.pt")]) == ConfigError.exit_code
    assert (run / "checkpoint.pt").read_bytes() == before  # the run can still be resumed
