"""Pieces of large sampling jobs: base noise that does not depend on the batch
size, ``.npy`` output written batch by batch, and default batch sizes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import Tensor

from cnf.flow import Flow
from cnf_prune.rundir import writing

NOISE_BLOCK = 256  # samples per noise block: the unit the seed is split into

# Samples per solve when --batch-size is not given, by kind of model, measured with
# bench/sample_batch.py on 2 CPU cores (2026-12-07, docs/performance.md): the toy model
# draws 47000 samples/s at batch 1000 against 11000 at 100 and 27000-29000 at 5000-10000;
# the 28x28 U-Net flow 5 images/s at 64 against 4 at 16 and 128.
DEFAULT_BATCH = {"flat": 1000, "image": 64}


def default_batch_size(model: Flow) -> int:
    return DEFAULT_BATCH["image" if len(model.event_shape) == 3 else "flat"]


class SampleNoise:
    """The base noise of samples ``start .. start + count - 1`` for ``seed``.

    Noise is drawn in blocks of :data:`NOISE_BLOCK` samples, block ``k`` from a CPU
    generator seeded with ``(seed, k)``, so sample ``i``'s noise is the same for
    every batch size (and device)."""

    def __init__(self, model: Flow, seed: int, temperature: float) -> None:
        self.model, self.seed, self.temperature = model, seed, temperature
        self._cached: tuple[int, Tensor] | None = None

    def _block(self, k: int) -> Tensor:
        if self._cached is None or self._cached[0] != k:
            generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, k]).generate_state(1)[0]))
            self._cached = (k, self.model.base_noise(NOISE_BLOCK, generator=generator, temperature=self.temperature))
        return self._cached[1]

    def draw(self, start: int, count: int) -> Tensor:
        first, last = start // NOISE_BLOCK, (start + count - 1) // NOISE_BLOCK
        blocks = torch.cat([self._block(k) for k in range(first, last + 1)])
        offset = start - first * NOISE_BLOCK
        return blocks[offset : offset + count]


class NpyWriter:
    """Rows of a ``.npy`` file written as they come, into ``PATH.partial`` renamed
    over ``PATH`` when complete; a write failure removes the partial file."""

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        self.path, self.partial = path, path.with_name(path.name + ".partial")
        with self._writing():
            self.array = open_memmap(self.partial, mode="w+", dtype=np.float32, shape=shape)

    def _writing(self):
        return writing(self.path, f"{self.path} was not changed")

    def write(self, start: int, rows: Tensor) -> None:
        try:
            with self._writing():
                self.array[start : start + len(rows)] = rows.numpy()
        except BaseException:
            self.discard()
            raise

    def finish(self, rows: int | None = None) -> None:
        """Complete the file; ``rows`` keeps only the first ``rows`` (a stopped job)."""
        try:
            with self._writing():
                if rows is not None and rows < len(self.array):
                    kept = open_memmap(self.path.with_name(self.path.name + ".kept"), mode="w+",
                                       dtype=np.float32, shape=(rows, *self.array.shape[1:]))
                    kept[:] = self.array[:rows]
                    kept.flush()
                    del kept
                    self.discard()
                    os.replace(self.path.with_name(self.path.name + ".kept"), self.path)
                    return
                self.array.flush()
                del self.array
                os.replace(self.partial, self.path)
        except BaseException:
            self.discard()
            self.path.with_name(self.path.name + ".kept").unlink(missing_ok=True)
            raise

    def discard(self) -> None:
        self.__dict__.pop("array", None)
        self.partial.unlink(missing_ok=True)
