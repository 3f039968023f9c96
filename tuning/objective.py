"""What a search steers by: the objective (one scalar per epoch, for ASHA and Optuna) and the
challenge as constraints (for Optuna, so the sampler learns where the feasible region lies).

The objective is what users want from a run, test accuracy by default; the tutorial's
challenge is not folded into it (a +1 for meeting it would rank a 40% trial above a 60% one,
and at an ASHA rung it would mostly ask whether a cosine schedule had annealed yet). It enters
Optuna as constraints, and the ranking (`tuning.results.ranking.rank`) picks the most accurate trial
that meets it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from trainable import challenge

# --objective name -> (metric, mode)
OBJECTIVES: dict[str, tuple[str, str]] = {
    "test_accuracy": ("test_accuracy", "max"),
    "test_loss": ("test_loss", "min"),
}
DEFAULT_OBJECTIVE = "test_accuracy"
# What a diverged run is told to the searcher as: worse than any real result, but finite.
WORST = {"max": -1.0, "min": 1e9}
# A trial whose last two epochs are within STALL_MARGIN of chance accuracy, with a test loss that
# did not fall by STALL_LOSS_DROP from the first of them to the second, has learned nothing and
# cannot: it is stopped as "stalled" (the default space's dead corners sit at exactly 10.0% with a
# flat loss of ln 10). This is judged after every epoch from the second on, so a trial that learned
# in its first epoch and then collapsed to chance (high lr with high momentum) stops too, instead
# of running on at 10% until ASHA's last rung. A slow learner near chance with a falling loss runs on.
STALL_MARGIN = 0.02
STALL_LOSS_DROP = 0.005
STALL_EPOCH = 2


def objective_value(metrics: Mapping[str, Any], objective: str) -> float:
    """The value of `objective` (a key of OBJECTIVES) for one epoch's metrics; finite always."""
    key, mode = OBJECTIVES[objective]
    value = metrics.get(key)
    if metrics.get("diverged") or value is None or not math.isfinite(float(value)):
        return WORST[mode]
    return float(value)


def constraints(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The challenge as Optuna constraints (feasible when every value is <= 0).

    train_below_test is continuous (how far the train loss is above the test loss minus its
    noise margin), so a sampler can tell nearly-met from far-off; the other two are yes/no.
    """
    gap = math.nan
    if metrics.get("train_loss") is not None and metrics.get("test_loss") is not None:
        gap = float(metrics["train_loss"]) - (float(metrics["test_loss"]) - challenge.margin(metrics))
    return {
        "train_below_test": gap if math.isfinite(gap) else 1.0,
        "still_decreasing": 0.0 if metrics.get("still_decreasing") else 1.0,
        "above_chance": 0.0 if metrics.get("above_chance") else 1.0,
    }


def stalled(history: Sequence[Mapping[str, Any]], classes: int) -> bool:
    """Its last two epochs at chance level with a flat (or non-finite) test loss."""
    if len(history) < STALL_EPOCH:
        return False
    recent = history[-STALL_EPOCH:]
    chance = 1.0 / classes + STALL_MARGIN
    if any(m.get("test_accuracy") is None or m["test_accuracy"] >= chance for m in recent):
        return False
    first, last = (recent[0].get("test_loss"), recent[-1].get("test_loss"))
    if first is None or last is None or not (math.isfinite(first) and math.isfinite(last)):
        return True
    return last > first - STALL_LOSS_DROP
