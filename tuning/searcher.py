"""FixedFirst: a Ray Tune searcher that hands out fixed configurations before asking Optuna;
and ASHA that lets the baseline run to the end.

The fixed ones are the tutorial's baseline and, when a search resumes, the trials an interruption
cut short (each tagged with the id of the trial it continues, so the trainable loads that trial's
checkpoint). Passing them through Optuna's own queue would tie a continuation to its trial only by
its hyperparameters, which a new sample can repeat; here the tag travels in the trial's config.
When a fixed trial ends, Optuna is told its result as an evaluated point, if the space can hold
it (the tutorial's values may lie outside a user's space).
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import Searcher

CONTINUES = "__continues__"  # config key: id of the interrupted trial this one continues
BASELINE = "__baseline__"  # config key: this is the tutorial's configuration


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's config without our tags: what the training configuration takes."""
    return {k: v for k, v in config.items() if not k.startswith("__")}


class FixedFirst(Searcher):
    def __init__(self, inner: Searcher, fixed: list[dict[str, Any]], metric: str, mode: str, first_number: int = 1) -> None:
        super().__init__(metric=metric, mode=mode)
        self.inner = inner
        self.queue = list(fixed)
        self.fixed_trials: dict[str, dict[str, Any]] = {}
        # Trial numbers in the order configurations were handed out (actors may start in
        # another order); a continuation keeps the number of the trial it continues.
        self.numbers: dict[str, int] = {}
        self.next_number = first_number

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.queue:
            config = self.queue.pop(0)
            self.fixed_trials[trial_id] = config
        else:
            config = self.inner.suggest(trial_id)
        if isinstance(config, dict) and CONTINUES not in config:
            self.numbers[trial_id] = self.next_number
            self.next_number += 1
        return dict(config) if isinstance(config, dict) else config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.fixed_trials:
            self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        config = self.fixed_trials.pop(trial_id, None)
        if config is None:
            self.inner.on_trial_complete(trial_id, result=result, error=error)
            return
        if error or not result or self.metric not in result:
            return
        try:
            self.inner.add_evaluated_point(hyperparameters(config), result[self.metric])
        except (ValueError, TypeError):
            pass  # outside the search space: Optuna cannot hold this point

    def save(self, checkpoint_path: str) -> None:
        pass  # resume is rebuilt from the experiment's journal, not from searcher state

    def restore(self, checkpoint_path: str) -> None:
        pass


class ASHAKeepingBaseline(ASHAScheduler):
    """ASHA that never stops the baseline: the tutorial's run is there to be compared with in
    full (its results still enter ASHA's rungs, so other trials are judged against it)."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        return TrialScheduler.CONTINUE if trial.config.get(BASELINE) and decision == TrialScheduler.STOP else decision
