"""The driver-side Tune callback: journals every event, prints one line per ended trial (under a live
line on a terminal), keeps trials.csv / epochs.csv / best_config.yaml current and, with
--tensorboard, writes each trial's metrics and hyperparameters for TensorBoard.

Runs in the driver, so it sees results from every node of a cluster. An exception in a Tune
callback would abort the whole search, so each hook logs its own failure and carries on, except
a write that fails (a full disk): a search that ran on would train what it cannot record, so that
one ends the search (Tune stops the trials; the driver says how to go on). A trial that fails
because its checkpoint cannot be written ends it the same way, instead of being retried into the
same full disk and recorded as errored.
"""

from __future__ import annotations

import functools
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from optuna.distributions import distribution_to_json
from ray import tune

from trainable.config import TrainConfig
from trainable.fileio import disk_error_in, write_error
from trainable.fit import slow_epoch_text, slow_epochs
from tuning.engine.searcher import BASELINE, CONTINUES, StudySearcher, hyperparameters
from tuning.engine.trial import EXTRA, TRIAL_METRICS
from tuning.results import export as export_mod
from tuning.results.console import fmt_params, fmt_result
from tuning.results.experiment import Experiment
from tuning.results.journal import TrialRecord
from tuning.results.progress_line import LineState, LiveLine, estimate_seconds_left
from tuning.results.tensorboard import TrialBoards, run_name
from tuning.space import apply_params

# How the search shows its progress: a live line above which ended trials are printed (a terminal),
# one plain line per ended trial (not a terminal), or nothing until the summary (--quiet).
LIVE, LINES, QUIET = "live", "lines", "quiet"


