from pathlib import Path

import pytest

from cnf_prune.config import Config, apply_overrides, from_dict, load_config, to_dict
from cnf.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads(path):
    import yaml

    raw = yaml.safe_load(path.read_text())
    if "base" in raw:  # comparison configs hold a train config under ``base``
        pytest.skip("comparison config: checked by the comparison tests")
    assert isinstance(load_config(path), Config)


def test_defaults_round_trip():
    assert from_dict(to_dict(Config())) == Config()


def test_overrides_are_typed():
    cfg = load_config(None, ["solver.rtol=1e-4", "train.iterations=7", "model.hidden_dims=[8,8]",
                             "solver.adjoint=false", "solver.step_size=0.1", "model.hidden_dims=16-16"])
    assert cfg.solver.rtol == 1e-4 and isinstance(cfg.solver.rtol, float)
    assert cfg.train.iterations == 7
    assert cfg.solver.adjoint is False
    assert cfg.model.hidden_dims == [16, 16]


def test_yaml_scientific_notation_without_dot_is_a_number(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("solver:\n  rtol: 1e-6\n")  # YAML 1.1 reads this as a string
    assert load_config(p).solver.rtol == 1e-6


@pytest.mark.parametrize(
    "override, match",
    [
        ("solver.rtl=1e-4", r"unknown config key 'solver.rtl'; valid keys in solver: method, rtol"),
        ("bogus=1", r"unknown config key 'bogus'; valid keys in config: seed, data"),
        ("train.iterations=many", r"train.iterations must be an integer"),
        ("train.iterations=1.5", r"train.iterations must be an integer"),
        ("solver.adjoint=maybe", r"solver.adjoint must be true or false"),
        ("model.hidden_dims=wide", r"model.hidden_dims\[0\] must be an integer"),
        ("train.lr=-1", r"train.lr must be positive"),
        ("train.lr_schedule=linear", r"train.lr_schedule must be .constant. or .cosine."),
        ("pruning.sparsity=1.0", r"pruning.sparsity must be in \[0, 1\)"),
        ("regularization.l0=-1", r"regularization.l0 must be non-negative"),
        ("data=3", r"data must be a mapping"),
        ("solver.rtol", r"must look like key.sub=value"),
    ],
)
def test_bad_values_name_the_problem(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_apply_overrides_does_not_mutate_input():
    base = {"solver": {"rtol": 1e-5}}
    apply_overrides(base, ["solver.rtol=1e-3"])
    assert base == {"solver": {"rtol": 1e-5}}


@pytest.mark.parametrize(
    "override, match",
    [
        ("data.logit_alpha=0.5", r"data.logit_alpha must be in \[1e-7, 0.5\)"),
        ("train.ema_decay=1", r"train.ema_decay must lie in \[0, 1\)"),
        ("data.val_size=0", r"data.val_size and data.test_size must be positive"),
        ("data.test_size=0", r"data.val_size and data.test_size must be positive"),
        (f"seed={2**63}", r"seed must be a non-negative integer below 2\*\*63"),
        ("train.lr=0", r"train.lr must be positive"),
        ("pruning.snip_mix=1.5", r"pruning.snip_mix must be in \[0, 1\]"),
        ("pruning.snip_mix=-0.5", r"pruning.snip_mix must be in \[0, 1\]"),
    ],
)
def test_bounds_reject_the_first_value_outside(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override",
    ["data.logit_alpha=0.4999", "train.ema_decay=0.9999", "data.val_size=1", f"seed={2**63 - 1}",
     "train.lr=1e-12", "pruning.snip_mix=1.0", "pruning.snip_mix=0.0", "train.ema_decay=0"],
)
def test_bounds_accept_the_last_value_inside(override):
    assert isinstance(load_config(None, [override]), Config)
