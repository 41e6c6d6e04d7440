"""Side-by-side benchmark: FFJORD's own scripts against this project's, on this machine.

    .venv/bin/python bench/vs_ffjord.py --ffjord PATH [--toy-iterations 200] [--mnist-iterations 3]
        [--batch-size 200] [--warmup 1] [--mnist-raw DIR] [--skip-toy] [--skip-mnist]
        [--skip-sampling] [--also-set KEY=VALUE ...] [--keep DIR]

PATH is a checkout of https://github.com/rtqichen/ffjord. Everything runs in
subprocesses, one at a time (never start two benchmarks at once on a small machine):

* toy: FFJORD's ``train_toy.py --data checkerboard`` (its defaults otherwise) for
  ``--toy-iterations`` iterations, then ``train.py configs/toy.yaml --out TMP --set
  train.iterations=N --set train.log_every=1``;
* MNIST: FFJORD's ``train_cnf.py --data mnist --dims 64,64,64 --strides 1,1,1,1
  --num_blocks 2 --layer_type concat --multiscale True --rademacher True
  --batch_size B --log_freq 1`` for ``--mnist-iterations`` iterations after
  ``--warmup``, then the bits/dim of the first 100 test images (a patch: FFJORD
  validates only at epoch ends), then
  ``train.py configs/mnist.yaml`` with the same batch and iterations (validation and
  test sets cut to 100 images, so that the run ends and checkpoints within minutes; its
  test images are the same first 100);
  ``--batch-size 20`` gives a quick check;
* sampling: 10000 toy samples and 64 MNIST images, with ``sample.py`` on this
  project's checkpoints and with FFJORD's own sampling path (``model(z,
  reverse=True)``, as its ``visualize_transform`` and its MNIST figures call it) in
  a small driver that imports FFJORD's modules from the checkout: the toy model from
  the checkpoint its run saved, the MNIST model at initialization (FFJORD saves
  none before an epoch ends; this project's has had ``--mnist-iterations`` steps).

Both sides' logs are parsed for seconds per iteration (the first ``--warmup``
iterations excluded), NFE forward/backward, time per function evaluation, the
validation NLL where the runs have one, each child's peak RSS (``os.wait4``) and, when
the runs use a GPU, each side's peak allocated GPU memory (this project's
``memory/gpu_peak_mib`` events; FFJORD's through a logging patch).
FFJORD logs only the total NFE on MNIST, so a one-line logging patch adds its
forward NFE. FFJORD runs from a temporary copy of PATH (never PATH itself) with the
compatibility patches listed in the output (for example stand-ins for ``six`` and
``scikit-learn`` when they are not installed; FFJORD's checkerboard does not use
scikit-learn); MNIST is read from copies of the four raw ``.gz`` files.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import importlib.util
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.machine import cpu_model  # noqa: E402  (standard library only)

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FFJORD_MNIST = ["--data", "mnist", "--dims", "64,64,64", "--strides", "1,1,1,1", "--num_blocks", "2",
                "--layer_type", "concat", "--multiscale", "True", "--rademacher", "True"]


@dataclass
class Run:
    """One child process: its per-iteration log and resource use."""

    name: str
    seconds: list[float] = field(default_factory=list)
    nfe_forward: list[float] = field(default_factory=list)
    nfe_backward: list[float] = field(default_factory=list)
    val_nll: str = "n/a"
    test_bpd: str = "n/a"
    gpu_peak_mib: float | None = None  # torch.cuda.max_memory_allocated, when the run used a GPU
    peak_rss_mib: float = float("nan")
    wall: float = 0.0
    returncode: int | None = None
    tail: str = ""

    def summary(self, warmup: int) -> dict[str, float]:
        """Means over iterations after ``warmup``: s/iter, NFE fwd/bwd, ms per NFE."""
        s, f, b = self.seconds[warmup:], self.nfe_forward[warmup:], self.nfe_backward[warmup:]
        if not s:
            return {"s_iter": float("nan"), "nfe_f": float("nan"), "nfe_b": float("nan"), "ms_nfe": float("nan")}
        n = len(s)
        nfe = sum(f[:n]) + sum(b[:n])
        return {"s_iter": sum(s) / n, "nfe_f": sum(f[:n]) / n, "nfe_b": sum(b[:n]) / n,
                "ms_nfe": 1e3 * sum(s) / nfe if nfe else float("nan"), "n": n}


def run_child(name: str, cmd: list[str], cwd: Path, on_line, stop_after=None, timeout: float = 7200,
              env: dict[str, str] | None = None) -> Run:
    """Run ``cmd`` (with ``env`` added to the environment), feeding each output line to
    ``on_line(run, line)``; stop it with SIGTERM once ``stop_after(run)`` is true. Peak
    RSS from ``wait4``."""
    run = Run(name)
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1", **(env or {})}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    stopped = False
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        on_line(run, line)
        if not stopped and stop_after is not None and stop_after(run):
            proc.send_signal(signal.SIGTERM)
            stopped = True
        if time.perf_counter() - start > timeout and not stopped:
            proc.kill()
            stopped = True
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    run.wall = time.perf_counter() - start
    run.returncode = proc.returncode
    run.peak_rss_mib = usage.ru_maxrss / 1024  # kilobytes on Linux
    run.tail = "".join(lines[-15:])
    return run


# --- FFJORD: a patched temporary copy -----------------------------------------------------------
def patch(root: Path, rel: str, old: str, new: str, why: str, patches: list[str]) -> None:
    path = root / rel
    text = path.read_text()
    if old not in text:
        raise SystemExit(f"cannot apply compatibility patch to {rel} ({why}): the FFJORD checkout differs")
    path.write_text(text.replace(old, new, 1))
    patches.append(f"{rel}: {why}")


# A line for FFJORD's scripts: log the peak GPU memory when there is a GPU (format with indent=...).
GPU_PEAK_LOG = ("{indent}if torch.cuda.is_available():\n"
                "{indent}    logger.info('[vs_ffjord] peak GPU memory {{:.0f}} MiB'.format(\n"
                "{indent}        torch.cuda.max_memory_allocated() / 2 ** 20))\n")


def prepare_ffjord(src: Path, work: Path) -> tuple[Path, list[str]]:
    """Copy FFJORD to ``work/ffjord`` and apply the run-time compatibility patches."""
    if not (src / "train_toy.py").is_file() or not (src / "lib" / "layers" / "cnf.py").is_file():
        raise SystemExit(f"{src} is not a checkout of rtqichen/ffjord (no train_toy.py, lib/layers/cnf.py)")
    dst = work / "ffjord"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git", "experiments", "data"))
    patches: list[str] = []
    if importlib.util.find_spec("six") is None:
        (dst / "six.py").write_text("def iteritems(d):\n    return iter(d.items())\n")
        patches.append("six.py: stand-in for the missing `six` package (iteritems only)")
    if importlib.util.find_spec("sklearn") is None:
        pkg = dst / "sklearn"
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        (pkg / "datasets.py").write_text("")
        (pkg / "utils.py").write_text(
            "def shuffle(*a, **k):\n    raise NotImplementedError('scikit-learn is not installed')\n")
        patches.append("sklearn/: empty stand-in for the missing scikit-learn (unused by checkerboard and MNIST)")
    patch(dst, "train_toy.py", "    logger.info('Training has finished.')\n",
          "    logger.info('Training has finished.')\n" + GPU_PEAK_LOG.format(indent="    ") +
          "    raise SystemExit(0)\n",
          "stop after training (skips the trajectory video, after all timing); log the peak GPU memory", patches)
    patch(dst, "train_cnf.py", "            loss = compute_bits_per_dim(x, model)\n",
          "            loss = compute_bits_per_dim(x, model)\n            vs_nfe_forward = count_nfe(model)\n",
          "count the forward NFE before loss.backward() (FFJORD logs only the total)", patches)
    patch(dst, "train_cnf.py", "                logger.info(log_message)\n\n            itr += 1",
          "                logger.info(log_message + ' | NFE Forward {:.0f}'.format(vs_nfe_forward))\n\n"
          "            itr += 1", "log that forward NFE", patches)
    patch(dst, "train_cnf.py", "            itr += 1\n\n        # compute test loss",
          "            itr += 1\n"
          "            if itr >= int(os.environ.get('VS_TEST_AFTER', '0')) > 0:\n"
          + GPU_PEAK_LOG.format(indent="                ") +
          "                model.eval()\n"
          "                with torch.no_grad():\n"
          "                    x = torch.stack([test_loader.dataset[i][0] for i in range(100)])\n"
          "                    bpd = compute_bits_per_dim(cvt(x), model)\n"
          "                logger.info('[vs_ffjord] test bits/dim {:.4f} on the first 100 test images after {} '\n"
          "                            'iterations'.format(float(bpd), itr))\n"
          "                raise SystemExit(0)\n\n        # compute test loss",
          "after the timed iterations, log the peak GPU memory, then the bits/dim of the first 100 test "
          "images in eval mode, then stop (FFJORD validates only at epoch ends)", patches)
    return dst, patches


def prepare_mnist(raw: Path, work: Path) -> Path:
    """``work/data/MNIST/raw`` with the four .gz files and their uncompressed copies."""
    dest = work / "data" / "MNIST" / "raw"
    dest.mkdir(parents=True)
    for name in MNIST_FILES:
        gz = raw / f"{name}.gz"
        if not gz.is_file():
            raise SystemExit(f"{gz} is missing: pass --mnist-raw DIR holding the four MNIST .gz files")
        shutil.copy(gz, dest / gz.name)
        with gzip.open(gz) as fin, open(dest / name, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    return work / "data"


# --- log parsers ----------------------------------------------------------------------------------
FF_TOY = re.compile(r"^Iter (\d+) \| Time ([\d.]+)\(.*NFE Forward (\d+)\(.*NFE Backward (\d+)\(")
FF_TOY_TEST = re.compile(r"^\[TEST\] Iter (\d+) \| Test Loss ([-\d.]+)")
FF_CNF = re.compile(r"^Iter (\d+) \| Time ([\d.]+)\(.*Steps (\d+)\(.*NFE Forward (\d+)")
FF_GPU_PEAK = re.compile(r"^\[vs_ffjord\] peak GPU memory ([\d.]+) MiB")
FF_CNF_TEST = re.compile(r"^\[vs_ffjord\] test bits/dim ([-\d.]+) on the first 100 test images after (\d+) iterations")


def ffjord_toy_line(run: Run, line: str) -> None:
    if m := FF_TOY.match(line):
        run.seconds.append(float(m[2]))
        run.nfe_forward.append(float(m[3]))
        run.nfe_backward.append(float(m[4]))
    elif m := FF_GPU_PEAK.match(line):
        run.gpu_peak_mib = float(m[1])
    elif m := FF_TOY_TEST.match(line):
        run.val_nll = f"{float(m[2]):.3f} (1000 fresh samples, iteration {int(m[1])})"


def ffjord_cnf_line(run: Run, line: str) -> None:
    if m := FF_CNF.match(line):
        run.seconds.append(float(m[2]))
        run.nfe_forward.append(float(m[4]))
        run.nfe_backward.append(float(m[3]) - float(m[4]))
    elif m := FF_GPU_PEAK.match(line):
        run.gpu_peak_mib = float(m[1])
    elif m := FF_CNF_TEST.match(line):
        run.test_bpd = f"{float(m[1]):.3f} (after {int(m[2])} iterations, eval mode)"


def ours_from_events(run: Run, out: Path) -> None:
    """Per-step scalars from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]

    def values(tag: str) -> list[float]:
        return [e.value for e in sorted(events.Scalars(tag), key=lambda e: e.step)] if tag in tags else []

    run.seconds, run.nfe_forward, run.nfe_backward = (
        values("time/iter_seconds"), values("nfe/forward"), values("nfe/backward"))
    val = [(e.step, e.value) for e in events.Scalars("val/nll")] if "val/nll" in tags else []
    if val:
        step, nll = max(val)
        bpd = {e.step: e.value for e in events.Scalars("val/bits_per_dim")} if "val/bits_per_dim" in tags else {}
        run.val_nll = f"{nll:.3f}" + (f" ({bpd[step]:.3f} bits/dim)" if step in bpd else "") \
            + f" (validation set, step {step})"
    gpu = values("memory/gpu_peak_mib")
    if gpu:
        run.gpu_peak_mib = max(gpu)
    test = values("test/bits_per_dim")
    if test:
        run.test_bpd = f"{test[-1]:.3f} (after {len(run.seconds)} iterations, the validated model)"
    end = values("flow/end_time")
    if end:
        run.val_nll += f"; end time {end[0]:.4f} -> {end[-1]:.4f}"


