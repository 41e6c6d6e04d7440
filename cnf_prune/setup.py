"""What a run sets up before its first step: the data, the model (with its base
fitted and its weights pruned at initialization), the optimizer, and the checks
a resumed run makes against its checkpoint."""

from __future__ import annotations

import sys

import torch

from cnf.base import fit_base
from cnf.data import DataSource, make_data
from cnf.errors import CheckpointError
from cnf.flow import Flow
from cnf_prune import distributed
from cnf_prune.build import build_model
from cnf_prune.config import Config, TrainConfig, from_dict, to_dict
from cnf_prune.objectives import make_objective
from pruning.apply import prune_at_init
from pruning.gates import flow_gates
from pruning.scores import Loss

# Sections that define the model: a resumed run must not change them.
ARCHITECTURE = ("data", "model", "pruning", "seed")


def say(message: str, ctx: distributed.Context) -> None:
    """A message about the run on stderr, from rank 0 only."""
    if ctx.main:
        print(message, file=sys.stderr, flush=True)


def phase(message: str, ctx: distributed.Context) -> None:
    """A line on stdout, from rank 0, as a long phase (fitting, pruning, testing) begins."""
    if ctx.main:
        print(message, flush=True)


def prepare_model(config: Config, ctx: distributed.Context, *, fresh: bool) -> tuple[DataSource, Flow]:
    """The data source and the model on ``ctx.device``. A fresh run (not a resume)
    also fits a mixture base and prunes at initialization, as the config says."""
    distributed.use_tf32(config.train.tf32)  # TF32 convolutions cost adaptive solvers steps (off by default)
    torch.manual_seed(config.seed)  # the same initial model on every rank
    data = make_data(config.data, config.seed)
    model = build_model(config, data.event_shape).to(ctx.device)
    if fresh and config.model.base_components:
        fit_base_at_init(model, data, config, ctx)
    if fresh and config.pruning.method != "none":
        phase(f"pruning at initialization ({config.pruning.method}) ...", ctx)
        report = prune_at_init(model, data, config.pruning, batch_size=config.train.batch_size, seed=config.seed,
                               loss=scoring_loss(config))
        print(report, file=sys.stderr)
        if config.model.base_components:  # the pruned flow maps the data elsewhere: refit
            fit_base_at_init(model, data, config, ctx)
    if config.train.compile:
        phase("compiling the vector fields with torch.compile (the first steps include the compile time) ...", ctx)
        compile_fields(model)
    return data, model


