"""Ctrl-C that always reaches the search's own handler.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread happens to be. Inside
Ray's and Tune's code that can be a finalizer (`__del__`) or a callback from C, where Python prints
"Exception ignored in ..." and drops the exception: the search then runs on as if no Ctrl-C had come
(a heavy test saw the driver neither stop nor print anything for two minutes after SIGINT, while its
trials waited). So the first Ctrl-C starts a watcher that raises it again every `every` seconds
until the search says it has handled it (`handled()`), and a second Ctrl-C from the user works as usual.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

REDELIVER_SECONDS = 3.0


class Interrupts:
    """The state of one search's Ctrl-C: requested (the signal came) and handled (the search took it)."""

    def __init__(self, every: float = REDELIVER_SECONDS) -> None:
        self.every = every
        self.requested = threading.Event()
        self._handled = threading.Event()

    def on_signal(self, signum: int, frame: object) -> None:
        if not self.requested.is_set():
            self.requested.set()
            threading.Thread(target=self._redeliver, name="ctrl-c-redeliver", daemon=True).start()
        raise KeyboardInterrupt

    def _redeliver(self) -> None:
        while not self._handled.wait(self.every):
            _thread.interrupt_main(signal.SIGINT)  # runs on_signal in the main thread again

    def handled(self) -> None:
        """The search caught the KeyboardInterrupt: stop raising it."""
        self._handled.set()


@contextlib.contextmanager
def sigint_handler(handler: Any) -> Iterator[None]:
    """SIGINT handled by `handler` for the block (main thread only: elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be changed from the main thread
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def delivered_until_handled(every: float = REDELIVER_SECONDS) -> Iterator[Interrupts]:
    """Install the redelivering handler for the block."""
    state = Interrupts(every)
    try:
        with sigint_handler(state.on_signal):
            yield state
    finally:
        state.handled()
