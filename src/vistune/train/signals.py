"""When to write a resume checkpoint: every N steps, every M minutes, and when the run is told to stop.

Clusters preempt a job with SIGTERM (SLURM also sends SIGUSR1 ahead of a time limit with
`--signal=USR1@120`), and people press Ctrl-C. During training these only set a flag; the loop sees it
at the next step boundary (the only point where weights, optimizer and data position agree), writes a
checkpoint and stops, so a rerun of the same command resumes there. A second Ctrl-C stops at once.

Every process must take the same decision (saving gathers FSDP shards, a collective), so the flags and
the timer of each process are combined with one all-reduce per step.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports this module for TrainingInterrupted; torch loads only when training
    import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class TrainingInterrupted(Exception):
    """A signal stopped the run at a step boundary; `message` says what was saved and how to resume."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class StopRequests:
    """A context that turns SIGTERM/SIGUSR1/SIGINT into a flag (handlers restored on exit; main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.signum = signum

    def __enter__(self) -> StopRequests:
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. training started from a worker thread)
                break
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()


class SaveClock:
    """Decides, the same way on every process, whether this step writes a checkpoint and whether it stops."""

    def __init__(self, every_steps: int | None, every_minutes: float | None, stop_after: int | None,
                 requests: StopRequests) -> None:
        self.every_steps, self.stop_after = every_steps, stop_after
        self.every_s = every_minutes * 60 if every_minutes else None
        self.requests = requests
        self.last_save = time.monotonic()

    def due(self, step: int, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> tuple[bool, int | None]:
        """(save now, signal number to stop for). `reduce_sum`: a tensor summed over processes."""
        import torch

        timer = self.every_s is not None and time.monotonic() - self.last_save >= self.every_s
        flags = torch.tensor([float(timer), float(self.requests.signum is not None)])
        timer_any, signalled = (x > 0 for x in reduce_sum(flags).tolist())
        # A signal seen by any process stops them all (a launcher may signal only some).
        signum = (self.requests.signum or signal.SIGTERM) if signalled else None
        by_steps = bool(self.every_steps and step % self.every_steps == 0)
        stop_after = self.stop_after is not None and step >= self.stop_after
        return bool(timer_any or signum or by_steps or stop_after), signum

    def saved(self) -> None:
        self.last_save = time.monotonic()
