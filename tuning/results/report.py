"""hptune report results/<name>: figures and an HTML page from an experiment folder.

Reads only the files in the folder (experiment.json and journal.jsonl through
tuning.results.experiment.Experiment; optuna.db, best_config.yaml and confirm.csv if there), so it works
after the search is gone, on a copied folder, without Ray. Writes results/<name>/report/:

    learning_curves.png  train and test loss, and test accuracy, per epoch: the best trials and
                         the tutorial's baseline (the tutorial's own figure), crossings marked
    progress.png         the objective of each trial in order, with the best so far
    convergence.png      the best so far with its noise band against trial-epochs spent, and where
                         the search converged (tuning/noise.py)
    what_mattered.png    final test accuracy against learning rate, by batch size; Optuna's
                         parameter importances
    index.html           one self-contained page: the verdict, the best configuration, the
                         figures, the trials table and the command that produced the run

Extraction (plain tables, tested) is kept apart from drawing (smoke-rendered).
"""

from __future__ import annotations

import base64
import html
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from trainable import challenge
from trainable.confirm import CONFIRM_FILE, describe, lucky_seed_check, read_confirm
from trainable.fileio import atomic_write_bytes, atomic_write_text
from tuning.results import export as export_mod
from tuning.results.console import baseline_label, fmt_params
from tuning.results.experiment import Experiment, ExperimentError, ended_in_order
from tuning.results.journal import DIVERGED, EARLY_STOPPED, ERRORED, FINISHED, INTERRUPTED, RUNNING
from tuning.results.show import noise_lines

PROG = "hptune report"
FIGURES = ("learning_curves.png", "progress.png", "convergence.png", "what_mattered.png")
DPI = 110
STATUS_STYLE = {  # marker and colour per trial status, one legend everywhere
    FINISHED: ("o", "tab:blue"),
    EARLY_STOPPED: ("v", "tab:gray"),
    DIVERGED: ("X", "tab:red"),
    ERRORED: ("s", "black"),
    INTERRUPTED: ("D", "tab:orange"),
    RUNNING: ("P", "tab:purple"),
}


# --- extraction: plain tables from trials.csv and epochs.csv ---------------------------------


def read_tables(experiment: Experiment) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The trials and epochs tables (as in trials.csv and epochs.csv) of the experiment."""
    if not experiment.trials:
        raise ExperimentError(f"{experiment.folder}: the experiment has no trials yet")
    trials_df = export_mod.trials_table(experiment.trials, experiment.mode, running=experiment.running)
    return trials_df, export_mod.epochs_table(experiment.trials)


def top_trials(trials_df: pd.DataFrame, k: int) -> pd.DataFrame:
    """The k best rows by their `rank` (tuning.results.ranking.rank), best first."""
    return trials_df[trials_df["rank"].notna()].sort_values("rank").head(k)


def curves_table(trials_df: pd.DataFrame, epochs_df: pd.DataFrame, mode: str, k: int) -> pd.DataFrame:
    """Per-epoch losses and accuracy of the top k trials and the baseline, labelled for a legend."""
    chosen = top_trials(trials_df, k)
    chosen = pd.concat([chosen, trials_df[trials_df["baseline"] & ~trials_df["trial"].isin(chosen["trial"])]])
    rows = []
    for rank, (_, t) in enumerate(chosen.iterrows(), start=1):
        label = f"trial {t['number']}" + (" (tutorial baseline)" if t["baseline"] else f" (#{rank})")
        for _, m in epochs_df[epochs_df["trial"] == t["trial"]].sort_values("epoch").iterrows():
            rows.append({"label": label, "trial": t["trial"], "baseline": bool(t["baseline"]), "epoch": m["epoch"],
                         "train_loss": m["train_loss"], "test_loss": m["test_loss"],
                         "test_accuracy": m["test_accuracy"], "crossing_epoch": t["crossing_epoch"]})
    return pd.DataFrame(rows, columns=["label", "trial", "baseline", "epoch", "train_loss", "test_loss",
                                       "test_accuracy", "crossing_epoch"])


def progress_table(trials_df: pd.DataFrame, mode: str) -> pd.DataFrame:
    """Objective per trial in start order, with the best so far (NaN where a trial has none)."""
    t = trials_df.sort_values("number")
    objective = t["objective"].where(t["status"] != ERRORED)
    best = (objective.cummax() if mode == "max" else objective.cummin()).ffill()  # NaN stays NaN in cummax
    return pd.DataFrame({"number": t["number"], "objective": objective, "status": t["status"],
                         "baseline": t["baseline"].astype(bool), "best_so_far": best}).reset_index(drop=True)


def convergence_table(experiment: Experiment) -> pd.DataFrame:
    """One row per trial that ended, in the order they ended: the trial-epochs and working seconds
    spent by then, its final objective, the best so far and that best's standard error."""
    journal, mode = experiment.journal, experiment.mode
    working = journal.working_clock()
    epoch_times = sorted(r["time"] for r in journal.epochs())
    by_number = {t.number: t for t in experiment.trials}
    rows, best, best_se = [], None, None
    for e in ended_in_order(experiment.trials, mode, experiment.settings.objective):
        value = None if e.value is None else (e.value if mode == "max" else -e.value)
        if e.value is not None and (best is None or e.value > (best if mode == "max" else -best)):
            best, best_se = value, e.se
        rows.append({"number": e.number, "status": by_number[e.number].status,
                     "trial_epochs": sum(t <= e.time for t in epoch_times), "seconds": working(e.time),
                     "objective": value, "best_so_far": best, "best_se": best_se})
    return pd.DataFrame(rows, columns=["number", "status", "trial_epochs", "seconds", "objective", "best_so_far",
                                       "best_se"])


