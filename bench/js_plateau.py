"""What Jacobian-spectrum masks keep at initialization, beside other methods' masks.

    python bench/js_plateau.py [--config configs/toy.yaml] [--sparsity 0.8 0.9]
        [--seeds 0 1 2] [--methods random snip jacobian_spectrum ...] [--set KEY=VALUE ...]

For each seed it scores the freshly built model once (the scoring batches and seed of
``train.py``) and prints, per method and sparsity:

* ``s>0``: the share of weights with a positive Jacobian-spectrum score ``dR·dL``
  (independent of the method: the model at initialization is the same);
* ``kept/layer``: the kept share of each prunable weight, first to last layer;
* ``dead in``/``dead out``: hidden units of the MLP field left with no input weight or
  no output weight (a unit with neither input nor output weights computes nothing
  the data can change);
* ``R0``, ``NLL0``: the cumulative Jacobian norm and the NLL of the pruned model at
  initialization on the scoring batch, and ``|g_nll|``: the norm of the NLL gradient
  the masked weights still receive, i.e. how fast a first Adam-free step could lower
  the loss.

docs/results.md uses these figures to discuss the low-R, high-NLL plateau of
Jacobian-spectrum masks (output of 2026-12-07: bench/results/js_plateau_2026-12-07.txt).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnf_prune import distributed  # noqa: E402
from cnf_prune.commands import report_user_errors  # noqa: E402
from cnf_prune.config import load_config  # noqa: E402
from cnf_prune.setup import prepare_model  # noqa: E402
from pruning.apply import scoring_batches  # noqa: E402
from pruning.masks import mask_buffer, prunable_weights  # noqa: E402
from pruning.scores import objective_gradients  # noqa: E402


def dead_units(model) -> tuple[int, int]:
    """Hidden units (outputs of every weight but the last) with no kept input weight,
    and with no kept output weight in the next layer."""
    masks = [mask_buffer(model, n) for n in prunable_weights(model)]
    dead_in = sum(int((m.flatten(1).sum(1) == 0).sum()) for m in masks[:-1])
    dead_out = sum(int((m.flatten(1).sum(0) == 0).sum()) for m in masks[1:])
    return dead_in, dead_out


def describe(overrides: list[str], config_path: str) -> dict:
    config = load_config(config_path, overrides)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        dense = prepare_model(load_config(config_path, [*overrides, "pruning.method=none", "pruning.sparsity=0"]),
                              distributed.Context(), fresh=True)[1]
        data, model = prepare_model(config, distributed.Context(), fresh=True)
    (x,) = scoring_batches(data, 1, config.train.batch_size, config.seed)
    weights = prunable_weights(dense)
    grads = objective_gradients(dense, [x], weights)
    positive = torch.cat([(grads["nll"][n] * grads["jac_norm"][n]).flatten() for n in weights]) > 0
    pruned_grads = objective_gradients(model, [x], prunable_weights(model), ("nll",))["nll"]
    model.train()
    trace = model.trace(x)
    nll = -(model.base.log_prob(trace.out) + trace.logabsdet).mean()
    kept = [float(mask_buffer(model, n).float().mean()) for n in weights]
    g = torch.cat([g.flatten() for g in pruned_grads.values()])
    return {"kept": kept, "dead": dead_units(model), "R0": trace.jac_norm.mean().item(), "NLL0": nll.item(),
            "g": float(g.norm()), "positive": float(positive.float().mean())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/toy.yaml")
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.8, 0.9])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+",
                   default=["random", "snip", "jacobian_spectrum", "jacobian_spectrum_abs", "jacobian_spectrum_snip",
                            "jacobian_spectrum layer", "jacobian_spectrum rounds10"],
                   help="pruning methods; 'METHOD layer' uses scope layer, 'METHOD roundsN' N rounds")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    return report_user_errors(run, args)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    print("method                       sparsity seed  s>0    kept/layer                 dead in/out  R0        NLL0   |g_nll|")
    for sparsity in args.sparsity:
        for entry in args.methods:
            method, *variant = entry.split()
            extra = [f"pruning.method={method}", f"pruning.sparsity={sparsity}"]
            for v in variant:
                extra.append("pruning.scope=layer" if v == "layer" else f"pruning.rounds={v.removeprefix('rounds')}")
            for seed in args.seeds:
                d = describe([*args.overrides, *extra, f"seed={seed}"], args.config)
                kept = " ".join(f"{k:.2f}" for k in d["kept"])
                print(f"{entry:<28} {sparsity:<8g} {seed:<5} {d['positive']:.2f}   {kept:<26} "
                      f"{d['dead'][0]:>3}/{d['dead'][1]:<3}     {d['R0']:.2e}  {d['NLL0']:.3f}  {d['g']:.3f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
