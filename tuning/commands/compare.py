"""hptune compare: search strategies side by side, on the same data, budget and trainer.

Every strategy is a real search, as `hptune search` runs it (same data, same number of samples,
several sampler seeds, our fast trainer), so only the strategy differs:

    ours           the default: the space's center first, then TPE over the define-by-run space,
                   the noise-aware stopping rule (tuning/noise.py), stalled trials stopped
    asha           the same with Ray Tune's ASHA (rungs at 25% and 75% of each schedule, factor 3)
    syne-asha      the same with Syne Tune's ASHA on those rungs (pip install -e ".[compare]")
    converged      ours with --until-converged: --samples is the most it runs
    ray-tutorial   PyTorch's "Hyperparameter tuning with Ray Tune" recipe applied to this MLP:
                   random search, SGD with momentum 0.9, lr log-uniform 1e-4..1e-1, batch
                   {32, 64, 128, 256}, 10 epochs, ASHA (max_t 10, grace 1, reduction 2) on test loss
    optuna-tpe     Optuna's default as users run it without a scheduler: TPE over our space, every
                   trial to its end
    random-asha    random search over our space, with ASHA
    ours-warm      with --warm-start EXPERIMENT: ours, --warm-samples trials (default half of
                   --samples), its study given the earlier experiment's trials first

Per run it reads the experiment's journal: the trial-epochs and wall seconds of the whole search,
and until some epoch first came within 0.5 and 0.3 points of the run's own final best test
accuracy (the winner's, tuning.results.ranking.rank), that final best, and the share of trials
meeting the challenge. Writes <out>/runs.csv, <out>/summary.csv, <out>/summary.md (medians over
seeds, with the machine and the command) and <out>/compare.png (best test accuracy so far against
trial-epochs and against wall time, the median over seeds per strategy).

    hptune compare --data data/cifar10-jpeg --samples 20 --seeds 0 1 2 --strategies ours asha syne-asha converged
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from trainable.errors import INTERRUPTED_STATUS, TERMINATED_STATUS
from trainable.fileio import atomic_write_text
from trainable.hardware import machine
from tuning.commands.common import (
    OneLineParser,
    add_data_args,
    add_model_args,
    command_line,
    data_overrides,
    fail,
    positive_int,
)
from tuning.commands.search import base_config, search
from tuning.results.experiment import Experiment, met
from tuning.settings import Grace, SearchSettings

PROG = "hptune compare"


class SearchStopped(KeyboardInterrupt):
    """A search stopped by Ctrl-C or SIGTERM (its exit status): compare stops too, with the same status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status

WITHIN = (0.005, 0.003)  # "within 0.5 and 0.3 points of the final best" (a share of the test set)
RAY_TUTORIAL_SPACE = """\
lr: {low: 1.0e-4, high: 1.0e-1, log: true}
batch_size: [32, 64, 128, 256]
epochs: 10
optimizer: sgd
momentum: 0.9
"""
DEFAULT_STRATEGIES = ["ours", "asha", "converged", "ray-tutorial", "optuna-tpe"]
# strategy -> its own SearchSettings (every run also has no baseline, is quiet, ...); ray-tutorial
# also has its own space (--tutorial-space)
STRATEGIES: dict[str, dict[str, Any]] = {
    "ours": {},
    "asha": {"stopping": "asha"},
    "syne-asha": {"stopping": "syne-asha"},
    "converged": {"until_converged": True},
    "ray-tutorial": {"sampler": "random", "objective": "test_loss", "grace": Grace.parse("1"),
                     "reduction_factor": 2.0, "center": False},
    "optuna-tpe": {"early_stop": False, "center": False},
    "random-asha": {"sampler": "random", "center": False, "stopping": "asha"},
}


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description="Search strategies side by side on the same data and budget.")
    add_data_args(p)
    p.add_argument("--samples", type=positive_int, default=20, metavar="N", help="trials per search (default 20)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED",
                   help="sampler seeds (default 0 1 2)")
    p.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=DEFAULT_STRATEGIES, metavar="NAME",
                   help=f"which to run, of {', '.join(STRATEGIES)} (default: {' '.join(DEFAULT_STRATEGIES)})")
    p.add_argument("--num-cpus", type=positive_int, metavar="N", help="CPUs for each search's local Ray (default: all)")
    p.add_argument("--warm-start", metavar="FOLDER",
                   help="also run ours-warm: our default, warm-started from this earlier experiment folder")
    p.add_argument("--warm-samples", type=positive_int, metavar="N",
                   help="trials of ours-warm (default: half of --samples)")
    p.add_argument("--out", default="results/compare", metavar="FOLDER",
                   help="where the runs and the summary go (default results/compare)")
    add_model_args(p, "your model factory (MODULE:NAME or FILE.py:NAME) for every strategy "
                      "(default: the tutorial's MLP)")
    p.add_argument("--space", metavar="YAML",
                   help="the space of ours, optuna-tpe and random-asha (default: the default space)")
    p.add_argument("--tutorial-space", metavar="YAML",
                   help="the space of ray-tutorial (default: the Ray Tune tutorial's, for the MLP)")
    return p


