"""Figure 2 of the seed on MNIST: pruned models' samples beside validation images,
and their cumulative Jacobian norm during training.

    python bench/figure2_mnist.py RUN_DIR [RUN_DIR ...] --out figure2.png
        [--labels random jacobian_spectrum] [--n 36] [--temperature 1] [--seed 0]
        [--max-step N]

Each RUN_DIR is a train.py run directory holding ``best.pt`` and TensorBoard events
(for example the runs ``.venv/bin/cnf-compare configs/compare_mnist.yaml`` writes).
The top row shows validation images of the first run's data and, per label, samples
from the *same* base noise (so differences come from the models, not the draws; a
run with a mixture base draws from its own mixture with the same seed);
the bottom panel shows ``jacobian/cumulative_norm`` (R = Σ_blocks ∫ ‖∂f/∂z‖_F dt,
Hutchinson estimate) against the training step for every label, with a dot at the
step of the ``best.pt`` the samples come from; ``--max-step`` cuts the curves there.
Runs that share a label (by default, run directories that differ only in their
``_seedN`` suffix, as ``cnf-compare`` names them) are seeds of one setting: their
curve is the mean over seeds with a ± standard-error band, and the samples come
from the label's first run.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnf.data import make_data  # noqa: E402
from cnf_prune.commands import report_user_errors  # noqa: E402
from cnf.errors import ConfigError  # noqa: E402
from cnf.images import sample_grid  # noqa: E402
from cnf_prune.build import load_model  # noqa: E402
from cnf_prune.comparison_figures import mean_curve  # noqa: E402

CURVE = "jacobian/cumulative_norm"


def scalar_curve(run_dir: Path, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of one TensorBoard scalar of a run (empty if it was not logged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    if tag not in events.Tags()["scalars"]:
        return np.array([]), np.array([])
    points = events.Scalars(tag)
    return np.array([p.step for p in points]), np.array([p.value for p in points])


def to_image(grid: torch.Tensor) -> np.ndarray:
    return grid.permute(1, 2, 0).numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="train.py run directories (with best.pt)")
    p.add_argument("--out", required=True, type=Path, help="output .png")
    p.add_argument("--labels", nargs="*", default=None,
                   help="one label per run (default: the directory names without their _seedN suffix); "
                        "runs with the same label are seeds of one setting: mean ± s.e. band")
    p.add_argument("--n", type=int, default=36, help="images per panel (default 36)")
    p.add_argument("--temperature", type=float, default=1.0, help="base noise scale (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shared base noise")
    p.add_argument("--max-step", type=int, default=None, help="plot the curves up to this training step")
    args = p.parse_args(argv)
    return report_user_errors(figure, args)


def figure(args: argparse.Namespace) -> int:
    labels = args.labels or [re.sub(r"_seed\d+$", "", r.name) for r in args.runs]
    if len(labels) != len(args.runs):
        raise ConfigError(f"--labels needs one label per run ({len(args.runs)}), got {len(labels)}")
    if args.n < 1 or not args.temperature > 0 or (args.max_step is not None and args.max_step < 1):
        raise ConfigError("--n and --max-step must be positive and --temperature > 0")
    device = torch.device("cpu")
    loaded = [load_model(run / "best.pt", device) for run in args.runs]  # (model, config, payload)
    configs = [config for _, config, _ in loaded]
    shapes = [model.event_shape for model, _, _ in loaded]
    if any(c.data.name != configs[0].data.name for c in configs) or len(set(shapes)) > 1:
        raise ConfigError("all runs must be trained on the same image data set at the same resolution "
                          f"(data {[c.data.name for c in configs]}, shapes {shapes})")
    data = make_data(configs[0].data, configs[0].seed)
    if len(data.event_shape) != 3:
        raise ConfigError(f"{args.runs[0]} is not an image model (data shape {data.event_shape})")
    nrow = math.ceil(math.sqrt(args.n))
    from torchvision.utils import make_grid

    panels = [("validation images", make_grid(data.val[: args.n].float() / 255, nrow=nrow, padding=2, pad_value=1.0))]
    groups: dict[str, list[int]] = {}  # runs sharing a label are seeds of one setting
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    for label, members in groups.items():
        model, config, _ = loaded[members[0]]  # the samples of the label's first run
        # each model's own base (a fitted mixture, or N(0, I)), drawn from the same seed
        noise = model.base_noise(args.n, generator=torch.Generator().manual_seed(args.seed),
                                 temperature=args.temperature)
        panels.append((f"{label} samples", sample_grid(model, noise, config.data.logit_alpha, nrow)))

    fig = plt.figure(figsize=(3.2 * len(panels), 6.4))
    grid = fig.add_gridspec(2, len(panels), height_ratios=[1.0, 0.8])
    for i, (title, image) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(to_image(image), interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :])
    for label, members in groups.items():
        curves = []
        for i in members:
            steps, values = scalar_curve(args.runs[i], CURVE)
            if args.max_step is not None:
                steps, values = steps[steps <= args.max_step], values[steps <= args.max_step]
            curves.append((steps, values))
        if len(members) > 1:  # mean ± standard error over the seeds
            steps, mean, se = mean_curve(curves)
            line, = ax.plot(steps, mean, label=f"{label} ({len(members)} seeds, band: ± s.e.)")
            ax.fill_between(steps, mean - se, mean + se, color=line.get_color(), alpha=0.2, lw=0)
            continue
        (steps, values), best = curves[0], loaded[members[0]][2].get("step")
        line, = ax.plot(steps, values, label=label)
        if best in steps:
            ax.plot([best], [values[list(steps).index(best)]], "o", color=line.get_color())
    ax.set_xlabel("training step")
    ax.set_ylabel("cumulative Jacobian norm R")
    ax.set_title("dots: the step of best.pt, whose samples are shown (a label's first run)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(args.out, dpi=120)
    except OSError as exc:
        raise ConfigError(f"cannot write {str(args.out)!r}: {exc.strerror}") from None
    print(f"wrote {args.out} (temperature {args.temperature}, {args.n} images per panel)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
