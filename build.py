"""``build_model``: the one place both scripts turn a config into a model.

It composes :mod:`cnf` (the flow) with :mod:`pruning` (weight gates for L0 and
PathReg), so that ``cnf`` never needs to import ``pruning``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from cnf.checkpoint import load_checkpoint
from cnf.config import Config, from_dict
from cnf.errors import CheckpointError, ConfigError
from cnf.flow import Flow
from cnf.model import build_flow


def build_model(config: Config, event_shape: Sequence[int]) -> Flow:
    """The flow for ``config`` on data of ``event_shape``, with gates if L0/PathReg are on."""
    make_gates = None
    if config.regularization.gated:
        from pruning.gates import gate_factory

        make_gates = gate_factory(config.regularization)
    return build_flow(config, event_shape, make_gates=make_gates)


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[Flow, Config, dict[str, Any]]:
    """Rebuild the model stored in a checkpoint from the config stored with it.

    Returns ``(model, config, payload)``; the model holds the checkpoint's weights
    and masks. A checkpoint that does not rebuild raises :class:`CheckpointError`.
    """
    ckpt = load_checkpoint(path, map_location=map_location)
    try:
        config = from_dict(ckpt["config"])
        model = build_model(config, ckpt["event_shape"])
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError, ConfigError) as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not rebuild a model: {str(exc).splitlines()[0]}"
        ) from None
    return model, config, ckpt
