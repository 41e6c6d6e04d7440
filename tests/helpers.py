"""Reusable test pieces: a linear vector field with closed-form flow; a quick
toy training run through train.py's entry point."""

from __future__ import annotations

from torch import Tensor, nn

import train

from cnf.fields import VectorField


class LinearField(VectorField):
    """``f(t, z) = A z``: the flow is ``z(T) = e^{AT} z(0)`` and ``J = A`` everywhere."""

    def __init__(self, a: Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(a.clone())
        self.event_shape = (a.shape[0],)

    def forward(self, t, z, tangents=None, weights=None):
        jv = None if tangents is None else tangents @ self.a.T
        return z @ self.a.T, jv


def count_calls(field: nn.Module) -> list[int]:
    """Wrap ``field.forward`` to count its calls; returns the one-element counter."""
    calls = [0]
    inner = field.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    field.forward = counted
    return calls


# A few seconds of toy training: small field, loose tolerances, validation twice.
QUICK = ["--set", "train.iterations=4", "--set", "train.val_every=2", "--set", "train.log_every=1",
         "--set", "model.hidden_dims=[16,16]", "--set", "data.val_size=200", "--set", "data.test_size=200",
         "--set", "solver.rtol=1e-3", "--set", "solver.atol=1e-3"]


def scalar_events(run, tag: str) -> list:
    """Every TensorBoard scalar event of ``tag`` in ``run`` (``.step``, ``.value``), none sampled away."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return events.Scalars(tag)


def run_train(out, *extra: str) -> int:
    """``train.py configs/toy.yaml --out out`` with :data:`QUICK` and ``extra`` settings."""
    return train.main(["configs/toy.yaml", "--out", str(out), *QUICK, *extra])


def prune(model, data, config):
    """Prune ``model`` at initialization as ``config`` (an experiment config) says."""
    from pruning.apply import prune_at_init

    return prune_at_init(model, data, config.pruning, batch_size=config.train.batch_size, seed=config.seed)


def score_args(config) -> tuple:
    """A scorer's ``(settings, seed)`` arguments from an experiment config."""
    return config.pruning, config.seed
