"""Data sources: seeded training batches, fixed validation/test sets, resumable.

A :class:`DataSource` yields training batches from its own NumPy generator and
holds fixed ``val``/``test`` tensors. Its ``state_dict`` captures the generator
(and epoch position), so a resumed run draws exactly the batches it would have.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from cnf.toy import sample_toy


class DataSource:
    """Base class: ``event_shape``, ``val``, ``test`` and generator state; subclasses
    implement ``train_batch(batch_size) -> Tensor`` and ``training_sample(n, seed) ->
    Tensor``: up to ``n`` training examples drawn with their own ``seed``, leaving the
    training stream (and so the batches of a run) untouched."""

    event_shape: tuple[int, ...]
    val: Tensor
    test: Tensor
    kind: str

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]

    def preprocess(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(x_model, log|det ∂x_model/∂x|)``: what the flow models, and the
        log-determinant that turns its NLL into the data's. The identity here;
        images dequantize and logit-transform (see :mod:`cnf.images`)."""
        return x, x.new_zeros(x.shape[0])

    def metrics(self, nll: float) -> dict[str, float]:
        """Figures derived from a mean data-space NLL (images: ``bits_per_dim``)."""
        return {}


class ToyData(DataSource):
    """A 2-D toy density: fresh training samples every batch (as FFJORD does)."""

    kind = "toy"

    def __init__(self, name: str, *, seed: int, val_size: int, test_size: int) -> None:
        super().__init__(seed)
        self.name = name
        self.event_shape = (2,)
        val_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)[1:])
        self.val = torch.from_numpy(sample_toy(name, val_size, val_rng))
        self.test = torch.from_numpy(sample_toy(name, test_size, test_rng))

    def train_batch(self, batch_size: int) -> Tensor:
        return torch.from_numpy(sample_toy(self.name, batch_size, self.rng))

    def training_sample(self, n: int, seed: int) -> Tensor:
        return torch.from_numpy(sample_toy(self.name, n, np.random.default_rng(seed)))


class ArrayData(DataSource):
    """Fixed train/val/test arrays; training batches walk a fresh permutation per epoch."""

    kind = "tabular"

    def __init__(self, train: np.ndarray, val: np.ndarray, test: np.ndarray, *, seed: int) -> None:
        super().__init__(seed)
        self.train = torch.as_tensor(train)
        self.val = torch.as_tensor(val)
        self.test = torch.as_tensor(test)
        self.event_shape = tuple(self.train.shape[1:])
        self._order = torch.from_numpy(self.rng.permutation(len(self.train)))
        self._pos = 0

    def train_batch(self, batch_size: int) -> Tensor:
        if self._pos + batch_size > len(self._order):
            self._order = torch.from_numpy(self.rng.permutation(len(self.train)))
            self._pos = 0
        idx = self._order[self._pos : self._pos + batch_size]
        self._pos += batch_size
        return self.train[idx]

    def training_sample(self, n: int, seed: int) -> Tensor:
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed))
        return self.train[order[:n]]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "order": self._order.clone(), "pos": self._pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._order, self._pos = state["order"].clone(), int(state["pos"])
