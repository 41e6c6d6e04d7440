"""TensorBoard events of a run, with write failures reported as one line.

TensorBoard's writer raises a bare ``OSError`` (from its own writer thread, on
the next call) when the disk fills up or the directory becomes unwritable;
:class:`EventLog` turns that into :class:`~cnf_prune.rundir.WriteError`, saying
what of the run is intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch.utils.tensorboard import SummaryWriter

from cnf_prune.rundir import writing


class EventLog:
    """A :class:`SummaryWriter` on ``out`` (events after ``purge_step`` dropped);
    ``intact()`` says what survives a failed write."""

    def __init__(self, out: Path, *, purge_step: int, intact: Callable[[], str]) -> None:
        self.out, self.intact = out, intact
        with self._writing():
            self.writer = SummaryWriter(str(out), purge_step=purge_step)

    def _writing(self):
        return writing(self.out / "events.out.tfevents.*", self.intact)

    def scalar(self, tag: str, value: float, step: int) -> None:
        with self._writing():
            self.writer.add_scalar(tag, value, step)

    def figure(self, tag: str, figure: Any, step: int) -> None:
        with self._writing():
            self.writer.add_figure(tag, figure, step)

    def image(self, tag: str, image: Any, step: int) -> None:
        with self._writing():
            self.writer.add_image(tag, image, step)

    def histogram(self, tag: str, values: Any, step: int) -> None:
        with self._writing():
            self.writer.add_histogram(tag, values, step)

    def close(self) -> None:
        with self._writing():
            self.writer.close()
