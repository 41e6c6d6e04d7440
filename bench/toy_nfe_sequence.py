"""Check: the forward NFE of the first toy iterations, stacked MLP evaluation vs layer by layer.

    python bench/toy_nfe_sequence.py [--iterations 50] [--perturb 1e-7]

Trains ``configs/toy.yaml`` from one seed three ways and prints each run's forward
NFE per iteration where it differs from the first run's:

1. the layer-by-layer field (:class:`cnf.fields.LayeredField`), the reference;
2. the stacked evaluation (:mod:`cnf.mlp_paired`, the default), which differs from
   it by floating-point rounding only;
3. the reference again, with every initial parameter scaled by ``1 + perturb * N(0, 1)``
   (float32 rounding is about 6e-8): how far a rounding-sized change moves the
   sequence on its own. The adaptive solver's step count can change where its error
   ratio is close to 1, which a rounding-sized change then decides either way.
"""

from __future__ import annotations

import argparse
import random
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import training_setup, training_step  # noqa: E402  (train.py's model and step)
from bench.machine import cpu_model  # noqa: E402
from cnf_prune.config import load_config  # noqa: E402


def forward_nfe(config, iterations: int, stacked: bool, perturb: float) -> list[int]:
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    data, model, optimizer, ema = training_setup(config, torch.device("cpu"))
    if not stacked:
        for block in model.blocks:
            block.field._paired = None  # take LayeredField.forward
    if perturb:
        noise = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + perturb * torch.randn(p.shape, generator=noise, dtype=p.dtype))
    counts = []
    for step in range(iterations):
        _, trace = training_step(model, data, optimizer, ema, config, data.train_batch(config.train.batch_size), step)
        counts.append(trace.nfe_forward)
    return counts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/toy.yaml")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--perturb", type=float, default=1e-7)
    args = p.parse_args()
    torch.set_num_threads(1)
    config = load_config(args.config)
    print(f"bench/toy_nfe_sequence.py: {datetime.now().isoformat(timespec='seconds')}; {cpu_model()}; "
          f"torch {torch.__version__}; {args.config}, seed {config.seed}, {args.iterations} iterations")
    reference = forward_nfe(config, args.iterations, stacked=False, perturb=0.0)
    print(f"layer by layer: forward NFE {reference} (sum {sum(reference)})")
    for name, stacked, perturb in [("stacked (default)", True, 0.0),
                                   (f"layer by layer, parameters x (1 + {args.perturb:g} N(0,1))", False, args.perturb)]:
        counts = forward_nfe(config, args.iterations, stacked, perturb)
        diff = [(i + 1, a, b) for i, (a, b) in enumerate(zip(counts, reference)) if a != b]
        print(f"{name}: sum {sum(counts)}; iterations that differ (iteration, NFE, reference NFE): {diff or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
