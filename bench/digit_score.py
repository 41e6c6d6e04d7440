"""How many samples of an MNIST flow a digit classifier recognizes.

    python bench/digit_score.py CHECKPOINT [CHECKPOINT ...] [--n 1000]
        [--temperature 0.7 1.0] [--threshold 0.9] [--epochs 6 [2 ...]] [--seed 0] [--diagnose]

"Recognizable digits" as a figure instead of an impression. The script trains a
small convolutional classifier on the MNIST training images of the first
checkpoint's config (at its resolution: ``data.downsample`` applies) and prints its
test accuracy. Then, for the test images as a reference and for each checkpoint and
temperature, it prints:

* ``confident``: the share of images the classifier assigns to one class with
  probability >= ``--threshold``. A readable digit should be classified
  confidently, and a blob or stroke fragment should not.
* ``mean p``: the mean top-class probability.
* ``classes``: how many of the 10 digits occur among the confident images, which
  shows whether the flow covers every digit or only a few.
* ``black`` and ``bright``: the shares of pixels at level 0 (below 1/256) and above
  one half. They compare the samples' intensities with the test images' without
  the classifier: a flow can get these marginals right and still draw broken
  strokes, and a low temperature shows up as fainter strokes (fewer bright pixels).

With ``--diagnose`` it also asks whether poor samples come from the model or from
sampling. For each checkpoint it encodes the first ``--n`` test images (dequantized,
logit-transformed) into latent codes ``z``, prints their per-dimension statistics
(a flow whose standard normal base fits the data has mean 0 and variance 1), and
scores two more image sets:

* ``reconstructed``: the codes pushed back through the flow. These should score
  like the test images; a gap means the inverse solve is inaccurate.
* ``Gaussian fit``: the flow applied to draws from a Gaussian with the codes' mean
  and full covariance instead of the model's base. If these score much
  higher than the samples, the codes of real images are not standard normal and
  the base is the problem; if not, the flow itself maps Gaussian noise to poor
  images.

The classifier (``--epochs 6`` by default; before 2026-12-07 it was 2, which reached
97.1% test accuracy but called only 86% of real test digits confidently) is a proxy,
in the spirit of the Inception score. ``--epochs 2 6`` scores the same samples with
one classifier per value (column ``clf``), to show how much a figure owes to it. A high
``confident`` share means the samples look like digits *to it*; it says nothing
about likelihood. Compare checkpoints at the same resolution only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnf_prune.build import load_model  # noqa: E402
from cnf.base import StandardNormal  # noqa: E402
from cnf_prune.config import DataConfig  # noqa: E402
from cnf_prune.commands import report_user_errors  # noqa: E402
from cnf.errors import ConfigError  # noqa: E402
from cnf.images import dequantize, downsample, load_mnist, logit_inverse, logit_transform  # noqa: E402


def mnist_with_labels(cfg: DataConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training and test images (``uint8``, shrunk by ``cfg.downsample``) and labels."""
    from torchvision.datasets import MNIST

    train, test = load_mnist(cfg.root, download=cfg.download)  # clear errors for missing files
    labels = [MNIST(str(cfg.root), train=split, download=False).targets for split in (True, False)]
    return downsample(train, cfg.downsample), labels[0], downsample(test, cfg.downsample), labels[1]