def _guarded(hook: Callable) -> Callable:
    @functools.wraps(hook)
    def wrapper(self: ExperimentCallback, *args: Any, **kwargs: Any) -> None:
        try:
            hook(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - never let bookkeeping kill the search ...
            failed = write_error(exc)
            if failed is not None:  # ... unless it can no longer be recorded (Tune passes on only its text)
                self.failed_write = failed
                raise
            print(f"hptune: {hook.__name__} failed (the search goes on):\n{traceback.format_exc()}", file=sys.stderr)

    return wrapper


class ExperimentCallback(tune.Callback):
    def __init__(
        self,
        experiment: Experiment,
        *,
        base: TrainConfig,
        searcher: StudySearcher,
        metrics: Sequence[str] = TRIAL_METRICS,
        output: str = LINES,
        slots: float = 1.0,
        tensorboard: bool = False,
    ) -> None:
        self.experiment = experiment
        self.journal = experiment.journal
        self.base = base
        self.searcher = searcher
        self.samples = experiment.settings.samples
        self.metrics = tuple(metrics)
        self.known: set[str] = set()
        self.first_epoch: dict[str, dict] = {}  # trial id -> its epoch 1 result, to spot stalls
        self.output = output
        self.slots = slots
        earlier = experiment.trials  # a resumed search starts from what is done
        self.numbers = {t.trial: t.number for t in earlier}  # our id -> trial number
        self.checkpoint_epochs = {t.trial: t.checkpoint_epoch for t in earlier}  # Ray or our id -> epoch
        # for the live line: measured in this run, or read from the journal
        self.running: dict[str, list[float]] = {}  # Ray id -> [epochs done, epochs planned, time of last report]
        self.seconds_per_epoch: list[float] = []
        self.done_trials = [t for t in earlier if t.done]
        self.best: TrialRecord | None = experiment.best
        self.boards = TrialBoards(experiment.folder) if tensorboard else None
        self.line = LiveLine(self.samples, len(self.done_trials)) if output == LIVE else None
        self.failed_write: OSError | None = None  # the write that ended the search, if one did

    @_guarded
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
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
        # what is shown, after what is recorded: a restart resumes from the trial's last checkpoint
        resumes_after = self.checkpoint_epochs.get(trial.trial_id) or self.checkpoint_epochs.get(continues or "", 0)
        self.running[trial.trial_id] = [resumes_after, config.get("epochs", 0), time.time()]
        if self.boards is not None:
            run = run_name(number) if number is not None else f"trial-{trial.trial_id}"
            hparams = {**params, "baseline": bool(trial.config.get(BASELINE))}
            self.boards.open(trial.trial_id, run, hparams, resumes_after=resumes_after)
        self._show()

    @_guarded
    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        metrics = {k: result.get(k) for k in (*self.metrics, *result.get(EXTRA, ()))}
        self.journal.append("epoch", trial=trial.trial_id, **metrics)
        if self.boards is not None:
            self.boards.epoch(trial.trial_id, metrics)
        state = self.running.get(trial.trial_id)
        if state is not None and metrics.get("epoch") is not None:
            now = time.time()
            epochs = metrics["epoch"] - state[0]
            if epochs > 0:  # wall time per epoch, the trial's start and reporting included
                self.seconds_per_epoch.extend([(now - state[2]) / epochs] * int(epochs))
            state[0], state[2] = metrics["epoch"], now
        self._warn_if_slow(trial.trial_id, result)
        self._show()

    def _warn_if_slow(self, trial_id: str, result: dict) -> None:
        """Say so at once when an epoch takes more than 3x its trial's first: a stall is seen, not waited out."""
        if result.get("epoch") == 1:
            self.first_epoch[trial_id] = result
            return
        first = self.first_epoch.get(trial_id)
        if first is not None and slow_epochs([first, result]) and self.output != QUIET:
            number = self.searcher.numbers.get(trial_id, "?")
            self._print(f"[slow] trial {number}: {slow_epoch_text([first, result])}")

    def _print(self, line: str) -> None:
        if self.line is not None:
            self.line.write(line)
        else:
            print(line, flush=True)

    @_guarded
    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        epoch = (trial.last_result or {}).get("epoch")
        path = checkpoint.path
        kind = getattr(checkpoint.filesystem, "type_name", "local")
        if kind != "local":  # Ray gives s3:// and gs:// paths without their scheme
            path = f"{'gs' if kind == 'gcs' else kind}://{path}"
        self.journal.append("checkpoint", trial=trial.trial_id, epoch=epoch, path=path)
        self.checkpoint_epochs[trial.trial_id] = epoch

    @_guarded
    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.journal.append("end", trial=trial.trial_id, error=None)
        self._ended(trial.trial_id)

    @_guarded
    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _raise_if_disk_failed(trial)  # not the trial's fault: it continues from its checkpoint on resume
        self.journal.append("end", trial=trial.trial_id, error=_error_message(trial))
        self._ended(trial.trial_id)

    @_guarded
    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _raise_if_disk_failed(trial)  # a retry would meet the same full disk

    @_guarded
    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the TensorBoard runs and the live line (also called if the search is interrupted)."""
        if self.boards is not None:
            self.boards.close_all()
        if self.line is not None:
            self.line.close()
            self.line = None

    def _ended(self, trial_id: str) -> None:
        self.running.pop(trial_id, None)
        all_trials = self.experiment.reload().trials
        export_mod.export(self.experiment)  # the CSV files stay current while the search runs
        if self.boards is not None:
            self.boards.close(trial_id)
        self.done_trials = [t for t in all_trials if t.done]
        self.best = self.experiment.best
        this = next((t for t in all_trials if t.trial == trial_id or trial_id in t.aliases), None)
        if this is not None and self.output != QUIET:
            best, ended = self.best, len(self.done_trials)
            met = " challenge met" if (this.last or {}).get("challenge_met") else ""
            slow = f" | {slow_epoch_text(this.epochs)}" if slow_epochs(this.epochs) else ""
            best_text = f"best so far: trial {best.number} ({fmt_result(best)})" if best is not None else ""
            self._print(f"[{ended:>3}/{self.samples}] trial {this.number:>3}{' (baseline)' if this.baseline else ''}: "
                        f"{fmt_params(this.config)} | {fmt_result(this)} | {this.status}{met}{slow} | {best_text}")
        self._show()

    def line_state(self) -> LineState:
        """What the live line shows, from what this callback has seen."""
        running = [(int(done), int(planned)) for done, planned, _ in self.running.values()]
        unstarted = max(self.samples - len(self.done_trials) - len(running), 0)
        ended_epochs = [len(t.epochs) for t in self.done_trials]
        left = estimate_seconds_left(self.seconds_per_epoch, running, unstarted, ended_epochs, self.slots)
        acc = (self.best.last or {}).get("test_accuracy") if self.best is not None else None
        best = f"trial {self.best.number} test_accuracy {100 * acc:.1f}%" if acc is not None else ""
        return LineState(self.samples, len(self.done_trials), len(running), best, left)

    def _show(self) -> None:
        if self.line is not None:
            self.line.show(self.line_state())


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
