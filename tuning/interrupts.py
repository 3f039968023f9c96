"""Ctrl-C and SIGTERM that always reach the search's own handler.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread happens to be. Inside
Ray's and Tune's code that can be a finalizer (`__del__`) or a callback from C, where Python prints
"Exception ignored in ..." and drops the exception: the search then runs on as if no Ctrl-C had come
(a heavy test saw the driver neither stop nor print anything for two minutes after SIGINT, while its
trials waited). So the first Ctrl-C starts a watcher that raises it again every `every` seconds
until the search says it has handled it (`handled()`), and a second Ctrl-C from the user works as usual.

SIGTERM (what Slurm, Kubernetes and systemd send, then SIGKILL after a grace period) is Ctrl-C's
twin: the same KeyboardInterrupt, so the search saves what it has and says how to resume, and
exit status 143 instead of 130. A second SIGTERM once the search has begun saving takes
SIGTERM's default action at once: whoever sends it wants the process gone, and the experiment
is resumable at every moment (journal lines and atomic writes), as after SIGKILL.

Ray replaces the SIGTERM handler when it starts: `ray.init` with one that calls sys.exit, its
C++ core worker with a crash handler that prints a stack and aborts (a SIGTERM killed the driver
with SIGABRT, the experiment left `running`). `handlers_kept` puts ours back after it.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

REDELIVER_SECONDS = 3.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupts:
    """The state of one search's interruption: requested (a signal came, `signum`) and handled
    (the search took it)."""

    def __init__(self, every: float = REDELIVER_SECONDS) -> None:
        self.every = every
        self.signum = signal.SIGINT
        self.requested = threading.Event()
        self._handled = threading.Event()

    @property
    def status(self) -> int:
        """The exit status a shell shows for the signal: 130 for Ctrl-C, 143 for SIGTERM."""
        return 128 + int(self.signum)

    @property
    def name(self) -> str:
        return "Ctrl-C" if self.signum == signal.SIGINT else signal.Signals(self.signum).name

    def on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGTERM and self._handled.is_set():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the second SIGTERM: die of it now
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if not self.requested.is_set():
            self.signum = signum
            self.requested.set()
            threading.Thread(target=self._redeliver, name="interrupt-redeliver", daemon=True).start()
        raise KeyboardInterrupt

    def _redeliver(self) -> None:
        while not self._handled.wait(self.every):
            _thread.interrupt_main(self.signum)  # runs on_signal in the main thread again

    def handled(self) -> None:
        """The search caught the KeyboardInterrupt: stop raising it."""
        self._handled.set()


@contextlib.contextmanager
def sigint_handler(handler: Any) -> Iterator[None]:
    """SIGINT handled by `handler` for the block (main thread only: elsewhere nothing changes)."""
    with signal_handler(handler, (signal.SIGINT,)):
        yield


@contextlib.contextmanager
def signal_handler(handler: Any, signums: tuple[int, ...] = SIGNALS) -> Iterator[None]:
    """`signums` handled by `handler` for the block (main thread only: elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be changed from the main thread
        return
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)


@contextlib.contextmanager
def handlers_kept() -> Iterator[None]:
    """The SIGINT and SIGTERM handlers as they were before the block (ray.init installs Ray's own)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ours = {s: signal.getsignal(s) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in ours.items():
            # set again even if Python still names it: Ray's C++ handler replaced it below Python
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def delivered_until_handled(every: float = REDELIVER_SECONDS) -> Iterator[Interrupts]:
    """Install the redelivering handler for Ctrl-C and SIGTERM for the block."""
    state = Interrupts(every)
    try:
        with signal_handler(state.on_signal):
            yield state
    finally:
        state.handled()
