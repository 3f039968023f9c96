"""What the noise of the objective lets a search conclude: ties, which trials can still change the
answer, and when the search has converged. Plain functions over metrics and trial records; no Ray
(the Ray scheduler that applies the rule is tuning/engine/schedulers.py).

The noise. A trial's final objective is a mean over the test set, so it moves by chance by its
standard error: `test_accuracy_se` = sqrt(acc (1 - acc) / N), about 0.5 points at 55% on CIFAR-10's
10,000 test images; `test_loss_se` for --objective test_loss.

The stopping rule (the default). From a tenth of its schedule on (`grace`), a trial is judged
after every epoch against the incumbent, the best trial that ran its whole schedule:

    potential = its objective now + the largest gain any finished trial made from the same share
                of its schedule to its end + one standard error of its own
    it goes on while potential > the incumbent's final objective + one standard error of it

so a trial stops once even the most a finished trial ever gained from that point, on top of its own
noise, leaves it within the noise of the incumbent: it can no longer change the answer. Gains are
taken at the same share of each schedule (progress = epoch / epochs), so a cosine schedule is
compared at the same point of its annealing. Before any trial has finished there is nothing to
compare with, and every trial goes on.

Convergence. In the order trials ended, the search converged at the first trial k after which the
best never rose by more than the noise of the best at k. With --until-converged the search starts no
new trial once the last `window` trials to end left the best within that noise (and at least
`min_trials` have ended): their forecasts are the upper bound of the improvement still to come, as
in Makarova et al. (AutoML 2022), which stop when the bound on the remaining regret falls below the
objective's statistical error.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuning.objective import OBJECTIVES

GRACE = 0.10  # no trial is judged before this share of its schedule (settings.DEFAULT_GRACE)
OWN_SES = 1.0  # a trial's optimism: its objective now plus this many of its standard errors
INCUMBENT_SES = 1.0  # "beats the incumbent": by more than this many of the incumbent's standard errors
WINDOW = 5  # --until-converged: this many trials in a row that left the best within noise
MIN_TRIALS = 8  # ... and at least this many ended (the sampler's random start-up, 6, and the center)

SE_KEYS = {"test_accuracy": "test_accuracy_se", "test_loss": "test_loss_se"}


def objective_se(metrics: Mapping[str, Any], objective: str) -> float:
    """The standard error of `objective` in one epoch's metrics; 0 where it was not measured."""
    value = metrics.get(SE_KEYS.get(OBJECTIVES[objective][0], ""))
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) and value >= 0 else 0.0


@dataclass
class Curve:
    """One trial's objective per epoch, signed so that larger is better (mode 'min' negates)."""

    epochs: int  # its schedule
    values: list[float] = field(default_factory=list)
    ses: list[float] = field(default_factory=list)

    def add(self, value: float, se: float) -> None:
        self.values.append(value)
        self.ses.append(se)

    @property
    def progress(self) -> float:
        return len(self.values) / self.epochs if self.epochs else 1.0

    @property
    def complete(self) -> bool:
        return bool(self.values) and len(self.values) >= self.epochs

    def at(self, progress: float) -> float | None:
        """The objective at `progress` (a share of the schedule), between its epochs linearly;
        None before its first epoch or past its last."""
        points = [((i + 1) / self.epochs, v) for i, v in enumerate(self.values)]
        if not points or progress < points[0][0] - 1e-9 or progress > points[-1][0] + 1e-9:
            return None
        for (p0, v0), (p1, v1) in zip(points, points[1:]):
            if p0 - 1e-9 <= progress <= p1 + 1e-9:
                return v0 + (v1 - v0) * (progress - p0) / (p1 - p0)
        return points[-1][1]


def curve_of(epochs: Sequence[Mapping[str, Any]], planned: int, objective: str, mode: str) -> Curve:
    """A trial's curve from its epochs' metrics as journalled (`objective`, its noise)."""
    sign = 1.0 if mode == "max" else -1.0
    curve = Curve(max(1, int(planned)))
    for m in epochs:
        value = m.get("objective")
        se = m.get("objective_se")
        curve.add(sign * float(value) if value is not None else -math.inf,
                  float(se) if se is not None else objective_se(m, objective))
    return curve


