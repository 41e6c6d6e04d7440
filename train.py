"""Train a continuous normalizing flow (optionally pruned or gated).

    python train.py CONFIG --out RUN_DIR [--set KEY=VALUE ...] [--resume]

Writes TensorBoard events, ``config.yaml``, ``checkpoint.pt`` (latest) and
``best.pt`` (best validation NLL) under RUN_DIR. ``--resume`` continues from
``RUN_DIR/checkpoint.pt`` exactly where it stopped (same batches, same noise).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from build import build_model
from cnf.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from cnf import distributed
from cnf.base import fit_base
from cnf.config import Config, load_config, save_config, to_dict
from cnf.data import make_data
from cnf.ema import ParameterAverage
from cnf.errors import CheckpointError, ConfigError, NonFiniteError, SolverError, TrainingError, UserError
from cnf.evaluate import evaluate
from cnf.images import sample_grid
from cnf.solver import solver_failure
from pruning.gates import flow_gates, gate_histograms
from pruning.tracking import regularization_terms, sparsity_scalars

# Sections that define the model: a resumed run must not change them.
ARCHITECTURE = ("data", "model", "pruning", "seed")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set solver.rtol=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    return p.parse_args(argv)


def prepare_run_dir(out: Path, resume: bool) -> None:
    if resume and not (out / "checkpoint.pt").is_file():
        raise CheckpointError(f"--resume: there is no {out / 'checkpoint.pt'} to resume from")
    if not resume and (out / "checkpoint.pt").is_file():
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write to the run directory {str(out)!r}: {exc.strerror}") from None


def check_resumable(config: Config, saved: dict) -> None:
    current = to_dict(config)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = None
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        config = load_config(args.config, args.overrides)
        ctx = distributed.setup(config.train.device)
        return train(args, config, ctx)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        for sig, handler in handlers.items():  # train() installs its own
            signal.signal(sig, handler)
        if ctx is not None:
            distributed.teardown(ctx)


def train(args: argparse.Namespace, config: Config, ctx: distributed.Context) -> int:
    # --- run directory (rank 0 writes; every rank reads a checkpoint to resume) ---
    out = Path(args.out)
    tc = config.train
    distributed.check_batch_size(tc.batch_size, ctx)
    if ctx.main:
        prepare_run_dir(out, args.resume)
    saved = load_checkpoint(out / "checkpoint.pt") if args.resume else None
    if saved is not None:
        check_resumable(config, saved["config"])
        changes = changed_settings(to_dict(config), saved["config"])
        if changes and ctx.main:
            print(f"resuming at step {saved['step']} with changed settings: " + "; ".join(changes),
                  file=sys.stderr)
        if saved["step"] >= config.train.iterations and ctx.main:
            print(f"the run already reached train.iterations={config.train.iterations} "
                  f"(step {saved['step']}): only the test evaluation runs; raise train.iterations "
                  "to train further", file=sys.stderr)
        elif stopped_early(config.train, saved["stale_validations"]) and ctx.main:
            print(f"the run stopped early at step {saved['step']} (no better validation NLL in "
                  f"{saved['stale_validations']} validations): only the test evaluation runs; raise "
                  "train.early_stopping (0: off) to train further", file=sys.stderr)
    if ctx.main:
        save_config(config, out / "config.yaml")
    device = ctx.device
    distributed.use_tf32(tc.tf32)  # TF32 convolutions cost adaptive solvers steps (off by default)
    torch.manual_seed(config.seed)  # the same initial model on every rank

    # --- data and model ---------------------------------------------------------
    data = make_data(config.data, config.seed)
    model = build_model(config, data.event_shape).to(device)
    if saved is None and config.model.base_components:
        fit_base_at_init(model, data, config, ctx)
    if saved is None and config.pruning.method != "none":
        from pruning.apply import prune_at_init

        report = prune_at_init(model, data, config, device)
        print(report, file=sys.stderr)
        if config.model.base_components:  # the pruned flow maps the data elsewhere: refit
            fit_base_at_init(model, data, config, ctx)
    # Ranks draw their own probes and gate samples, reproducibly from the seed.
    torch.manual_seed(config.seed + 7919 * ctx.rank)
    step_model = distributed.wrap(model, ctx)  # DistributedDataParallel under torchrun
    optimizer = make_optimizer(model, tc)
    ema = ParameterAverage(model, tc.ema_decay) if tc.ema_decay > 0 else None

    step, best_val, bad_steps, skipped, stale = 0, math.inf, 0, 0, 0
    if saved is not None:
        try:
            # with averaging on, "model" holds the averaged weights and "training_model" the iterate
            model.load_state_dict(saved.get("training_model", saved["model"]))
            optimizer.load_state_dict(regroup_optimizer_state(saved["optimizer"], optimizer, model))
            if ema is not None:  # a run that did not average so far starts averaging its iterate
                ema.load(saved["model"], saved["ema_updates"] if "training_model" in saved else 0)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint does not match the model: {str(exc).splitlines()[0]}") from None
        data.load_state_dict(saved["data"])
        rng = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]  # older single-process format
        if len(rng) != ctx.world_size:
            raise CheckpointError(
                f"--resume: the checkpoint was written by {len(rng)} process(es), "
                f"this run has {ctx.world_size}; resume with the same number of processes"
            )
        set_rng_state(rng[ctx.rank])
        step, best_val, skipped = saved["step"], saved["best_val"], saved["skipped_steps"]
        stale = saved["stale_validations"]
        if ctx.main and step < tc.iterations and not stopped_early(tc, stale):
            # best.pt may be ahead of checkpoint.pt (or gone): compare with what is on disk
            best_val = saved_best_val(out / "best.pt")

    def checkpoint(path: Path, rng: list | None = None) -> None:
        """Rank 0 writes; the latest checkpoint holds every rank's RNG state (a
        collective, so every rank calls it); ``best.pt`` (rank 0 only) passes its own."""
        if rng is None:
            rng = distributed.gather_objects(rng_state(), ctx)
        if not ctx.main:
            return
        weights = {"model": model.state_dict()}
        if ema is not None:  # sample.py and the pruning tools read "model": the averaged weights
            weights = {"model": ema.averaged_state(model), "training_model": model.state_dict(),
                       "ema_updates": ema.updates}
        save_checkpoint(
            {
                "config": to_dict(config), "event_shape": list(data.event_shape), **weights,
                "optimizer": optimizer.state_dict(),
                "step": step, "best_val": best_val, "skipped_steps": skipped, "stale_validations": stale,
                "rng": rng, "data": data.state_dict(),
            },
            path,
        )

    # --- signals: write a checkpoint, then stop ---------------------------------
    stop = {"signal": None}

    def request_stop(signum, frame):  # noqa: ARG001
        stop["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)

    # Image runs log samples from the same base noise at every validation.
    fixed_noise = model.base_noise(64, generator=torch.Generator().manual_seed(config.seed))
    # The checkpoint at `step` was written after that step's events: purge only later
    # ones. A fresh run purges all, in case a killed run left events in `out`.
    writer = SummaryWriter(str(out), purge_step=step + 1 if step > 0 else 0) if ctx.main else None
    bar = tqdm(total=tc.iterations, initial=step, desc="train", dynamic_ncols=True, mininterval=1.0,
               disable=not ctx.main)
    recent_nll: list[float] = []  # logged training NLLs since the last validation
    model.train()
    while step < tc.iterations and not stopped_early(tc, stale):
        # --- one optimization step ---------------------------------------------
        start = time.perf_counter()
        x = distributed.shard(data.train_batch(tc.batch_size), ctx).to(device)
        try:
            nll, loss, trace, penalties = training_loss(step_model, model, data, x, config)
            finite = bool(torch.isfinite(loss))
        except NonFiniteError:
            finite = False
        except SolverError:
            checkpoint(out / "checkpoint.pt")
            raise
        finite = not distributed.any_rank(not finite, ctx)  # every rank skips, or none
        optimizer.zero_grad(set_to_none=True)
        if finite:
            try:
                loss.backward()
            except AssertionError as exc:  # torchdiffeq's step-size underflow, in the adjoint solve
                checkpoint(out / "checkpoint.pt")
                raise solver_failure(exc, model.blocks[0].solver, backward_failure_site(trace)) from None
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf)
            finite = bool(torch.isfinite(grad_norm))
        if not finite:
            skipped += 1
            bad_steps += 1
            if writer is not None:
                writer.add_scalar("train/skipped_steps", skipped, step)
            if bad_steps >= tc.max_bad_steps:
                then = ("the last good checkpoint is kept. {} then --resume" if (out / "checkpoint.pt").is_file()
                        else "no checkpoint was written yet. {} then run again without --resume")
                raise TrainingError(
                    f"{bad_steps} steps in a row had a NaN/inf loss or gradient (step {step}); " + then.format(
                        "Lower train.lr, set train.grad_clip, or tighten the solver tolerances,")
                )
            continue
        bad_steps = 0
        apply_update(model, optimizer, ema, tc, step)
        step += 1
        elapsed = time.perf_counter() - start

        # --- logging (averaged over ranks) ---------------------------------------
        bar.update(1)
        if step % tc.log_every == 0 or step == 1:
            nll_v, nfe_f, nfe_b, jac = distributed.mean_over_ranks(
                [nll.item(), trace.nfe_forward, trace.nfe_backward, trace.jac_norm.mean().item()], ctx
            )
            bar.set_postfix(nll=f"{nll_v:.3f}", nfe=f"{nfe_f:.0f}/{nfe_b:.0f}")
            recent_nll.append(nll_v)
            scalars = {
                "train/nll": nll_v,
                **{f"train/{k}": v for k, v in data.metrics(nll_v).items()},
                "nfe/forward": nfe_f,
                "nfe/backward": nfe_b,
                "jacobian/cumulative_norm": jac,
                "flow/end_time": torch.stack([b.end_time for b in model.blocks]).mean().item(),
                "train/lr": optimizer.param_groups[0]["lr"],
                "time/iter_seconds": elapsed,
                **{f"regularization/{k}": v.item() for k, v in penalties.items()},
                **sparsity_scalars(model),
            }
            for tag, value in scalars.items():
                if writer is not None:
                    writer.add_scalar(tag, value, step)

        # --- validation, figures, checkpoints ------------------------------------
        last = step == tc.iterations
        if ctx.main and (step % tc.val_every == 0 or last):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                    evaluation_weights(model, ema):
                val = evaluate(model, data.val, batch_size=tc.val_batch_size, preprocess=data.preprocess)
                if tc.figures and data.event_shape == (2,):
                    writer.add_figure("flow/density", two_d_figure(model, data), step)
                if tc.figures and len(data.event_shape) == 3:
                    writer.add_image("flow/samples", sample_grid(model, fixed_noise, config.data.logit_alpha), step)
            writer.add_scalar("val/nll", val.nll, step)
            if recent_nll:
                gap = val.nll - sum(recent_nll) / len(recent_nll)
                writer.add_scalar("val/gap_to_train", gap, step)
                warning = solver_gap_warning(gap, math.prod(data.event_shape), model.blocks[0].solver)
                if warning:
                    tqdm.write(f"warning at step {step}: {warning}", file=sys.stderr)
                recent_nll.clear()
            for k, v in data.metrics(val.nll).items():
                writer.add_scalar(f"val/{k}", v, step)
            for tag, values in gate_histograms(model).items():  # empty unless gated
                writer.add_histogram(tag, values, step)
            stale = 0 if val.nll < best_val else stale + 1
            if val.nll < best_val:
                best_val = val.nll
                checkpoint(out / "best.pt", rng=[rng_state()])
        early_stop = distributed.broadcast_object(stopped_early(tc, stale), ctx) \
            if step % tc.val_every == 0 or last else False
        stop_now = distributed.any_rank(stop["signal"] is not None, ctx)
        if step % tc.checkpoint_every == 0 or last or early_stop or stop_now:
            checkpoint(out / "checkpoint.pt")
        if early_stop:
            if ctx.main:
                print(f"early stopping at step {step}: no better validation NLL in {stale} validations",
                      file=sys.stderr)
            break
        if stop_now:
            if writer is not None:
                writer.close()
            signum = stop["signal"] or signal.SIGTERM
            if ctx.main:
                print(f"stopped by signal {signum} at step {step}; checkpoint written, "
                      f"continue with --resume", file=sys.stderr)
            return 128 + signum
    bar.close()
    # Training is over and checkpointed: Ctrl-C and SIGTERM now stop the test
    # evaluation at once instead of waiting for a step that will never come.
    def stop_evaluation(signum, frame):  # noqa: ARG001
        error = TrainingError(
            f"stopped by signal {signum} during the test evaluation; training is finished and "
            f"saved in {out}; run the same command with --resume to evaluate it"
        )
        error.exit_code = 128 + signum
        raise error

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop_evaluation)
    if not ctx.main:
        return 0

    # --- final test evaluation with the best model --------------------------------
    best = best_model_state(out / "best.pt", device, step)
    if best is not None:
        model.load_state_dict(best)  # already averaged when ema_decay > 0
        ema = None
    with evaluation_weights(model, ema):
        test = evaluate(model, data.test, batch_size=tc.val_batch_size, preprocess=data.preprocess)
    writer.add_scalar("test/nll", test.nll, step)
    for k, v in data.metrics(test.nll).items():
        writer.add_scalar(f"test/{k}", v, step)
    writer.add_scalar("test/jacobian_norm", test.jac_norm, step)
    writer.add_scalar("test/nfe", test.nfe, step)
    writer.close()
    derived = "".join(f", {k} {v:.4f}" for k, v in data.metrics(test.nll).items())
    validated = f"best val NLL {best_val:.4f}" if best is not None else f"model of step {step}"
    print(f"done: {step} steps; {validated}; test NLL {test.nll:.4f}{derived} "
          f"(R {test.jac_norm:.3f}, NFE {test.nfe:.0f}) -> {out}")
    return 0


def evaluation_weights(model, ema: ParameterAverage | None):
    """The weights to evaluate and sample with: the average if there is one."""
    return ema.applied(model) if ema is not None else contextlib.nullcontext(model)


def make_optimizer(model, tc) -> torch.optim.Adam:
    """Adam with ``train.weight_decay`` on the weights; gate locations ``log α`` get
    none (as in Louizos et al.: the L0 penalty is what acts on them, and decay would
    pull every gate towards q = 0.83 and an eval gate of 0.5)."""
    gate_ids = {id(p) for gates in flow_gates(model).values() for p in gates.parameters()}
    weights = [p for p in model.parameters() if id(p) not in gate_ids]
    gates = [p for p in model.parameters() if id(p) in gate_ids]
    groups = [{"params": weights}] + ([{"params": gates, "weight_decay": 0.0}] if gates else [])
    return torch.optim.Adam(groups, lr=tc.lr, weight_decay=tc.weight_decay)


def regroup_optimizer_state(state: dict, optimizer: torch.optim.Optimizer, model) -> dict:
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


def saved_best_val(path: Path) -> float:
    """The validation NLL stored in ``best.pt`` (inf when there is none or it is
    unreadable, so that the next validation writes a new one)."""
    if not path.is_file():
        return math.inf
    try:
        return float(load_checkpoint(path)["best_val"])
    except (CheckpointError, KeyError, TypeError, ValueError) as exc:
        print(f"warning: ignoring {path} ({str(exc).splitlines()[0]}); the next best "
              "validation replaces it", file=sys.stderr)
        return math.inf


def backward_failure_site(trace) -> str:
    """Where the adjoint solves of ``loss.backward()`` failed. They run from the last
    block to the first, so the failing one is the first block that evaluated any."""
    for index, counter in enumerate(trace.counters):
        if counter.backward and counter.last_t is not None:
            return f" in the backward (adjoint) solve of block {index}, at t={float(counter.last_t.detach()):.4g}"
    return " in the backward (adjoint) solve"


def apply_update(model, optimizer: torch.optim.Optimizer, ema: ParameterAverage | None, tc, step: int) -> None:
    """The parameter update after a finite backward pass (gradients already clipped):
    this step's learning rate, the optimizer step and the running average."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(tc, step)
    optimizer.step()
    if ema is not None:
        ema.update(model)


