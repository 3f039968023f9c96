"""The search's live line: trials done / running / total, the best so far and the time left.

The estimate is a pure function of what has been measured (`estimate_seconds_left`, tested on its
own); `LiveLine` only draws it, with tqdm, and only on a terminal. Elsewhere (CI, a file) the
search prints its plain line per ended trial instead.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass


def estimate_seconds_left(
    seconds_per_epoch: Sequence[float],
    running: Sequence[tuple[int, int]],
    unstarted: int,
    ended_epochs: Sequence[int],
    slots: float,
) -> float | None:
    """Seconds until the search ends, from the epochs measured so far; None before the first one.

    seconds_per_epoch: wall time of each epoch measured in this run (inside a trial, so with the
        machine shared as it is now); their mean is the cost of one epoch.
    running: (epochs done, epochs planned) of each running trial: it is assumed to run to its end.
    unstarted: trials not started yet; each is expected to run as many epochs as the ended trials
        did on average (early stopping included), or as the running ones plan before any ended.
    slots: trials that run at once; fewer when fewer trials are left.
    """
    if not seconds_per_epoch:
        return None
    per_epoch = sum(seconds_per_epoch) / len(seconds_per_epoch)
    if ended_epochs:
        per_new_trial = sum(ended_epochs) / len(ended_epochs)
    elif running:
        per_new_trial = sum(planned for _, planned in running) / len(running)
    else:
        return None
    epochs_left = sum(max(planned - done, 0) for done, planned in running) + unstarted * per_new_trial
    parallel = max(1.0, min(slots, len(running) + unstarted))
    return per_epoch * epochs_left / parallel


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "time left: estimating"
    if seconds < 90:
        return f"about {max(seconds, 1):.0f} s left"
    if seconds < 90 * 60:
        return f"about {seconds / 60:.0f} min left"
    return f"about {seconds / 3600:.1f} h left"


@dataclass
class LineState:
    total: int
    done: int
    running: int
    best: str  # e.g. "trial 4 test_accuracy 53.7%", or "" before any result
    seconds_left: float | None

    def text(self) -> str:
        best = f" | best {self.best}" if self.best else ""
        left = "all done" if self.done >= self.total else format_duration(self.seconds_left)
        return f"{self.running} running{best} | {left}"


class LiveLine:
    """A tqdm bar on stdout (trials done of the total) whose postfix is the rest of the state.
    Lines printed through `write` appear above it."""

    def __init__(self, total: int, done: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            initial=done,
            file=sys.stdout,
            unit="trial",
            dynamic_ncols=True,
            bar_format="{n_fmt}/{total_fmt} trials done |{bar:20}| {elapsed} | {desc}",
        )

    def show(self, state: LineState) -> None:
        self.bar.n = state.done
        self.bar.set_description_str(state.text(), refresh=True)

    def write(self, line: str) -> None:
        self.bar.write(line, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()
