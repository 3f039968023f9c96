"""The Ray Tune searcher over an Optuna study.

StudySearcher asks Optuna for each new configuration (define-by-run: `Space.suggest`, so
momentum exists only for SGD and each optimizer family has its own learning rates), reports each
epoch's objective as an intermediate value, and tells Optuna how the trial ended: COMPLETE with
its final objective, PRUNED when ASHA stopped it early or it stalled at chance level, FAIL when
it raised; with the tutorial's challenge as constraints (`Trial.set_constraint`), so the sampler
learns where the challenge is met.

Before asking Optuna it hands out fixed configurations: the tutorial's baseline and, when a
search resumes, the trials an interruption cut short (each tagged with the id of the trial it
continues, so the trainable loads that trial's checkpoint). When a fixed trial ends, its result
is added to the study as a finished trial of its own; parameters the space cannot hold (the
baseline's momentum 0 and weight decay 0) are left out of it and named in its user attributes.

Every trial of the study carries the experiment's own trial number (`number`, as in trials.csv
and the console; Optuna numbers its trials from 0 in its own order), the values the space did not
search (`fixed`), and its final metrics and status, so optuna-dashboard and trials.csv can be
read side by side.

With --until-converged it proposes nothing more once `converged()` says the best is settled within
its noise (tuning/noise.py): the trials running then end as the stopping rule decides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from tuning.objective import WORST, constraints
from tuning.space import AnySpace, apply_params
from tuning.study import add_finished, final_attrs, fixed_values

CONTINUES = "__continues__"  # config key: id of the interrupted trial this one continues
BASELINE = "__baseline__"  # config key: this is the tutorial's configuration


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's config without our tags: what the training configuration takes."""
    return {k: v for k, v in config.items() if not k.startswith("__")}


class StudySearcher(Searcher):
    def __init__(
        self,
        study: optuna.Study,
        space: AnySpace,
        fixed: list[dict[str, Any]],
        *,
        base: dict[str, Any],
        metric: str,
        mode: str,
        first_number: int = 1,
        converged: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self.study, self.space, self.base = study, space, base
        self.queue = list(fixed)
        self.fixed_trials: dict[str, dict[str, Any]] = {}
        self.asked: dict[str, optuna.Trial] = {}
        self.configs: dict[str, dict[str, Any]] = {}  # the full configuration handed out
        self.history: dict[str, list[dict[str, Any]]] = {}  # per trial: its epochs' results
        # Trial numbers in the order configurations were handed out (actors may start in
        # another order); a continuation keeps the number of the trial it continues.
        self.numbers: dict[str, int] = {}
        self.next_number = first_number
        self.continued_numbers: dict[str, int] = {}  # id of an interrupted trial -> its number (set by the driver)
        self.converged = converged  # --until-converged: no new trial once this says so
        # ... and once it has said so, the search is over: trials still running may move the best
        # after that, but Tune has been told FINISHED and proposes nothing more
        self.stopped_converged = False

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # metric and mode are ours, the space is Space.suggest

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.queue:
            config = dict(self.queue.pop(0))
            self.fixed_trials[trial_id] = config
        elif self.converged is not None and (self.stopped_converged or self.converged()):
            self.stopped_converged = True
            return Searcher.FINISHED
        else:
            trial = self.study.ask()
            self.asked[trial_id] = trial
            config = self.space.suggest(trial)
        self.configs[trial_id] = apply_params(self.base, hyperparameters(config))
        if CONTINUES not in config:
            self.numbers[trial_id] = self.next_number
            self.next_number += 1
        trial = self.asked.get(trial_id)
        if trial is not None:
            trial.set_user_attr("number", self.numbers[trial_id])
            trial.set_user_attr("fixed", fixed_values(self.configs[trial_id], config))
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        value, epoch = result.get(self.metric), result.get("epoch")
        if value is None or epoch is None:
            return
        history = self.history.setdefault(trial_id, [])
        retried = any(m["epoch"] == epoch for m in history)  # a retry reports its epochs again
        history[:] = [m for m in history if m["epoch"] < epoch] + [{**result}]
        trial = self.asked.get(trial_id)
        if trial is not None and not retried:
            trial.report(float(value), step=int(epoch))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and not error and result.get("epoch") not in [m["epoch"] for m in self.history.get(trial_id, [])]:
            self.on_trial_result(trial_id, result)  # Tune hands a stopping trial's last result only here
        history = self.history.pop(trial_id, [])
        last = {**(history[-1] if history else {}), **(result or {})}
        state = self._state(trial_id, last, error)
        fixed = self.fixed_trials.pop(trial_id, None)
        number = self.numbers.get(trial_id) or self.continued_numbers.get(str(fixed.get(CONTINUES)) if fixed else "")
        if fixed is not None:
            if state != TrialState.FAIL and history:
                config = apply_params(self.base, hyperparameters(fixed))
                attrs = {"baseline": True} if fixed.get(BASELINE) else {"continues": fixed.get(CONTINUES)}
                add_finished(self.study, self.space, config, history, state=state,
                             attrs={**attrs, "number": number, **final_attrs(last, state)})
            return
        trial = self.asked.pop(trial_id, None)
        if trial is None:
            return
        for key, value in final_attrs(last if not error else {}, state).items():
            trial.set_user_attr(key, value)
        if state == TrialState.FAIL:
            self.study.tell(trial, state=TrialState.FAIL)
            return
        for key, value in constraints(last).items():
            trial.set_constraint(key, value)
        value = last.get(self.metric)
        if state == TrialState.PRUNED:
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            self.study.tell(trial, WORST[self.mode] if value is None else float(value))

    def _state(self, trial_id: str, last: dict[str, Any], error: bool) -> TrialState:
        if error or not last or last.get(self.metric) is None:
            return TrialState.FAIL
        epochs = self.configs.pop(trial_id, self.base).get("epochs")
        if last.get("diverged"):
            return TrialState.COMPLETE  # with the worst objective: a result, not a stop
        if last.get("stalled") or (epochs is not None and last.get("epoch", 0) < epochs):
            return TrialState.PRUNED
        return TrialState.COMPLETE

    def save(self, checkpoint_path: str) -> None:
        pass  # resume is rebuilt from the experiment's journal, not from searcher state

    def restore(self, checkpoint_path: str) -> None:
        pass

