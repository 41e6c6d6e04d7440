"""Atomic, safely loaded checkpoints.

A checkpoint is a dict of tensors and plain Python values, written to a
temporary file in the same directory and renamed over the target, so a crash
during a write never leaves a corrupt checkpoint. Loading uses
``torch.load(..., weights_only=True)``: a file holding arbitrary pickled objects
is refused rather than executed.
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from cnf.errors import CheckpointError, ConfigError

FORMAT = "cnf-checkpoint/1"


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_derived_output(source: Path, out: Path, kept: str) -> None:
    """Check that ``out`` can take a checkpoint derived from ``source`` (a command
    that rewrites a checkpoint, such as compaction or gate export, keeps its input):
    a new file, not ``source``, in a folder that exists. Nothing is replaced, so a
    slip cannot overwrite a run's ``checkpoint.pt``. ``kept`` names what the input
    holds, for the message."""
    if out.resolve() == source.resolve():
        raise ConfigError(f"--out must differ from the input checkpoint (the {kept} is kept)")
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a directory; name a file, for example {str(out / 'derived.pt')!r}")
    if out.exists():
        raise ConfigError(f"--out {str(out)!r} exists; remove it or choose another file (nothing is replaced)")
    if not out.parent.is_dir():
        raise ConfigError(f"output directory {str(out.parent)!r} does not exist")


def derived_payload(source: dict[str, Any], config: dict, state: dict, **origin: Any) -> dict[str, Any]:
    """A checkpoint derived from ``source`` (a loaded checkpoint): the new config
    dict and model ``state``, the source's event shape, step and best validation,
    and ``origin`` (for example ``compacted_from=PATH``). No optimizer state: it is
    for sampling and evaluation, not for ``--resume``."""
    return {"config": config, "event_shape": list(source["event_shape"]), "model": state,
            "step": source.get("step"), "best_val": source.get("best_val"), **origin}


def save_derived_checkpoint(payload: dict[str, Any], out: Path) -> None:
    """:func:`save_checkpoint` for a command's ``--out``: a write that fails (no
    space, no permission) is a one-line error, not a traceback."""
    try:
        save_checkpoint(payload, out)
    except OSError as exc:
        raise ConfigError(f"cannot write {str(out)!r}: {exc.strerror or exc}") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; clear errors otherwise."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{str(path)!r} is a directory; pass a checkpoint in it, for example "
                              f"{str(path / 'best.pt')!r}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    corrupt = CheckpointError(
        f"checkpoint {str(path)!r} is corrupt, truncated or not a checkpoint; "
        "use another checkpoint (for example best.pt) or retrain"
    )
    if not zipfile.is_zipfile(path):
        raise corrupt
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was refused: it holds Python objects other than tensors "
            "and plain values, which are never unpickled; only checkpoints written by this "
            "tool are loaded"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError):
        raise corrupt from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a checkpoint written by this tool")
    return payload


def rng_state() -> dict[str, Any]:
    """Python and torch (CPU and CUDA) random generator states."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
