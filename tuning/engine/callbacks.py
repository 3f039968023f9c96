"""The driver-side Tune callback: journals every event, then tells the search's listeners
(tuning/results/listener.py: the CSV files, TensorBoard, the console), one job each.

Runs in the driver, so it sees results from every node of a cluster. An exception in a Tune
callback would abort the whole search, so each record and each listener is guarded on its own: a
failure is reported and the search goes on, except a write that fails (a full disk): a search
that ran on would train what it cannot record, so that one ends the search (Tune stops the
trials; the driver says how to go on). A trial that fails because its checkpoint cannot be
written ends it the same way, instead of being retried into the same full disk and recorded as
errored.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from optuna.distributions import distribution_to_json
from ray import tune

from trainable.config import TrainConfig
from trainable.fileio import disk_error_in, write_error
from tuning.engine.searcher import BASELINE, CONTINUES, StudySearcher, hyperparameters
from tuning.engine.trial import EXTRA, TRIAL_METRICS
from tuning.results.experiment import Experiment
from tuning.results.listener import Listener, TrialStart
from tuning.space import apply_params


class ExperimentCallback(tune.Callback):
    def __init__(
        self,
        experiment: Experiment,
        *,
        base: TrainConfig,
        searcher: StudySearcher,
        listeners: Sequence[Listener] = (),
        metrics: Sequence[str] = TRIAL_METRICS,
    ) -> None:
        self.experiment = experiment
        self.journal = experiment.journal
        self.base = base
        self.searcher = searcher
        self.listeners = list(listeners)
        self.metrics = tuple(metrics)
        self.known: set[str] = set()
        earlier = experiment.trials  # a resumed search starts from what is done
        self.numbers = {t.trial: t.number for t in earlier}  # our id -> trial number
        self.checkpoint_epochs = {t.trial: t.checkpoint_epoch for t in earlier}  # Ray or our id -> epoch
        self.failed_write: OSError | None = None  # the write that ended the search, if one did

    def _guard(self, what: str, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - never let bookkeeping kill the search ...
            failed = write_error(exc)
            if failed is not None:  # ... unless it can no longer be recorded (Tune passes on only its text)
                self.failed_write = failed
                raise
            print(f"hptune: {what} failed (the search goes on):\n{traceback.format_exc()}", file=sys.stderr)

    def _tell(self, event: str, *args: Any) -> None:
        for listener in self.listeners:
            self._guard(f"{type(listener).__name__}.{event}", lambda lst=listener: getattr(lst, event)(*args))

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        start: list[TrialStart] = []
        self._guard("on_trial_start", lambda: start.append(self._record_start(trial)))
        if start:  # what is shown, after what is recorded
            self._tell("trial_started", start[0])

    def _record_start(self, trial: Any) -> TrialStart:
        params = hyperparameters(trial.config)
        config = apply_params(self.base.to_dict(), params)  # not validated here: a bad one errors in its trial
        continues = trial.config.get(CONTINUES)
        number = self.numbers.get(continues) if continues else self.searcher.numbers.get(trial.trial_id)
        if trial.trial_id not in self.known:  # else restarted after a failure: same trial, same record
            self.known.add(trial.trial_id)
            record: dict[str, Any] = {"trial": trial.trial_id, "params": params, "config": config}
            if continues:
                record["continues"] = continues
            elif number is not None:
                record["number"] = number
            if trial.config.get(BASELINE):
                record["baseline"] = True
            asked = self.searcher.asked.get(trial.trial_id)
            if asked is not None:  # what Optuna holds of it, so a lost optuna.db can be rebuilt exactly
                record["optuna"] = {"params": asked.params, "distributions": {
                    k: distribution_to_json(d) for k, d in asked.distributions.items()}}
            self.journal.append("trial", **record)
        # a restart resumes from the trial's last checkpoint
        resumes_after = self.checkpoint_epochs.get(trial.trial_id) or self.checkpoint_epochs.get(continues or "", 0)
        return TrialStart(trial=trial.trial_id, number=number, params=params, config=config,
                          baseline=bool(trial.config.get(BASELINE)), resumes_after=resumes_after or 0)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        metrics = {k: result.get(k) for k in (*self.metrics, *result.get(EXTRA, ()))}
        self._guard("on_trial_result", lambda: self.journal.append("epoch", trial=trial.trial_id, **metrics))
        self._tell("epoch", trial.trial_id, metrics)

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        def record() -> None:
            epoch = (trial.last_result or {}).get("epoch")
            path = checkpoint.path
            kind = getattr(checkpoint.filesystem, "type_name", "local")
            if kind != "local":  # Ray gives s3:// and gs:// paths without their scheme
                path = f"{'gs' if kind == 'gcs' else kind}://{path}"
            self.journal.append("checkpoint", trial=trial.trial_id, epoch=epoch, path=path)
            self.checkpoint_epochs[trial.trial_id] = epoch

        self._guard("on_checkpoint", record)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._guard("on_trial_complete", lambda: self.journal.append("end", trial=trial.trial_id, error=None))
        self._ended(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        def record() -> None:
            _raise_if_disk_failed(trial)  # not the trial's fault: it continues from its checkpoint on resume
            self.journal.append("end", trial=trial.trial_id, error=_error_message(trial))

        self._guard("on_trial_error", record)
        self._ended(trial.trial_id)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._guard("on_trial_recover", lambda: _raise_if_disk_failed(trial))  # a retry would meet the same full disk

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close every listener (also called if the search is interrupted)."""
        self._tell("close")

    def _ended(self, trial_id: str) -> None:
        experiment: list[Experiment] = []
        self._guard("reading the journal", lambda: experiment.append(self.experiment.reload()))
        if experiment:
            self._tell("trial_ended", trial_id, experiment[0])


def _raise_if_disk_failed(trial: Any) -> None:
    """A trial that failed for want of space (or of a working disk) where its checkpoints go."""
    path = getattr(trial, "error_file", None)
    text = Path(path).read_text(errors="replace") if path and Path(path).exists() else ""
    failed = disk_error_in(text, filename=getattr(trial, "path", None))
    if failed is not None:
        raise failed


def _error_message(trial: Any) -> str:
    """The last line of the trial's traceback (the exception), read from Ray's local error file."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        if lines:
            return lines[-1].strip()
    return "the trial failed (no error message recorded)"
