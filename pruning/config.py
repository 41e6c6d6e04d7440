"""Config sections of the pruning library: ``regularization`` (RNODE and sparsity
penalties, hard-concrete gate settings) and ``pruning`` (pruning at initialization).
Built and checked by :func:`cnf.config.build_section` like the flow's sections."""

from __future__ import annotations

from dataclasses import dataclass, field

from cnf.config import check
from pruning.scores import SCORERS

PRUNING_METHODS = ("none", *SCORERS)


@dataclass
class RegularizationConfig:
    """Weights of training penalties added to the NLL (0 disables a term).

    ``kinetic``: ∫‖f‖² dt and ``jacobian_frobenius``: ∫‖∂f/∂z‖_F² dt (RNODE);
    ``l0``: expected number of open hard-concrete gates; ``pathreg``: expected
    number of input->output paths through the gates; ``path_weights``: the weight
    path norm ‖|W_L|···|W_1|‖_{1,1}. ``gate_*``: hard-concrete gate settings.
    """

    kinetic: float = 0.0
    jacobian_frobenius: float = 0.0
    l0: float = 0.0
    pathreg: float = 0.0
    path_weights: float = 0.0
    gate_temperature: float = 2.0 / 3.0
    gate_stretch_low: float = -0.1
    gate_stretch_high: float = 1.1
    gate_init_open: float = 0.9
    gate_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        for key in ("kinetic", "jacobian_frobenius", "l0", "pathreg", "path_weights"):
            check(getattr(self, key) >= 0, f"regularization.{key} must be non-negative (got {getattr(self, key)})")
        check(self.gate_temperature > 0, f"regularization.gate_temperature (β) must be positive (got {self.gate_temperature})")
        check(self.gate_stretch_low < 0, f"regularization.gate_stretch_low (γ) must be negative (got {self.gate_stretch_low})")
        check(self.gate_stretch_high > 1, f"regularization.gate_stretch_high (ζ) must exceed 1 (got {self.gate_stretch_high})")
        check(self.gate_lr_scale > 0, f"regularization.gate_lr_scale must be positive (got {self.gate_lr_scale})")
        check(0 < self.gate_init_open < 1, f"regularization.gate_init_open must be in (0, 1) (got {self.gate_init_open})")

    @property
    def gated(self) -> bool:
        return self.l0 > 0 or self.pathreg > 0


@dataclass
class PruningConfig:
    """Pruning at initialization: ``method`` (none, random, magnitude, snip, synflow,
    grasp, jacobian_spectrum, jacobian_spectrum_abs, jacobian_spectrum_snip; see
    ``pruning/scores.py``), target ``sparsity`` in [0, 1), ``scope`` global or
    layer, ``batches`` scoring batches, ``layers`` fnmatch patterns of prunable
    weights, ``synflow_iterations`` SynFlow's pruning rounds, ``snip_mix`` the SNIP
    share of ``jacobian_spectrum_snip``, ``granularity`` weight (unstructured) or
    unit (whole hidden units/channels, see ``pruning/structured.py``), ``rounds``
    iterative pruning rounds, ``warmup_steps``/``warmup_lr`` Adam steps on a copy of
    the model before scoring it (the mask then applies to the initial weights)."""

    method: str = "none"
    sparsity: float = 0.0
    scope: str = "global"
    batches: int = 1
    layers: list[str] = field(default_factory=lambda: ["*"])
    synflow_iterations: int = 100
    snip_mix: float = 0.5
    granularity: str = "weight"
    rounds: int = 1
    warmup_steps: int = 0
    warmup_lr: float = 1e-3

    def __post_init__(self) -> None:
        check(self.method in PRUNING_METHODS,
              f"unknown pruning.method {self.method!r}; valid: {', '.join(PRUNING_METHODS)}")
        check(self.granularity in ("weight", "unit"),
               f"pruning.granularity must be 'weight' or 'unit' (got {self.granularity!r})")
        check(0.0 <= self.sparsity < 1.0, f"pruning.sparsity must be in [0, 1) (got {self.sparsity})")
        check(self.scope in ("global", "layer"), f"pruning.scope must be 'global' or 'layer' (got {self.scope!r})")
        check(self.batches > 0, f"pruning.batches must be positive (got {self.batches})")
        check(self.synflow_iterations > 0, "pruning.synflow_iterations must be positive")
        check(self.rounds > 0, f"pruning.rounds must be a positive integer (got {self.rounds})")
        check(self.rounds == 1 or self.method not in ("random", "synflow"),
              f"pruning.rounds applies to scores of the current weights; {self.method} does not iterate "
              "that way (SynFlow has pruning.synflow_iterations): set rounds to 1")
        check(self.rounds == 1 or self.granularity == "weight",
              "pruning.rounds > 1 prunes weights iteratively; with granularity 'unit' set rounds to 1")
        check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
              f"pruning.warmup_steps must be a non-negative integer (got {self.warmup_steps})")
        check(self.warmup_lr > 0, f"pruning.warmup_lr must be positive (got {self.warmup_lr})")
        check(self.warmup_steps == 0 or self.method != "random",
              "pruning.warmup_steps trains a copy of the model before scoring it; random scores ignore the "
              "model: set warmup_steps to 0")
        check(0.0 <= self.snip_mix <= 1.0, f"pruning.snip_mix must be in [0, 1] (got {self.snip_mix})")
        check(self.method != "none" or self.sparsity == 0.0,
               f"pruning.sparsity is {self.sparsity} but pruning.method is 'none'; "
               "choose a method (e.g. --set pruning.method=random) or set the sparsity to 0")
