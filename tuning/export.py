"""trials.csv, epochs.csv and best_config.yaml, from the files in an experiment folder alone.

    python -m tuning.export results/<name>     # rewrite them (the search does this itself)
"""

from __future__ import annotations

import io
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from trainable.cli import OneLineParser, fail
from trainable.config import TrainConfig
from trainable.confirm import CONFIRM_FILE, describe, lucky_seed_check, read_confirm
from trainable.fileio import atomic_write_text
from trainable.fit import METRICS
from tuning.journal import ERRORED, INTERRUPTED, RUNNING, Journal, TrialRecord, trials
from tuning.space import SEARCHABLE

EXPERIMENT = "experiment.json"
TRIALS_CSV, EPOCHS_CSV, BEST_CONFIG = "trials.csv", "epochs.csv", "best_config.yaml"
PARAMS = SEARCHABLE
FINAL = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "train_below_test", "still_decreasing", "challenge_met", "crossing_epoch", "objective")


class ExperimentError(RuntimeError):
    """An experiment folder that cannot be read; the message says which and why."""


def read_experiment(exp_dir: str | Path) -> dict[str, Any]:
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        raise ExperimentError(f"{exp_dir}: no such experiment folder")
    path = exp_dir / EXPERIMENT
    if not path.exists():
        raise ExperimentError(f"{exp_dir}: not an experiment folder (no {EXPERIMENT}; is this the folder tuning/search.py wrote?)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExperimentError(f"{path}: unreadable ({exc})") from None


def write_experiment(exp_dir: str | Path, meta: dict[str, Any]) -> None:
    atomic_write_text(Path(exp_dir) / EXPERIMENT, json.dumps(meta, indent=2) + "\n")


def load_trials(exp_dir: str | Path) -> tuple[dict[str, Any], list[TrialRecord]]:
    meta = read_experiment(exp_dir)
    return meta, trials(Journal(exp_dir).read())


def final_objective(trial: TrialRecord) -> float | None:
    last = trial.last
    if last is None or trial.status in (ERRORED,):
        return None
    value = last.get("objective")
    return None if value is None or not math.isfinite(value) else float(value)


def best_trial(all_trials: Sequence[TrialRecord], mode: str) -> TrialRecord | None:
    """The trial with the best final objective (what Tune and Optuna rank by)."""
    scored = [t for t in all_trials if final_objective(t) is not None and t.status != INTERRUPTED]
    if not scored:
        return None
    sign = 1 if mode == "max" else -1
    return max(scored, key=lambda t: (sign * final_objective(t), -t.number))  # type: ignore[operator]


def trials_table(all_trials: Sequence[TrialRecord], running: bool = False) -> pd.DataFrame:
    """One row per trial: its hyperparameters, status, epochs run, final and best metrics.

    `running`: the search is still going, so a trial that has not ended is "running", not
    "interrupted".
    """
    rows = []
    for t in all_trials:
        last = t.last or {}
        tested = [m for m in t.epochs if m.get("test_accuracy") is not None]
        status = RUNNING if running and t.status == INTERRUPTED else t.status
        row: dict[str, Any] = {"trial": t.trial, "number": t.number, "status": status, "baseline": t.baseline}
        row.update({p: t.config.get(p) for p in PARAMS})
        row["epochs_run"] = len(t.epochs)
        row.update({f: last.get(f) for f in FINAL})
        row["best_test_accuracy"] = max((m["test_accuracy"] for m in tested), default=None)
        row["best_test_loss"] = min((m["test_loss"] for m in tested if m.get("test_loss") is not None), default=None)
        row["train_seconds"] = sum(m.get("epoch_seconds") or 0.0 for m in t.epochs)
        row["error"] = t.error
        if status == ERRORED:
            row["objective"] = None  # an errored trial has no result to rank
        rows.append(row)
    columns = ["trial", "number", "status", "baseline", *PARAMS, "epochs_run", *FINAL, "best_test_accuracy", "best_test_loss", "train_seconds", "error"]
    return pd.DataFrame(rows, columns=columns)


def epochs_table(all_trials: Sequence[TrialRecord]) -> pd.DataFrame:
    """One row per trial and epoch, with the trainable's metric names."""
    columns = ["trial", "number", *METRICS, "objective"]
    rows = [{"trial": t.trial, "number": t.number, **{c: m.get(c) for c in columns[2:]}} for t in all_trials for m in t.epochs]
    return pd.DataFrame(rows, columns=columns)


def best_config_text(meta: dict[str, Any], trial: TrialRecord, exp_dir: str | Path) -> str:
    """best_config.yaml for `trial` of the experiment in `exp_dir` (the folder as it is now)."""
    last = trial.last or {}
    config = TrainConfig.from_dict(trial.config)
    accuracy = last.get("test_accuracy")
    lines = [
        f"Best trial of experiment {meta['name']}: {trial.trial} (trial {trial.number} of {meta['samples']}, {trial.status})",
        f"objective {meta['objective']}: {final_objective(trial):.4f}; test_accuracy {100 * accuracy:.1f}%" if accuracy is not None else "",
        _verdict_line(last, meta.get("challenge_window", 3)),
        *_confirm_lines(Path(exp_dir), accuracy),
        f"Re-train without Ray: {retrain_command(Path(exp_dir))}",
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


def _verdict_line(last: dict[str, Any], window: int) -> str:
    if not last:
        return ""
    if last.get("challenge_met"):
        return (
            f"challenge met: train_loss {last['train_loss']:.4f} < test_loss {last['test_loss']:.4f} "
            f"(below since epoch {last['crossing_epoch']}) and falling in each of the last {window} epochs"
        )
    return f"challenge not met: train_below_test={last.get('train_below_test')}, still_decreasing={last.get('still_decreasing')}"


def export(exp_dir: str | Path, all_trials: Sequence[TrialRecord] | None = None) -> dict[str, Path]:
    """Write trials.csv, epochs.csv and best_config.yaml (each atomically); returns their paths.

    `all_trials`: the journal's trials if the caller has just read them.
    """
    exp_dir = Path(exp_dir)
    meta = read_experiment(exp_dir)
    if all_trials is None:
        all_trials = trials(Journal(exp_dir).read())
    paths = {"trials": exp_dir / TRIALS_CSV, "epochs": exp_dir / EPOCHS_CSV}
    atomic_write_text(paths["trials"], trials_table(all_trials, running=meta.get("status") == "running").to_csv(index=False))
    atomic_write_text(paths["epochs"], epochs_table(all_trials).to_csv(index=False))
    best = best_trial(all_trials, meta["mode"])
    if best is not None:
        paths["best_config"] = exp_dir / BEST_CONFIG
        atomic_write_text(paths["best_config"], best_config_text(meta, best, exp_dir))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m tuning.export", description="Rewrite an experiment's CSV files and best_config.yaml from its journal.")
    parser.add_argument("experiment", help="results/<name>")
    args = parser.parse_args(argv)
    try:
        paths = export(args.experiment)
    except ExperimentError as exc:
        return fail(parser.prog, str(exc))
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