def lr_table(trials_df: pd.DataFrame) -> pd.DataFrame:
    """Final test accuracy against learning rate and batch size, per trial that has one."""
    rows = trials_df[trials_df["test_accuracy"].notna()]
    return rows[["number", "lr", "batch_size", "test_accuracy", "status"]].reset_index(drop=True)


def load_study(exp_dir: Path, name: str):  # noqa: ANN201 - optuna.Study or None
    import optuna

    path = exp_dir / "optuna.db"
    if not path.exists():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=f"sqlite:///{path}")
    except Exception:  # noqa: BLE001 - a damaged or foreign database: report without it
        return None


# --- drawing ---------------------------------------------------------------------------------


def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(curves: pd.DataFrame, path: Path, window: int) -> None:
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=DPI)
    colours = plt.get_cmap("tab10")
    for i, (label, group) in enumerate(curves.groupby("label", sort=False)):
        colour = "black" if group["baseline"].iloc[0] else colours(i % 10)
        ax_loss.plot(group["epoch"], group["train_loss"], "--", color=colour, lw=1.4)
        ax_loss.plot(group["epoch"], group["test_loss"], "-", color=colour, lw=1.8, label=label)
        ax_acc.plot(group["epoch"], 100 * group["test_accuracy"], "-", color=colour, lw=1.8, label=label)
        crossing = group["crossing_epoch"].iloc[0]
        if crossing is not None and not pd.isna(crossing):
            at = group[group["epoch"] == crossing]
            ax_loss.plot(at["epoch"], at["train_loss"], "o", color=colour, ms=8, mfc="white", mew=2)
    ax_loss.set(title="Loss per epoch (solid: test, dashed: train; ○ train falls below test)", xlabel="epoch",
                ylabel="cross-entropy loss")
    ax_acc.set(title="Test accuracy per epoch", xlabel="epoch", ylabel="test accuracy (%)")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    if not curves.empty:
        ax_acc.legend(fontsize=8, loc="lower right")
    fig.suptitle("Best trials and the tutorial's baseline (challenge: train loss below test loss and falling over the "
                 f"last {window} epochs)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_progress(progress: pd.DataFrame, path: Path, objective: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 4.2), dpi=DPI)  # the width of the other two
    for status, group in progress.groupby("status"):
        marker, colour = STATUS_STYLE.get(status, ("o", "tab:purple"))
        ax.scatter(group["number"], group["objective"], marker=marker, color=colour, s=45, label=status, zorder=3)
    ax.step(progress["number"], progress["best_so_far"], where="post", color="tab:green", lw=2, label="best so far")
    missing = progress[progress["objective"].isna()]
    for number in missing["number"]:
        ax.axvline(number, color="black", alpha=0.2, lw=1)
    baseline = progress[progress["baseline"]]
    for _, row in baseline.iterrows():
        ax.annotate("tutorial baseline", (row["number"], row["objective"]), textcoords="offset points", xytext=(6, -12),
                    fontsize=8)
    unit = " (test accuracy + 1 if the challenge is met)" if objective == "challenge" else ""
    ax.set(title="Search progress: objective of each trial, in order", xlabel="trial number",
           ylabel=f"{objective}{unit}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_convergence(table: pd.DataFrame, converged: Any, path: Path, objective: str) -> None:
    """The best so far (the answer the search would give if stopped then) with its noise band,
    against trial-epochs spent; each ended trial's own result; where the search converged."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 4.2), dpi=DPI)
    scale = 100 if objective == "test_accuracy" else 1
    for status, group in table.groupby("status"):
        marker, colour = STATUS_STYLE.get(status, ("o", "tab:purple"))
        ax.scatter(group["trial_epochs"], scale * group["objective"], marker=marker, color=colour, s=35, label=status,
                   zorder=3)
    shown = table[table["best_so_far"].notna()]
    if not shown.empty:
        x, best, se = shown["trial_epochs"], scale * shown["best_so_far"], scale * shown["best_se"]
        ax.step(x, best, where="post", color="tab:green", lw=2, label="best so far")
        ax.fill_between(x, best - se, best + se, step="post", color="tab:green", alpha=0.2,
                        label="± its standard error (the noise)")
    if converged is not None:
        at = table[table["number"] == converged.number]["trial_epochs"]
        if len(at):
            ax.axvline(at.iloc[0], color="black", ls="--", lw=1)
            ax.annotate(f"converged at trial {converged.number}", (at.iloc[0], 0.02), xycoords=("data", "axes fraction"),
                        xytext=(4, 0), textcoords="offset points", fontsize=8)
    ax.set(title="Convergence: the best result so far and its noise, against the trial-epochs spent",
           xlabel="trial-epochs spent (all trials)", ylabel=f"{objective}{' (%)' if scale == 100 else ''}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_what_mattered(lrs: pd.DataFrame, study: Any, path: Path) -> None:
    plt = _pyplot()
    fig, (ax_lr, ax_imp) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=DPI, gridspec_kw={"width_ratios": [3, 2]})
    colours = plt.get_cmap("tab10")
    sizes = sorted(lrs["batch_size"].unique()) if not lrs.empty else []
    for i, size in enumerate(sizes):
        group = lrs[lrs["batch_size"] == size]
        ax_lr.scatter(group["lr"], 100 * group["test_accuracy"], color=colours(i % 10), s=45, label=f"batch {size}",
                      edgecolor="black", lw=0.5)
    ax_lr.set_xscale("log")
    ax_lr.set(title="Final test accuracy against learning rate", xlabel="learning rate (log scale)",
              ylabel="test accuracy (%)")
    ax_lr.grid(alpha=0.3, which="both")
    if sizes:
        ax_lr.legend(fontsize=8)
    if not _draw_importances(study, ax_imp):
        ax_imp.text(0.5, 0.5, "too few completed trials\nfor parameter importances", ha="center", va="center",
                    transform=ax_imp.transAxes)
        ax_imp.set(title="Parameter importances (Optuna)", xticks=[], yticks=[])
    fig.tight_layout()
    _save(fig, path)


def _draw_importances(study: Any, ax: Any) -> bool:
    """Optuna's parameter importances (PED-ANOVA: needs no scikit-learn) drawn by Optuna's own
    matplotlib plot, moved onto `ax`; False when there are too few completed trials."""
    import matplotlib
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator

    if study is None or len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) < 4:
        return False
    try:
        with warnings.catch_warnings(), matplotlib.rc_context():  # Optuna switches the global style
            warnings.simplefilter("ignore")
            drawn = optuna.visualization.matplotlib.plot_param_importances(
                study, evaluator=PedAnovaImportanceEvaluator())
    except (ValueError, RuntimeError, ZeroDivisionError):
        return False
    names = [t.get_text() for t in drawn.get_yticklabels()]
    widths = [p.get_width() for p in drawn.patches]
    _pyplot().close(drawn.figure)
    ax.barh(names, widths, color="tab:blue")
    ax.set_title("Parameter importances (Optuna, PED-ANOVA)", fontsize=11)
    ax.set_xlabel("importance for the objective (share of 1)")
    return True


def _save(fig: Any, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    _pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())


# --- the page ----------------------------------------------------------------------------------


def verdict_html(experiment: Experiment, trials_df: pd.DataFrame) -> str:
    """The page's verdict: how many trials met the challenge, and the best trial's and the
    baseline's verdicts in the words every other output uses (trainable.challenge.verdict_text)."""
    window = experiment.settings.challenge_window
    met = trials_df[trials_df["challenge_met"] == True]  # noqa: E712 - NaN for trials without epochs
    lines = []
    if len(met):
        lines.append(f"<p class='yes'><b>Challenge met</b> by {len(met)} of {len(trials_df)} trials: train loss below "
                     f"test loss by more than 2 standard errors of the test loss, still falling over the last "
                     f"{window} epochs, test accuracy above chance.</p>")
    else:
        lines.append(f"<p class='no'><b>Challenge not met</b> by any of the {len(trials_df)} trials: the best trial "
                     f"below is the most accurate one.</p>")
    best = experiment.best
    if best is not None and best.last is not None:
        accuracy = best.last.get("test_accuracy")
        shown = f"test accuracy <b>{100 * accuracy:.1f}%</b>; " if accuracy is not None else ""
        lines.append(f"<p>Best: trial {best.number} &mdash; {shown}"
                     f"{html.escape(challenge.verdict_text(best.last, window))} "
                     f"({html.escape(fmt_params(best.config))}).</p>")
    for t in experiment.trials:
        if not t.baseline or t.last is None or t.last.get("test_accuracy") is None:
            continue
        lines.append(f"<p>Baseline, {baseline_label(t.config)} (trial {t.number}): test accuracy "
                     f"{100 * t.last['test_accuracy']:.1f}%; {html.escape(challenge.verdict_text(t.last, window))}.</p>")
    for line in noise_lines(experiment):  # the ties with the winner, where the search converged
        lines.append(f"<p>{html.escape(line)}</p>")
    if "slow_epoch" in trials_df:
        for _, t in trials_df[trials_df["slow_epoch"].notna()].iterrows():
            lines.append(f"<p class='no'>Trial {t['number']}: {html.escape(str(t['slow_epoch']))} "
                         f"(a stall: denormal floats, or a busy or swapping machine).</p>")
    return "\n".join(lines)


# Columns of the page's trials table, results first so they show without scrolling sideways
# (trials.csv keeps its own order); columns not named here follow in the CSV's order.
TABLE_FIRST = ("rank", "number", "status", "objective", "test_accuracy", "train_loss", "test_loss", "challenge_met",
               "crossing_epoch", "epochs_run", "lr", "batch_size", "epochs", "optimizer", "momentum", "weight_decay",
               "schedule")
# not shown: the baseline is a highlighted row instead
TABLE_HIDDEN = ("trial", "train_below_test", "still_decreasing", "above_chance", "baseline")

SORT_SCRIPT = """
document.querySelectorAll('table.trials th').forEach((th, col) => th.addEventListener('click', () => {
  const table = th.closest('table'), body = table.tBodies[0];
  const asc = th.getAttribute('aria-sort') !== 'ascending';
  table.querySelectorAll('th').forEach(h => h.removeAttribute('aria-sort'));
  th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
  // data-v holds the raw number; empty cells always sort last
  const key = r => {
    const c = r.cells[col];
    return c.dataset.v !== undefined ? parseFloat(c.dataset.v) : c.innerText;
  };
  const cmp = (a, b) => {
    const x = key(a), y = key(b), ex = x === '' || Number.isNaN(x), ey = y === '' || Number.isNaN(y);
    if (ex || ey) return ex - ey;
    return (x > y ? 1 : x < y ? -1 : 0) * (asc ? 1 : -1);
  };
  [...body.rows].sort(cmp).forEach(r => body.appendChild(r));
}));
"""


def _cell(value: Any) -> str:
    """One table cell: numbers right-aligned with 4 significant digits and their raw value for sorting."""
    if value is None or value is pd.NA or (isinstance(value, float) and pd.isna(value)):
        return "<td data-v='NaN'></td>"
    if isinstance(value, (bool, np.bool_)) or isinstance(value, str):
        return f"<td class='text'>{html.escape(str(value))}</td>"
    if isinstance(value, (int, np.integer)):
        return f"<td data-v='{value}'>{value}</td>"
    return f"<td data-v='{value!r}'>{value:.4g}</td>"


def trials_table_html(trials_df: pd.DataFrame, mode: str) -> str:
    """The sortable trials table, best objective first; the baseline and the best trial highlighted."""
    shown = trials_df.sort_values(["rank", "number"], na_position="last")  # the ranking: tuning.results.ranking.rank
    columns = [c for c in TABLE_FIRST if c in shown]
    columns += [c for c in shown if c not in TABLE_FIRST and c not in TABLE_HIDDEN]
    best = top_trials(trials_df, 1)["trial"].tolist()
    text = {c for c in columns if not pd.api.types.is_numeric_dtype(shown[c]) or pd.api.types.is_bool_dtype(shown[c])}
    head = "".join(
        f"<th scope='col'{' class=text' if c in text else ''} title='click to sort'>{html.escape(c)}</th>"
        for c in columns
    )
    rows = []
    for _, t in shown.iterrows():
        kind = "baseline" if bool(t.get("baseline")) else "best" if t["trial"] in best else ""
        cells = "".join(_cell(t[c].item() if hasattr(t[c], "item") else t[c]) for c in columns)
        rows.append(f"<tr class='{kind}'>{cells}</tr>" if kind else f"<tr>{cells}</tr>")
    return (f"<div class='scroll'><table class='trials'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def index_html(experiment: Experiment, trials_df: pd.DataFrame, figures: dict[str, bytes]) -> str:
    exp_dir, meta, settings = experiment.folder, experiment.meta, experiment.settings
    best_config = exp_dir / export_mod.BEST_CONFIG
    config_text = best_config.read_text() if best_config.exists() else "(no trial produced a result)"
    table_html = trials_table_html(trials_df, experiment.mode)
    confirm_html = ""
    confirm_file = exp_dir / CONFIRM_FILE
    if confirm_file.exists():
        rows = read_confirm(confirm_file)
        best = top_trials(trials_df, 1)
        check = lucky_seed_check(rows, float(best["test_accuracy"].iloc[0])) if len(best) else ""
        confirm_html = (
            f"<h2>Confirmed with new seeds</h2><p>The best configuration re-trained: {html.escape(describe(rows))}.</p>"
            f"<p>{html.escape(check[:1].upper() + check[1:])}.</p><div class='scroll'>"
            + pd.DataFrame(rows).to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0) + "</div>"
        )
    images = "\n".join(
        f"<figure><img alt='{name}' src='data:image/png;base64,{base64.b64encode(data).decode()}'></figure>"
        for name, data in figures.items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(experiment.name)}: hyperparameter search</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222;
       line-height: 1.4; }}
