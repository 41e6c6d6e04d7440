"""User-facing errors.

Every problem a user can fix (a bad config value, a missing data file, a corrupt
checkpoint, a solver that gives up) is raised as a subclass of :class:`UserError`.
The commands (:mod:`cnf_prune.commands`) turn these into a one-line message on
stderr and the exit code held by the class, so a mistake never ends in a bare traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can act on. ``exit_code`` is what the scripts exit with."""

    exit_code = 1


class ConfigError(UserError, ValueError):
    """A config file, key or value is invalid."""

    exit_code = 2


class DataError(UserError):
    """A data set is missing, unknown or corrupt."""

    exit_code = 3


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt or belongs to another model."""

    exit_code = 4


class SolverError(UserError):
    """The ODE solver failed (for example an adaptive step size underflow)."""

    exit_code = 5


class TrainingError(UserError):
    """Training cannot continue (for example the loss stays NaN)."""

    exit_code = 6


class NonFiniteError(TrainingError):
    """NaN or inf values entered an ODE solve (the solver cannot step over them)."""
