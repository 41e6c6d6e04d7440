"""Hard-concrete weight gates for L0 regularization.

Each gated weight entry ``w`` gets a gate ``z ∈ [0, 1]`` with its own location
``log α``. With temperature ``β`` and stretch interval ``(γ, ζ)``, ``γ < 0 < 1 < ζ``:

    u ~ U(0, 1),   s̄ = sigmoid((log u − log(1 − u) + log α) / β),
    s = s̄ (ζ − γ) + γ,   z = min(1, max(0, s)).

The stretch puts probability mass on exactly ``0`` and exactly ``1``. The
probability that a gate is open has a closed form,

    q(z ≠ 0) = 1 − Q(s ≤ 0) = sigmoid(log α − β log(−γ / ζ)),

and the expected L0 norm is its sum over gates. In eval mode a gate is the
deterministic ``min(1, max(0, sigmoid(log α)(ζ − γ) + γ))``.

The ODE block calls the gate module once per solve, so a training solve sees one
fixed draw of every gate: the vector field is deterministic inside the solve, and
adaptive step-size control is not fooled by gate noise.

References: Louizos, Welling & Kingma 2018, "Learning Sparse Neural Networks
through L0 Regularization"; Aliee et al. 2022, "Sparsity in Continuous-Depth
Neural Networks" (eqs. 4-5).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from pruning.config import RegularizationConfig
from cnf.errors import ConfigError
from cnf.fields import VectorField
from cnf.flow import Flow
from pruning.masks import mask_buffer

_EPS = 1e-6  # keeps the uniform noise away from 0 and 1, where its logit is infinite


class HardConcreteGates(nn.Module):
    """One hard-concrete gate per entry of each named weight.

    Args:
        shapes: weight name (as in :meth:`VectorField.prunable_weights`) -> shape.
        temperature: ``β > 0``.
        stretch_low / stretch_high: ``γ < 0`` and ``ζ > 1``.
        init_open: the open probability ``q(z ≠ 0)`` every gate starts with;
            ``log α`` is initialized to ``logit(init_open) + β log(−γ/ζ)``.

    Calling the module returns ``{name: gate}`` with each gate of its weight's
    shape: a fresh reparametrized draw in training mode, the deterministic gate
    in eval mode. The names are kept in order, so ``log_alpha[i]`` belongs to
    ``names[i]``.
    """

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        *,
        temperature: float = 2.0 / 3.0,
        stretch_low: float = -0.1,
        stretch_high: float = 1.1,
        init_open: float = 0.9,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"gate temperature β must be positive (got {temperature})")
        if not stretch_low < 0:
            raise ConfigError(f"gate stretch γ must be negative (got {stretch_low})")
        if not stretch_high > 1:
            raise ConfigError(f"gate stretch ζ must exceed 1 (got {stretch_high})")
        if not 0 < init_open < 1:
            raise ConfigError(f"initial gate open probability must be in (0, 1) (got {init_open})")
        if not shapes:
            raise ConfigError("hard-concrete gates need at least one weight to gate")
        self.names = tuple(shapes)
        self.temperature = temperature
        self.stretch_low = stretch_low
        self.stretch_high = stretch_high
        start = math.log(init_open / (1 - init_open)) + self._open_shift
        self.log_alpha = nn.ParameterList(
            nn.Parameter(torch.full(tuple(shape), start)) for shape in shapes.values()
        )

    @property
    def _open_shift(self) -> float:
        """``β log(−γ/ζ)``: ``q(z ≠ 0) = sigmoid(log α − shift)``."""
        return self.temperature * math.log(-self.stretch_low / self.stretch_high)

    def open_probabilities(self) -> dict[str, Tensor]:
        """``q(z ≠ 0) = sigmoid(log α − β log(−γ/ζ))`` per gate (differentiable)."""
        shift = self._open_shift
        return {n: torch.sigmoid(a - shift) for n, a in zip(self.names, self.log_alpha)}

    def expected_l0(self) -> Tensor:
        """The expected number of open gates, ``Σ q(z ≠ 0)`` (a scalar)."""
        return sum(p.sum() for p in self.open_probabilities().values())

    def _stretch(self, s: Tensor) -> Tensor:
        return (s * (self.stretch_high - self.stretch_low) + self.stretch_low).clamp(0.0, 1.0)

    def sample(self) -> dict[str, Tensor]:
        """One reparametrized draw of every gate; gradients reach ``log α``."""
        out = {}
        for name, a in zip(self.names, self.log_alpha):
            u = torch.rand_like(a).clamp(_EPS, 1 - _EPS)
            logistic = torch.log(u) - torch.log1p(-u)
            out[name] = self._stretch(torch.sigmoid((logistic + a) / self.temperature))
        return out

    def deterministic(self) -> dict[str, Tensor]:
        """The eval-mode gates ``min(1, max(0, sigmoid(log α)(ζ − γ) + γ))``."""
        return {n: self._stretch(torch.sigmoid(a)) for n, a in zip(self.names, self.log_alpha)}

    def forward(self) -> dict[str, Tensor]:
        return self.sample() if self.training else self.deterministic()

    def extra_repr(self) -> str:
        n = sum(a.numel() for a in self.log_alpha)
        return (f"{n} gates, β={self.temperature:g}, γ={self.stretch_low:g}, "
                f"ζ={self.stretch_high:g}")


def gate_factory(config: RegularizationConfig) -> Callable[[VectorField], HardConcreteGates]:
    """A function that gates every prunable weight of a field with ``config``'s settings."""

    def make(field: VectorField) -> HardConcreteGates:
        return HardConcreteGates(
            {name: p.shape for name, p in field.prunable_weights().items()},
            temperature=config.gate_temperature,
            stretch_low=config.gate_stretch_low,
            stretch_high=config.gate_stretch_high,
            init_open=config.gate_init_open,
        )

    return make


def flow_gates(model: Flow) -> dict[int, HardConcreteGates]:
    """The hard-concrete gates of each gated block, keyed by block index."""
    return {
        k: block.gates
        for k, block in enumerate(model.blocks)
        if isinstance(block.gates, HardConcreteGates)
    }


def expected_l0(model: Flow) -> Tensor:
    """``Σ_blocks Σ_gates mask ⊙ q(z ≠ 0)``: the L0 penalty of a gated flow (a scalar).

    Gates on pruned entries (``weight_mask == 0``) are not counted: those weights
    are zero whatever their gate does.
    """
    gates = flow_gates(model)
    if not gates:
        raise ConfigError("the L0 penalty needs a gated model; build the model with gates (regularization.l0 or pathreg > 0)")
    return sum(
        (p * mask_buffer(model.blocks[k].field, name)).sum()
        for k, g in gates.items()
        for name, p in g.open_probabilities().items()
    )


@torch.no_grad()
def gate_histograms(model: Flow) -> dict[str, Tensor]:
    """Open probabilities ``q(z ≠ 0)`` for TensorBoard histograms: one tag per gated
    weight (``gates/open_probability/<full weight name>``) and one over all gates
    (``gates/open_probability``). Empty for a model without gates."""
    out: dict[str, Tensor] = {}
    for k, gates in flow_gates(model).items():
        for name, p in gates.open_probabilities().items():
            out[f"gates/open_probability/blocks.{k}.field.{name}"] = p.flatten()
    if out:
        out["gates/open_probability"] = torch.cat(list(out.values()))
    return out