.yes {{ color: #176117; font-size: 1.15em; }} .no {{ color: #a11; font-size: 1.15em; }}
pre {{ background: #f5f5f5; padding: 0.8em; white-space: pre-wrap; overflow-wrap: anywhere; font-size: 0.85em; }}
figure {{ margin: 1em 0; }} img {{ width: 100%; height: auto; }}
.scroll {{ overflow: auto; max-height: 80vh; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; font-size: 0.82em; font-variant-numeric: tabular-nums; }}
th, td {{ padding: 0.25em 0.55em; border-bottom: 1px solid #e4e4e4; text-align: right; white-space: nowrap; }}
td.text, th.text {{ text-align: left; }}
th {{ background: #eee; position: sticky; top: 0; }}
table.trials th {{ cursor: pointer; user-select: none; }}
table.trials th:hover {{ background: #ddd; }}
th[aria-sort=ascending]::after {{ content: ' \\25B2'; }} th[aria-sort=descending]::after {{ content: ' \\25BC'; }}
tr.best {{ background: #e6f4e6; font-weight: 600; }} tr.baseline {{ background: #f1f1f1; font-style: italic; }}
tbody tr:hover {{ background: #fff7d6; }}
</style></head><body>
<h1>Search {html.escape(experiment.name)}</h1>
{verdict_html(experiment, trials_df)}
<h2>Best configuration</h2>
<pre>{html.escape(config_text)}</pre>
{confirm_html}
<h2>Figures</h2>
{images}
<h2>Trials</h2>
<p>Objective: <code>{html.escape(settings.objective)}</code> ({experiment.mode}).
Click a column to sort; scroll sideways for the rest.
<span style="background:#e6f4e6;font-weight:600">Best trial</span>,
<span style="background:#f1f1f1;font-style:italic">the baseline</span>.</p>
{table_html}
<h2>Command</h2>
<pre>{html.escape(meta.get('command', ''))}</pre>
<p>Search space: {html.escape(', '.join(f'{k} {v}' for k, v in meta.get('space', {}).items()))}</p>
<script>{SORT_SCRIPT}</script>
</body></html>
"""


def save_interrupted(experiment: Experiment, top: int, prog: str) -> None:
    """The CSV files and the report of an interrupted search, its stopped trials shown as
    interrupted; nothing if the folder was never written. Each is optional: the journal is the
    record, and the next run writes them again. (The driver's, and the supervisor's when the
    search's process could not.)"""
    from tuning.results.experiment import EXPERIMENT

    if not (experiment.folder / EXPERIMENT).exists():
        return
    try:
        export_mod.export(experiment.reload())
        write_report(experiment, top=top)
    except Exception as exc:  # noqa: BLE001 - the journal has everything; the resumed search writes them again
        print(f"{prog}: warning: the CSV files or the report of the interrupted search could not be written ({exc})",
              file=sys.stderr)


def write_report(experiment: Experiment | str | Path, top: int = 5) -> Path:
    """Draw the figures and write index.html into <folder>/report/; returns the page's path."""
    if not isinstance(experiment, Experiment):
        experiment = Experiment.load(experiment)
    exp_dir, settings = experiment.folder, experiment.settings
    trials_df, epochs_df = read_tables(experiment)
    out = exp_dir / "report"
    out.mkdir(exist_ok=True)
    study = load_study(exp_dir, experiment.name)
    plot_learning_curves(curves_table(trials_df, epochs_df, experiment.mode, top), out / FIGURES[0],
                         settings.challenge_window)
    plot_progress(progress_table(trials_df, experiment.mode), out / FIGURES[1], settings.objective)
    plot_convergence(convergence_table(experiment), experiment.convergence(), out / FIGURES[2], settings.objective)
    plot_what_mattered(lr_table(trials_df), study, out / FIGURES[3])
    figures = {name: (out / name).read_bytes() for name in FIGURES}
    page = out / "index.html"
    atomic_write_text(page, index_html(experiment, trials_df, figures))
    return page
