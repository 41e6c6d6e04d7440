"""The command-line tools: ``train``, ``sample``, ``compare``, ``compact`` and
``export`` (installed as ``cnf-train``, ``cnf-sample``, ...)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from cnf.errors import UserError


def derived_checkpoint_parser(prog: str, doc: str, kind: str, what: str) -> argparse.ArgumentParser:
    """The arguments of a command that writes a checkpoint derived from another:
    ``CHECKPOINT --out NEW`` (``kind``: the runs it takes; ``what``: what it writes)."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help=f"checkpoint.pt or best.pt of a run with {kind}")
    p.add_argument("--out", required=True, help=f"where to write the {what} checkpoint")
    return p


def report_user_errors(body: Callable[..., int], *args: Any) -> int:
    """``body(*args)``, the exit code of a command-line tool; a :class:`UserError`
    it raises becomes one ``error: ...`` line on stderr and the error's exit code."""
    try:
        return body(*args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
