"""rank(): the ONE place a best trial is chosen, and what it reads of a trial (its final
objective, its challenge verdict). Below the experiment folder and its tables, so both import it."""

from __future__ import annotations

import math
from collections.abc import Sequence

from tuning.results.journal import DIVERGED, ERRORED, FINISHED, INTERRUPTED, TrialRecord

RANKED_OUT = (ERRORED, INTERRUPTED, DIVERGED)  # no final result to rank


def final_objective(trial: TrialRecord) -> float | None:
    last = trial.last
    if last is None or trial.status == ERRORED:
        return None
    value = last.get("objective")
    return None if value is None or not math.isfinite(value) else float(value)


def rank(all_trials: Sequence[TrialRecord], mode: str) -> list[TrialRecord]:
    """Trials best first: those that ran their whole schedule and meet the challenge, by their
    objective, then the others by their objective. Errored, diverged and interrupted trials have
    no final result and are left out. The winner is rank(...)[0]: the most accurate trial that
    ran its schedule and meets the challenge, or, if none does, the most accurate trial (for
    --objective test_accuracy). A trial stopped early is judged on the epochs it ran, whose loss
    is still falling as a matter of course, and its configuration re-trained runs the whole
    schedule: its verdict does not make it the winner."""
    sign = 1 if mode == "max" else -1
    scored = [t for t in all_trials if t.status not in RANKED_OUT and final_objective(t) is not None]
    return sorted(scored, key=lambda t: (not wins_challenge(t), -sign * final_objective(t), t.number))  # type: ignore[operator]


def wins_challenge(trial: TrialRecord) -> bool:
    """It meets the challenge at the end of its whole schedule: what puts a trial first in rank()."""
    return trial.status == FINISHED and met(trial)


def met(trial: TrialRecord) -> bool:
    return bool((trial.last or {}).get("challenge_met"))