@dataclass(frozen=True)
class Judgement:
    """What the rule saw at one epoch of a trial: the two numbers it compares, and its decision."""

    go: bool
    potential: float | None = None  # its optimistic final objective (signed)
    bar: float | None = None  # the incumbent's final + its noise (signed)
    why: str = ""


class StoppingRule:
    """The noise-aware rule (module docstring). `finished`: the curves of trials that ran their
    whole schedule, in the order they ended; the incumbent is the best of them."""

    def __init__(self, finished: Iterable[Curve] = (), *, grace: float = GRACE, grace_epochs: int | None = None,
                 own_ses: float = OWN_SES, incumbent_ses: float = INCUMBENT_SES) -> None:
        """`grace`: judged from this share of each schedule on; or, given `grace_epochs`, from that
        epoch on (--grace-period N)."""
        self.finished: list[Curve] = [c for c in finished if c.complete]
        self.grace, self.grace_epochs = grace, grace_epochs
        self.own_ses, self.incumbent_ses = own_ses, incumbent_ses

    def add_finished(self, curve: Curve) -> None:
        if curve.complete and all(math.isfinite(v) for v in curve.values):
            self.finished.append(curve)

    @property
    def incumbent(self) -> Curve | None:
        return max(self.finished, key=lambda c: c.values[-1], default=None)

    def judge(self, curve: Curve) -> Judgement:
        """Go on, or stop: may this trial, at its last epoch so far, still beat the incumbent by
        more than the noise?"""
        progress = curve.progress
        early = (len(curve.values) < self.grace_epochs if self.grace_epochs is not None
                 else progress < self.grace - 1e-9)
        if early or progress >= 1 - 1e-9 or not curve.values:
            return Judgement(True, why="before the grace period" if progress < 1 else "its last epoch")
        incumbent = self.incumbent
        if incumbent is None:
            return Judgement(True, why="no trial has finished yet")
        gains = [c.values[-1] - v for c in self.finished if (v := c.at(progress)) is not None]
        if not gains:
            return Judgement(True, why="no finished trial reported at this share of its schedule")
        now, se = curve.values[-1], curve.ses[-1]
        if not math.isfinite(now):
            return Judgement(False, why="its objective is not finite")
        potential = now + max(max(gains), 0.0) + self.own_ses * se
        bar = incumbent.values[-1] + self.incumbent_ses * incumbent.ses[-1]
        return Judgement(potential > bar, potential, bar)


# --- over a whole search: ties and convergence -----------------------------------------------------


@dataclass(frozen=True)
class Ended:
    """A trial as convergence sees it: when it ended, and its final objective (signed, larger is
    better) with its noise; value None for a trial without a result (errored, diverged)."""

    number: int
    time: float
    value: float | None
    se: float


@dataclass(frozen=True)
class Convergence:
    number: int  # the trial the search converged at
    time: float  # when that trial ended
    index: int  # how many trials had ended by then (it included)
    after: int  # trials that ended after it
    moved: float  # how much they moved the best (signed, >= 0)
    noise: float  # the noise of the best at it
    confirmed: bool  # at least `window` trials ended after it: what --until-converged waits for


def converged_at(ended: Sequence[Ended], window: int = WINDOW, min_trials: int = MIN_TRIALS) -> Convergence | None:
    """The first trial after which the best never rose by more than the noise of the best at it
    (module docstring); None before any trial has a result."""
    best: Ended | None = None
    bests: list[Ended | None] = []
    for e in ended:
        if e.value is not None and (best is None or e.value > best.value):  # type: ignore[operator]
            best = e
        bests.append(best)
    final = bests[-1] if bests else None
    if final is None:
        return None
    for i, b in enumerate(bests):
        if b is not None and final.value <= b.value + b.se:  # type: ignore[operator]
            after = len(ended) - i - 1
            confirmed = after >= window and len(ended) >= min_trials
            return Convergence(ended[i].number, ended[i].time, i + 1, after, final.value - b.value, b.se,  # type: ignore[operator]
                               confirmed)
    return None


def tied(values: Sequence[tuple[int, float, float]], best: tuple[int, float, float]) -> list[int]:
    """Trial numbers (number, signed value, se) within the best's noise of the best, best first."""
    number, value, se = best
    close = [(n, v) for n, v, _ in values if abs(v - value) <= se]
    return [n for n, _ in sorted(close, key=lambda x: (-x[1], x[0]))]
