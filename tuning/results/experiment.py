"""An experiment folder, results/<name>/, as one object: its settings and status
(experiment.json), its trials (from journal.jsonl, the source of truth), the lock held while a
search runs it, --restart, and its ranking (rank(), tuning/results/ranking.py: the ONE place a best
trial is chosen).

Everything here reads the folder it is given, so a copied folder reads the same. Nothing here
imports Ray. From Python:

    from tuning import Experiment
    exp = Experiment.open("results/example")
    exp.best.number, exp.best_config, exp.trials_dataframe(), exp.settings.samples
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from trainable.config import TrainConfig
from trainable.fileio import atomic_write_text
from tuning.noise import Convergence, Ended, converged_at, objective_se, tied
from tuning.results.journal import Journal, TrialRecord, trials
from tuning.results.ranking import RANKED_OUT, final_objective, met, rank
from tuning.settings import SearchSettings

EXPERIMENT = "experiment.json"


class ExperimentError(RuntimeError):
    """An experiment folder that cannot be read or run; the message says which and why."""


def final_se(trial: TrialRecord, objective: str) -> float:
    """The noise of the trial's final objective (0 where it was not measured)."""
    last = trial.last or {}
    se = last.get("objective_se")
    return float(se) if se is not None else objective_se(last, objective)


def ended_in_order(all_trials: Sequence[TrialRecord], mode: str, objective: str) -> list[Ended]:
    """The trials that ended, in the order they ended, as convergence sees them (tuning/noise.py)."""
    sign = 1.0 if mode == "max" else -1.0
    done = sorted((t for t in all_trials if t.done and t.finished_at is not None), key=lambda t: t.finished_at)
    out = []
    for t in done:
        value = final_objective(t) if t.status not in RANKED_OUT else None
        out.append(Ended(t.number, float(t.finished_at), None if value is None else sign * value,  # type: ignore[arg-type]
                         final_se(t, objective)))
    return out


@dataclass
class Experiment:
    folder: Path
    meta: dict[str, Any]
    trials: list[TrialRecord] = field(default_factory=list)

    # --- reading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, folder: str | Path) -> Experiment:
        """Settings and trials, read once from the folder as it is now (wherever it is)."""
        folder = Path(folder)
        return cls(folder, read_meta(folder), trials(Journal(folder).read()))

    open = load  # Experiment.open("results/<name>"), as the Python API names it

    @property
    def settings(self) -> SearchSettings:
        """The search's settings, typed (older folders: built from the keys they recorded)."""
        stored = self.meta.get("settings")
        if stored is None:  # written before settings were stored whole
            stored = {k: self.meta[k] for k in ("samples", "objective", "challenge_window") if k in self.meta}
            stored["name"] = self.meta.get("name")
        return SearchSettings.from_dict(stored)

    @property
    def base_config(self) -> TrainConfig:
        """The configuration every trial started from (before the space's values)."""
        return TrainConfig.from_dict(self.meta.get("base_config") or {})

    @property
    def status(self) -> str:
        """running, finished or interrupted."""
        return str(self.meta.get("status", "interrupted"))

    @property
    def best_config(self) -> TrainConfig | None:
        """The winner's configuration, as best_config.yaml holds it (None before any result)."""
        best = self.best
        return TrainConfig.from_dict(best.config) if best is not None else None

    def trials_dataframe(self):  # noqa: ANN201 - a pandas DataFrame (pandas imported on use)
        """One row per trial, as trials.csv (tuning.results.tables.trials_table)."""
        from tuning.results.tables import trials_table

        return trials_table(self.trials, self.mode, running=self.running)

    def epochs_dataframe(self):  # noqa: ANN201
        """One row per trial and epoch, as epochs.csv."""
        from tuning.results.tables import epochs_table

        return epochs_table(self.trials)

    def __repr__(self) -> str:
        best = self.best
        won = f", best trial {best.number}" if best is not None else ""
        return f"Experiment({self.folder}: {self.status}, {len(self.trials)} of {self.settings.samples} trials{won})"

    def reload(self) -> Experiment:
        self.trials = trials(self.journal.read())
        return self

    @property
    def journal(self) -> Journal:
        return Journal(self.folder)

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def mode(self) -> str:
        return self.meta.get("mode") or self.settings.mode

    @property
    def running(self) -> bool:
        return self.meta.get("status") == "running"

    def ranked(self) -> list[TrialRecord]:
        return rank(self.trials, self.mode)

    @property
    def best(self) -> TrialRecord | None:
        ranked = self.ranked()
        return ranked[0] if ranked else None

    def convergence(self) -> Convergence | None:
        """Where the search converged: the trial after which the best never rose by more than its
        noise (tuning/noise.py); None before any trial has a result."""
        settings = self.settings
        return converged_at(ended_in_order(self.trials, self.mode, settings.objective))

    def ties(self) -> list[TrialRecord]:
        """The trials whose final objective is within the winner's noise of the winner's, the
        winner first: none of them can be told apart from it."""
        best = self.best
        if best is None:
            return []
        objective, sign = self.settings.objective, 1.0 if self.mode == "max" else -1.0
        ranked = [t for t in self.ranked() if final_objective(t) is not None]
        values = [(t.number, sign * final_objective(t), final_se(t, objective)) for t in ranked]  # type: ignore[operator]
        numbers = tied(values, (best.number, sign * final_objective(best), final_se(best, objective)))  # type: ignore[operator]
        by_number = {t.number: t for t in ranked}
        return [best, *(by_number[n] for n in numbers if n != best.number)]

    # --- writing ---------------------------------------------------------------------------

    def save_meta(self) -> None:
        atomic_write_text(self.folder / EXPERIMENT, json.dumps(self.meta, indent=2) + "\n")

    def mark(self, status: str) -> None:
        """running, finished or interrupted; nothing if the folder was never created."""
        if (self.folder / EXPERIMENT).exists():
            self.meta = {**read_meta(self.folder), "status": status}
            self.save_meta()


