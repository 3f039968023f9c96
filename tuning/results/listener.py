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

import sys
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


class Tracker(Listener):
    """A listener that pushes the journal's state to an experiment tracker (mlflow_runs.py,
    wandb_runs.py) as epochs and trials end. A tracker that fails is one warning and the search
    goes on; while it is down only trials' ends try again, and the first push that succeeds, or
    `hptune export FOLDER FLAG TARGET`, brings it up to the journal."""

    name = ""  # "MLflow", "W&B"
    flag = ""  # the flag of hptune export that completes the record

    def __init__(self, experiment: Experiment, runs: Any, target: str) -> None:
        self.experiment = experiment
        self.runs = runs  # has push(experiment, ended=...)
        self.target = target
        self.down = False

    def epoch(self, trial: str, metrics: dict[str, Any]) -> None:
        if not self.down:
            self.push()

    def trial_ended(self, trial: str, experiment: Experiment) -> None:
        self.push()

    def push(self, *, ended: bool = False) -> None:
        try:
            self.runs.push(Experiment.load(self.experiment.folder), ended=ended)
        except Exception as exc:  # noqa: BLE001 - a tracker never costs a trial
            if not self.down:
                print(f"hptune: warning: {self.name} ({self.target}) failed: {first_line(exc)}; the search goes "
                      f"on, and `hptune export {self.experiment.folder} {self.flag} {self.target}` completes the "
                      f"record later", file=sys.stderr, flush=True)
            self.down = True
            return
        if self.down:
            print(f"hptune: {self.name} ({self.target}) answers again; the record is complete", file=sys.stderr,
                  flush=True)
        self.down = False


def first_line(exc: BaseException) -> str:
    """What an exception says, on one line."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
