"""A reference point for bench/digit_score.py: Gaussian mixtures on the MNIST logits.

    python bench/mixture_baseline.py CONFIG [--components 1 10] [--iterations 30]
        [--n 1000] [--threshold 0.9] [--train-size N] [--seed 0]

How digit-like are the samples of a density model whose likelihood is known? For
the data section of an MNIST config (resolution, splits, logit α), the script fits
Gaussian mixtures with full covariances by EM to the logits of the dequantized
training images, then prints, per number of components, the test bits/dim
(the same preprocessing and change of variables as train.py's) and the
``digit_score.py`` columns of ``--n`` samples. One component is the maximum-likelihood
Gaussian. Set beside a flow's row, the table separates what the likelihood measures
from what the classifier does: a mixture's components are blurred prototypes of
digits, so its samples can be recognizable at a likelihood far below a flow's.

The mixtures are :mod:`cnf.base`'s, the same EM that fits a flow's mixture base
(``model.base_components``). EM adds a ridge of 1e-3 (in logit units, whose scale is
about 3) to each covariance, which keeps components with few images invertible;
the fit runs in float64.

References: Dempster, Laird and Rubin 1977 (EM); Bishop 2006, section 9.2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.digit_score import fit, mnist_with_labels, rate  # noqa: E402
from cnf.base import GaussianMixture, fit_gaussian_mixture  # noqa: E402
from cnf_prune.config import load_config  # noqa: E402
from cnf_prune.commands import report_user_errors  # noqa: E402
from cnf.errors import ConfigError  # noqa: E402
from cnf.images import bits_per_dim, dequantize, load_images, logit_inverse, logit_transform  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="an MNIST config (its data section is used)")
    p.add_argument("--components", type=int, nargs="+", default=[1, 10], help="default 1 10")
    p.add_argument("--iterations", type=int, default=30, help="EM iterations (default 30)")
    p.add_argument("--n", type=int, default=1000, help="samples scored per mixture (default 1000)")
    p.add_argument("--threshold", type=float, default=0.9, help="confidence of a recognized digit (default 0.9)")
    p.add_argument("--train-size", type=int, default=None, help="classifier training images (default all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    return report_user_errors(report, args)


def report(args: argparse.Namespace) -> int:
    if min(args.components) < 1 or args.iterations < 1 or args.n < 1 or not 0 < args.threshold < 1 \
            or (args.train_size is not None and args.train_size < 1):
        raise ConfigError("--components, --iterations, --n and --train-size must be positive "
                          "and --threshold in (0, 1)")
    cfg = load_config(args.config).data
    if cfg.name != "mnist":
        raise ConfigError(f"{args.config} is not an MNIST config (data.name is {cfg.name!r})")
    data = load_images(cfg, seed=args.seed)
    train_images, train_labels = mnist_with_labels(cfg)[:2]
    net = fit(train_images[:args.train_size], train_labels[:args.train_size], epochs=2, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        x_train = logit_transform(dequantize(data.train, generator=generator).double(), cfg.logit_alpha)[0].flatten(1)
        x_test, logdet = logit_transform(dequantize(data.test, generator=generator).double(), cfg.logit_alpha)
        x_test, dims = x_test.flatten(1), x_test[0].numel()
        shape = data.test.shape[1:]
        print(f"{len(x_train)} training and {len(x_test)} test images of {'x'.join(map(str, shape))}; "
              f"classifier confident means p >= {args.threshold}")
        print("components  test bits/dim  confident  mean p  classes  black  bright")
        for k in args.components:
            mixture = GaussianMixture(dims, k).double()
            mixture.set(*fit_gaussian_mixture(x_train, k, iterations=args.iterations, seed=args.seed)[0])
            nll = -(mixture.log_prob(x_test) + logdet).mean()
            draws = mixture.sample(args.n, generator=generator, dtype=torch.float64)
            samples = logit_inverse(draws, cfg.logit_alpha).clamp(0.0, 1.0)
            s = rate(net, samples.float().view(args.n, *shape), args.threshold)
            print(f"{k:10d}  {bits_per_dim(nll.item(), dims):13.3f}  {s['confident']:9.3f}  {s['mean p']:6.3f}"
                  f"  {s['classes']:7.0f}  {s['black']:5.3f}  {s['bright']:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