# --- sampling drivers -----------------------------------------------------------------------------
FFJORD_SAMPLER = textwrap.dedent('''
    import sys, time
    import torch
    ffjord, kind, save, n, ckpt = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    sys.path.insert(0, ffjord)
    torch.manual_seed(0)
    if kind == "toy":
        sys.argv = ["train_toy.py", "--data", "checkerboard", "--save", save]
        import train_toy as script
        from train_misc import build_model_tabular, set_cnf_options
        model = build_model_tabular(script.args, 2, ())
        set_cnf_options(script.args, model)
        model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])
        z = torch.randn(n, 2)
    else:
        sys.argv = ["train_cnf.py", *sys.argv[6:], "--save", save]
        import train_cnf as script
        from train_misc import set_cnf_options
        model = script.create_model(script.args, (1, 28, 28), ())
        set_cnf_options(script.args, model)
        z = torch.randn(n, 1, 28, 28)
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        x = model(z, reverse=True)
    seconds = time.perf_counter() - start
    nfe = sum(m.num_evals() for m in model.modules() if type(m).__name__ == "ODEfunc")
    print(f"SAMPLED {n} {seconds:.3f} s NFE {nfe:.0f}")
''')
OURS_SAMPLED = re.compile(r"wrote (\d+) samples .* NFE (\d+) per batch.*; ([\d.]+) s \(")
FF_SAMPLED = re.compile(r"^SAMPLED (\d+) ([\d.]+) s NFE (\d+)")


