"""The driver-side Tune callback: journals every event, prints one line per ended trial, and keeps
trials.csv / epochs.csv / best_config.yaml current.

Runs in the driver, so it sees results from every node of a cluster. An exception in a Tune
callback would abort the whole search, so each hook logs its own failure and carries on.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ray import tune

from trainable.config import TrainConfig
from trainable.fit import slow_epoch_text, slow_epochs
from tuning import export as export_mod
from tuning.console import fmt_params, fmt_result
from tuning.experiment import Experiment
from tuning.searcher import BASELINE, CONTINUES, StudySearcher, hyperparameters


def _guarded(hook: Callable) -> Callable:
    @functools.wraps(hook)
    def wrapper(self: ExperimentCallback, *args: Any, **kwargs: Any) -> None:
        try:
            hook(self, *args, **kwargs)
        except Exception:  # noqa: BLE001 - never let bookkeeping kill the search
            print(f"hptune: {hook.__name__} failed (the search goes on):\n{traceback.format_exc()}", file=sys.stderr)

    return wrapper


class ExperimentCallback(tune.Callback):
    def __init__(self, experiment: Experiment, *, base: TrainConfig, searcher: StudySearcher, metrics: Sequence[str]) -> None:
        self.experiment = experiment
        self.journal = experiment.journal
        self.base = base
        self.searcher = searcher
        self.samples = experiment.meta["samples"]
        self.metrics = tuple(metrics)
        self.known: set[str] = set()
        self.first_epoch: dict[str, dict] = {}  # trial id -> its epoch 1 result, to spot stalls

    @_guarded
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self.known:
            return  # restarted after a failure: same trial, same record
        self.known.add(trial.trial_id)
        params = hyperparameters(trial.config)
        config = {**self.base.to_dict(), **params}  # not validated here: a bad one errors in its trial
        record: dict[str, Any] = {"trial": trial.trial_id, "params": params, "config": config}
        if trial.config.get(CONTINUES):
            record["continues"] = trial.config[CONTINUES]
        elif trial.trial_id in self.searcher.numbers:
            record["number"] = self.searcher.numbers[trial.trial_id]
        if trial.config.get(BASELINE):
            record["baseline"] = True
        self.journal.append("trial", **record)

    @_guarded
    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.journal.append("epoch", trial=trial.trial_id, **{k: result.get(k) for k in self.metrics})
        self._warn_if_slow(trial.trial_id, result)

    def _warn_if_slow(self, trial_id: str, result: dict) -> None:
        """Say so at once when an epoch takes more than 3x its trial's first: a stall is seen, not waited out."""
        if result.get("epoch") == 1:
            self.first_epoch[trial_id] = result
            return
        first = self.first_epoch.get(trial_id)
        if first is not None and slow_epochs([first, result]):
            number = self.searcher.numbers.get(trial_id, "?")
            print(f"[slow] trial {number}: {slow_epoch_text([first, result])}", flush=True)

    @_guarded
    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        epoch = (trial.last_result or {}).get("epoch")
        path = checkpoint.path
        kind = getattr(checkpoint.filesystem, "type_name", "local")
        if kind != "local":  # Ray gives s3:// and gs:// paths without their scheme
            path = f"{'gs' if kind == 'gcs' else kind}://{path}"
        self.journal.append("checkpoint", trial=trial.trial_id, epoch=epoch, path=path)

    @_guarded
    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.journal.append("end", trial=trial.trial_id, error=None)
        self._ended(trial.trial_id)

    @_guarded
    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.journal.append("end", trial=trial.trial_id, error=_error_message(trial))
        self._ended(trial.trial_id)

    def _ended(self, trial_id: str) -> None:
        all_trials = self.experiment.reload().trials
        export_mod.export(self.experiment)  # the CSV files stay current while the search runs
        this = next((t for t in all_trials if t.trial == trial_id or trial_id in t.aliases), None)
        if this is None:
            return
        ended = sum(t.done for t in all_trials)
        best = self.experiment.best
        met = " challenge met" if (this.last or {}).get("challenge_met") else ""
        slow = f" | {slow_epoch_text(this.epochs)}" if slow_epochs(this.epochs) else ""
        best_text = f"best so far: trial {best.number} ({fmt_result(best)})" if best is not None else ""
        print(
            f"[{ended:>3}/{self.samples}] trial {this.number:>3}{' (baseline)' if this.baseline else ''}: {fmt_params(this.config)} | "
            f"{fmt_result(this)} | {this.status}{met}{slow} | {best_text}",
            flush=True,
        )


def _error_message(trial: Any) -> str:
    """The last line of the trial's traceback (the exception), read from Ray's local error file."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        if lines:
            return lines[-1].strip()
    return "the trial failed (no error message recorded)"
