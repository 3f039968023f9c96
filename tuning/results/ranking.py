"""rank(): the ONE place a best trial is chosen, and what it reads of a trial (its final
objective, its challenge verdict). Below the experiment folder and its tables, so both import it."""

from __future__ import annotations

import math
from collections.abc import Sequence

from tuning.results.journal import DIVERGED, ERRORED, INTERRUPTED, TrialRecord

RANKED_OUT = (ERRORED, INTERRUPTED, DIVERGED)  # no final result to rank


def final_objective(trial: TrialRecord) -> float | None:
    last = trial.last
    if last is None or trial.status == ERRORED:
        return None
    value = last.get("objective")
    return None if value is None or not math.isfinite(value) else float(value)


def rank(all_trials: Sequence[TrialRecord], mode: str) -> list[TrialRecord]:
    """Trials best first: those meeting the challenge by their objective, then the others by
    their objective. Errored, diverged and interrupted trials have no final result and are
    left out. The winner is rank(...)[0]: the most accurate trial that meets the challenge, or,
    if none does, the most accurate trial (for --objective test_accuracy)."""
    sign = 1 if mode == "max" else -1
    scored = [t for t in all_trials if t.status not in RANKED_OUT and final_objective(t) is not None]
    return sorted(scored, key=lambda t: (not met(t), -sign * final_objective(t), t.number))  # type: ignore[operator]


def met(trial: TrialRecord) -> bool:
    return bool((trial.last or {}).get("challenge_met"))
