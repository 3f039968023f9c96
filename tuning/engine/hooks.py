"""Test hooks: how the test suite makes a trial raise or wait, so that tests wait for events
instead of guessing how fast a machine is. Read by the search driver from its environment (never
by the workers) and handed to every trial only if one is set: a search without them installs no
hook, and its trials call nothing here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# "EPOCH:TIMES:MARKER_DIR[:KEY=VALUE]": at EPOCH, the first TIMES times a trial gets there
# (counted in MARKER_DIR) it raises, only in trials whose config has KEY == VALUE if given.
FAULT_ENV = "HPTUNE_INJECT_FAULT"
# "EPOCH:FREE:MARKER_DIR": after reporting EPOCH, every trial but the first FREE to get there
# waits until MARKER_DIR/release exists (the search cannot end while one waits). The n-th trial to
# arrive creates MARKER_DIR/arrived-n.
HOLD_ENV = "HPTUNE_HOLD_TRIALS"
MOST_SECONDS = 900.0  # a held trial never hangs a forgotten test run for ever


@dataclass(frozen=True)
class Hooks:
    fault: str | None = None
    hold: str | None = None

    @classmethod
    def from_environment(cls) -> Hooks | None:
        """The hooks the environment asks for; None (nothing installed) where it asks for none."""
        fault, hold = os.environ.get(FAULT_ENV) or None, os.environ.get(HOLD_ENV) or None
        return cls(fault, hold) if fault or hold else None

    def around(self, report: Callable[..., bool], config: Any, trial_id: str) -> Callable[..., bool]:
        """`report` (one epoch's report to Tune, given the epoch's metrics first) with the hooks
        around it: the injected fault before the report, if due, and the hold after it (the epoch
        reported and checkpointed), if due. Wrapped once per trial; the trial's loop knows nothing
        of it."""

        def hooked(metrics: dict[str, Any], *args: Any) -> bool:
            epoch = metrics["epoch"]
            if self.fault:
                _inject_fault(self.fault, epoch, config, trial_id)
            stops = report(metrics, *args)
            if self.hold:
                _hold(self.hold, epoch)
            return stops

        return hooked


def _inject_fault(spec: str, epoch: int, config: Any, trial_id: str) -> None:
    at, times, marker_dir, *only = spec.split(":")
    if epoch != int(at):
        return
    if only:
        key, value = only[0].split("=", 1)
        if str(getattr(config, key)) != value:
            return
    marker = os.path.join(marker_dir, f"{trial_id}.faults")
    count = int(open(marker).read()) if os.path.exists(marker) else 0
    if count < int(times):
        with open(marker, "w") as fh:
            fh.write(str(count + 1))
        raise RuntimeError(f"injected fault at epoch {epoch} (test)")


def _hold(spec: str, epoch: int) -> None:
    at, free, marker_dir = spec.split(":", 2)
    if epoch != int(at):
        return
    arrival = 0
    while True:  # the n-th trial to get here creates arrived-n (atomically, across processes)
        try:
            os.close(os.open(os.path.join(marker_dir, f"arrived-{arrival}"), os.O_CREAT | os.O_EXCL))
            break
        except FileExistsError:
            arrival += 1
    deadline = time.monotonic() + MOST_SECONDS
    while (arrival >= int(free) and not os.path.exists(os.path.join(marker_dir, "release"))
           and time.monotonic() < deadline):
        time.sleep(0.05)
