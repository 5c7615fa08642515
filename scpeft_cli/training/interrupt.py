"""Ctrl-C / SIGTERM stop training at the next step; the last epoch's checkpoint is the resume point."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class TrainingInterrupted(BaseException):
    """Not an Exception: a sweep must stop too, not record the job as failed and go on."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = EXIT_CODES.get(signum, 1)


class StopFlag:
    def __init__(self):
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None


@contextmanager
def stop_on_signals():
    """Yield a flag that turns true on SIGINT/SIGTERM (handlers restored afterwards)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, _frame):
        flag.signum = signum

    previous = {sig: signal.signal(sig, handler) for sig in EXIT_CODES}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
