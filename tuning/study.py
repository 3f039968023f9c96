"""The experiment's Optuna study (results/<name>/optuna.db): samplers, opening, tidying, and
rebuilding it from the journal when the file cannot be read. No Ray."""

from __future__ import annotations

import datetime as dt
import sqlite3
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import json_to_distribution
from optuna.trial import TrialState

from tuning.objective import WORST, constraints, objective_value
from tuning.results.experiment import Experiment, ExperimentError
from tuning.results.journal import DIVERGED, EARLY_STOPPED, FINISHED, STALLED, TrialRecord
from tuning.space import AnySpace, flat

STUDY_FILE = "optuna.db"
# Optuna's tables that hold a study's trials: a file without one of them has lost them
STUDY_TABLES = ("studies", "study_directions", "trials", "trial_values", "trial_params", "trial_intermediate_values",
                "trial_user_attributes")
# how each ending in the journal was told to Optuna (tuning/engine/searcher.py); errored: FAIL
JOURNAL_STATES = {FINISHED: TrialState.COMPLETE, DIVERGED: TrialState.COMPLETE, EARLY_STOPPED: TrialState.PRUNED,
                  STALLED: TrialState.PRUNED}
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


def fixed_values(config: dict[str, Any], sampled: dict[str, Any]) -> dict[str, Any]:
    """The configuration's values the sampler did not choose (base and the space's fixed ones)."""
    keys = ("lr", "batch_size", "epochs", "optimizer", "momentum", "weight_decay", "schedule", "seed", "model")
    out = {k: config[k] for k in keys if k in config and k not in sampled}
    out.update({f"model.{k}": v for k, v in (config.get("model_args") or {}).items() if f"model.{k}" not in sampled})
    return out


# --- a study file that cannot be read: rebuilt from the journal -----------------------------------


def open_or_rebuild(experiment: Experiment, space: AnySpace, direction: str,
                    sampler: optuna.samplers.BaseSampler | None = None) -> tuple[optuna.Study, str | None]:
    """The experiment's study; if optuna.db cannot be opened (not a database, a table missing, no
    study of the experiment's name) or has lost trials the journal says it holds, a new one rebuilt
    from the journal, the old file moved aside as optuna.db.broken-<time>. Returns (study, a
    one-line note saying so, or None)."""
    folder, name = experiment.folder, experiment.name
    path = folder / STUDY_FILE
    problem = study_problem(path, name, experiment.trials)
    if problem is None:
        return open_study(folder, name, direction, sampler), None
    aside = None
    if path.exists():
        aside = path.with_name(f"{STUDY_FILE}.broken-{dt.datetime.now():%Y%m%d-%H%M%S}")
        path.rename(aside)
        for extra in ("-journal", "-wal", "-shm"):  # SQLite's side files belong to the broken file
            side = path.with_name(STUDY_FILE + extra)
            if side.exists():
                side.rename(aside.with_name(aside.name + extra))
    study = open_study(folder, name, direction, sampler)
    added = rebuild_study(study, space, experiment)
    kept = f"moved aside as {aside.name}" if aside else "it was missing"
    return study, (f"{path} could not be used ({problem}); {kept}, and the study was rebuilt from "
                   f"{experiment.journal.path.name} ({added} trials)")


