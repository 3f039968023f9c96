"""trials.csv, epochs.csv and best_config.yaml, from the files in an experiment folder alone.

    hptune export results/<name>     # rewrite them (the search does this itself)
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pandas as pd

from trainable import challenge
from trainable.config import TRAINING_HYPERPARAMETERS, TrainConfig
from trainable.errors import UsageError
from trainable.confirm import CONFIRM_FILE, describe, lucky_seed_check, read_confirm
from trainable.fileio import atomic_write_text
from trainable.fit import METRICS, slow_epoch_text
from tuning.results.experiment import Experiment
from tuning.results.ranking import final_objective, rank
from tuning.results.tables import epochs_table, params_of, trials_table
from tuning.results.journal import ERRORED, INTERRUPTED, RUNNING, TrialRecord
from tuning.results.listener import Listener

TRIALS_CSV, EPOCHS_CSV, BEST_CONFIG = "trials.csv", "epochs.csv", "best_config.yaml"
def best_config_text(experiment: Experiment, trial: TrialRecord) -> str:
    settings, last = experiment.settings, trial.last or {}
    config = TrainConfig.from_dict(trial.config)
    accuracy = last.get("test_accuracy")
    objective = final_objective(trial)
    lines = [
        f"Best trial of experiment {experiment.name}: {trial.trial} (trial {trial.number} of {settings.samples}, "
        f"{trial.status})",
        f"objective {settings.objective}: {objective:.4f}; test_accuracy {100 * accuracy:.1f}%"
        if accuracy is not None and objective is not None else "",
        challenge.verdict_text(last, settings.challenge_window) if last else "",
        *_confirm_lines(experiment.folder, accuracy),
        f"Re-train without Ray: {retrain_command(experiment.folder)}",
    ]
    buffer = io.StringIO()
    for line in filter(None, lines):
        buffer.write(f"# {line}\n")
    buffer.write(config.to_yaml())
    return buffer.getvalue()


def retrain_command(exp_dir: Path) -> str:
    """The command that re-trains best_config.yaml, with no absolute path in it.

    Relative to the working directory when the folder is under it (where relative data paths in
    the configuration also point); otherwise run from the folder itself.
    """
    try:
        return f"python -m trainable --config {Path(exp_dir).resolve().relative_to(Path.cwd().resolve()) / BEST_CONFIG}"
    except ValueError:
        return f"python -m trainable --config {BEST_CONFIG}  (in the experiment's folder)"


def _confirm_lines(exp_dir: Path, accuracy: float | None) -> list[str]:
    """The --confirm-seeds summary (mean ± std over the new seeds), if there is one."""
    path = exp_dir / CONFIRM_FILE
    if not path.exists():
        return []
    rows = read_confirm(path)
    lines = [f"confirmed with {describe(rows)} (per seed: {CONFIRM_FILE})"]
    if accuracy is not None:
        lines.append(lucky_seed_check(rows, accuracy))
    return lines


def export(experiment: Experiment) -> dict[str, Path]:
    """Write trials.csv, epochs.csv and best_config.yaml (each atomically) from the experiment's
    trials as loaded; returns their paths."""
    folder = experiment.folder
    paths = {"trials": folder / TRIALS_CSV, "epochs": folder / EPOCHS_CSV}
    table = trials_table(experiment.trials, experiment.mode, running=experiment.running)
    atomic_write_text(paths["trials"], table.to_csv(index=False))
    atomic_write_text(paths["epochs"], epochs_table(experiment.trials).to_csv(index=False))
    best = experiment.best
    if best is not None:
        paths["best_config"] = folder / BEST_CONFIG
        atomic_write_text(paths["best_config"], best_config_text(experiment, best))
    return paths


class CsvFiles(Listener):
    """The search's listener that keeps trials.csv, epochs.csv and best_config.yaml current: rewritten
    from the journal each time a trial ends."""

    def trial_ended(self, trial: str, experiment: Experiment) -> None:
        export(experiment)