def sample_run(name: str, cmd: list[str], cwd: Path, pattern: re.Pattern) -> tuple[Run, str]:
    found: list[str] = []

    def on_line(run: Run, line: str) -> None:
        if m := pattern.search(line):
            found.append(f"{float(m[3] if pattern is OURS_SAMPLED else m[2]):.2f} s "
                         f"(NFE {m[2] if pattern is OURS_SAMPLED else m[3]})")

    run = run_child(name, cmd, cwd, on_line)
    if not found:
        return run, f"failed (exit {run.returncode}):\n{textwrap.indent(run.tail, '    ')}"
    return run, found[0]


# --- report ---------------------------------------------------------------------------------------
def machine() -> str:
    import torch
    import torchdiffeq

    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"date {datetime.datetime.now().isoformat(timespec='seconds')}; {cpu_model()}; "
            f"{platform.platform()}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"torchdiffeq {torchdiffeq.__version__}; OMP_NUM_THREADS={threads} (each side: torch's default threads); "
            f"load average {load}")


def compare(title: str, ours: Run, theirs: Run, warmup: int) -> list[str]:
    a, b = ours.summary(warmup), theirs.summary(warmup)

    def ratio(key: str) -> str:
        return f"{a[key] / b[key]:.2f}x" if b[key] and b[key] == b[key] and a[key] == a[key] else "n/a"

    lines = [f"== {title} (means over iterations after the first {warmup}: this project {a.get('n', 0)}, "
             f"FFJORD {b.get('n', 0)}) =="]
    lines.append(f"{'':24}{'this project':>16}{'FFJORD':>16}{'this/FFJORD':>13}")
    for label, key, fmt in (("s/iter", "s_iter", "{:.4f}"), ("NFE forward", "nfe_f", "{:.1f}"),
                            ("NFE backward", "nfe_b", "{:.1f}"), ("ms per NFE", "ms_nfe", "{:.3f}")):
        lines.append(f"{label:24}{fmt.format(a[key]):>16}{fmt.format(b[key]):>16}{ratio(key):>13}")
    lines.append(f"{'peak RSS (MiB)':24}{ours.peak_rss_mib:>16.0f}{theirs.peak_rss_mib:>16.0f}"
                 f"{ours.peak_rss_mib / theirs.peak_rss_mib:>12.2f}x")
    if ours.gpu_peak_mib is not None or theirs.gpu_peak_mib is not None:
        mine, their = (f"{r.gpu_peak_mib:.0f}" if r.gpu_peak_mib is not None else "n/a" for r in (ours, theirs))
        lines.append(f"{'peak GPU memory (MiB)':24}{mine:>16}{their:>16}")
    lines.append(f"{'child wall time (s)':24}{ours.wall:>16.1f}{theirs.wall:>16.1f}")
    lines.append(f"validation NLL: this project {ours.val_nll}; FFJORD {theirs.val_nll}")
    if ours.test_bpd != "n/a" or theirs.test_bpd != "n/a":
        lines.append(f"test bits/dim, first 100 MNIST test images: this project {ours.test_bpd}; FFJORD {theirs.test_bpd}")
    for run in (ours, theirs):
        if run.returncode not in (0, -signal.SIGTERM, 128 + signal.SIGTERM) or not run.seconds:
            lines.append(f"!! {run.name} exited {run.returncode}; its last lines:\n{textwrap.indent(run.tail, '    ')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ffjord", required=True, type=Path, help="a checkout of rtqichen/ffjord (left untouched)")
    p.add_argument("--toy-iterations", type=int, default=200)
    p.add_argument("--mnist-iterations", type=int, default=3, help="timed MNIST iterations (after --warmup)")
    p.add_argument("--batch-size", type=int, default=200, help="MNIST batch (200 is both configs'; 20: quick check)")
    p.add_argument("--warmup", type=int, default=1, help="first iterations left out of the means")
    p.add_argument("--mnist-raw", type=Path, default=None,
                   help="the four MNIST .gz files (default: data/MNIST/raw, else ../shared/data/MNIST/raw)")
    p.add_argument("--skip-toy", action="store_true")
    p.add_argument("--skip-mnist", action="store_true")
    p.add_argument("--skip-sampling", action="store_true")
    p.add_argument("--also-set", action="append", default=[], metavar="KEY=VALUE",
                   help="also run this project's side with these settings (for example "
                        "solver.adjoint_seminorm=true) and compare it with the same FFJORD run")
    p.add_argument("--keep", type=Path, default=None, help="work in this directory and keep it (default: a temp dir)")
    args = p.parse_args(argv)
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="vs_ffjord_")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        return report(args, py, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def variant(args: argparse.Namespace, cmd: list[str], out: Path, theirs: Run, title: str, warmup: int,
            work: Path, say) -> None:
    """With ``--also-set``, this project's run again with those settings, against the same FFJORD run."""
    if not args.also_set:
        return
    extra = [x for kv in args.also_set for x in ("--set", kv)]
    out2 = out.with_name(out.name + "_variant")
    cmd = [out2 if x == str(out) else x for x in cmd]
    cmd = [str(x) for x in cmd] + extra
    say(f"this project again with {' '.join(args.also_set)}:")
    ours = run_child("train.py variant", cmd, work, lambda r, line: None)
    ours_from_events(ours, out2)
    say(*compare(f"{title}; this project with {' '.join(args.also_set)}", ours, theirs, warmup))


def report(args: argparse.Namespace, py: str, work: Path) -> int:
    say = lambda *lines: print(*lines, sep="\n", flush=True)  # noqa: E731
    ffjord, patches = prepare_ffjord(args.ffjord.resolve(), work)
    commit = subprocess.run(["git", "-C", str(args.ffjord), "rev-parse", "HEAD"], capture_output=True, text=True)
    say(f"bench/vs_ffjord.py: {machine()}",
        f"FFJORD {args.ffjord} (commit {commit.stdout.strip() or 'unknown'}), run from a patched copy; patches:",
        *(f"  - {x}" for x in patches))
    say("End time: FFJORD builds its integration times with torch.tensor([0.0, sqrt_end_time**2]), a new tensor",
        "  without history, so sqrt_end_time never gets a gradient and Adam never moves it: T stays at its",
        "  initial value (0.5 toy, 1.0 MNIST) although train_T=True. This project trains T (flow/end_time) with",
        "  the weights' Adam settings: lr 1e-3 with weight decay 1e-5 (toy), lr 1e-3 without decay (MNIST).")
    sampler = work / "ffjord_sample.py"
    sampler.write_text(FFJORD_SAMPLER)
    if not args.skip_toy:
        report_toy(args, py, work, ffjord, sampler, say)
    if not args.skip_mnist:
        report_mnist(args, py, work, ffjord, sampler, say)
    say("", f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
            "(other processes on the machine slow both sides alike only if they run throughout)")
    return 0


def report_toy(
    args: argparse.Namespace, py: str, work: Path, ffjord: Path, sampler: Path, say: Callable[..., None]
) -> None:
    """The toy comparison: training side by side, then sampling."""
    n = args.toy_iterations
    ff_save = work / "ffjord_toy"
    ff_cmd = [py, str(ffjord / "train_toy.py"), "--data", "checkerboard", "--niters", str(n), "--save", str(ff_save)]
    ours_out = work / "ours_toy"
    ours_cmd = [py, str(ROOT / "train.py"), str(ROOT / "configs/toy.yaml"), "--out", str(ours_out),
                "--set", f"train.iterations={n}", "--set", "train.log_every=1"]
    say("", "toy settings:",
        f"  FFJORD: {' '.join(ff_cmd[1:])}",
        "    (defaults: 64-64-64 concatsquash tanh MLP, brute-force divergence, dopri5 rtol=atol=1e-5, adjoint,",
        "     batch 100, Adam lr 1e-3 weight decay 1e-5, T=0.5 not trained (see above); validation every 100",
        "     iterations on 1000 fresh samples; its timing excludes validation and figures)",
        f"  this project: {' '.join(ours_cmd[1:])}",
        "    (configs/toy.yaml: the same model, exact divergence, solver, batch and Adam; gradients by",
        "     backpropagation through the solver steps, not the adjoint (configs/toy.yaml; --also-set",
        "     solver.adjoint=true times FFJORD's method); T=0.5 trained with lr 1e-3, weight decay 1e-5;",
        "     validation every 100 iterations; per-step time/iter_seconds)")
    theirs = run_child("FFJORD train_toy.py", ff_cmd, work, ffjord_toy_line)
    ours = run_child("train.py toy", ours_cmd, work, lambda r, line: None)
    ours_from_events(ours, ours_out)
    say(*compare(f"toy checkerboard, {n} iterations", ours, theirs, args.warmup))
    variant(args, ours_cmd, ours_out, theirs, f"toy checkerboard, {n} iterations", args.warmup, work, say)
    if not args.skip_sampling:
        ckpt = ours_out / "checkpoint.pt"
        _, ours_s = sample_run("sample.py toy", [py, str(ROOT / "sample.py"), str(ckpt), "--out",
                                                 str(work / "toy_samples.npy"), "--n", "10000",
                                                 "--batch-size", "10000"], work, OURS_SAMPLED)
        _, ff_s = sample_run("FFJORD toy sampling", [py, str(sampler), str(ffjord), "toy", str(work / "ffjord_toy_s"),
                                                      "10000", str(ff_save / "checkpt.pth")], work, FF_SAMPLED)
        say(f"toy sampling, 10000 samples after {n} iterations (one batch, sampling call only, imports excluded):",
            f"  this project (sample.py, z only, test solver): {ours_s}",
            f"  FFJORD (model(z, reverse=True) in eval mode, integrates log-density too): {ff_s}")


def report_mnist(
    args: argparse.Namespace, py: str, work: Path, ffjord: Path, sampler: Path, say: Callable[..., None]
) -> None:
    """The MNIST comparison: training side by side, then sampling."""
    raw = args.mnist_raw or next((d for d in (ROOT / "data/MNIST/raw", ROOT.parent / "shared/data/MNIST/raw")
                                  if (d / f"{MNIST_FILES[0]}.gz").is_file()), ROOT / "data/MNIST/raw")
    data_root = prepare_mnist(raw, work)
    b, n, w = args.batch_size, args.mnist_iterations, args.warmup
    ff_cmd = [py, str(ffjord / "train_cnf.py"), *FFJORD_MNIST, "--batch_size", str(b), "--log_freq", "1",
              "--save", str(work / "ffjord_mnist")]
    ours_out = work / "ours_mnist"
    ours_cmd = [py, str(ROOT / "train.py"), str(ROOT / "configs/mnist.yaml"), "--out", str(ours_out),
                "--set", f"train.iterations={n + w}", "--set", f"train.batch_size={b}",
                "--set", "train.log_every=1", "--set", f"data.root={data_root}", "--set", "data.download=false",
                "--set", "data.val_size=100", "--set", "data.test_size=100", "--set", "train.val_batch_size=100"]
    say("", "MNIST settings:",
        f"  FFJORD: {' '.join(ff_cmd[1:])} (cwd holds ./data/MNIST/raw; after {n + w} iterations it computes",
        "    the bits/dim of the first 100 test images in eval mode and stops)",
        "    (multiscale: 10 CNF blocks over 3 scales, 64-64-64 concat conv softplus, Rademacher Hutchinson, dopri5 1e-5 adjoint,",
        "     Adam lr 1e-3 warmed up over 1000 iterations, no weight decay, loss in bits/dim, T=1 not trained)",
        f"  this project: {' '.join(ours_cmd[1:])}",
        "    (configs/mnist.yaml: the same flow, dopri5 1e-5 forward solves; gradients by backpropagation through the solver",
        "     steps with each evaluation recomputed in the backward pass (solver.checkpoint; --also-set solver.adjoint=true --also-set",
        "     solver.checkpoint=false times FFJORD's adjoint); Adam lr 1e-3 warmed up over 1000 iterations, no decay, loss",
        "     in nats per image, T=1 trained with lr 1e-3; validation/test cut to 100 images, the test images being",
        "     the first 100 of MNIST's test set)")
    theirs = run_child("FFJORD train_cnf.py", ff_cmd, work, ffjord_cnf_line,
                       stop_after=lambda r: len(r.seconds) > n + w, env={"VS_TEST_AFTER": str(n + w)})
    ours = run_child("train.py mnist", ours_cmd, work, lambda r, line: None)
    ours_from_events(ours, ours_out)
    say(*compare(f"MNIST, batch {b}, {n} iterations after {w} warm-up", ours, theirs, w))
    variant(args, ours_cmd, ours_out, theirs, f"MNIST, batch {b}, {n} iterations after {w} warm-up", w, work, say)
    if not args.skip_sampling:
        _, ours_s = sample_run("sample.py mnist", [py, str(ROOT / "sample.py"), str(ours_out / "checkpoint.pt"),
                                                   "--out", str(work / "mnist_samples.pt"), "--n", "64", "--batch-size", "64"],
                               work, OURS_SAMPLED)
        _, ff_s = sample_run("FFJORD MNIST sampling", [py, str(sampler), str(ffjord), "mnist",
                                                       str(work / "ffjord_mnist_s"), "64", "-", *FFJORD_MNIST,
                                                       "--batch_size", str(b)], work, FF_SAMPLED)
        say("MNIST sampling, 64 images in one batch (sampling call only, imports excluded):",
            f"  this project (sample.py on its checkpoint after {n + w} steps, z only): {ours_s}",
            f"  FFJORD (model(z, reverse=True) at initialization, integrates log-density too): {ff_s}")


if __name__ == "__main__":
    sys.exit(main())
