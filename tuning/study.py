"""The experiment's Optuna study (results/<name>/optuna.db): samplers, opening, tidying. No Ray."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

SAMPLERS = ("tpe", "random", "cmaes", "gp", "qmc")
STUDY_FILE = "optuna.db"


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


def open_study(folder: Path, name: str, direction: str, sampler: optuna.samplers.BaseSampler | None = None) -> optuna.Study:
    storage = optuna.storages.RDBStorage(storage_url(folder))
    return optuna.create_study(study_name=name, storage=storage, direction=direction, sampler=sampler, load_if_exists=True)


def release_stale_trials(study: optuna.Study) -> int:
    """Trials a killed driver (or a time budget) left RUNNING would stay so for ever: mark them
    failed; the trials that continue them are added as trials of their own when they end."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
    return len(stale)
