"""Test bits/dim of FFJORD's MNIST model at initialization, for several seeds.

    python bench/mnist_init_bpd.py [--seeds 0 1 2] [--images 100] [--mnist-root DIR]

Builds ``configs/mnist.yaml``'s flow as ``train.py`` does (one seed each) and prints
the bits/dim of the first ``--images`` MNIST test images before any training step:
how far the initialization alone moves the figure that a side-by-side run of a few
iterations (``bench/vs_ffjord.py``) reports.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import cpu_model  # noqa: E402
from cnf_prune.config import load_config  # noqa: E402
from cnf_prune.distributed import Context  # noqa: E402
from cnf_prune.evaluate import evaluate  # noqa: E402
from cnf_prune.setup import prepare_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--mnist-root", default="data", help="data root holding MNIST/raw (default: data)")
    args = p.parse_args()
    print(f"bench/mnist_init_bpd.py: {datetime.now().isoformat(timespec='seconds')}; {cpu_model()}; "
          f"torch {torch.__version__}; configs/mnist.yaml, first {args.images} test images")
    for seed in args.seeds:
        config = load_config(ROOT / "configs/mnist.yaml", [
            f"seed={seed}", f"data.root={args.mnist_root}", "data.download=false",
            "data.val_size=100", f"data.test_size={args.images}"])
        data, model = prepare_model(config, Context(device=torch.device("cpu")), fresh=True)
        model.eval()
        result = evaluate(model, data.test, batch_size=args.images, preprocess=data.preprocess)
        print(f"seed {seed}: {data.metrics(result.nll)['bits_per_dim']:.3f} bits/dim (NFE {result.nfe:.0f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
