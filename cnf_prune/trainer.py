"""The trainer: one visible loop over helpers that each do one thing.

:meth:`Trainer.run` is the loop: one step, logging, validation and ``best.pt``,
the latest checkpoint, early stopping and stops on a signal, then the test of
the best model. The loss of a batch comes from an objective object
(:mod:`cnf_prune.objectives`), so the loop does not know what it minimizes.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from cnf.errors import CheckpointError, ConfigError, NonFiniteError, SolverError, TrainingError
from cnf.images import sample_grid
from cnf.solver import solver_failure
from cnf_prune import distributed
from cnf_prune.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from cnf_prune.config import Config, save_config, to_dict
from cnf_prune.ema import ParameterAverage
from cnf_prune.evaluate import evaluate
from cnf_prune.events import EventLog
from cnf_prune.objectives import BatchLoss, make_objective
from cnf_prune.rundir import writing
from cnf_prune.setup import (
    check_resumable, make_optimizer, phase, prepare_model, regroup_optimizer_state, report_resume, say,
    stopped_early,
)
from pruning.gates import gate_histograms
from pruning.tracking import sparsity_scalars

GAP_WARNING_NATS_PER_DIM = 0.1


@dataclass
class LoopState:
    """What the loop carries from step to step: optimizer steps taken, the best
    validation NLL, validations since it improved, steps skipped for a non-finite
    loss or gradient in all and in a row."""

    step: int = 0
    best_val: float = math.inf
    stale: int = 0
    skipped: int = 0
    bad_steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "best_val": self.best_val, "skipped_steps": self.skipped,
                "stale_validations": self.stale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.best_val = int(state["step"]), float(state["best_val"])
        self.skipped, self.stale = int(state["skipped_steps"]), int(state["stale_validations"])


class StopRequest:
    """The signal that asked the run to stop (``None`` while none did)."""

    signal: int | None = None


@contextlib.contextmanager
def stop_on_signal(handler: Callable[[int, Any], None] | None = None) -> Iterator[StopRequest]:
    """Handle SIGTERM and SIGINT for the duration, then restore the previous handlers.

    Without ``handler`` a signal is only recorded in the yielded request, for the
    loop to stop at the end of its step (after a checkpoint)."""
    request = StopRequest()

    def record(signum: int, frame: Any) -> None:  # noqa: ARG001
        request.signal = signum

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, handler or record)
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Trainer:
    """Trains ``config``'s model into ``out`` (a locked run directory on rank 0).

    ``saved``: the checkpoint to resume from, or ``None`` for a fresh run.
    """

    def __init__(self, config: Config, out: Path, ctx: distributed.Context, saved: dict | None = None) -> None:
        self.config, self.out, self.ctx, self.tc = config, out, ctx, config.train
        if ctx.distributed and config.train.objective != "likelihood":
            raise ConfigError(f"train.objective {config.train.objective} runs in one process (its loss does not "
                              "pass through the DDP-wrapped solve that averages gradients); run it without torchrun")
        if saved is not None:
            check_resumable(config, saved["config"])
            report_resume(config, saved, ctx)
        self.device = ctx.device
        self.data, self.model = prepare_model(config, ctx, fresh=saved is None)
        # Ranks draw their own probes and gate samples, reproducibly from the seed.
        torch.manual_seed(config.seed + 7919 * ctx.rank)
        self.step_model = distributed.wrap(self.model, ctx)  # DistributedDataParallel under torchrun
        self.optimizer = make_optimizer(self.model, self.tc, self.config.regularization.gate_lr_scale)
        self.ema = ParameterAverage(self.model, self.tc.ema_decay) if self.tc.ema_decay > 0 else None
        self.objective = make_objective(config.train, config.regularization)
        self.state = LoopState()
        if saved is not None:
            self.resume(saved)
        # Image runs log samples from the same base noise at every validation.
        self.fixed_noise = self.model.base_noise(64, generator=torch.Generator().manual_seed(config.seed))
        self.recent_nll: list[float] = []  # logged training NLLs since the last validation
        self.sparse = config.pruning.method != "none" or config.regularization.gated
        if ctx.main:
            with writing(out / "config.yaml", self.intact):
                save_config(config, out / "config.yaml")
        # The checkpoint at `step` was written after that step's events: purge only later ones.
        # A fresh run purges all, in case a killed run left events in `out`.
        step = self.state.step
        self.events = EventLog(out, purge_step=step + 1 if step > 0 else 0, intact=self.intact) \
            if ctx.main else None

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> int:
        """Train to ``train.iterations`` (or an early stop), then test; the exit code."""
        s, tc, ctx = self.state, self.tc, self.ctx
        bar = tqdm(total=tc.iterations, initial=s.step, desc="train", dynamic_ncols=True, mininterval=1.0,
                   disable=not ctx.main)
        self.model.train()
        started = time.perf_counter()
        with stop_on_signal() as stop, contextlib.closing(bar):
            while s.step < tc.iterations and not self.stopped_early():
                # one optimization step; a non-finite loss or gradient skips it
                start = time.perf_counter()
                batch = self.step()
                if batch is None:
                    continue
                s.step += 1
                bar.update(1)
                # logging (averaged over ranks)
                if s.step % tc.log_every == 0 or s.step == 1:
                    bar.set_postfix(self.log_step(batch, time.perf_counter() - start))
                # validation, best.pt (at the last step: train.iterations, or train.time_limit)
                last = s.step == tc.iterations or self.out_of_time(started)
                validating = s.step % tc.val_every == 0 or last
                if validating and ctx.main:
                    self.validate()
                early_stop = bool(distributed.broadcast_object(self.stopped_early(), ctx)) if validating else False
                stop_now = distributed.any_rank(stop.signal is not None, ctx)
                # the latest checkpoint
                if s.step % tc.checkpoint_every == 0 or last or early_stop or stop_now:
                    self.checkpoint(self.out / "checkpoint.pt")
                # stop early, or on a signal
                if early_stop or last:
                    if early_stop:
                        say(f"early stopping at step {s.step}: no better validation NLL in {s.stale} validations", ctx)
                    break
                if stop_now:
                    return self.stopped_by(stop.signal or signal.SIGTERM)
        # Training is over and checkpointed: a signal now stops the test evaluation at once.
        with stop_on_signal(self.interrupt_test):
            return self.test() if ctx.main else 0

    # --- helpers the loop calls -----------------------------------------------------------------
    def step(self) -> BatchLoss | None:
        """One optimization step on a fresh batch: the batch's loss, or ``None`` when
        every rank skipped it for a non-finite loss or gradient."""
        ctx = self.ctx
        x = distributed.shard(self.data.train_batch(self.tc.batch_size), ctx).to(self.device)
        batch = None
        try:
            batch = self.objective(self.step_model, self.model, self.data, x)
            finite = bool(torch.isfinite(batch.loss))
        except NonFiniteError:
            finite = False
        except SolverError:
            self.checkpoint(self.out / "checkpoint.pt")
            raise
        finite = not distributed.any_rank(not finite, ctx)  # every rank skips, or none
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            try:
                batch.loss.backward()
            except AssertionError as exc:  # torchdiffeq's step-size underflow, in the adjoint solve
                self.checkpoint(self.out / "checkpoint.pt")
                raise solver_failure(exc, self.model.blocks[0].solver, backward_failure_site(batch.trace)) from None
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip or math.inf)
            finite = bool(torch.isfinite(grad_norm))
        if not finite:
            self.skip_step()
            return None
        self.state.bad_steps = 0
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.tc, self.state.step) * group.get("lr_scale", 1.0)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return batch

    def skip_step(self) -> None:
        s = self.state
        s.skipped += 1
        s.bad_steps += 1
        if self.events is not None:
            self.events.scalar("train/skipped_steps", s.skipped, s.step)
        if s.bad_steps >= self.tc.max_bad_steps:
            then = ("the last good checkpoint is kept. {} then --resume" if (self.out / "checkpoint.pt").is_file()
                    else "no checkpoint was written yet. {} then run again without --resume")
            raise TrainingError(
                f"{s.bad_steps} steps in a row had a NaN/inf loss or gradient (step {s.step}); " + then.format(
                    "Lower train.lr, set train.grad_clip, or tighten the solver tolerances,")
            )

    def log_step(self, batch: BatchLoss, seconds: float) -> dict[str, str]:
        """Log one step's scalars (rank means); returns the progress bar's postfix."""
        local: dict[str, float] = {}
        if batch.nll is not None:
            local["train/nll"] = batch.nll.item()
        if batch.trace is not None:
            local["nfe/forward"] = batch.trace.nfe_forward
            local["nfe/backward"] = batch.trace.nfe_backward
            local["jacobian/cumulative_norm"] = batch.trace.jac_norm.mean().item()
        local.update({f"train/{k}": float(v) for k, v in batch.scalars.items()})
        scalars = dict(zip(local, distributed.mean_over_ranks(list(local.values()), self.ctx)))
        if "train/nll" in scalars:
            self.recent_nll.append(scalars["train/nll"])
            scalars.update({f"train/{k}": v for k, v in self.data.metrics(scalars["train/nll"]).items()})
        scalars.update({
            "flow/end_time": torch.stack([b.end_time for b in self.model.blocks]).mean().item(),
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "time/iter_seconds": seconds,
            **({"memory/gpu_peak_mib": torch.cuda.max_memory_allocated(self.device) / 2**20}
               if self.device.type == "cuda" else {}),
            **{f"regularization/{k}": v.item() for k, v in batch.penalties.items()},
            **(sparsity_scalars(self.model) if self.sparse else {}),
        })
        if self.events is not None:
            for tag, value in scalars.items():
                self.events.scalar(tag, value, self.state.step)
        postfix = {"nll": f"{scalars['train/nll']:.3f}"} if "train/nll" in scalars else {}
        if "train/fm_loss" in scalars:
            postfix["fm_loss"] = f"{scalars['train/fm_loss']:.3f}"
        if "nfe/forward" in scalars:
            postfix["nfe"] = f"{scalars['nfe/forward']:.0f}/{scalars['nfe/backward']:.0f}"
        return postfix

    def validate(self) -> None:
        """Rank 0: the validation NLL (test solver, averaged weights), figures, and
        ``best.pt`` when it improved."""
        s, tc, step = self.state, self.tc, self.state.step
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), \
                evaluation_weights(self.model, self.ema):
            examples = self.data.val[: tc.val_examples] if tc.val_examples else self.data.val
            val = evaluate(self.model, examples, batch_size=tc.val_batch_size, preprocess=self.data.preprocess)
            if tc.figures and self.data.event_shape == (2,):
                self.events.figure("flow/density", two_d_figure(self.model, self.data), step)
            if tc.figures and len(self.data.event_shape) == 3:
                grid = sample_grid(self.model, self.fixed_noise, self.config.data.logit_alpha)
                self.events.image("flow/samples", grid, step)
        self.events.scalar("val/nll", val.nll, step)
        self.events.scalar("val/jacobian_norm", val.jac_norm, step)
        self.events.scalar("val/nfe", val.nfe, step)
        if self.tc.objective != "likelihood":  # no training solve: R and NFE curves come from validation
            self.events.scalar("jacobian/cumulative_norm", val.jac_norm, step)
            self.events.scalar("nfe/forward", val.nfe, step)
        if self.recent_nll:
            gap = val.nll - sum(self.recent_nll) / len(self.recent_nll)
            self.events.scalar("val/gap_to_train", gap, step)
            warning = solver_gap_warning(gap, math.prod(self.data.event_shape), self.model.blocks[0].solver)
            if warning:
                tqdm.write(f"warning at step {step}: {warning}", file=sys.stderr)
            self.recent_nll.clear()
        for k, v in self.data.metrics(val.nll).items():
            self.events.scalar(f"val/{k}", v, step)
        for tag, values in gate_histograms(self.model).items():  # empty unless gated
            self.events.histogram(tag, values, step)
        s.stale = 0 if val.nll < s.best_val else s.stale + 1
        if val.nll < s.best_val:
            s.best_val = val.nll
            self.checkpoint(self.out / "best.pt", rng=[rng_state()])

    def checkpoint(self, path: Path, rng: list | None = None) -> None:
        """Rank 0 writes ``path``; the latest checkpoint holds every rank's RNG state
        (a collective, so every rank calls it); ``best.pt`` (rank 0) passes its own."""
        if rng is None:
            rng = distributed.gather_objects(rng_state(), self.ctx)
        if not self.ctx.main:
            return
        model = self.model
        weights: dict[str, Any] = {"model": model.state_dict()}
        if self.ema is not None:  # sample.py and the pruning tools read "model": the averaged weights
            weights = {"model": self.ema.averaged_state(model), "training_model": model.state_dict(),
                       "ema_updates": self.ema.updates}
        payload = {
            "config": to_dict(self.config), "event_shape": list(self.data.event_shape), **weights,
            "optimizer": self.optimizer.state_dict(), **self.state.state_dict(),
            "rng": rng, "data": self.data.state_dict(),
        }
        with writing(path, self.intact):
            save_checkpoint(payload, path)

    def intact(self) -> str:
        """What a failed write leaves intact, and how to go on (for error messages)."""
        path = self.out / "checkpoint.pt"
        if not path.is_file():
            return "no checkpoint was written yet; free space and run the same command again"
        try:
            step = load_checkpoint(path)["step"]
        except (CheckpointError, KeyError):
            return f"{path} is unreadable; free space and start the run again"
        return f"{path.name} of step {step} is intact; free space and run the same command with --resume"

    def out_of_time(self, started: float) -> bool:
        """Whether ``train.time_limit`` seconds of training have passed (rank 0 decides)."""
        if self.tc.time_limit is None:
            return False
        late = time.perf_counter() - started >= self.tc.time_limit
        return bool(distributed.broadcast_object(late, self.ctx))

    def stopped_early(self) -> bool:
        return stopped_early(self.tc, self.state.stale)

    def stopped_by(self, signum: int) -> int:
        if self.events is not None:
            self.events.close()
        say(f"stopped by signal {signum} at step {self.state.step}; checkpoint written, "
            f"continue with --resume", self.ctx)
        return 128 + signum

    def interrupt_test(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        error = TrainingError(
            f"stopped by signal {signum} during the test evaluation; training is finished and "
            f"saved in {self.out}; run the same command with --resume to evaluate it"
        )
        error.exit_code = 128 + signum
        raise error

    def test(self) -> int:
        """Rank 0: the test NLL, R and NFE of the best validated model (the model of
        the last step if there is none), logged and printed."""
        s, model, step = self.state, self.model, self.state.step
        best = best_model_state(self.out / "best.pt", self.device, step)
        ema = self.ema
        if best is not None:
            model.load_state_dict(best)  # already averaged when ema_decay > 0
            ema = None
        phase(f"testing on {len(self.data.test)} examples with {model.blocks[0].test_solver.describe()} ...", self.ctx)
        with evaluation_weights(model, ema):
            test = evaluate(model, self.data.test, batch_size=self.tc.val_batch_size, preprocess=self.data.preprocess)
        metrics = self.data.metrics(test.nll)
        for tag, value in {"test/nll": test.nll, **{f"test/{k}": v for k, v in metrics.items()},
                           "test/jacobian_norm": test.jac_norm, "test/nfe": test.nfe}.items():
            self.events.scalar(tag, value, step)
        self.events.close()
        derived = "".join(f", {k} {v:.4f}" for k, v in metrics.items())
        validated = f"best val NLL {s.best_val:.4f}" if best is not None else f"model of step {step}"
        print(f"done: {step} steps; {validated}; test NLL {test.nll:.4f}{derived} "
              f"(R {test.jac_norm:.3f}, NFE {test.nfe:.0f}){gate_summary(model, self.config)} -> {self.out}")
        return 0

    def resume(self, saved: dict) -> None:
        """Load weights, optimizer, average, data stream, RNG and loop state of ``saved``."""
        model, ctx = self.model, self.ctx
        try:
            # with averaging on, "model" holds the averaged weights and "training_model" the iterate
            model.load_state_dict(saved.get("training_model", saved["model"]))
            self.optimizer.load_state_dict(regroup_optimizer_state(saved["optimizer"], self.optimizer, model))
            if self.ema is not None:  # a run that did not average so far starts averaging its iterate
                self.ema.load(saved["model"], saved["ema_updates"] if "training_model" in saved else 0)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint does not match the model: {str(exc).splitlines()[0]}") from None
        self.data.load_state_dict(saved["data"])
        rng = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]  # older single-process format
        if len(rng) != ctx.world_size:
            raise CheckpointError(
                f"--resume: the checkpoint was written by {len(rng)} process(es), "
                f"this run has {ctx.world_size}; resume with the same number of processes"
            )
        set_rng_state(rng[ctx.rank])
        self.state.load_state_dict(saved)
        if ctx.main and self.state.step < self.tc.iterations and not self.stopped_early():
            # best.pt may be ahead of checkpoint.pt (or gone): compare with what is on disk
            self.state.best_val = saved_best_val(self.out / "best.pt")


def evaluation_weights(model, ema: ParameterAverage | None):
    """The weights to evaluate and sample with: the average if there is one."""
    return ema.applied(model) if ema is not None else contextlib.nullcontext(model)


def gate_summary(model, config: Config) -> str:
    """``; gates closed: ...`` for a gated model's ``done:`` line (empty otherwise)."""
    if not config.regularization.gated:
        return ""
    scalars = sparsity_scalars(model)
    paths = f", path sparsity {scalars['sparsity/paths']:.3f}" if "sparsity/paths" in scalars else ""
    return f"; eval gates leave weight sparsity {scalars['sparsity/weights']:.3f}{paths}"


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
    for index, counter in enumerate(trace.counters if trace is not None else []):
        if counter.backward and counter.last_t is not None:
            return f" in the backward (adjoint) solve of block {index}, at t={float(counter.last_t.detach()):.4g}"
    return " in the backward (adjoint) solve"


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


def learning_rate(tc, step: int) -> float:
    """The learning rate of the optimizer step taken after ``step`` steps: the
    schedule's rate, times ``(step + 1) / warmup_iterations`` during the linear
    warm-up. A function of the step alone, so a resumed run follows the same schedule."""
    lr = tc.lr
    if tc.lr_schedule == "cosine":
        lr = 0.5 * tc.lr * (1.0 + math.cos(math.pi * min(step, tc.iterations) / tc.iterations))
    if step < tc.warmup_iterations:
        lr *= (step + 1) / tc.warmup_iterations
    return lr


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


def two_d_figure(model, data):
    from cnf_prune.figures import density_grid, flow_figure

    model.eval()
    with torch.no_grad():
        density = density_grid(model)
        noise = model.base_noise(2000, generator=torch.Generator().manual_seed(0))
        samples = model.trace(noise, reverse=True, density=False).out
    model.train()
    return flow_figure(density, samples, data.val)
