"""torchrun / DistributedDataParallel on CPU with Gloo (2 processes)."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from helpers import prune
from cnf_prune.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# rk4 with a fixed step and the exact divergence: each sample's computation does not
# depend on the batch it is in, so a sharded step must equal the single-process step.
ARGS = ["configs/toy.yaml", "--set", "train.iterations=2", "--set", "train.batch_size=16",
        "--set", "model.hidden_dims=[16,16]", "--set", "solver.method=rk4", "--set", "solver.step_size=0.1",
        "--set", "solver.adjoint=false", "--set", "train.val_every=2", "--set", "data.val_size=64",
        "--set", "data.test_size=64", "--set", "train.figures=false", "--set", "train.device=cpu",
        "--set", "pruning.method=magnitude", "--set", "pruning.sparsity=0.5", "--set", "train.ema_decay=0.9",
        "--set", "model.base_components=2", "--set", "model.base_fit_size=200"]


def run(cmd, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_two_gloo_ranks_match_one_process_on_the_global_batch(tmp_path):
    single = run([sys.executable, "train.py", *ARGS, "--out", str(tmp_path / "one")], ROOT)
    assert single.returncode == 0, single.stderr[-2000:]
    multi = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 "train.py", *ARGS, "--out", str(tmp_path / "two")], ROOT)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    two = load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    assert len(two["rng"]) == 2 and two["step"] == 2
    # each rank draws its own Hutchinson probes and gate samples: their generators differ
    assert not torch.equal(two["rng"][0]["torch"], two["rng"][1]["torch"])
    for weights in ("model", "training_model"):  # the parameter average and the iterate
        for key, value in one[weights].items():
            torch.testing.assert_close(two[weights][key], value, rtol=1e-5, atol=1e-6, msg=f"{weights}.{key}")


def _rank_masks(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from cnf_prune.build import build_model
    from cnf_prune import distributed
    from cnf_prune.config import load_config
    from cnf.data import make_data

    config = load_config(ROOT / "configs/toy.yaml", ["model.hidden_dims=[16,16]", "pruning.method=magnitude",
                                                    "pruning.sparsity=0.5", "train.device=cpu"])
    ctx = distributed.setup("cpu")
    torch.manual_seed(1234 + rank)  # deliberately different initial models per rank
    data = make_data(config.data, config.seed)
    model = build_model(config, data.event_shape)
    prune(model, data, config)
    def masks():
        return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("_mask")}

    before = distributed.gather_objects(masks(), ctx)
    distributed.wrap(model, ctx)  # DDP broadcasts rank 0's parameters and masks
    after = distributed.gather_objects(masks(), ctx)
    differed = any(not torch.equal(before[0][k], b[k]) for b in before for k in before[0])
    agree = all(torch.equal(after[0][k], a[k]) for a in after for k in after[0])
    queue.put((differed, agree))
    distributed.teardown(ctx)


def test_masks_agree_across_ranks():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_rank_masks, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    # magnitude masks of different initial models differ, and agree after wrapping
    assert results == [(True, True), (True, True)]
