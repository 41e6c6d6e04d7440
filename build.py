"""``build_model``: the one place both scripts turn a config into a model.

It composes :mod:`cnf` (the flow) with :mod:`pruning` (weight gates for L0 and
PathReg), so that ``cnf`` never needs to import ``pruning``.
"""

from __future__ import annotations

from typing import Sequence

from cnf.config import Config
from cnf.flow import Flow
from cnf.model import build_flow


def build_model(config: Config, event_shape: Sequence[int]) -> Flow:
    """The flow for ``config`` on data of ``event_shape``, with gates if L0/PathReg are on."""
    make_gates = None
    if config.regularization.gated:
        from pruning.gates import gate_factory

        make_gates = gate_factory(config.regularization)
    return build_flow(config, event_shape, make_gates=make_gates)
