"""A user's own training loop in place of ours: ``fn(config, data, report)``.

For those who cannot hand their loop over. `fn` receives the trial's configuration as a dict
(`TrainConfig.to_dict()`: lr, batch_size, epochs, optimizer, momentum, weight_decay, schedule,
seed, model, model_args, ...), the data set loaded once (a `trainable.data.Dataset` of numpy
arrays, or `StreamedData` for one too large to hold), and `report`. It trains and calls
``report(train_loss=..., test_loss=..., test_accuracy=...)`` once per epoch (any other numbers are
kept too; ``test_loss_se``, the test loss's standard error, gives the challenge its noise margin,
0 without it). The search's early stopping, the challenge, the journal, CSV files and report work
from what it reports.

What it gives up against ours: the fast tensor-resident loop and bf16 step (it trains as it
trains), and resuming mid-trial, unless it saves its state through the hook:
``report(..., state=obj)`` checkpoints `obj` (anything torch.save takes) with the epoch, and a
resumed trial finds it in ``report.state`` and the epochs done in ``report.epoch``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from trainable.challenge import DEFAULT_WINDOW
from trainable.config import TrainConfig
from trainable.data import Data
from trainable.fit import accuracy_se, complete_metrics
from trainable.refs import UserCodeError, call_user, describe, resolve

REQUIRED = ("train_loss", "test_loss", "test_accuracy")
# Reported keys that are ours to compute; a loop's own values for them are not taken.
COMPUTED = ("epoch", "epoch_seconds", "diverged", "train_below_test", "still_decreasing", "above_chance",
            "challenge_met", "crossing_epoch")


class StopTrial(BaseException):  # noqa: N818 - not an error: a BaseException so `except Exception` in a loop passes it
    """Raised from `report` when the run must end now (it diverged, or the search stops it)."""


class Report:
    """The `report` callable handed to a user's loop; one call per epoch."""

    def __init__(self, config: TrainConfig, data: Data, on_epoch: Callable[[dict[str, Any], Any], bool | None], *,
                 challenge_window: int = DEFAULT_WINDOW, history: list[dict[str, Any]] | None = None,
                 state: Any = None) -> None:
        self.config, self.data, self.on_epoch = config, data, on_epoch
        self.window = challenge_window
        self.history: list[dict[str, Any]] = list(history or [])
        self.state = state  # what the loop saved with its last reported epoch (a resumed trial), else None
        self._since = time.perf_counter()

    @property
    def epoch(self) -> int:
        """Epochs reported so far (before this run too, for a resumed trial)."""
        return len(self.history)

    def __call__(self, metrics: Mapping[str, Any] | None = None, *, state: Any = None, **values: Any) -> None:
        given = {**(metrics or {}), **values}
        missing = [k for k in REQUIRED if given.get(k) is None]
        if missing:
            raise ValueError(f"report() needs {', '.join(REQUIRED)} every epoch; missing {', '.join(missing)} "
                             f"(got {', '.join(sorted(given)) or 'nothing'})")
        now = time.perf_counter()
        seconds, self._since = now - self._since, now
        full: dict[str, Any] = {"epoch": self.epoch + 1}
        for key, value in given.items():
            if key in COMPUTED:
                continue
            full[key] = _number(key, value)
        full.setdefault("train_accuracy", None)
        full.setdefault("test_loss_se", 0.0)
        full.setdefault("test_accuracy_se", accuracy_se(full.get("test_accuracy"), self.data.test_size))
        full["epoch_seconds"] = seconds
        full.setdefault("samples_per_second", self.data.train_size / seconds if seconds > 0 else None)
        complete_metrics(full, self.history, self.window, self.data.num_classes)
        self.history.append(full)
        stop = self.on_epoch(full, state)
        if stop or full["diverged"] or self.epoch >= self.config.epochs:
            raise StopTrial


def _number(key: str, value: Any) -> Any:
    if isinstance(value, bool):
        return value
    try:
        return float(value) if not isinstance(value, int) else value
    except (TypeError, ValueError):
        raise ValueError(f"report(): {key} must be a number, got {value!r}") from None


def loop_of(reference: str) -> Callable[..., Any]:
    return resolve(reference, "loop")


def run_own_loop(fn: Callable[..., Any], config: TrainConfig, data: Data,
                 on_epoch: Callable[[dict[str, Any], Any], bool | None], *,
                 challenge_window: int = DEFAULT_WINDOW, history: list[dict[str, Any]] | None = None,
                 state: Any = None) -> list[dict[str, Any]]:
    """Run `fn(config dict, data, report)`; `on_epoch(metrics, state)` after each reported epoch
    (returning True stops the run). The run ends when `fn` returns, when it has reported
    `config.epochs` epochs, or when an epoch diverged. Returns the metrics of every epoch.

    UserCodeError (naming `fn`) if it raises, or reports without the required metrics."""
    report = Report(config, data, on_epoch, challenge_window=challenge_window, history=history, state=state)
    if history and len(history) >= config.epochs:
        return report.history
    try:
        call_user(fn, "the training loop", config.to_dict(), data, report)
    except StopTrial:
        pass
    except UserCodeError:
        raise
    if not report.history:
        raise UserCodeError(f"the training loop {describe(fn)} returned without calling report() once")
    return report.history


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