def classifier() -> nn.Module:
    """Two conv-pool stages and a linear head; any image size of at least 4x4."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(64 * 9, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def fit(images: Tensor, labels: Tensor, *, epochs: int, seed: int, batch_size: int = 128) -> nn.Module:
    """A classifier of ``images`` (``uint8``) trained with Adam and cross-entropy."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = classifier()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = images.float() / 255
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(net(x[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


@torch.no_grad()
def probabilities(net: nn.Module, pixels: Tensor, batch_size: int = 1000) -> Tensor:
    """Class probabilities of images with values in ``[0, 1]``."""
    return torch.cat([net(pixels[i:i + batch_size]).softmax(-1) for i in range(0, len(pixels), batch_size)])


def score(probs: Tensor, threshold: float) -> dict[str, float]:
    """``confident`` share, ``mean p`` and the number of ``classes`` among the confident."""
    top, label = probs.max(-1)
    confident = top >= threshold
    return {"confident": confident.float().mean().item(), "mean p": top.mean().item(),
            "classes": float(label[confident].unique().numel())}


def pixel_shares(images: Tensor) -> dict[str, float]:
    """Shares of pixels at level 0 (``< 1/256``) and above ``1/2``, for images in ``[0, 1]``."""
    return {"black": (images < 1 / 256).float().mean().item(), "bright": (images > 0.5).float().mean().item()}


def rate(net: nn.Module, images: Tensor, threshold: float) -> dict[str, float]:
    """The classifier's :func:`score` and the :func:`pixel_shares` of ``images`` in ``[0, 1]``."""
    return {**score(probabilities(net, images), threshold), **pixel_shares(images)}


@torch.no_grad()
def decode(model, z: Tensor, alpha: float, batch_size: int = 500) -> Tensor:
    """Images in ``[0, 1]`` pixel space from latent codes ``z`` (the flow's inverse)."""
    return torch.cat([
        logit_inverse(model.trace(z[i:i + batch_size], reverse=True, density=False).out, alpha).clamp(0.0, 1.0)
        for i in range(0, len(z), batch_size)
    ])


@torch.no_grad()
def draw(model, n: int, temperature: float, alpha: float, seed: int, batch_size: int = 500) -> Tensor:
    """``n`` samples in ``[0, 1]`` pixel space, reproducible from ``seed``."""
    torch.manual_seed(seed)
    chunks = []
    for start in range(0, n, batch_size):
        chunks.append(decode(model, model.base_noise(min(batch_size, n - start), temperature=temperature), alpha))
    return torch.cat(chunks)


@torch.no_grad()
def encode(model, pixels: Tensor, alpha: float, seed: int, batch_size: int = 500) -> Tensor:
    """Latent codes of ``uint8`` images, dequantized with noise reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    x = logit_transform(dequantize(pixels, generator=generator), alpha)[0]
    return torch.cat([model.trace(x[i:i + batch_size], density=False).out for i in range(0, len(x), batch_size)])


def gaussian_fit(codes: Tensor, n: int, seed: int) -> Tensor:
    """``n`` draws from the Gaussian with the mean and covariance of ``codes`` (``(N, ...)``, N > D)."""
    flat = codes.flatten(1).double()
    mean, cov = flat.mean(0), torch.cov(flat.T)
    chol = torch.linalg.cholesky(cov + 1e-8 * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype))
    noise = torch.randn(n, flat.shape[1], generator=torch.Generator().manual_seed(seed), dtype=flat.dtype)
    return (mean + noise @ chol.T).to(codes.dtype).view(n, *codes.shape[1:])


def diagnose(model, net: nn.Module, test: Tensor, alpha: float, seed: int, threshold: float,
             name: str) -> list[tuple[str, str, dict[str, float]]]:
    """Print the latent statistics of ``test`` and score its reconstructions and Gaussian-fit samples."""
    codes = encode(model, test, alpha, seed)
    flat = codes.flatten(1)
    var = flat.var(0)
    low, mid, high = var.quantile(torch.tensor([0.05, 0.5, 0.95], dtype=var.dtype)).tolist()
    reference = "standard normal: 0, 1" if isinstance(model.base, StandardNormal) else "the base is a mixture"
    print(f"{name}: codes of {len(test)} test images: mean |mean| {flat.mean(0).abs().mean():.3f}, "
          f"variance median {mid:.3f} (5-95%: {low:.3f}-{high:.3f}); {reference}")
    rebuilt = decode(model, codes, alpha)
    fit_images = decode(model, gaussian_fit(codes, len(test), seed), alpha)
    return [(f"{name} reconstructed", "-", rate(net, rebuilt, threshold)),
            (f"{name} Gaussian fit", "-", rate(net, fit_images, threshold))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", type=Path, help="best.pt / checkpoint.pt of MNIST runs")
    p.add_argument("--n", type=int, default=1000, help="samples per checkpoint and temperature (default 1000)")
    p.add_argument("--temperature", type=float, nargs="+", default=[0.7, 1.0], help="default 0.7 1.0")
    p.add_argument("--threshold", type=float, default=0.9, help="confidence of a recognized digit (default 0.9)")
    p.add_argument("--epochs", type=int, nargs="+", default=[6],
                   help="classifier training epochs (default 6: test accuracy 98.1%%, 93%% of real test digits "
                        "confident); several values score the same samples with one classifier each")
    p.add_argument("--train-size", type=int, default=None, help="classifier training images (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--diagnose", action="store_true",
                   help="also score reconstructions of test images and samples from a Gaussian fit to their codes")
    args = p.parse_args(argv)
    return report_user_errors(report, args)


def report(args: argparse.Namespace) -> int:
    if args.n < 1 or min(args.epochs) < 1 or not 0 < args.threshold < 1 or min(args.temperature) <= 0 \
            or (args.train_size is not None and args.train_size < 1):
        raise ConfigError("--n, --epochs and --train-size must be positive, --threshold in (0, 1), temperatures > 0")
    loaded = [(path, *load_model(path, map_location="cpu")[:2]) for path in args.checkpoints]
    data_cfg = loaded[0][2].data
    for path, _, config in loaded:
        if config.data.name != "mnist" or config.data.downsample != data_cfg.downsample:
            raise ConfigError(f"{path} is not an MNIST model at the first checkpoint's resolution "
                              f"(data {config.data.name!r}, downsample {config.data.downsample})")
    train, train_labels, test, test_labels = mnist_with_labels(data_cfg)
    if args.train_size is not None:
        train, train_labels = train[:args.train_size], train_labels[:args.train_size]
    if args.diagnose and args.n <= test[0].numel():
        raise ConfigError(f"--diagnose fits a covariance to the codes of --n test images: --n must exceed "
                          f"the {test[0].numel()} pixels of an image (got {args.n})")
    size = "x".join(str(s) for s in test.shape[-2:])
    nets = {}
    for epochs in args.epochs:
        net = fit(train, train_labels, epochs=epochs, seed=args.seed)
        test_probs = probabilities(net, test.float() / 255)
        accuracy = (test_probs.argmax(-1) == test_labels).float().mean().item()
        print(f"classifier {epochs}: {epochs} epoch{'s' if epochs != 1 else ''} on {len(train)} {size} training "
              f"images, test accuracy {accuracy:.4f}; confident means p >= {args.threshold}")
        nets[epochs] = (net, test_probs)

    rows = [("test images", "-", epochs, {**score(test_probs[:args.n], args.threshold),
                                          **pixel_shares(test[:args.n].float() / 255)})
            for epochs, (_, test_probs) in nets.items()]
    for path, model, config in loaded:
        model.eval()
        for t in args.temperature:
            samples = draw(model, args.n, t, config.data.logit_alpha, args.seed)  # one draw for every classifier
            rows += [(str(path), f"{t:g}", epochs, rate(net, samples, args.threshold)) for epochs, (net, _) in nets.items()]
        if args.diagnose:
            for epochs, (net, _) in nets.items():
                rows += [(name, t, epochs, s) for name, t, s in
                         diagnose(model, net, test[:args.n], config.data.logit_alpha, args.seed, args.threshold, str(path))]
    width = max(len(r[0]) for r in rows)
    print(f"{'images':<{width}}  T     clf  confident  mean p  classes  black  bright")
    for name, t, epochs, s in rows:
        print(f"{name:<{width}}  {t:<4}  {epochs:<3}  {s['confident']:9.3f}  {s['mean p']:6.3f}  {s['classes']:7.0f}"
              f"  {s['black']:5.3f}  {s['bright']:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
