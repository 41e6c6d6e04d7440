"""Bad inputs through the real entry points: each gives a one-line, actionable error,
a non-zero exit code, and leaves existing checkpoints untouched."""

import hashlib
import re

import numpy as np
import pytest
import torch

import sample
import train
from cnf.errors import ConfigError
from cnf.fields import MLPField
from cnf.solver import Solver

TINY = ["--set", "train.iterations=2", "--set", "model.hidden_dims=[8]", "--set", "data.val_size=50",
        "--set", "data.test_size=50", "--set", "train.figures=false", "--set", "solver.rtol=1e-3",
        "--set", "solver.atol=1e-3"]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "run"
    assert train.main(["configs/toy.yaml", "--out", str(out), *TINY]) == 0
    return out


def digest(run_dir):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.glob("*.pt"))}


def one_line_error(capsys, pattern):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    assert re.search(pattern, err), err


def train_case(tmp_path, *args):
    return ["configs/toy.yaml", "--out", str(tmp_path / "new"), *TINY, *args]


TRAIN_CASES = {
    "unknown key": (["--set", "solver.rtl=1e-4"], r"unknown config key 'solver.rtl'.*valid keys", 2),
    "unknown section": (["--set", "optim.lr=1"], r"unknown config key 'optim'", 2),
    "wrong type": (["--set", "train.iterations=many"], r"train.iterations must be an integer", 2),
    "wrong bool": (["--set", "solver.adjoint=perhaps"], r"must be true or false", 2),
    "sparsity out of range": (["--set", "pruning.sparsity=1.5"], r"pruning.sparsity must be in \[0, 1\)", 2),
    "negative penalty": (["--set", "regularization.pathreg=-1"], r"must be non-negative", 2),
    "gate beta": (["--set", "regularization.gate_temperature=0"], r"must be positive", 2),
    "gate zeta": (["--set", "regularization.gate_stretch_high=1"], r"must exceed 1", 2),
    "non-positive tolerance": (["--set", "solver.atol=0"], r"tolerances must be positive", 2),
    "unknown solver": (["--set", "solver.method=rk45"], r"unknown solver method 'rk45'; valid:", 2),
    "unknown nonlinearity": (["--set", "model.nonlinearity=relu"], r"unknown nonlinearity 'relu'", 2),
    "unknown dataset": (["--set", "data.name=spirals"], r"unknown dataset 'spirals'; valid:", 3),
    "unknown pruning method": (["--set", "pruning.method=lottery", "--set", "pruning.sparsity=0.5"],
                               r"lottery", 2),
    "layer pattern matches nothing": (["--set", "pruning.method=random", "--set", "pruning.sparsity=0.5",
                                       "--set", "pruning.layers=[decoder.*]"], r"matches no prunable weight", 2),
    "negative seed": (["--set", "seed=-1"], r"seed must be a non-negative integer below 2\*\*63", 2),
    "misspelled noise": (["--set", "model.noise=gausian"], r"model.noise must be gaussian or rademacher", 2),
    "unknown divergence": (["--set", "model.test_divergence=hutch"], r"model.test_divergence must be exact", 2),
    "logit alpha below float32": (["--set", "data.logit_alpha=1e-8"], r"must be in \[1e-7, 0.5\)", 2),
    "unknown device": (["--set", "train.device=gpu"], r"train.device 'gpu' is not a device", 2),
    "batch not divisible": None,  # covered in test_distributed (needs 2 processes)
}


@pytest.mark.parametrize("case", [k for k, v in TRAIN_CASES.items() if v], ids=str)
def test_train_rejects_bad_config(tmp_path, capsys, case):
    args, pattern, code = TRAIN_CASES[case]
    assert train.main(train_case(tmp_path, *args)) == code
    one_line_error(capsys, pattern)
    assert not (tmp_path / "new" / "checkpoint.pt").exists()


