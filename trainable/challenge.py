"""The tutorial's challenge as a verdict on one run's per-epoch history.

"Play with the hyperparameters until the training loss is lower than the test loss and keeps
decreasing." A pure function of the history, so the trainer, the search and the report agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_WINDOW = 3  # epochs over which the train loss must keep falling

# --objective name -> (metric the search steers by, mode)
OBJECTIVES: dict[str, tuple[str, str]] = {
    "challenge": ("challenge_score", "max"),
    "test_accuracy": ("test_accuracy", "max"),
    "test_loss": ("test_loss", "min"),
}
# What a diverged run is told to the searcher as: worse than any real result, but finite.
WORST = {"max": -1.0, "min": 1e9}


def verdict(history: Sequence[Mapping[str, Any]], window: int = DEFAULT_WINDOW) -> dict[str, Any]:
    """Challenge verdict after the last epoch of `history` (dicts with train_loss, test_loss).

    - train_below_test: train_loss < test_loss at the last epoch;
    - still_decreasing: train_loss fell in each of the last `window` epochs;
    - challenge_met: both;
    - crossing_epoch: first epoch from which train_loss stayed below test_loss (None if it is
      not below at the last epoch).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    train = [float(h["train_loss"]) for h in history]
    test = [float(h["test_loss"]) for h in history]
    below = [tr < te for tr, te in zip(train, test)]  # NaN compares False: a diverged epoch is never below
    train_below_test = bool(below) and below[-1]
    tail = train[-(window + 1) :]
    still_decreasing = len(tail) == window + 1 and all(b < a for a, b in zip(tail, tail[1:]))
    crossing_epoch = None
    if train_below_test:
        first = len(below)
        while first > 1 and below[first - 2]:
            first -= 1
        crossing_epoch = int(history[first - 1].get("epoch", first))
    return {
        "train_below_test": train_below_test,
        "still_decreasing": still_decreasing,
        "challenge_met": train_below_test and still_decreasing,
        "crossing_epoch": crossing_epoch,
    }


def challenge_score(metrics: Mapping[str, Any]) -> float:
    """One scalar that ranks runs meeting the challenge above all others, then by test accuracy."""
    if metrics.get("diverged"):
        return WORST["max"]
    return float(metrics["test_accuracy"]) + (1.0 if metrics["challenge_met"] else 0.0)


def objective_value(metrics: Mapping[str, Any], objective: str) -> float:
    """The value of `objective` (a key of OBJECTIVES) for one epoch's metrics; finite always."""
    key, mode = OBJECTIVES[objective]
    value = challenge_score(metrics) if key == "challenge_score" else float(metrics[key])
    if metrics.get("diverged") or not math.isfinite(value):
        return WORST[mode]
    return value
