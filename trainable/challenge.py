"""The tutorial's challenge as a verdict on one run's per-epoch history.

"Play with the hyperparameters until the training loss is lower than the test loss and keeps
decreasing." A pure function of the history, so the trainer, the search and the report agree.

Noise-aware: a test loss is the mean over a finite test set, so it moves by chance by about its
standard error (`test_loss_se`: per-image loss standard deviation / sqrt(N), 0.01-0.02 on
CIFAR-10's 10,000 test images). "Lower" means lower by more than NOISE_SES standard errors.
The train loss compared is the epoch mean (`train_loss`), measured while the weights move: it
costs nothing extra, and it is higher than the train loss after the epoch, so the verdict errs
on the side of "not met". A run within 3 points of chance accuracy has learned nothing, whatever
its losses do, and never meets the challenge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_WINDOW = 3  # epochs over which the train loss must keep falling
NOISE_SES = 2.0  # the gap must exceed this many standard errors of the test loss
ABOVE_CHANCE = 0.03  # test accuracy must exceed chance (1 / classes) by this much


def margin(metrics: Mapping[str, Any]) -> float:
    """How much lower than the test loss the train loss must be: NOISE_SES standard errors."""
    return NOISE_SES * float(metrics.get("test_loss_se") or 0.0)


def below(metrics: Mapping[str, Any]) -> bool:
    """train_loss < test_loss - margin; NaN compares False, so a diverged epoch is never below."""
    return float(metrics["train_loss"]) < float(metrics["test_loss"]) - margin(metrics)


def verdict(history: Sequence[Mapping[str, Any]], window: int = DEFAULT_WINDOW, classes: int = 10) -> dict[str, Any]:
    """Challenge verdict after the last epoch of `history` (dicts with train_loss, test_loss,
    test_loss_se, test_accuracy).

    - train_below_test: train_loss < test_loss - 2 x test_loss_se at the last epoch;
    - still_decreasing: train_loss fell in each of the last `window` epochs;
    - above_chance: test accuracy more than 3 points above chance (1 / classes);
    - challenge_met: all three;
    - crossing_epoch: first epoch from which train_loss stayed below test_loss by the margin
      (None if it is not below at the last epoch).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    train = [float(h["train_loss"]) for h in history]
    is_below = [below(h) for h in history]
    train_below_test = bool(is_below) and is_below[-1]
    tail = train[-(window + 1) :]
    still_decreasing = len(tail) == window + 1 and all(b < a for a, b in zip(tail, tail[1:]))
    accuracy = float(history[-1].get("test_accuracy") or 0.0) if history else 0.0
    above_chance = accuracy > 1.0 / classes + ABOVE_CHANCE
    crossing_epoch = None
    if train_below_test:
        first = len(is_below)
        while first > 1 and is_below[first - 2]:
            first -= 1
        crossing_epoch = int(history[first - 1].get("epoch", first))
    return {
        "train_below_test": train_below_test,
        "still_decreasing": still_decreasing,
        "above_chance": above_chance,
        "challenge_met": train_below_test and still_decreasing and above_chance,
        "crossing_epoch": crossing_epoch,
    }


def gap_text(metrics: Mapping[str, Any]) -> str:
    """'train_loss 0.9499 < test_loss 1.2448 - 0.0245 (2 SE)': the comparison with its margin."""
    relation = "<" if below(metrics) else ">="
    return (f"train_loss {float(metrics['train_loss']):.4f} {relation} test_loss {float(metrics['test_loss']):.4f}"
            f" - {margin(metrics):.4f} ({NOISE_SES:g} SE)")


def verdict_text(metrics: Mapping[str, Any] | None, window: int = DEFAULT_WINDOW) -> str:
    """The verdict after a run's last epoch, in words, with its margin: the ONE rendering every
    command, file and page uses (the report's HTML wraps it).

    'challenge met (train_loss 0.8882 < test_loss 1.2399 - 0.0261 (2 SE), below since epoch 3,
    falling in each of the last 3 epochs)'"""
    if not metrics or metrics.get("train_loss") is None or metrics.get("test_loss") is None:
        return "challenge not met (no result)"
    if metrics.get("diverged"):
        return "challenge not met (training diverged: the loss became NaN or infinite)"
    gap = gap_text(metrics)
    crossing = metrics.get("crossing_epoch")
    since = f"below since epoch {crossing}" if metrics.get("train_below_test") and crossing is not None else ""
    if metrics.get("challenge_met"):
        return f"challenge met ({gap}, {since}, falling in each of the last {window} epochs)"
    parts = [gap, since]
    if not metrics.get("still_decreasing"):
        parts.append(f"not falling in each of the last {window} epochs")
    if metrics.get("above_chance") is False:
        parts.append(f"test accuracy within {100 * ABOVE_CHANCE:.0f} points of chance")
    return f"challenge not met ({'; '.join(p for p in parts if p)})"
