"""Ways a training run stops early on purpose: preemption (SIGTERM/SIGINT) and divergence (non-finite steps).

Preemption: the first SIGTERM or SIGINT only sets a flag. The loop finishes the current optimizer step, writes a
checkpoint, and raises :class:`Preempted`; the launcher exits with code 75 (EX_TEMPFAIL: a scheduler may requeue
the job, and re-running the same command resumes). A second signal exits at once with 128 + signal number.
Under DeepSpeed every rank takes part in the decision (the flag is max-reduced each step), so a signal that
reaches one rank stops all of them at the same step.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
EXIT_DIVERGED = 3


class TrainingStopped(Exception):
    """Training stopped early on purpose; ``exit_code`` is what the launcher exits with."""

    exit_code = 1


class Preempted(TrainingStopped):
    exit_code = EXIT_PREEMPTED


class Diverged(TrainingStopped):
    exit_code = EXIT_DIVERGED


class StopSignals:
    """Catches SIGTERM/SIGINT for the duration of a run (main thread only; elsewhere it never fires)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # the second signal: stop now
            os._exit(128 + signum)
        self.signum = signum
        log.warning("received %s: finishing this step, writing a checkpoint, then exiting with code %d (send it "
                    "again to stop at once)", signal.Signals(signum).name, EXIT_PREEMPTED)