def test_missing_config_file_and_bad_yaml(tmp_path, capsys):
    assert train.main([str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, r"does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {iterations: [1,\n")
    assert train.main([str(bad), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, r"not valid YAML")
    bad.write_bytes(b"# caf\xe9\nseed: 1\n")  # Latin-1, or a checkpoint passed by mistake
    assert train.main([str(bad), "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, r"not a UTF-8 text file")


@pytest.mark.parametrize("content, pattern", [
    (None, r"power/data.npy.*Zenodo"),                 # missing
    (b"garbage, not numpy", r"data.npy"),             # corrupt
    ("truncated", r"data.npy"),                        # truncated
])
def test_bad_data_files(tmp_path, capsys, content, pattern):
    root = tmp_path / "data"
    (root / "power").mkdir(parents=True)
    target = root / "power" / "data.npy"
    if content == "truncated":
        np.save(target, np.random.default_rng(0).normal(size=(500, 8)))
        target.write_bytes(target.read_bytes()[:1000])
    elif content is not None:
        target.write_bytes(content)
    code = train.main(["configs/power.yaml", "--out", str(tmp_path / "o"), "--set", f"data.root={root}"])
    assert code == 3
    one_line_error(capsys, pattern)


def test_missing_mnist_says_where_to_put_it(tmp_path, capsys):
    code = train.main(["configs/mnist_cpu.yaml", "--out", str(tmp_path / "o"), "--set", f"data.root={tmp_path}",
                       "--set", "data.download=false"])
    assert code == 3
    one_line_error(capsys, r"MNIST not found in .*download")


def test_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert train.main(train_case(tmp_path)[:1] + ["--out", str(blocker / "run"), *TINY]) == 2
    one_line_error(capsys, r"cannot write to the run directory")


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    assert train.main(train_case(tmp_path, "--resume")) == 4
    one_line_error(capsys, r"no .*checkpoint.pt to resume from")


def test_existing_run_is_not_overwritten(good_run, capsys):
    before = digest(good_run)
    assert train.main(["configs/toy.yaml", "--out", str(good_run), *TINY]) == 2
    one_line_error(capsys, r"already holds a run; pass --resume")
    assert digest(good_run) == before


def test_resume_with_another_model_keeps_the_checkpoint(good_run, capsys):
    before = digest(good_run)
    assert train.main(["configs/toy.yaml", "--out", str(good_run), *TINY, "--set", "model.hidden_dims=[4]",
                       "--resume"]) == 4
    one_line_error(capsys, r"differs from the checkpoint")
    assert digest(good_run) == before


def test_resume_from_a_corrupt_checkpoint(tmp_path, good_run, capsys):
    run = tmp_path / "copy"
    run.mkdir()
    data = (good_run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    before = digest(run)
    assert train.main(["configs/toy.yaml", "--out", str(run), *TINY, "--resume"]) == 4
    one_line_error(capsys, r"corrupt, truncated or not a checkpoint")
    assert digest(run) == before


@pytest.mark.parametrize("kind", ["missing", "not a checkpoint", "truncated", "arbitrary pickle", "other model"])
def test_sample_rejects_bad_checkpoints(tmp_path, good_run, capsys, kind):
    path = tmp_path / "ckpt.pt"
    if kind == "not a checkpoint":
        path.write_text("hello")
    elif kind == "truncated":
        path.write_bytes((good_run / "best.pt").read_bytes()[:5000])
    elif kind == "arbitrary pickle":
        class Payload:
            def __reduce__(self):
                return (print, ("executed",))
        torch.save({"format": "cnf-checkpoint/1", "model": Payload()}, path)
    elif kind == "other model":
        ckpt = torch.load(good_run / "best.pt", weights_only=True)
        ckpt["config"]["model"]["hidden_dims"] = [32, 32]
        torch.save(ckpt, path)
    code = sample.main([str(path), "--out", str(tmp_path / "s.npy")])
    assert code == 4
    patterns = {"missing": "does not exist", "not a checkpoint": "corrupt", "truncated": "corrupt",
                "arbitrary pickle": "refused", "other model": "does not rebuild a model"}
    one_line_error(capsys, patterns[kind])
    assert not (tmp_path / "s.npy").exists()


def test_sample_rejects_bad_arguments(tmp_path, good_run, capsys):
    assert sample.main([str(good_run / "best.pt"), "--out", str(tmp_path / "s.txt")]) == 2
    one_line_error(capsys, r"--out must end in one of")
    assert sample.main([str(good_run / "best.pt"), "--out", str(tmp_path / "no" / "s.npy")]) == 2
    one_line_error(capsys, r"output directory .* does not exist")
    assert sample.main([str(good_run / "best.pt"), "--out", str(tmp_path / "s.npy"), "--n", "0"]) == 2
    one_line_error(capsys, r"must be positive")
    assert sample.main([str(good_run / "best.pt"), "--out", str(tmp_path / "s.npy"), "--tol", "0"]) == 2
    one_line_error(capsys, r"--tol must be positive")
    assert sample.main([str(good_run / "best.pt"), "--out", str(tmp_path / "s.npy"), "--device", "gpu"]) == 2
    one_line_error(capsys, r"--device 'gpu' is not a device \(auto, cpu, cuda")
    if not torch.cuda.is_available():
        assert sample.main([str(good_run / "best.pt"), "--out", str(tmp_path / "s.npy"), "--device", "cuda"]) == 2
        one_line_error(capsys, r"--device is cuda but no GPU is available; use --device cpu")
    assert not (tmp_path / "s.npy").exists()


def test_sample_tol_needs_an_adaptive_solver(tmp_path, capsys):
    assert train.main(train_case(tmp_path, "--set", "solver.method=rk4", "--set", "solver.step_size=0.25")) == 0
    run = tmp_path / "new"
    capsys.readouterr()
    assert sample.main([str(run / "best.pt"), "--out", str(tmp_path / "s.npy"), "--tol", "1e-6"]) == 2
    one_line_error(capsys, r"--tol needs an adaptive solver; this checkpoint samples with rk4 \(step_size=0.25\)")
    assert not (tmp_path / "s.npy").exists()


def test_python_api_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="tolerances must be positive"):
        Solver(rtol=-1.0)
    with pytest.raises(ConfigError, match="needs a positive step_size"):
        Solver(method="euler")
    with pytest.raises(ConfigError, match="unknown layer_type"):
        MLPField(2, [4], layer_type="dense")


def test_load_checkpoint_refuses_a_plain_torch_save_dict(tmp_path):
    from cnf_prune.checkpoint import load_checkpoint
    from cnf.errors import CheckpointError

    path = tmp_path / "state_dict.pt"
    torch.save({"weight": torch.zeros(3), "step": 7}, path)  # a loadable zip, but no format tag
    with pytest.raises(CheckpointError, match="is not a checkpoint written by this tool"):
        load_checkpoint(path)
    torch.save({"format": "cnf-checkpoint/0", "weight": torch.zeros(3)}, path)  # another format
    with pytest.raises(CheckpointError, match="is not a checkpoint written by this tool"):
        load_checkpoint(path)


def test_load_checkpoint_calls_a_non_zip_file_corrupt(tmp_path):
    from cnf_prune.checkpoint import load_checkpoint
    from cnf.errors import CheckpointError

    path = tmp_path / "garbage.pt"
    path.write_bytes(b"garbage" * 100)  # torch.load would call this a refused pickle
    with pytest.raises(CheckpointError, match=r"is corrupt, truncated or not a checkpoint; use another checkpoint"):
        load_checkpoint(path)


def test_failed_checkpoint_write_leaves_no_temporary_file_and_keeps_the_target(tmp_path, monkeypatch):
    from cnf_prune import checkpoint

    target = tmp_path / "checkpoint.pt"
    checkpoint.save_checkpoint({"step": 1, "weight": torch.ones(2)}, target)
    before = target.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_checkpoint({"step": 2, "weight": torch.zeros(2)}, target)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert target.read_bytes() == before
    assert checkpoint.load_checkpoint(target)["step"] == 1
