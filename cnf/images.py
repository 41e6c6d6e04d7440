"""Image data: dequantization, the logit transform, bits per dimension, MNIST.

Pixels are integers ``k ∈ {0, ..., 255}^D``. Training and evaluation model the
dequantized image ``y = (k + u) / 256`` with ``u ~ U[0, 1)^D`` (so ``y ∈ [0, 1)^D``),
mapped to the real line by the logit transform

    x = logit(s),   s = α + (1 - 2α) y,   log|dx/dy| = log(1 - 2α) - log s - log(1 - s)

(``α = 1e-6`` keeps ``x`` finite). The flow models ``x``; the density of ``y`` is
``p_Y(y) = p_X(x) |det ∂x/∂y|``, so the data-space NLL is

    -log p_Y(y) = -log p_X(x) - Σ_i log|dx_i/dy_i|.

Bits per dimension. The discrete model ``P(k) = ∫_{cube(k)} p_Y(y) dy`` over the
cube of side ``1/256`` at ``k/256`` equals ``256^{-D} E_u[p_Y((k + u)/256)]``, and
Jensen's inequality gives ``-log P(k) ≤ E_u[-log p_Y(y)] + D log 256``. In bits
per dimension (the number reported for MNIST, 0.99 for FFJORD):

    bpd = (E_u[-log p_Y(y)] + D log 256) / (D log 2)
        = (NLL_x - Σ log|det ∂x/∂y| + D log 256) / (D log 2),

an upper bound on the discrete model's code length.

References: FFJORD, Grathwohl et al. 2019; Real NVP, Dinh et al. 2017 (logit
transform); Theis et al. 2016 (dequantization bound).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from cnf.errors import DataError
from cnf.flow import Flow
from cnf.sources import ArrayData

if TYPE_CHECKING:
    from cnf.config import DataConfig

LEVELS = 256
IMAGE_DATASETS = ("mnist", "synthetic8")
SYNTHETIC_SIZE = 8
SYNTHETIC_TRAIN = 4096


def dequantize(pixels: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """``(k + u) / 256`` with ``u ~ U[0, 1)`` per pixel, in the default float dtype.

    ``generator`` (on any device) makes the noise reproducible; without one the
    global generator of ``pixels``' device is used.
    """
    dtype = torch.get_default_dtype()
    if generator is None:
        u = torch.rand(pixels.shape, dtype=dtype, device=pixels.device)
    else:
        u = torch.rand(pixels.shape, dtype=dtype, generator=generator, device=generator.device).to(pixels.device)
    return (pixels.to(dtype) + u) / LEVELS


def logit_transform(y: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """``x = logit(α + (1 - 2α) y)`` and ``Σ log|dx/dy|`` per sample (shape ``(B,)``)."""
    s = alpha + (1.0 - 2.0 * alpha) * y
    x = torch.log(s) - torch.log1p(-s)
    logdet = (math.log1p(-2.0 * alpha) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(1)
    return x, logdet


def logit_inverse(x: Tensor, alpha: float) -> Tensor:
    """The inverse of :func:`logit_transform`: ``y = (σ(x) - α) / (1 - 2α)``."""
    return (torch.sigmoid(x) - alpha) / (1.0 - 2.0 * alpha)


def bits_per_dim(nll: float | Tensor, dims: int) -> float | Tensor:
    """Bits per dimension from the data-space NLL (nats per image of ``dims``
    pixels, dequantized to ``[0, 1)``): ``(nll + D log 256) / (D log 2)``."""
    return (nll + dims * math.log(LEVELS)) / (dims * math.log(2.0))


class ImageData(ArrayData):
    """Images stored as ``uint8`` ``(N, C, H, W)``; the model sees them dequantized
    and logit-transformed (:meth:`preprocess`, fresh noise every batch)."""

    kind = "image"

    def __init__(self, train: Tensor, val: Tensor, test: Tensor, *, seed: int, alpha: float) -> None:
        super().__init__(train, val, test, seed=seed)
        self.alpha = alpha

    def preprocess(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(logit(α + (1 - 2α) y), Σ log|dx/dy|)`` for ``y`` the dequantized pixels."""
        return logit_transform(dequantize(x, generator=generator), self.alpha)

    def metrics(self, nll: float) -> dict[str, float]:
        """``bits_per_dim`` of a mean data-space NLL."""
        return {"bits_per_dim": bits_per_dim(nll, math.prod(self.event_shape))}


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def load_mnist(root: str | Path, *, download: bool) -> tuple[Tensor, Tensor]:
    """MNIST's training and test images, ``uint8`` of shape ``(N, 1, 28, 28)``, read by
    torchvision from ``root/MNIST/raw`` (downloaded there first if ``download``)."""
    from torchvision.datasets import MNIST

    raw = Path(root) / "MNIST" / "raw"
    setup = (f"copy the four MNIST .gz files into {raw} (for example `mkdir -p {raw} && "
             f"cp ../shared/data/MNIST/raw/*.gz {raw}/`)")

    def corrupt(exc: BaseException) -> DataError:
        detail = (str(exc).splitlines() or [type(exc).__name__])[0]
        return DataError(f"the MNIST files in {raw} are corrupt or truncated ({detail}); "
                         f"replace them: delete {raw}/*-ubyte* and {setup}")

    try:
        _extract(raw)
        with contextlib.redirect_stdout(io.StringIO()):  # torchvision prints while extracting
            splits = [MNIST(str(root), train=train, download=download).data for train in (True, False)]
    except RuntimeError as exc:
        if all((raw / name).is_file() for name in MNIST_FILES):  # there, but not what they should hold
            raise corrupt(exc) from None
        if download:
            raise DataError(f"could not download MNIST into {raw} ({str(exc).splitlines()[0]}); {setup}") from None
        raise DataError(f"MNIST not found in {raw}: {setup}, or set data.download=true to download it") from None
    except (ValueError, AssertionError, IndexError, KeyError, EOFError, gzip.BadGzipFile) as exc:  # their checks
        raise corrupt(exc) from None
    except OSError as exc:
        raise DataError(
            f"cannot read or extract MNIST in {raw} ({getattr(exc, 'strerror', None) or exc}); point data.root at a "
            "writable folder holding a copy of the .gz files"
        ) from None
    return splits[0].unsqueeze(1), splits[1].unsqueeze(1)


