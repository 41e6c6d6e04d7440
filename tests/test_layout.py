"""The architecture holds: libraries apart from the application, names checked when
a config loads, several settings after one --set, and checkpoints written before the
application package existed still load and sample."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
import train
from cnf.errors import ConfigError
from cnf_prune import load_flow
from cnf_prune.config import load_config
from helpers import QUICK, scalar_events

ROOT = Path(__file__).parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
APPLICATION = {"cnf_prune", "train", "sample", "build", "bench", "tests"}


def imported_modules(package: str) -> dict[str, set[str]]:
    """Per module file of ``package``, the top-level names of everything it imports."""
    out = {}
    for path in (ROOT / package).glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


@pytest.mark.parametrize("library", ["cnf", "pruning"])
def test_libraries_import_no_script_or_application_module(library):
    for path, names in imported_modules(library).items():
        assert not names & APPLICATION, (path, names & APPLICATION)
        if library == "cnf":
            assert "pruning" not in names, path  # cnf never imports pruning


@pytest.mark.parametrize("library", ["cnf", "pruning"])
def test_libraries_neither_print_nor_parse_arguments(library):
    for path in (ROOT / library).glob("*.py"):
        tree = ast.parse(path.read_text())
        calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert "print" not in calls, path
        assert "argparse" not in imported_modules(library)[str(path.relative_to(ROOT))], path


def test_the_distribution_installs_packages_and_console_scripts_only():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    assert "py-modules" not in setuptools  # no top-level build, train or sample module
    assert set(setuptools["packages"]) == {"cnf", "pruning", "cnf_prune", "cnf_prune.commands"}
    scripts = project["project"]["scripts"]
    assert {"cnf-train", "cnf-sample", "cnf-compare", "cnf-compact", "cnf-export"} <= set(scripts)
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function))


def test_an_unknown_pruning_method_fails_before_any_data_or_model_work():
    """On the MNIST CPU config (whose setup fits a mixture base for about a minute)
    the name is rejected as the config loads, listing the valid methods."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "train.py", "configs/mnist_cpu.yaml", "--out", "/nonexistent/never",
         "--set", "pruning.method=lottery", "pruning.sparsity=0.5"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == ConfigError.exit_code
    assert proc.stderr.strip().splitlines() == [
        "error: unknown pruning.method 'lottery'; valid: none, random, magnitude, snip, grasp, synflow, "
        "jacobian_spectrum, jacobian_spectrum_abs, jacobian_spectrum_snip"
    ]
    assert time.perf_counter() - start < 60  # an interpreter start and a YAML file, not a data load


@pytest.mark.parametrize(("key", "value", "message"), [
    ("solver.method", "rk45", "unknown solver method 'rk45'; valid: dopri8, dopri5"),
    ("model.nonlinearity", "relu", "unknown nonlinearity 'relu'; valid: elu, softplus, swish, tanh"),
    ("model.layer_type", "dense", "unknown layer_type 'dense'; valid:"),
    ("data.name", "spirals", "unknown dataset 'spirals'; valid: 8gaussians"),
])
def test_every_registered_name_is_checked_when_the_config_loads(key, value, message):
    with pytest.raises(Exception, match=message):
        load_config(ROOT / "configs" / "mnist_cpu.yaml", [f"{key}={value}"])


def test_set_takes_several_settings_after_one_flag(tmp_path):
    quick = [a for a in QUICK if a != "--set"]
    assert train.main(["configs/toy.yaml", "--out", str(tmp_path / "r"), "--set", *quick,
                       "train.lr=0.002", "--set", "seed=3"]) == 0
    saved = load_config(tmp_path / "r" / "config.yaml")
    assert saved.train.lr == 0.002 and saved.seed == 3 and saved.model.hidden_dims == [16, 16]
    assert saved.train.iterations == 4


def test_dense_runs_log_no_sparsity_cards(tmp_path):
    from helpers import run_train

    assert run_train(tmp_path / "r") == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "r"))
    events.Reload()
    assert not [t for t in events.Tags()["scalars"] if t.startswith("sparsity/")]
    assert scalar_events(tmp_path / "r", "train/nll")


def fixture_inputs(name: str, model) -> torch.Tensor:
    spec = json.loads((FIXTURES / "old_checkpoints.json").read_text())[name]
    x = torch.randn(3, *model.event_shape, generator=torch.Generator().manual_seed(spec["x_seed"]))
    return x * spec["x_scale"], torch.tensor(spec["log_prob"])


@pytest.mark.parametrize("name", ["old_toy_checkpoint", "old_gated_best", "old_image_best"])
def test_checkpoints_written_before_the_application_package_load_and_sample(tmp_path, name):
    """Written by the code before cnf_prune existed (commit 4042bbc): the same
    log-densities, and sample.py samples them."""
    path = FIXTURES / f"{name}.ckpt"
    flow = load_flow(path)
    x, expected = fixture_inputs(name, flow)
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x), expected, rtol=1e-4, atol=1e-3)
    out = tmp_path / "s.npy"
    assert sample.main([str(path), "--out", str(out), "--n", "5"]) == 0
    assert np.isfinite(np.load(out)).all()


def test_an_old_checkpoint_resumes(tmp_path):
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FIXTURES / "old_toy_checkpoint.ckpt", run / "checkpoint.pt")
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    config = tmp_path / "config.yaml"
    import yaml

    config.write_text(yaml.safe_dump({**saved["config"], "train": {**saved["config"]["train"], "iterations": 3}}))
    assert train.main([str(config), "--out", str(run), "--resume"]) == 0
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 3


def test_the_python_api_is_distribution_like(tmp_path):
    """``log_prob`` is the exact density, ``sample`` draws without gradients and
    ``rsample`` with gradients reaching every field parameter."""
    from helpers import run_train

    assert run_train(tmp_path / "r") == 0
    flow = load_flow(tmp_path / "r" / "best.pt")
    assert not flow.training
    x = flow.sample((7,))
    assert x.shape == (7, 2) and not x.requires_grad
    assert flow.sample(4).shape == (4, 2) and flow.sample((2, 3)).shape == (2, 3, 2)
    assert flow.log_prob(x).shape == (7,)
    flow.zero_grad()
    y = flow.rsample((5,))
    assert y.requires_grad
    y.pow(2).sum().backward()
    grads = [p.grad for n, p in flow.named_parameters() if "field" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    # rsample's gradient against a central difference in one weight (h = 1e-2: a float32
    # sum near 12 resolves differences of about 1e-6, so a smaller step is mostly rounding)
    weight, h = flow.blocks[0].field.layers[0].weight, 1e-2

    def seeded_loss():
        torch.manual_seed(0)
        return flow.rsample((5,)).pow(2).sum()

    with torch.no_grad():
        weight[0, 0] += h
        up = seeded_loss()
        weight[0, 0] -= 2 * h
        down = seeded_loss()
        weight[0, 0] += h
    flow.zero_grad()
    seeded_loss().backward()
    assert float(weight.grad[0, 0]) == pytest.approx(float(up - down) / (2 * h), rel=0.02, abs=2e-4)
