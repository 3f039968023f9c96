"""Who stops a running trial early: the Ray Tune schedulers of a search, one per `--stopping`.

    noise      the default: a trial goes on only while it may still beat the incumbent by more than
               the noise (the rule and its two numbers: tuning/noise.py)
    asha       Ray Tune's ASHA, rungs at 25% and 75% of each trial's schedule, reduction factor 3
    syne-asha  Syne Tune's ASHA on the same rungs (an implementation of another project, driving the
               same trials: `pip install -e ".[compare]"`), for `hptune compare`

Each lets the baseline (the tutorial's configuration) run to its end: it is there to be compared
with in full. Its results still count (the noise rule may take it as the incumbent, ASHA records it
at the rungs). `--no-early-stop` runs every trial to its end (FIFO).
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from tuning.engine.searcher import BASELINE, CONTINUES
from tuning.noise import Curve, StoppingRule
from tuning.settings import Grace

STOPPING = ("noise", "asha", "syne-asha")


class ASHAKeepingBaseline(ASHAScheduler):
    """ASHA that never stops the baseline."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        return TrialScheduler.CONTINUE if trial.config.get(BASELINE) and decision == TrialScheduler.STOP else decision


def make_asha(grace: Grace, reduction_factor: float, max_epochs: int) -> ASHAKeepingBaseline:
    """ASHA with rungs by share of each trial's schedule (`grace.time_attr == "progress"`: a
    20-epoch cosine trial is judged at epoch 5 beside a 8-epoch one at epoch 2, both a quarter
    through their schedules) or by epoch (Ray Tune's examples: every trial judged at epoch N)."""
    if grace.time_attr == "progress":
        return ASHAKeepingBaseline(time_attr="progress", max_t=1.0, grace_period=grace.value,
                                   reduction_factor=reduction_factor)
    return ASHAKeepingBaseline(time_attr="epoch", max_t=max_epochs, grace_period=min(grace.value, max_epochs),
                               reduction_factor=reduction_factor)


class NoiseAwareStopping(FIFOScheduler):
    """The noise rule as a Ray Tune scheduler: judges each trial's every epoch with `rule`, which
    learns the curve of every trial that runs its whole schedule (a resumed search hands it those
    of its journal, and the epochs an interrupted trial had already run)."""

    def __init__(self, rule: StoppingRule, *, mode: str, earlier: dict[str, Curve] | None = None) -> None:
        super().__init__()
        self.rule, self.sign = rule, 1.0 if mode == "max" else -1.0
        self.earlier = dict(earlier or {})  # id of an interrupted trial -> its curve so far
        self.curves: dict[str, Curve] = {}
        self.judgements: dict[str, Any] = {}  # trial id -> the last Judgement, for the journal

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True

    def _curve(self, trial: Any, result: dict) -> Curve:
        curve = self.curves.get(trial.trial_id)
        if curve is None:
            epochs = max(1, round(result["epoch"] / result["progress"])) if result.get("progress") else 1
            before = self.earlier.get(str(trial.config.get(CONTINUES)))
            curve = Curve(epochs, list(before.values), list(before.ses)) if before else Curve(epochs)
            self.curves[trial.trial_id] = curve
        epoch = int(result["epoch"])
        del curve.values[epoch - 1:], curve.ses[epoch - 1:]  # a retry reports its epochs again
        value = result.get("objective")
        curve.add(self.sign * float(value) if value is not None else -math.inf, float(result.get("objective_se") or 0))
        return curve

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get("epoch") is None:
            return TrialScheduler.CONTINUE
        curve = self._curve(trial, result)
        if trial.config.get(BASELINE):
            return TrialScheduler.CONTINUE
        judgement = self.rule.judge(curve)
        self.judgements[trial.trial_id] = judgement
        return TrialScheduler.CONTINUE if judgement.go else TrialScheduler.STOP

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        curve = self.curves.pop(trial.trial_id, None)
        if curve is not None and not (result or {}).get("diverged"):
            self.rule.add_finished(curve)  # only a curve that reached its schedule's end counts

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self.curves.pop(trial.trial_id, None)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self.curves.pop(trial.trial_id, None)


class SyneTuneASHA(FIFOScheduler):
    """Syne Tune's AsynchronousSuccessiveHalving deciding for Ray Tune's trials: its `on_trial_add`
    and `on_trial_result` are called with each trial's results, its STOP is Tune's. The searcher
    stays ours, so only the stopping differs from `asha`."""

    def __init__(self, grace: Grace, reduction_factor: float, max_epochs: int, *, mode: str, seed: int) -> None:
        try:
            from syne_tune.backend.trial_status import Trial as SyneTrial
            from syne_tune.optimizer.scheduler import SchedulerDecision
            from syne_tune.optimizer.schedulers.asha import AsynchronousSuccessiveHalving
        except ImportError as exc:  # the compare extra: the driver checks before anything is written
            raise ImportError(f"--stopping syne-asha needs Syne Tune: pip install -e \".[compare]\" ({exc})") from None
        super().__init__()
        self._trial, self._stop = SyneTrial, SchedulerDecision.STOP
        progress = grace.time_attr == "progress"
        self.time_attr = "progress" if progress else "epoch"
        self.asha = AsynchronousSuccessiveHalving(
            {}, metric="objective", do_minimize=mode == "min", time_attr=self.time_attr,
            max_t=1.0 if progress else max_epochs,
            grace_period=grace.value if progress else min(grace.value, max_epochs),
            reduction_factor=reduction_factor, random_seed=seed)
        self.ids: dict[str, Any] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get("objective") is None or result.get(self.time_attr) is None:
            return TrialScheduler.CONTINUE
        theirs = self.ids.get(trial.trial_id)
        if theirs is None:
            theirs = self.ids[trial.trial_id] = self._trial(trial_id=len(self.ids), config={},
                                                             creation_time=dt.datetime.now())
            self.asha.on_trial_add(theirs)
        decision = self.asha.on_trial_result(theirs, {"objective": result["objective"],
                                                      self.time_attr: result[self.time_attr]})
        if decision == self._stop and not trial.config.get(BASELINE):
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE


def make_scheduler(stopping: str, grace: Grace, reduction_factor: float, max_epochs: int, *, mode: str,
                   seed: int, rule: StoppingRule | None = None,
                   earlier: dict[str, Curve] | None = None) -> TrialScheduler:
    """The scheduler `stopping` names (STOPPING)."""
    if stopping == "asha":
        return make_asha(grace, reduction_factor, max_epochs)
    if stopping == "syne-asha":
        return SyneTuneASHA(grace, reduction_factor, max_epochs, mode=mode, seed=seed)
    return NoiseAwareStopping(rule or StoppingRule(), mode=mode, earlier=earlier)
