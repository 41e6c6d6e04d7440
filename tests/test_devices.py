"""The GPU path: a model gives the same numbers on an accelerator as on the CPU, and
training, pruning, checkpoints and sampling run there end to end; and the TF32
setting that the scripts apply.

The tests that take the ``device`` fixture are skipped without a GPU.
``CNF_TEST_DEVICE=cpu pytest tests/test_devices.py`` runs them with the CPU standing
in for the accelerator: that exercises the tests themselves (the comparisons are
then trivially equal), not a GPU. Those comparisons run in float64, where neither
side uses TF32 and the two devices differ only in the rounding of their kernels.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
import train
from bench.tf32_emulation import round_to_tf32, tf32_convolutions
from cnf_prune.build import build_model, load_model
from cnf.base import fit_gaussian_mixture
from cnf_prune.config import from_dict
from cnf.data import make_data
from cnf_prune.evaluate import evaluate
from helpers import QUICK, run_train, scalar_events
from pruning.scores import get_scorer


def _accelerator() -> torch.device | None:
    name = os.environ.get("CNF_TEST_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda") if torch.cuda.is_available() else None


@pytest.fixture
def device() -> torch.device:
    found = _accelerator()
    if found is None:
        pytest.skip("needs a GPU (CNF_TEST_DEVICE=cpu runs these checks on the CPU)")
    return found


def _toy_config(solver=None):
    # dopri5 at 1e-8 with the adjoint: should a step be accepted on one device and
    # rejected on the other, the results still agree to about the tolerance.
    return from_dict({
        "data": {"name": "checkerboard"},
        "model": {"hidden_dims": [16, 16], "num_blocks": 2, "layer_type": "concatsquash", "divergence": "exact"},
        "solver": solver or {"method": "dopri5", "rtol": 1e-8, "atol": 1e-8, "adjoint": True},
    })


def _image_config(base_components: int = 0):
    # Exact divergence (one tangent per pixel) so that no probe is drawn from a
    # device's own generator; rk4 so that both devices take the same steps.
    return from_dict({
        "data": {"name": "synthetic8", "val_size": 8, "test_size": 8},
        "model": {"hidden_dims": [8], "num_blocks": 1, "divergence": "exact", "base_components": base_components},
        "solver": {"method": "rk4", "step_size": 0.5, "adjoint": False},
    })


def _image_mixture_config():
    return _image_config(base_components=3)


def _fit_any_mixture(flow) -> None:
    """A fitted-looking mixture base (distinct means, correlated covariances)."""
    if getattr(flow.base, "components", 0):
        points = torch.randn(300, flow.base.dims, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        points[:100] += 2.0
        flow.base.set(*fit_gaussian_mixture(points, flow.base.components, iterations=3, seed=0, ridge=0.1)[0])


def _gradients(flow) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().cpu() for n, p in flow.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("config", [_toy_config, _image_config, _image_mixture_config],
                         ids=["toy-adjoint", "multiscale-images", "mixture-base"])
def test_log_prob_trace_and_gradients_match_the_cpu(device, float64, config):
    cfg = config()
    data = make_data(cfg.data, 0)
    torch.manual_seed(0)
    flow = build_model(cfg, data.event_shape)
    _fit_any_mixture(flow)
    x = data.preprocess(data.test[:8], torch.Generator().manual_seed(0))[0].double()
    on_device = copy.deepcopy(flow).to(device)

    results = []
    for model, inputs in ((flow, x), (on_device, x.to(device))):
        trace = model.trace(inputs)
        log_prob = model.log_prob(inputs)
        (-log_prob.mean() + trace.jac_norm.mean()).backward()
        results.append((log_prob.detach().cpu(), trace.jac_norm.detach().cpu(), trace.out.detach().cpu(),
                        _gradients(model)))
    (lp, jac, z, grads), (lp_d, jac_d, z_d, grads_d) = results
    torch.testing.assert_close(lp_d, lp, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(jac_d, jac, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(z_d, z, rtol=1e-7, atol=1e-7)
    assert grads_d.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads_d[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("config", [_image_config, _image_mixture_config], ids=["standard-normal", "mixture-base"])
def test_samples_from_the_same_noise_match_the_cpu(device, float64, config):
    torch.manual_seed(0)
    flow = build_model(config(), (1, 8, 8)).eval()
    _fit_any_mixture(flow)
    on_device = copy.deepcopy(flow).to(device)
    noise = flow.base_noise(4, generator=torch.Generator().manual_seed(1))
    noise_d = on_device.base_noise(4, generator=torch.Generator().manual_seed(1))
    assert noise_d.device.type == device.type
    # the same draws on any device (a mixture's μ_k + L_k ε is computed there)
    torch.testing.assert_close(noise_d.cpu(), noise, rtol=1e-12, atol=1e-12)
    out = flow.trace(noise, reverse=True, density=False).out
    out_d = on_device.trace(noise_d, reverse=True, density=False).out
    torch.testing.assert_close(out_d.cpu(), out, rtol=1e-7, atol=1e-7)


def test_evaluation_and_its_dequantization_noise_match_the_cpu(device, float64):
    cfg = _image_config()
    data = make_data(cfg.data, 0)
    torch.manual_seed(0)
    flow = build_model(cfg, data.event_shape)
    on_cpu = evaluate(flow, data.test, batch_size=4, preprocess=data.preprocess)
    on_device = evaluate(copy.deepcopy(flow).to(device), data.test, batch_size=4, preprocess=data.preprocess)
    assert on_device.nll == pytest.approx(on_cpu.nll, rel=1e-9)
    assert on_device.jac_norm == pytest.approx(on_cpu.jac_norm, rel=1e-9)
    assert on_device.nfe == on_cpu.nfe


def test_jacobian_spectrum_scores_match_the_cpu(device, float64):
    # Fixed steps: a score near zero is a difference of gradients, compared here to 1e-12.
    cfg = _toy_config({"method": "rk4", "step_size": 0.25, "adjoint": False})
    data = make_data(cfg.data, 0)
    torch.manual_seed(0)
    flow = build_model(cfg, data.event_shape)
    batches = [data.train_batch(64).double() for _ in range(2)]
    scorer = get_scorer("jacobian_spectrum")
    scores = scorer(flow, batches, cfg.pruning, cfg.seed)
    scores_d = scorer(copy.deepcopy(flow).to(device), [b.to(device) for b in batches], cfg)
    assert scores_d.keys() == scores.keys()
    for name, s in scores.items():
        assert scores_d[name].device.type == device.type
        torch.testing.assert_close(scores_d[name].cpu(), s, rtol=1e-5, atol=1e-12, msg=name)


@pytest.mark.parametrize("extra", [
    ["--set", "pruning.method=jacobian_spectrum", "--set", "pruning.sparsity=0.5"],
    ["--set", "regularization.l0=0.01", "--set", "regularization.pathreg=0.01"],
    ["--set", "model.base_components=3", "--set", "model.base_fit_size=300",
     "--set", "pruning.method=jacobian_spectrum", "--set", "pruning.sparsity=0.5"],
], ids=["pruned-at-init", "l0-pathreg", "mixture-base"])
def test_train_resume_and_sample_on_the_device(device, tmp_path, capsys, extra):
    run = tmp_path / "run"
    args = ["configs/toy.yaml", "--out", str(run), *QUICK, "--set", f"train.device={device}", *extra]
    assert train.main(args) == 0
    assert train.main([*args, "--resume", "--set", "train.iterations=6"]) == 0
    assert "done: 6 steps" in capsys.readouterr().out

    # The checkpoint loads on the CPU, and a pruned mask still holds after training.
    model, config, _ = load_model(run / "best.pt", map_location="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    masked = [m for m in model.modules() if hasattr(m, "weight_mask")]
    for module in masked:
        assert (module.weight[module.weight_mask == 0] == 0).all()
    kept = torch.cat([m.weight_mask.flatten() for m in masked]).mean()
    assert kept < 0.9 if config.pruning.method != "none" else kept == 1

    for where in (str(device), "cpu"):
        out = tmp_path / f"samples_{where.replace(':', '_')}.npy"
        assert sample.main([str(run / "best.pt"), "--out", str(out), "--n", "16", "--device", where]) == 0
        drawn = np.load(out)
        assert drawn.shape == (16, 2) and np.isfinite(drawn).all()


def test_training_logs_the_peak_gpu_memory(device, tmp_path):
    # bench/vs_ffjord.py reports it from these events next to FFJORD's own figure.
    assert run_train(tmp_path / "run", "--set", f"train.device={device}") == 0
    if device.type == "cuda":
        peaks = [e.value for e in scalar_events(tmp_path / "run", "memory/gpu_peak_mib")]
        assert len(peaks) == 4 and min(peaks) > 0
    else:
        with pytest.raises(KeyError):
            scalar_events(tmp_path / "run", "memory/gpu_peak_mib")


# --- TF32 ---------------------------------------------------------------------------


@pytest.fixture
def tf32_flags():
    """Restore PyTorch's TF32 flags after the test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _tf32_allowed() -> tuple[bool, bool]:
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def test_train_and_sample_apply_the_configs_tf32_setting(tmp_path, capsys, tf32_flags):
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default for convolutions
    assert run_train(tmp_path / "ieee") == 0
    assert _tf32_allowed() == (False, False)  # train.tf32 is false by default
    assert run_train(tmp_path / "tf32", "--set", "train.tf32=true") == 0
    assert _tf32_allowed() == (True, True)
    for run, allowed in (("ieee", (False, False)), ("tf32", (True, True)), ("ieee", (False, False))):
        out = tmp_path / f"{run}.npy"
        assert sample.main([str(tmp_path / run / "best.pt"), "--out", str(out), "--n", "4"]) == 0
        assert _tf32_allowed() == allowed, run  # the checkpoint's setting
    capsys.readouterr()


