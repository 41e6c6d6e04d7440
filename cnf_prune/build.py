"""``build_model``: the one place every command turns a config into a model.

It composes :mod:`cnf` (the flow) with :mod:`pruning` (weight gates for L0 and
PathReg), so that ``cnf`` never needs to import ``pruning``. Checkpoints rebuild
through it too (:func:`load_model`), so a checkpoint always rebuilds the model
that wrote it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import torch

from cnf.errors import CheckpointError, ConfigError
from cnf.flow import Flow
from cnf.model import build_flow
from cnf_prune.checkpoint import load_checkpoint
from cnf_prune.config import Config, from_dict
from pruning.compact import compacted_state
from pruning.gates import gate_factory


def build_model(config: Config, event_shape: Sequence[int], *, test_tolerance: float | None = None) -> Flow:
    """The flow for ``config`` on data of ``event_shape``, with gates if L0/PathReg
    are on. ``test_tolerance``, if given, sets ``rtol = atol`` of the evaluation and
    sampling solver (which must then be adaptive)."""
    r, solver = config.regularization, config.solver
    if test_tolerance is not None:
        _check_adaptive(config, test_tolerance)
        solver = dataclasses.replace(solver, test_rtol=test_tolerance, test_atol=test_tolerance)
    return build_flow(
        config.model, solver, event_shape,
        kinetic=r.kinetic > 0, jacobian_frobenius=r.jacobian_frobenius > 0,
        make_gates=gate_factory(r) if r.gated else None,
    )


def _check_adaptive(config: Config, tolerance: float) -> None:
    test = config.solver.test_solver(tolerance)
    if not test.adaptive:
        raise ConfigError(f"--tol needs an adaptive solver; this checkpoint samples with {test.describe()}")


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu", *, test_tolerance: float | None = None
) -> tuple[Flow, Config, dict[str, Any]]:
    """Rebuild the model stored in a checkpoint from the config stored with it.

    Returns ``(model, config, payload)``; the model holds the checkpoint's weights
    and masks. A checkpoint that does not rebuild raises :class:`CheckpointError`.
    ``test_tolerance`` as in :func:`build_model`.
    """
    ckpt = load_checkpoint(path, map_location=map_location)

    def unusable(exc: Exception) -> CheckpointError:
        return CheckpointError(f"checkpoint {str(path)!r} does not rebuild a model: {str(exc).splitlines()[0]}")

    try:
        config = from_dict(ckpt["config"])
    except (KeyError, ConfigError) as exc:
        raise unusable(exc) from None
    if test_tolerance is not None:
        _check_adaptive(config, test_tolerance)
    try:
        model = build_model(config, ckpt["event_shape"], test_tolerance=test_tolerance)
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError, ConfigError) as exc:
        raise unusable(exc) from None
    return model, config, ckpt


def load_flow(path: str | Path, map_location: str | torch.device = "cpu") -> Flow:
    """The trained flow of a checkpoint, in eval mode, for use in Python:
    ``flow.log_prob(x)``, ``flow.sample((n,))``, ``flow.rsample((n,))``."""
    return load_model(path, map_location)[0].eval()


def compact_model(model: Flow, config: Config) -> tuple[Flow, Config]:
    """The smaller model without the pruned units of ``model`` (built from
    ``config``), and its config, which records the new widths in
    ``model.block_hidden_dims``. The new model has the device, dtype and
    train/eval mode of ``model``; ``model`` is not changed."""
    widths, state = compacted_state(model)
    smaller = dataclasses.replace(config, model=dataclasses.replace(config.model, block_hidden_dims=widths))
    reference = next(model.parameters())
    new = build_model(smaller, model.event_shape).to(device=reference.device, dtype=reference.dtype)
    new.load_state_dict(state)
    return new.train(model.training), smaller