def run_strategy(strategy: str, seed: int, args: argparse.Namespace, out: Path, command: str = "") -> dict[str, Any]:
    """One strategy's search with one sampler seed, in <out>/runs/<strategy>-seed<seed> (a finished
    one is measured again, not run again; an unfinished one resumes), and its measures. `command`
    is what goes on with it (the compare's own command)."""
    name = f"{strategy}-seed{seed}"
    folder = out / "runs" / name
    if not (folder / "experiment.json").exists() or Experiment.load(folder).meta.get("status") != "finished":
        print(f"{strategy}, seed {seed} ...", flush=True)
        settings = SearchSettings(samples=args.samples, seed=seed, results_dir=str(out / "runs"), name=name,
                                  baseline=False, quiet=True, num_cpus=args.num_cpus, cache_dir=args.cache_dir,
                                  **STRATEGIES.get(strategy, {}))
        space = args.space
        if strategy == "ray-tutorial":
            space = str(args.tutorial_space or out / "ray-tutorial-space.yaml")
        model = {"model": args.model} if args.model else {}
        if strategy == "ours-warm":  # our default, with the earlier experiment's trials; its own space and model
            settings = settings.replace(samples=args.warm_samples or max(1, args.samples // 2),
                                        warm_start=str(args.warm_start))
            space, model = None, {}
        status = search(settings, lambda: base_config(overrides={**data_overrides(args), **model}), space,
                        lambda _: command)
        if status in (INTERRUPTED_STATUS, TERMINATED_STATUS):
            raise SearchStopped(status)  # the search has kept what finished; main says how to go on
        if status != 0:
            raise RuntimeError(f"the {strategy} search with seed {seed} failed (exit {status})")
    return measure(Experiment.load(folder), strategy, seed)


def progress(experiment: Experiment) -> pd.DataFrame:
    """Every epoch of the search in the order it was reported: cumulative trial-epochs, seconds
    since the first trial started (a resumed search's time between its runs left out), and the best
    test accuracy so far."""
    journal = experiment.journal
    working = journal.working_clock()
    rows, best = [], 0.0
    for i, r in enumerate(sorted(journal.epochs(), key=lambda r: r["time"]), start=1):
        best = max(best, r.get("test_accuracy") or 0.0)
        rows.append({"trial_epochs": i, "seconds": working(r["time"]), "best_test_accuracy": best})
    return pd.DataFrame(rows, columns=["trial_epochs", "seconds", "best_test_accuracy"])


def measure(experiment: Experiment, strategy: str, seed: int) -> dict[str, Any]:
    curve = progress(experiment)
    best = experiment.best
    final = (best.last or {}).get("test_accuracy") if best is not None else None
    row: dict[str, Any] = {"strategy": strategy, "seed": seed, "trials": len(experiment.trials),
                           "trial_epochs": len(curve),
                           "seconds": float(curve["seconds"].iloc[-1]) if len(curve) else None}
    for within in WITHIN:
        reached = curve[curve["best_test_accuracy"] >= final - within - 1e-12] if final is not None else curve[:0]
        key = f"{100 * within:g}"
        row[f"trial_epochs_to_{key}"] = int(reached["trial_epochs"].iloc[0]) if len(reached) else None
        row[f"seconds_to_{key}"] = float(reached["seconds"].iloc[0]) if len(reached) else None
    row["best_test_accuracy"] = final
    row["challenge_share"] = (sum(met(t) for t in experiment.trials) / len(experiment.trials)
                              if experiment.trials else None)
    return row


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Medians over seeds; a threshold some seed never reached counts as never (shown as '-')."""
    rows = []
    for strategy, group in runs.groupby("strategy", sort=False):
        row: dict[str, Any] = {"strategy": strategy, "seeds": len(group)}
        for col in [c for c in runs.columns if c not in ("strategy", "seed")]:
            values = group[col].tolist()
            missing = any(pd.isna(v) for v in values)
            row[col] = None if missing else statistics.median(values)
        rows.append(row)
    return pd.DataFrame(rows)


COLUMNS = {  # summary.md: column -> heading
    "strategy": "strategy", "trials": "trials", "trial_epochs": "trial-epochs", "seconds": "seconds",
    "trial_epochs_to_0.5": "trial-epochs to within 0.5", "seconds_to_0.5": "seconds to within 0.5",
    "trial_epochs_to_0.3": "trial-epochs to within 0.3", "seconds_to_0.3": "seconds to within 0.3",
    "best_test_accuracy": "final best", "challenge_share": "trials meeting the challenge",
}


def markdown(summary: pd.DataFrame) -> str:
    cols = [c for c in COLUMNS if c in summary.columns]
    head = "| " + " | ".join(COLUMNS[c] for c in cols) + " |\n|" + "---|" * len(cols) + "\n"

    def cell(col: str, value: Any) -> str:
        if value is None or pd.isna(value):
            return "-"
        if col == "best_test_accuracy":
            return f"{100 * value:.1f}%"
        if col == "challenge_share":
            return f"{100 * value:.0f}%"
        return f"{value:.0f}" if isinstance(value, (int, float)) else str(value)

    return head + "".join("| " + " | ".join(cell(c, r[c]) for c in cols) + " |\n" for _, r in summary.iterrows())


def plot(curves: dict[str, list[pd.DataFrame]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for strategy, runs in curves.items():
        for ax, x in zip(axes, ("trial_epochs", "seconds")):
            grid = sorted({v for r in runs for v in r[x]})
            # the median over seeds of the best accuracy reached by each point of the budget
            median = [statistics.median([_best_at(r, x, g) for r in runs]) for g in grid]
            ax.step(grid, [100 * m for m in median], where="post", label=strategy)
    for ax, label in zip(axes, ("trial-epochs spent", "wall seconds")):
        ax.set_xlabel(label)
        ax.set_ylabel("best test accuracy so far (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Search strategies on the same data and budget (median over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _best_at(curve: pd.DataFrame, x: str, at: float) -> float:
    seen = curve[curve[x] <= at]["best_test_accuracy"]
    return float(seen.iloc[-1]) if len(seen) else 0.0


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return fail(prog, f"{out}: cannot create it ({exc.strerror or exc})")
    (out / "ray-tutorial-space.yaml").write_text(RAY_TUTORIAL_SPACE)
    started = time.time()
    command = command_line(prog, sys.argv[1:] if argv is None else argv)
    strategies = [*args.strategies, *(["ours-warm"] if args.warm_start else [])]
    rows, curves = [], {}
    try:
        for seed in args.seeds:  # seed by seed, so a partial run already compares like with like
            for strategy in strategies:
                rows.append(run_strategy(strategy, seed, args, out, command))
                folder = out / "runs" / f"{strategy}-seed{seed}"
                curves.setdefault(strategy, []).append(progress(Experiment.load(folder)))
    except RuntimeError as exc:
        return fail(prog, str(exc), status=1)
    except KeyboardInterrupt as exc:
        print(f"\nInterrupted. Finished searches are kept in {out / 'runs'}; the same command goes on from "
              f"them (an interrupted search resumes):\n  {command}", file=sys.stderr)
        return exc.status if isinstance(exc, SearchStopped) else INTERRUPTED_STATUS
    runs = pd.DataFrame(rows)
    summary = summarize(runs)
    atomic_write_text(out / "runs.csv", runs.to_csv(index=False))
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    table = markdown(summary)
    atomic_write_text(out / "summary.md", f"Machine: {machine()}; {dt.date.today():%Y-%m-%d}; medians over seeds "
                      f"{' '.join(map(str, args.seeds))}.\nCommand: `{command}`\n\n{table}")
    plot(curves, out / "compare.png")
    print(f"\n{len(rows)} searches in {time.time() - started:.0f} s; medians over seeds {args.seeds}:\n")
    print(table)
    print(f"written: {out / 'runs.csv'}, {out / 'summary.csv'}, {out / 'summary.md'}, {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
