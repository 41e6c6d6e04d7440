"""The run directory: one run at a time, and writes that fail cleanly.

:func:`locked_run_directory` takes an exclusive ``flock`` on ``RUN_DIR/.lock``
for the life of a run. The kernel drops the lock when the process ends, however
it ends (``kill -9`` included), so a lock is never stale; a second run (or a
``--resume`` while the first is alive) stops at once with :class:`BusyError`,
naming the process that holds the directory, and changes nothing in it.

:func:`writing` turns an ``OSError`` while writing a run's file (no space, lost
permission, a read-only filesystem, a quota) into a one-line :class:`WriteError`
that names the file, the error and what is intact.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from cnf.errors import ConfigError, UserError

LOCK_FILE = ".lock"


class BusyError(UserError):
    """Another live process holds the run directory."""

    exit_code = 7


class WriteError(UserError):
    """A file of the run could not be written (disk full, permissions, read-only)."""

    exit_code = 8


@contextlib.contextmanager
def locked_run_directory(out: Path, *, shared: bool = False, remove_if_unused: bool = True) -> Iterator[Path]:
    """Create ``out`` if needed and hold its lock for the duration (``shared``: a
    lock that other shared holders may hold too, but not an exclusive one).

    If ``out`` did not exist and the body fails before writing anything but the
    lock, the directory is removed again (``remove_if_unused``), so a run that
    fails in its setup (missing data, a bad checkpoint) leaves nothing behind.
    """
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK_FILE, "a+")
    except OSError as exc:
        raise ConfigError(f"cannot write to the run directory {str(out)!r}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise BusyError(
                f"run directory {str(out)!r} is in use by process {holder}; wait for it to finish "
                "(or stop it) and run again, or choose another --out"
            ) from None
        if not shared:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
        try:
            yield out
        except BaseException:
            if created and remove_if_unused and _only_lock(out):
                shutil.rmtree(out, ignore_errors=True)
            raise
    finally:
        handle.close()


def _only_lock(out: Path) -> bool:
    return {p.name for p in out.iterdir()} <= {LOCK_FILE}


@contextlib.contextmanager
def writing(path: Path, intact: str | Callable[[], str] = "") -> Iterator[None]:
    """Turn an ``OSError`` raised in the body (writing ``path``) into a
    :class:`WriteError`: ``cannot write PATH: <errno text>; <intact>`` (``intact``
    may be a function, called only on failure)."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        intact = intact() if callable(intact) else intact
        raise WriteError(f"cannot write {str(path)!r}: {reason}" + (f"; {intact}" if intact else "")) from None