def read_meta(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise ExperimentError(f"{folder}: no such experiment folder")
    path = folder / EXPERIMENT
    if not path.exists():
        raise ExperimentError(f"{folder}: not an experiment folder "
                              f"(no {EXPERIMENT}; is this the folder tuning/search.py wrote?)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExperimentError(f"{path}: unreadable ({exc})") from None


CLAIM_WAIT_SECONDS = 5.0


@dataclass
class Claim:
    """A search's hold on results/<name>: the lock, and what it found there."""

    folder: Path
    lock: FileLock
    old_meta: dict[str, Any] | None  # the experiment already in the folder, if any
    replaces: Path | None = None  # moved aside on --restart, once the input has been checked

    def release(self) -> None:
        self.lock.release()
        if not self.folder.exists():  # a search that created nothing leaves no lock file behind either
            Path(self.lock.lock_file).unlink(missing_ok=True)


def claim(results: Path, name: str, *, restart: bool) -> Claim:
    """Lock results/<name> for this process; refuse a running or a finished experiment (unless
    --restart) and a folder that is not an experiment. Writes nothing but the lock file."""
    if not name or "/" in name or name.startswith("."):
        raise ExperimentError(f"--name {name!r}: use a plain folder name")
    folder = results / name
    lock = FileLock(str(results / f".{name}.lock"))
    try:
        # a search killed a moment ago may still hold it: its process ends a little after the
        # command's own (tuning/supervisor.py), as its memory is freed
        lock.acquire(timeout=CLAIM_WAIT_SECONDS)
    except Timeout:
        raise ExperimentError(f"another search is running experiment {folder} right now") from None
    try:
        if not (folder.exists() and any(folder.iterdir())):
            return Claim(folder, lock, None)
        old = read_meta(folder) if (folder / EXPERIMENT).exists() else None
        if old is None:
            raise ExperimentError(f"{folder} exists and is not an experiment folder; choose another --name")
        if restart:
            return Claim(folder, lock, old, replaces=folder)
        if old.get("status") == "finished":
            raise ExperimentError(f"{folder} is a finished experiment; use --restart to run it again "
                                  "(the old one is kept) or choose another --name")
        return Claim(folder, lock, old)
    except BaseException:
        lock.release()
        raise


def create(claimed: Claim, meta: dict[str, Any]) -> Experiment:
    """Write experiment.json: only once the data loaded and the cluster can run the trials.
    On --restart the earlier experiment is first moved aside, never deleted."""
    if claimed.replaces is not None and claimed.replaces.exists():
        aside = claimed.replaces.with_name(f"{claimed.replaces.name}.replaced-{dt.datetime.now():%Y%m%d-%H%M%S}")
        claimed.replaces.rename(aside)
        print(f"--restart: the earlier experiment is kept as {aside}")
    claimed.folder.mkdir(parents=True, exist_ok=True)
    experiment = Experiment(claimed.folder, meta)
    experiment.save_meta()
    return experiment.reload()
