"""The experiment's Optuna study (results/<name>/optuna.db): samplers, opening, tidying. No Ray."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from tuning.objective import constraints, objective_value
from tuning.results.experiment import Experiment
from tuning.results.journal import EARLY_STOPPED, FINISHED, STALLED
from tuning.space import AnySpace, flat

STUDY_FILE = "optuna.db"
FINAL_METRICS = ("test_accuracy", "test_loss", "train_loss", "challenge_met", "epoch")  # user attributes per trial


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """Optuna's samplers as users run them, seeded. The space is define-by-run (momentum only for
    SGD), so TPE models parameters in groups; the others sample a conditional parameter on its own."""
    if name == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # group=True
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=6, multivariate=True, group=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=6, warn_independent_sampling=False)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=6, warn_independent_sampling=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)


def storage_url(folder: Path) -> str:
    return f"sqlite:///{folder / STUDY_FILE}"


def open_study(folder: Path, name: str, direction: str,
               sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    storage = optuna.storages.RDBStorage(storage_url(folder))
    return optuna.create_study(study_name=name, storage=storage, direction=direction, sampler=sampler,
                               load_if_exists=True)


def release_stale_trials(study: optuna.Study) -> int:
    """Trials a killed driver (or a time budget) left RUNNING would stay so for ever: mark them
    failed; the trials that continue them are added as trials of their own when they end."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
    return len(stale)


def final_attrs(last: dict[str, Any], state: TrialState) -> dict[str, Any]:
    """A trial's final metrics as user attributes (`final_epoch`, `final_test_accuracy`, ...)."""
    attrs = {f"final_{k}": last[k] for k in FINAL_METRICS if last.get(k) is not None}
    if last.get("stalled"):
        attrs["stopped"] = "stalled"
    elif state == TrialState.PRUNED:
        attrs["stopped"] = "early-stopped"
    return attrs


def add_finished(
    study: optuna.Study,
    space: AnySpace,
    config: dict[str, Any],
    history: list[dict[str, Any]],
    *,
    state: TrialState = TrialState.COMPLETE,
    attrs: dict[str, Any] | None = None,
) -> list[str]:
    """Add a trial that did not come from the sampler (the baseline, an earlier experiment's
    trial) with its per-epoch objective; returns the parameters the space could not hold."""
    params, distributions, skipped = space.optuna_point(config)
    last = history[-1] if history else {}
    flat_config = flat(config)
    user_attrs = {**(attrs or {}), **({"outside_space": {k: flat_config[k] for k in skipped}} if skipped else {})}
    study.add_trial(
        optuna.trial.create_trial(
            state=state,
            value=last.get("objective") if state == TrialState.COMPLETE else None,
            params=params,
            distributions=distributions,
            intermediate_values={int(m["epoch"]): float(m["objective"])
                                 for m in history if m.get("objective") is not None},
            constraints=constraints(last),
            user_attrs=user_attrs,
        )
    )
    return skipped


def warm_start(study: optuna.Study, space: AnySpace, earlier: Experiment, objective: str) -> tuple[int, int]:
    """Give `study` the finished, early-stopped and stalled trials of an earlier experiment, with
    their per-epoch `objective`, so the sampler starts from what that search learned. A trial
    with a parameter this space cannot hold is skipped. Returns (added, skipped)."""
    added = skipped = 0
    for t in earlier.trials:
        if t.status not in (FINISHED, EARLY_STOPPED, STALLED) or not t.epochs:
            continue
        _, _, outside = space.optuna_point(t.config)
        if outside:
            skipped += 1
            continue
        history = [{**m, "objective": objective_value(m, objective)} for m in t.epochs]
        state = TrialState.COMPLETE if t.status == FINISHED else TrialState.PRUNED
        add_finished(study, space, t.config, history, state=state,
                     attrs={"warm_start": f"{earlier.name} trial {t.number}"})
        added += 1
    return added, skipped