@pytest.mark.parametrize("level", ["torch.backends", "torch.backends.cudnn"])
def test_tf32_off_overrides_a_tf32_precision_set_with_the_newer_api(level):
    """A "tf32" set at a parent level of PyTorch's newer precision API survives the
    legacy flag, so convolutions would keep TF32; use_tf32(False) must remove it.
    Run in a fresh interpreter: these flags are process-wide."""
    code = (f"import torch\n{level}.fp32_precision = 'tf32'\n"
            "from cnf_prune.distributed import use_tf32\nuse_tf32(False)\n"
            "b = torch.backends\n"
            "print(b.cudnn.conv.fp32_precision, b.cuda.matmul.fp32_precision, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ieee", "ieee", "False", "False"]


def test_tf32_rounding_keeps_ten_mantissa_bits_to_nearest():
    exact = torch.tensor([1.0, 1.0 + 2**-10, -4.0 * (1.0 + 5 * 2**-10), 2.0**-100, 0.0])
    assert torch.equal(round_to_tf32(exact), exact)  # already 10-bit values stay as they are
    # halfway cases and below/above them, around 1
    below, above = 1.0 + 2**-11 - 2**-20, 1.0 + 2**-11 + 2**-20
    assert round_to_tf32(torch.tensor([below, above])).tolist() == [1.0, 1.0 + 2**-10]
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0)) * 10.0 ** torch.randint(-5, 5, (10000,))
    rounded = round_to_tf32(x)
    assert ((rounded - x).abs() <= x.abs() * 2**-11).all()  # half a unit in the 10th bit
    assert (rounded.view(torch.int32) & (2**13 - 1) == 0).all()
    assert ((rounded - x).abs() > 0).float().mean() > 0.99  # and random float32 values do move


def test_tf32_convolutions_round_the_inputs_and_restore_conv2d():
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 3, 5, 5, generator=gen), torch.randn(4, 3, 3, 3, generator=gen)
    exact = F.conv2d
    with tf32_convolutions():
        emulated = F.conv2d(x, w, padding=1)
    assert F.conv2d is exact
    torch.testing.assert_close(emulated, exact(round_to_tf32(x), round_to_tf32(w), padding=1), rtol=0, atol=0)
    assert not torch.equal(emulated, exact(x, w, padding=1))
