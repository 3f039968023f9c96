"""The summary of a search: printed at its end, and by `hptune show results/<name>` for any
experiment folder (finished, interrupted, or running: then with what is running), as text or JSON.
Reads the folder alone (experiment.json and journal.jsonl), so a copied folder shows the same.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from trainable.challenge import verdict_text
from trainable.fileio import jsonable
from tuning.results import export as export_mod
from tuning.results.console import baseline_label, fmt_difference, fmt_objective, fmt_params, fmt_result
from tuning.results.experiment import Experiment, final_objective, final_se, met
from tuning.results.journal import DIVERGED, EARLY_STOPPED, ERRORED, FINISHED, INTERRUPTED, RUNNING, STALLED

STATUSES = (FINISHED, EARLY_STOPPED, STALLED, DIVERGED, ERRORED, INTERRUPTED)
TABLE_COLUMNS = ["rank", "number", "status", "lr", "batch_size", "epochs", "optimizer", "epochs_run", "train_loss",
                 "test_loss", "test_accuracy", "challenge_met"]


def counts(experiment: Experiment) -> dict[str, int]:
    """Trials per status; running ones as `running` while the search goes on."""
    out: dict[str, int] = {}
    for t in experiment.trials:
        status = RUNNING if experiment.running and t.status == INTERRUPTED else t.status
        out[status] = out.get(status, 0) + 1
    return {s: out[s] for s in (*STATUSES, RUNNING) if out.get(s)}


def summary(experiment: Experiment) -> dict[str, Any]:
    """Everything the summary says, as plain data (what `hptune show --json` prints)."""
    settings = experiment.settings
    best = experiment.best
    window = settings.challenge_window

    def trial(t: Any) -> dict[str, Any]:
        last = t.last or {}
        return {"number": t.number, "trial": t.trial, "status": t.status, "baseline": t.baseline,
                "hyperparameters": {k: v for k, v in export_mod.params_of(t.config).items()},
                "epochs_run": len(t.epochs), "test_accuracy": last.get("test_accuracy"),
                "train_loss": last.get("train_loss"), "test_loss": last.get("test_loss"),
                "challenge_met": bool(last.get("challenge_met")), "verdict": verdict_text(last or None, window),
                "error": t.error}

    running = [t for t in experiment.trials if experiment.running and not t.done]
    return jsonable({
        "name": experiment.name,
        "folder": str(experiment.folder),
        "status": experiment.status,
        "command": experiment.meta.get("command"),
        "samples": settings.samples,
        "trials": len(experiment.trials),
        "counts": counts(experiment),
        "met": sum(met(t) for t in experiment.trials),
        "objective": settings.objective,
        "best": trial(best) if best is not None else None,
        "baseline": next((trial(t) for t in experiment.trials if t.baseline), None),
        "running": [{**trial(t), "epoch": len(t.epochs), "epochs": t.config.get("epochs")} for t in running],
        "errored": [trial(t) for t in experiment.trials if t.status == ERRORED],
        "ties": [t.number for t in experiment.ties()],
        "convergence": convergence_data(experiment),
    })


def convergence_data(experiment: Experiment) -> dict[str, Any] | None:
    """Where the search converged (tuning/noise.py), as plain data."""
    found = experiment.convergence()
    if found is None:
        return None
    return {"trial": found.number, "seconds": experiment.journal.working_clock()(found.time),
            "trials_ended_by_then": found.index, "trials_after": found.after, "moved": found.moved,
            "noise": found.noise, "confirmed": found.confirmed}


def noise_lines(experiment: Experiment) -> list[str]:
    """The ties with the winner and where the search converged, each one line (none if nothing to say)."""
    objective = experiment.settings.objective
    lines = []
    ties = experiment.ties()
    if len(ties) > 1:
        values = [final_objective(t) for t in ties]
        numbers = sorted(t.number for t in ties)
        listed = ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}"
        lines.append(f"Tied      trials {listed} are within the noise of the best ({objective} "
                     f"{fmt_objective(min(values), objective)}–{fmt_objective(max(values), objective)}; "
                     f"standard error {fmt_difference(final_se(ties[0], objective), objective)})")
    found = convergence_data(experiment)
    if found is not None:
        moved, noise = fmt_difference(found["moved"], objective), fmt_difference(found["noise"], objective)
        after = found["trials_after"]
        stopped = (experiment.settings.until_converged and experiment.status == "finished"
                   and len(experiment.trials) < experiment.settings.samples)
        if stopped and found["confirmed"]:
            tail = (f"--until-converged stopped the search there: the {after} trials after it moved the best by {moved}, "
                    f"within its noise ({noise})")
        elif after:
            tail = f"the {after} trial{'s' if after > 1 else ''} after it moved the best by {moved}, within its noise ({noise})"
        elif stopped:  # it ended after --until-converged had stopped proposing trials, and moved the best
            tail = "it was still running when --until-converged stopped proposing trials, and moved the best"
        else:
            tail = "the last trial to end: no trial after it yet"
        lines.append(f"Converged at trial {found['trial']}, {found['seconds']:.0f} s into the search; {tail}")
    return lines


def summary_lines(experiment: Experiment, *, wall: float | None = None, res: dict[str, float] | None = None,
                  since: float | None = None) -> list[str]:
    """The search's closing summary. `wall`, `res` and `since` (this run of the command) add how
    busy the machine was; without them (`hptune show`) the trials' own times are given."""
    settings = experiment.settings
    all_trials = experiment.trials
    window = settings.challenge_window
    parts = ", ".join(f"{n} {s}" for s, n in counts(experiment).items())
    lines = []
    if wall is not None and res:
        lines.append(f"Search {experiment.name}: {len(all_trials)} trials ({parts}) in {wall:.0f} s; "
                     f"train/evaluate used {100 * busy_share(experiment, wall, res, since or 0.0):.0f}% "
                     f"of {res.get('cluster_cpus', 0):g} CPUs x wall time")
    else:
        trained = sum(m.get("epoch_seconds") or 0.0 for t in all_trials for m in t.epochs)
        lines.append(f"Search {experiment.name} ({experiment.status}): {len(all_trials)} of {settings.samples} trials "
                     f"({parts or 'none yet'}); {trained:.0f} s of train/evaluate in trials")
    lines.append(f"Challenge (train loss below test loss by more than 2 standard errors, still falling, above "
                 f"chance): met by {sum(met(t) for t in all_trials)} of {len(all_trials)} trials")
    best = experiment.best
    if best is not None:
        lines.append(f"Best      trial {best.number:>2} ({best.trial}): {fmt_params(best.config)}")
        lines.append(f"          {fmt_result(best)}; {verdict_text(best.last, window)}")
        if not met(best):
            lines.append(f"          No trial met the challenge: this is the best by {settings.objective} alone.")
        lines.extend(noise_lines(experiment))
    for t in all_trials:
        if t.baseline:
            lines.append(f"Baseline  trial {t.number:>2} ({baseline_label(t.config)}): {fmt_result(t)}; "
                         f"{verdict_text(t.last, window)}")
    for t in all_trials:
        if t.status == ERRORED:
            lines.append(f"Errored   trial {t.number:>2} ({t.trial}): {t.error}")
    if experiment.running:
        if age(experiment):
            lines.append(f"Running   (its journal last written {age(experiment)})")
        for t in all_trials:
            if not t.done:
                lines.append(f"Running   trial {t.number:>2} ({t.trial}): epoch {len(t.epochs)} of "
                             f"{t.config.get('epochs')}; {fmt_params(t.config)}")
    table = export_mod.trials_table(all_trials, experiment.mode, running=experiment.running)
    if not table.empty:
        shown = table.sort_values(["rank", "number"], na_position="last").head(10)
        columns = [c for c in TABLE_COLUMNS if c in shown.columns]
        columns += [c for c in shown.columns if c.startswith("model.")]
        lines.append("")
        lines.extend(shown[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}").splitlines())
    return lines


def print_summary(experiment: Experiment, *, wall: float, res: dict[str, float], paths: dict[str, Path],
                  since: float) -> None:
    print()
    for line in summary_lines(experiment, wall=wall, res=res, since=since):
        print(line)
    print()
    for label, path in paths.items():
        print(f"{label:>12}: {path}")


def busy_share(experiment: Experiment, wall: float, res: dict[str, float], since: float) -> float:
    """Train/evaluate time of this run's epochs as a share of the CPUs x wall time (only the
    epochs of this run of the command: a resumed search's wall time covers no others)."""
    this_run = experiment.journal.epochs(since)
    busy = sum(r.get("epoch_seconds") or 0.0 for r in this_run) * max(1, math.floor(res.get("cpu", 1)))
    return busy / (wall * max(res.get("cluster_cpus", 1), 1)) if wall > 0 else 0.0


def age(experiment: Experiment) -> str:
    """How long ago the journal last changed, for a running search: a stale 'running' shows."""
    journal = experiment.journal.path
    if not journal.exists():
        return ""
    return f"{time.time() - journal.stat().st_mtime:.0f} s ago"