def compile_fields(model: Flow) -> None:
    """Compile every block's vector field in place (``train.compile``): parameter names
    and checkpoints are unchanged.

    One compiled graph per input shape and grad mode (``dynamic=False``: the shapes are
    few and fixed, and dynamic-shape kernels fail for some conv layouts), for every
    block's shape; dynamo's per-function limit of 8 graphs is raised to cover them, so
    that no block falls back to uncompiled code.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(model.blocks))
    for block in model.blocks:
        block.field.compile(dynamic=False)


def scoring_loss(config: Config) -> Loss | None:
    """The training loss whose gradient ``dL`` pruning scores use: ``None`` (the NLL)
    for likelihood training; for flow matching its regression loss on each scoring
    batch, with base draws and times from a generator seeded by ``config.seed``."""
    if config.train.objective != "flow_matching":
        return None
    objective = make_objective(config.train, config.regularization)
    generator = torch.Generator().manual_seed(config.seed)
    return lambda model, x, trace: objective.regression_loss(model, x, generator)


def fit_base_at_init(model: Flow, data: DataSource, config: Config, ctx: distributed.Context) -> None:
    """Fit the mixture base to the untrained flow's latents. Every rank fits it from
    the same examples and seed, and DDP broadcasts rank 0's buffers when it wraps the
    model, so the ranks share one base."""
    m = config.model
    phase(f"base: fitting a {m.base_components}-component Gaussian mixture by EM to the latents of up to "
        f"{m.base_fit_size} training examples ...", ctx)
    history, used = fit_base(model, data, size=m.base_fit_size, seed=config.seed)
    say(f"base: {m.base_components}-component Gaussian mixture fitted by EM to the latents of "
        f"{used} training examples (mean log-likelihood "
        f"{history[0]:.1f} -> {history[-1]:.1f} nats per example)", ctx)


def normalized(saved: dict) -> dict:
    """A checkpoint's config dict with the keys added since it was written, at their
    defaults (which reproduce what the older code did), so configs compare like for like."""
    return to_dict(from_dict(saved))


def check_resumable(config: Config, saved: dict) -> None:
    current, saved = to_dict(config), normalized(saved)
    for section in ARCHITECTURE:
        if current[section] != saved[section]:
            raise CheckpointError(
                f"--resume: config section {section!r} differs from the checkpoint's; "
                "only training and solver settings may change when resuming"
            )


def changed_settings(current: dict, saved: dict, prefix: str = "") -> list[str]:
    """``"section.key: old -> new"`` for every setting that differs between two config
    dicts. The config file given to a resumed run replaces the saved one, so a resume
    reports what it changes (for example a regularization weight) instead of doing it
    silently."""
    changes = []
    for key in sorted(set(current) | set(saved)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += changed_settings(b, a, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


def report_resume(config: Config, saved: dict, ctx: distributed.Context) -> None:
    """Say what a resumed run changes, and when it will only test."""
    tc = config.train
    changes = changed_settings(to_dict(config), normalized(saved["config"]))
    if changes:
        say(f"resuming at step {saved['step']} with changed settings: " + "; ".join(changes), ctx)
    if saved["step"] >= tc.iterations:
        say(f"the run already reached train.iterations={tc.iterations} "
            f"(step {saved['step']}): only the test evaluation runs; raise train.iterations "
            "to train further", ctx)
    elif stopped_early(tc, saved["stale_validations"]):
        say(f"the run stopped early at step {saved['step']} (no better validation NLL in "
            f"{saved['stale_validations']} validations): only the test evaluation runs; raise "
            "train.early_stopping (0: off) to train further", ctx)


def stopped_early(tc: TrainConfig, stale: int) -> bool:
    """Whether ``stale`` validations without improvement end the run (``train.early_stopping``)."""
    return tc.early_stopping > 0 and stale >= tc.early_stopping


def make_optimizer(model: Flow, tc: TrainConfig, gate_lr_scale: float = 1.0) -> torch.optim.Adam:
    """Adam with ``train.weight_decay`` on the weights; gate locations ``log α`` get
    none (as in Louizos et al.: the L0 penalty is what acts on them, and decay would
    pull every gate towards q = 0.83 and an eval gate of 0.5), and ``gate_lr_scale``
    times the learning rate (each group's ``lr_scale``; the trainer's schedule applies it)."""
    gate_ids = {id(p) for gates in flow_gates(model).values() for p in gates.parameters()}
    weights = [p for p in model.parameters() if id(p) not in gate_ids]
    gates = [p for p in model.parameters() if id(p) in gate_ids]
    gate_group = {"params": gates, "weight_decay": 0.0, "lr": tc.lr * gate_lr_scale, "lr_scale": gate_lr_scale}
    groups = [{"params": weights, "lr_scale": 1.0}] + ([gate_group] if gates else [])
    return torch.optim.Adam(groups, lr=tc.lr, weight_decay=tc.weight_decay)


def regroup_optimizer_state(state: dict, optimizer: torch.optim.Optimizer, model: Flow) -> dict:
    """A one-group optimizer state of a gated model (written before gates had a group
    of their own, in ``model.parameters()`` order) rearranged into ``optimizer``'s
    groups; any other state is returned as it is."""
    if len(state["param_groups"]) != 1 or len(optimizer.param_groups) == 1:
        return state
    old_index = {id(p): i for i, p in enumerate(model.parameters())}
    if len(state["param_groups"][0]["params"]) != len(old_index):
        return state  # load_state_dict reports the mismatch
    groups, moments, position = [], {}, 0
    for group in optimizer.param_groups:
        params = list(range(position, position + len(group["params"])))
        groups.append({**state["param_groups"][0], "weight_decay": group["weight_decay"], "params": params})
        for new, p in zip(params, group["params"]):
            if old_index[id(p)] in state["state"]:
                moments[new] = state["state"][old_index[id(p)]]
        position += len(group["params"])
    return {"state": moments, "param_groups": groups}
