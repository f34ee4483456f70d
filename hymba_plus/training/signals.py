"""Graceful stop of a training run: the first SIGINT (Ctrl-C) or SIGTERM (what a scheduler
sends before it kills a job) asks the loop to stop after the current optimizer step; the
trainer then writes a checkpoint if any step ran since the last one and exits 130. A second
signal aborts at once (``KeyboardInterrupt``), as Ctrl-C does anywhere else.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

#: exit status of an interrupted run (128 + SIGINT), also after SIGTERM
EXIT_INTERRUPTED = 130


class StopRequest:
    """Context manager: installs the handlers (main thread only; elsewhere it does nothing)
    and restores the previous ones on exit. ``requested`` names the first signal, or is None."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, say: Callable[[str], None] | None = None):
        self.say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.requested: str | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        self._old.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            self._restore()
            raise KeyboardInterrupt(f"second signal ({name})")
        self.requested = name
        self.say(f"{name}: stopping after this step and saving a checkpoint (Ctrl-C again aborts at once)")
