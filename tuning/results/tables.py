"""trials.csv and epochs.csv as tables, from a search's trial records: one row per trial (its
hyperparameters, status, final metrics and rank) and one per trial and epoch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from trainable.config import TRAINING_HYPERPARAMETERS
from trainable.fit import METRICS, slow_epoch_text
from tuning.results.journal import ERRORED, INTERRUPTED, RUNNING, TrialRecord
from tuning.results.ranking import rank

PARAMS = TRAINING_HYPERPARAMETERS  # and model.NAME for each model hyperparameter any trial has


def params_of(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's hyperparameters as trials.csv shows them: the training ones, then model.NAME."""
    values = {p: config.get(p) for p in PARAMS}
    values.update({f"model.{k}": v for k, v in (config.get("model_args") or {}).items()})
    return values
FINAL = (
    "train_loss", "train_accuracy", "test_loss", "test_accuracy", "test_loss_se", "train_below_test",
    "still_decreasing", "above_chance", "challenge_met", "crossing_epoch", "objective",
)


def trials_table(all_trials: Sequence[TrialRecord], mode: str = "max", running: bool = False) -> pd.DataFrame:
    """One row per trial: its hyperparameters, status, epochs run, final and best metrics, and
    its `rank` (1 = the winner, by tuning.results.ranking.rank; empty for trials without a result).

    `running`: the search is still going, so a trial that has not ended is "running", not
    "interrupted".
    """
    ranks = {t.trial: i for i, t in enumerate(rank(all_trials, mode), start=1)}
    model_columns = list(dict.fromkeys(f"model.{k}" for t in all_trials for k in (t.config.get("model_args") or {})))
    rows = []
    for t in all_trials:
        last = t.last or {}
        tested = [m for m in t.epochs if m.get("test_accuracy") is not None]
        status = RUNNING if running and t.status == INTERRUPTED else t.status
        row: dict[str, Any] = {"trial": t.trial, "number": t.number, "rank": ranks.get(t.trial), "status": status,
                               "baseline": t.baseline}
        row.update(params_of(t.config))
        row["epochs_run"] = len(t.epochs)
        row.update({f: last.get(f) for f in FINAL})
        row["best_test_accuracy"] = max((m["test_accuracy"] for m in tested), default=None)
        row["best_test_loss"] = min((m["test_loss"] for m in tested if m.get("test_loss") is not None), default=None)
        row["train_seconds"] = sum(m.get("epoch_seconds") or 0.0 for m in t.epochs)
        row["slow_epoch"] = slow_epoch_text(t.epochs) or None
        row["error"] = t.error
        if status == ERRORED:
            row["objective"] = None  # an errored trial has no result to rank
        rows.append(row)
    columns = ["trial", "number", "rank", "status", "baseline", *PARAMS, *model_columns, "epochs_run", *FINAL,
               "best_test_accuracy", "best_test_loss", "train_seconds", "slow_epoch", "error"]
    return pd.DataFrame(rows, columns=columns).astype({"rank": "Int64"})


def epochs_table(all_trials: Sequence[TrialRecord]) -> pd.DataFrame:
    """One row per trial and epoch, with the trainable's metric names."""
    extra = list(dict.fromkeys(k for t in all_trials for m in t.epochs for k in m
                               if k not in (*METRICS, "objective", "objective_se", "stalled", "data_device",
                                            "_extra_metrics")))
    columns = ["trial", "number", *METRICS, "objective", "objective_se", *extra]
    rows = [{"trial": t.trial, "number": t.number, **{c: m.get(c) for c in columns[2:]}}
            for t in all_trials for m in t.epochs]
    return pd.DataFrame(rows, columns=columns)
