"""The command-line tools: ``train``, ``sample``, ``compare``, ``compact`` and
``export`` (installed as ``cnf-train``, ``cnf-sample``, ...)."""

from __future__ import annotations

import sys
from typing import Any, Callable

from cnf.errors import UserError


def report_user_errors(body: Callable[..., int], *args: Any) -> int:
    """``body(*args)``, the exit code of a command-line tool; a :class:`UserError`
    it raises becomes one ``error: ...`` line on stderr and the error's exit code."""
    try:
        return body(*args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