def study_problem(path: Path, name: str, trials: list[TrialRecord]) -> str | None:
    """Why optuna.db cannot serve as the study of an experiment with these journal trials; None if it can."""
    expected = [t for t in trials if _in_study(t)]
    if not path.exists():
        return "no such file" if expected else None
    # SQLite itself first: opening it through Optuna would add the tables it lacks (and roll back
    # what a killed driver left half-written, as this does too)
    db = sqlite3.connect(path)
    try:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:  # an empty database, which Optuna fills: fine unless trials were expected in it
            return "an empty file" if expected else None
        missing = [t for t in STUDY_TABLES if t not in tables]
        if missing:
            return f"table {missing[0]} is missing"
        names = [row[0] for row in db.execute("SELECT study_name FROM studies")]
    except sqlite3.Error as exc:
        return f"not a readable SQLite database: {exc}"
    finally:
        db.close()
    if name not in names:
        if not names and not expected:
            return None
        other = f" (it holds {', '.join(repr(n) for n in names)})" if names else ""
        return f"no study named {name!r}{other}"
    try:
        held: dict[int, set[TrialState]] = {}
        study = optuna.load_study(study_name=name, storage=storage_url(path.parent))
        for t in study.get_trials(deepcopy=False):
            number = t.user_attrs.get("number")
            if number is not None:
                held.setdefault(number, set()).add(t.state)
    except Exception as exc:  # noqa: BLE001 - whatever Optuna or SQLAlchemy make of a damaged file
        return f"unreadable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    if not held and study.trials:
        return None  # written before trials carried their number: nothing to compare with
    for t in expected:
        states = held.get(t.number, set())
        if not states or (t.status in JOURNAL_STATES and not states & {TrialState.COMPLETE, TrialState.PRUNED}):
            return f"it has lost trial {t.number}, which the journal holds"
    return None


def _in_study(trial: TrialRecord) -> bool:
    """The journal's trials the study holds: every one the sampler proposed, and every one that
    ended with a result."""
    return not trial.baseline or trial.status in JOURNAL_STATES


def rebuild_study(study: optuna.Study, space: AnySpace, experiment: Experiment) -> int:
    """Give an empty `study` what the search told Optuna, from the journal: the warm start's
    trials, then each trial as the searcher recorded it (tuning/engine/searcher.py). A trial the
    sampler proposed: COMPLETE, PRUNED or FAIL with its parameters, intermediate values,
    constraints and final metrics; one an interruption cut short: FAIL, as release_stale_trials
    left it, and the run that continued it a trial of its own, as the searcher added it (with
    every epoch's value: the original holds only those after the checkpoint; samplers read only
    the last). The baseline: as add_finished added it. Returns the number of trials added."""
    settings, mode = experiment.settings, experiment.mode
    added = 0
    attempted = any(r.get("event") == "attempt" for r in experiment.journal.read())
    if settings.warm_start and attempted:  # else the search gives them itself, as on any first attempt
        try:
            added += warm_start(study, space, Experiment.load(settings.warm_start), settings.objective)[0]
        except ExperimentError:
            pass  # gone since: the journal's own trials are what matter most
    for t in experiment.trials:
        state = JOURNAL_STATES.get(t.status)
        last = t.last or {}
        history = [m for m in t.epochs if m.get("objective") is not None]
        if not t.baseline:  # proposed by the sampler: asked, reported, told
            told = state if state is not None and not t.aliases else TrialState.FAIL
            params, distributions = _optuna_params(space, t)
            attrs = {"number": t.number, "fixed": fixed_values(t.config, t.params)}
            intermediate = {} if t.aliases else {int(m["epoch"]): float(m["objective"]) for m in history}
            value = None
            if told == TrialState.COMPLETE:
                value = WORST[mode] if last.get("objective") is None else float(last["objective"])
            elif told == TrialState.PRUNED and intermediate:  # what study.tell gives a pruned trial
                value = intermediate[max(intermediate)]
            if told != TrialState.FAIL:
                attrs.update(final_attrs(last, told))
            study.add_trial(optuna.trial.create_trial(
                state=told,
                value=value,
                params=params,
                distributions=distributions,
                intermediate_values=intermediate,
                constraints=constraints(last) if told != TrialState.FAIL else None,
                user_attrs=attrs,
            ))
            added += 1
        if (t.baseline or t.aliases) and state is not None and history:  # added by the searcher when it ended
            tag = {"baseline": True} if t.baseline else {"continues": t.trial}
            add_finished(study, space, t.config, t.epochs, state=state,
                         attrs={**tag, "number": t.number, **final_attrs(last, state)})
            added += 1
    return added


def _optuna_params(space: AnySpace, trial: TrialRecord) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trial's parameters as Optuna held them: from the journal, or (journals written before
    it recorded them) from the space."""
    if trial.optuna:
        distributions = {k: json_to_distribution(v) for k, v in trial.optuna["distributions"].items()}
        return dict(trial.optuna["params"]), distributions
    params, distributions, _ = space.optuna_point(trial.config)
    return params, distributions
