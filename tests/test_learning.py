"""End to end: train.py learns a density whose log-density is known in closed form.

Slow (a few minutes on one thread): run with ``pytest -m slow``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import train
from cnf_prune.build import load_model
from cnf.base import standard_normal_log_prob
from cnf.toy import sample_toy


def eight_gaussians_log_prob(x: np.ndarray) -> np.ndarray:
    """Exact log-density of ``sample_toy("8gaussians")``: an equal mixture of eight
    isotropic Gaussians with centres ``4(cos kπ/4, sin kπ/4)/1.414`` and spread ``0.5/1.414``."""
    sigma = 0.5 / 1.414
    angles = np.arange(8) * (np.pi / 4)
    centres = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1) / 1.414
    sq = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
    log_components = torch.from_numpy(-sq / (2 * sigma**2))
    return torch.logsumexp(log_components, dim=1).numpy() - math.log(8) - math.log(2 * math.pi * sigma**2)


@pytest.mark.slow
def test_a_trained_flow_is_a_normalized_density_close_to_the_data(tmp_path):
    """KL(data || model) = E[log p_data − log p_model] is never negative, and training
    makes it small. Paired on the same points, its estimate has a small standard error,
    so a flow whose density is off by a constant factor (a wrong log-determinant sign or
    scale, a missing base normalizer) fails the lower bound, and one that does not
    learn fails the upper one."""
    out = tmp_path / "run"
    status = train.main([
        "configs/toy.yaml", "--out", str(out), "--set", "data.name=8gaussians",
        "--set", "train.iterations=1500", "--set", "train.val_every=250",
        "--set", "solver.adjoint=false", "--set", "solver.rtol=1e-4", "--set", "solver.atol=1e-4",
        "--set", "data.val_size=1000", "--set", "data.test_size=1000",
    ])
    assert status == 0

    model, _, _ = load_model(out / "best.pt")
    model.eval()
    x = sample_toy("8gaussians", 4000, np.random.default_rng(12345))  # not the training stream
    with torch.no_grad():
        trace = model.trace(torch.from_numpy(x))
        log_model = (standard_normal_log_prob(trace.out) + trace.logabsdet).double().numpy()
    gap = eight_gaussians_log_prob(x.astype(np.float64)) - log_model
    kl, se = gap.mean(), gap.std(ddof=1) / math.sqrt(len(gap))
    assert kl > -4 * se, f"model density exceeds the data's: KL estimate {kl:.4f} ± {se:.4f}"
    assert kl < 0.15, f"the flow did not learn 8gaussians: KL estimate {kl:.4f} ± {se:.4f}"