def best_model_state(path: Path, device: torch.device, step: int) -> dict | None:
    """The model state of ``best.pt`` for the test, or ``None`` (with a warning) when
    it is missing or unreadable, so that the test uses the model of ``step``."""
    try:
        state = load_checkpoint(path, map_location=device)["model"] if path.is_file() else None
    except (CheckpointError, KeyError, TypeError) as exc:
        print(f"warning: cannot read {path} ({str(exc).splitlines()[0]}); testing the model of "
              f"step {step} instead", file=sys.stderr)
        return None
    if state is None:
        print(f"warning: there is no {path} (no finite validation NLL); testing the model of "
              f"step {step} instead", file=sys.stderr)
    return state


def stopped_early(tc, stale: int) -> bool:
    """Whether ``stale`` validations without improvement end the run (``train.early_stopping``)."""
    return tc.early_stopping > 0 and stale >= tc.early_stopping


def learning_rate(tc, step: int) -> float:
    """The learning rate of the optimizer step taken after ``step`` steps. A function
    of the step alone, so a resumed run follows the same schedule."""
    if tc.lr_schedule == "cosine":
        return 0.5 * tc.lr * (1.0 + math.cos(math.pi * min(step, tc.iterations) / tc.iterations))
    return tc.lr


GAP_WARNING_NATS_PER_DIM = 0.1


