"""What a search does with each event once the journal has it: one job a class, on one interface.

The Tune callback (tuning/engine/callbacks.py) writes the journal first, the record that the
files, the report and a resumed search are made from; then it tells each listener, in order:

    export.CsvFiles      trials.csv, epochs.csv and best_config.yaml, rewritten as each trial ends
    tensorboard.TrialBoards   --tensorboard: one run per trial
    console.Console      one line per ended trial, under a live line on a terminal

A listener implements the methods it needs; none of them imports Ray. A listener that raises is
reported and the search goes on, except for a write that fails (a full disk), which ends it the
way a journal write that fails does: a search that ran on would train what it cannot record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuning.results.experiment import Experiment


@dataclass(frozen=True)
class TrialStart:
    """A trial as it starts (or restarts from its checkpoint after a failure or a resume)."""

    trial: str  # Ray's trial id: the key of every later event
    number: int | None  # its number in the search (None: a trial this search did not number)
    params: dict[str, Any]  # the hyperparameters the search chose
    config: dict[str, Any]  # the whole training configuration
    baseline: bool
    resumes_after: int  # epochs already trained (its checkpoint's), 0 for a fresh start


class Listener:
    """The events of a search, after the journal has recorded them. Every method is optional."""

    def trial_started(self, start: TrialStart) -> None:
        """A trial started, or restarted (then `start.resumes_after` > 0)."""

    def epoch(self, trial: str, metrics: dict[str, Any]) -> None:
        """A trial reported an epoch (metrics as journalled, "epoch" among them)."""

    def trial_ended(self, trial: str, experiment: Experiment) -> None:
        """A trial ended; `experiment` is reloaded from the journal, this trial's status in it."""

    def close(self) -> None:
        """The search ended or was interrupted."""
