"""How trials read on the console: one line per trial, the same words in the summary."""

from __future__ import annotations

from typing import Any

from trainable import challenge
from tuning.journal import ERRORED, TrialRecord


def fmt_params(config: dict[str, Any]) -> str:
    opt = config["optimizer"]
    momentum = f" momentum {config['momentum']:.2f}" if opt in ("sgd", "nesterov") and config["momentum"] else ""
    schedule = " cosine" if config.get("schedule") == "cosine" else ""
    return (f"lr {config['lr']:.2e}{schedule} batch_size {config['batch_size']} epochs {config['epochs']} "
            f"{opt}{momentum} weight_decay {config['weight_decay']:.0e}")


def fmt_result(t: TrialRecord) -> str:
    last = t.last
    if last is None:
        return f"no epoch finished ({t.error or t.status})"
    acc = last.get("test_accuracy")
    losses = f"train_loss {_num(last.get('train_loss'))} test_loss {_num(last.get('test_loss'))}"
    return f"test_accuracy {100 * acc:.1f}% {losses}" if acc is not None else losses


def _num(value: Any) -> str:
    return "nan" if value is None else f"{value:.4f}"


def verdict_text(t: TrialRecord, window: int) -> str:
    """The challenge's verdict with its margin:
    'challenge met (train_loss 0.95 < test_loss 1.24 - 0.02 (2 SE), ...)'."""
    last = t.last or {}
    if t.status == ERRORED:
        return f"errored: {t.error}"
    if last.get("diverged"):
        return "diverged: challenge not met"
    if last.get("train_loss") is None or last.get("test_loss") is None:
        return "challenge not met (no result)"
    gap = challenge.gap_text(last)
    if last.get("challenge_met"):
        return (f"challenge met ({gap}, below since epoch {last['crossing_epoch']}, "
                f"falling over the last {window} epochs)")
    if last.get("above_chance") is False:
        return f"challenge not met (test accuracy within {100 * challenge.ABOVE_CHANCE:.0f} points of chance; {gap})"
    if last.get("train_below_test"):
        return f"challenge not met ({gap}, but not falling in each of the last {window} epochs)"
    return f"challenge not met ({gap})"