def solver_gap_warning(gap: float, dims: int, solver) -> str | None:
    """A warning if a fixed-step training solver may be exploited, else ``None``.

    ``gap`` is the validation NLL (test solver) minus the recent training NLL
    (training solver), in nats per example. With a fixed step, the trace integral
    is only an estimate of the discrete map's log-determinant and a model can learn
    to widen the difference: the training NLL keeps falling while the validation
    NLL, solved accurately, rises. Adaptive solvers control that error themselves.
    """
    if solver.adaptive or gap / dims <= GAP_WARNING_NATS_PER_DIM:
        return None
    return (
        f"validation NLL (test solver) is {gap / dims:.3f} nats/dim above the training NLL "
        f"({solver.describe()}); the fixed-step training solver may be exploited (or the model "
        "overfits). best.pt keeps the best validated model; lower solver.step_size or raise "
        "regularization.kinetic / jacobian_frobenius"
    )


def fit_base_at_init(model, data, config: Config, ctx: distributed.Context) -> None:
    """Fit the mixture base to the untrained flow's latents. Every rank fits it from
    the same examples and seed, and DDP broadcasts rank 0's buffers when it wraps the
    model, so the ranks share one base."""
    m = config.model
    history, used = fit_base(model, data, size=m.base_fit_size, seed=config.seed)
    if ctx.main:
        print(f"base: {m.base_components}-component Gaussian mixture fitted by EM to the latents of "
              f"{used} training examples (mean log-likelihood "
              f"{history[0]:.1f} -> {history[-1]:.1f} nats per example)", file=sys.stderr)


def training_loss(step_model, model, data, x, config: Config):
    """``(nll, loss, trace, penalties)`` of one training batch: the data NLL (nats per
    example, preprocessing included) plus the weighted RNODE and sparsity penalties."""
    x, pre_logdet = data.preprocess(x)  # images: dequantize, logit; else identity
    trace = step_model(x)
    nll = -(model.base.log_prob(trace.out) + trace.logabsdet + pre_logdet).mean()
    r = config.regularization
    loss = nll
    if trace.kinetic is not None:
        loss = loss + r.kinetic * trace.kinetic.mean() + r.jacobian_frobenius * trace.jac_frobenius.mean()
    penalties = regularization_terms(model, r)
    for name, value in penalties.items():
        loss = loss + getattr(r, name) * value
    return nll, loss, trace, penalties


def two_d_figure(model, data):
    from cnf.plots import density_grid, flow_figure

    model.eval()
    with torch.no_grad():
        density = density_grid(model)
        noise = model.base_noise(2000, generator=torch.Generator().manual_seed(0))
        samples = model.trace(noise, reverse=True, density=False).out
    model.train()
    return flow_figure(density, samples, data.val)


if __name__ == "__main__":
    sys.exit(main())
