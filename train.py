"""Train a continuous normalizing flow (optionally pruned or gated).

    python train.py CONFIG --out RUN_DIR [--set KEY=VALUE ...] [--resume]

Writes TensorBoard events, ``config.yaml``, ``checkpoint.pt`` (latest) and
``best.pt`` (best validation NLL) under RUN_DIR. ``--resume`` continues from
``RUN_DIR/checkpoint.pt`` exactly where it stopped (same batches, same noise).
"""

from __future__ import annotations

import argparse
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
from cnf.config import Config, load_config, save_config, to_dict
from cnf.data import make_data
from cnf.errors import CheckpointError, ConfigError, SolverError, TrainingError, UserError
from cnf.evaluate import evaluate
from cnf.flow import standard_normal_log_prob
from cnf.solver import solver_failure
from pruning.gates import gate_histograms
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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device {name!r} is not a device (use auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no GPU is available; use --set train.device=cpu")
    return device


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return train(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def train(args: argparse.Namespace) -> int:
    # --- config and run directory -------------------------------------------------
    config = load_config(args.config, args.overrides)
    out = Path(args.out)
    prepare_run_dir(out, args.resume)
    saved = load_checkpoint(out / "checkpoint.pt") if args.resume else None
    if saved is not None:
        check_resumable(config, saved["config"])
    save_config(config, out / "config.yaml")
    tc = config.train
    device = pick_device(tc.device)
    torch.manual_seed(config.seed)

    # --- data and model ---------------------------------------------------------
    data = make_data(config.data, config.seed)
    model = build_model(config, data.event_shape).to(device)
    if saved is None and config.pruning.method != "none":
        from pruning.apply import prune_at_init

        report = prune_at_init(model, data, config, device)
        print(report, file=sys.stderr)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)

    step, best_val, bad_steps, skipped = 0, math.inf, 0, 0
    if saved is not None:
        try:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint does not match the model: {str(exc).splitlines()[0]}") from None
        data.load_state_dict(saved["data"])
        set_rng_state(saved["rng"])
        step, best_val, skipped = saved["step"], saved["best_val"], saved["skipped_steps"]

    def checkpoint(path: Path) -> None:
        save_checkpoint(
            {
                "config": to_dict(config), "event_shape": list(data.event_shape),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "best_val": best_val, "skipped_steps": skipped,
                "rng": rng_state(), "data": data.state_dict(),
            },
            path,
        )

    # --- signals: write a checkpoint, then stop ---------------------------------
    stop = {"signal": None}

    def request_stop(signum, frame):  # noqa: ARG001
        stop["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)

    writer = SummaryWriter(str(out), purge_step=step if step > 0 else None)
    bar = tqdm(total=tc.iterations, initial=step, desc="train", dynamic_ncols=True, mininterval=1.0)
    model.train()
    while step < tc.iterations:
        # --- one optimization step ---------------------------------------------
        start = time.perf_counter()
        x = data.train_batch(tc.batch_size).to(device)
        try:
            trace = model.trace(x)
            nll = -(standard_normal_log_prob(trace.out) + trace.logabsdet).mean()
            loss = nll
            r = config.regularization
            if trace.kinetic is not None:
                loss = loss + r.kinetic * trace.kinetic.mean() + r.jacobian_frobenius * trace.jac_frobenius.mean()
            penalties = regularization_terms(model, r)
            for name, value in penalties.items():
                loss = loss + getattr(r, name) * value
            optimizer.zero_grad(set_to_none=True)
            finite = bool(torch.isfinite(loss))
            if finite:
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf)
                finite = bool(torch.isfinite(grad_norm))
        except AssertionError as exc:  # torchdiffeq's step-size underflow, in the adjoint solve
            checkpoint(out / "checkpoint.pt")
            raise solver_failure(exc, model.blocks[0].solver, " in the backward (adjoint) solve") from None
        except SolverError:
            checkpoint(out / "checkpoint.pt")
            raise
        if not finite:
            skipped += 1
            bad_steps += 1
            writer.add_scalar("train/skipped_steps", skipped, step)
            if bad_steps >= tc.max_bad_steps:
                raise TrainingError(
                    f"{bad_steps} steps in a row had a NaN/inf loss or gradient (step {step}); "
                    "the last good checkpoint is kept. Lower train.lr, set train.grad_clip, "
                    "or tighten the solver tolerances, then --resume"
                )
            continue
        bad_steps = 0
        optimizer.step()
        step += 1
        elapsed = time.perf_counter() - start

        # --- logging -------------------------------------------------------------
        bar.update(1)
        if step % tc.log_every == 0 or step == 1:
            bar.set_postfix(nll=f"{nll.item():.3f}", nfe=f"{trace.nfe_forward}/{trace.nfe_backward}")
            scalars = {
                "train/nll": nll.item(),
                "nfe/forward": trace.nfe_forward,
                "nfe/backward": trace.nfe_backward,
                "jacobian/cumulative_norm": trace.jac_norm.mean().item(),
                "flow/end_time": torch.stack([b.end_time for b in model.blocks]).mean().item(),
                "train/lr": optimizer.param_groups[0]["lr"],
                "time/iter_seconds": elapsed,
                **{f"regularization/{k}": v.item() for k, v in penalties.items()},
                **sparsity_scalars(model),
            }
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, step)

        # --- validation, figures, checkpoints ------------------------------------
        last = step == tc.iterations
        if step % tc.val_every == 0 or last:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                val = evaluate(model, data.val, batch_size=tc.val_batch_size)
                if data.event_shape == (2,):
                    writer.add_figure("flow/density", two_d_figure(model, data), step)
            writer.add_scalar("val/nll", val.nll, step)
            for tag, values in gate_histograms(model).items():  # empty unless gated
                writer.add_histogram(tag, values, step)
            if val.nll < best_val:
                best_val = val.nll
                checkpoint(out / "best.pt")
        if step % tc.checkpoint_every == 0 or last or stop["signal"] is not None:
            checkpoint(out / "checkpoint.pt")
        if stop["signal"] is not None:
            writer.close()
            print(f"stopped by signal {stop['signal']} at step {step}; checkpoint written, "
                  f"continue with --resume", file=sys.stderr)
            return 128 + stop["signal"]
    bar.close()

    # --- final test evaluation with the best model --------------------------------
    best = load_checkpoint(out / "best.pt", map_location=device) if (out / "best.pt").is_file() else None
    if best is not None:
        model.load_state_dict(best["model"])
    test = evaluate(model, data.test, batch_size=tc.val_batch_size)
    writer.add_scalar("test/nll", test.nll, step)
    writer.close()
    print(f"done: {step} steps; best val NLL {best_val:.4f}; test NLL {test.nll:.4f} "
          f"(R {test.jac_norm:.3f}, NFE {test.nfe:.0f}) -> {out}")
    return 0


def two_d_figure(model, data):
    from cnf.plots import density_grid, flow_figure

    model.eval()
    with torch.no_grad():
        density = density_grid(model)
        samples = model.inverse(model.base_noise(2000, generator=torch.Generator().manual_seed(0)))[0]
    model.train()
    return flow_figure(density, samples, data.val)


if __name__ == "__main__":
    sys.exit(main())