def _extract(raw: Path) -> None:
    """Decompress the ``*-ubyte.gz`` archives in ``raw`` whose decompressed file is
    missing or of another size than the archive records (a stale or truncated
    copy); torchvision itself only decompresses when asked to download."""
    for archive in raw.glob("*-ubyte.gz") if raw.is_dir() else ():
        target = archive.with_suffix("")
        if not target.exists() or target.stat().st_size != _gzip_size(archive):
            partial = target.with_name(target.name + ".partial")
            with gzip.open(archive, "rb") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.replace(target)


def _gzip_size(archive: Path) -> int:
    """The decompressed size a gzip file records in its last four bytes (modulo 2**32)."""
    with open(archive, "rb") as f:
        f.seek(0, 2)
        if f.tell() < 4:
            return -1
        f.seek(-4, 2)
        return int.from_bytes(f.read(4), "little")


def synthetic_images(n: int, rng: np.random.Generator, size: int = SYNTHETIC_SIZE) -> Tensor:
    """``n`` single-channel ``size x size`` images of one bright bar (horizontal or
    vertical, two pixels wide, random position and brightness) on a dark, noisy
    background: a small structured image set for smoke tests."""
    images = rng.integers(0, 32, size=(n, size, size))
    position = rng.integers(0, size - 1, size=n)
    brightness = rng.integers(160, 256, size=n)
    vertical = rng.random(n) < 0.5
    for i in range(n):
        rows = slice(None) if vertical[i] else slice(position[i], position[i] + 2)
        cols = slice(position[i], position[i] + 2) if vertical[i] else slice(None)
        images[i, rows, cols] = brightness[i]
    return torch.from_numpy(images.astype(np.uint8)).unsqueeze(1)


def downsample(images: Tensor, factor: int) -> Tensor:
    """``uint8`` images ``(N, C, H, W)`` shrunk by ``factor`` per side: each output
    pixel is the mean of a ``factor x factor`` block, rounded to the nearest level,
    so the result is again an image of 256 levels (and bits/dim keep their meaning,
    for the smaller images)."""
    if factor == 1:
        return images
    _, _, h, w = images.shape
    if h % factor or w % factor:
        raise DataError(f"data.downsample={factor} does not divide the {h}x{w} images; use a divisor of both sides")
    means = torch.nn.functional.avg_pool2d(images.double(), factor)
    return means.round().to(torch.uint8)


def load_images(cfg: DataConfig, seed: int) -> ImageData:
    """``mnist`` or ``synthetic8`` as an :class:`ImageData`.

    The last ``cfg.val_size`` training images are the validation set, the first
    ``cfg.subset`` of the rest (all if ``None``) the training set, and the first
    ``cfg.test_size`` test images the test set; all are shrunk by
    ``cfg.downsample``. ``synthetic8`` is a fixed set of 8x8 bar images
    (:func:`synthetic_images`), the same for every seed.
    """
    if cfg.name == "mnist":
        train, test = load_mnist(cfg.root, download=cfg.download)
    elif cfg.name == "synthetic8":
        rng = np.random.default_rng(SYNTHETIC_SIZE)
        train = synthetic_images(SYNTHETIC_TRAIN + cfg.val_size, rng)
        test = synthetic_images(cfg.test_size, rng)
    else:
        raise DataError(f"unknown image dataset {cfg.name!r}; valid: mnist, synthetic8")
    train, test = downsample(train, cfg.downsample), downsample(test, cfg.downsample)
    if cfg.val_size >= len(train):
        raise DataError(f"data.val_size={cfg.val_size} leaves no training images (there are {len(train)})")
    train, val = train[: -cfg.val_size], train[-cfg.val_size :]
    if cfg.subset is not None and cfg.subset > len(train):
        raise DataError(f"data.subset={cfg.subset} exceeds the {len(train)} training images left after validation")
    if cfg.test_size > len(test):
        raise DataError(f"data.test_size={cfg.test_size} exceeds the {len(test)} test images")
    if cfg.subset is not None:
        train = train[: cfg.subset]
    return ImageData(train, val, test[: cfg.test_size], seed=seed, alpha=cfg.logit_alpha)


@torch.no_grad()
def sample_grid(flow: Flow, noise: Tensor, alpha: float, nrow: int | None = None) -> Tensor:
    """Samples from ``noise`` (base draws) as one ``(3, H, W)`` image grid in ``[0, 1]``
    (eval mode, restores the previous mode)."""
    from torchvision.utils import make_grid

    was_training = flow.training
    flow.eval()
    try:
        x = flow.trace(noise, reverse=True, density=False).out
    finally:
        flow.train(was_training)
    pixels = logit_inverse(x, alpha).clamp(0.0, 1.0).cpu()
    return make_grid(pixels, nrow=nrow or math.ceil(math.sqrt(len(pixels))), padding=2, pad_value=1.0)
