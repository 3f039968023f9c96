"""hptune export results/<name>: rewrite an experiment's trials.csv, epochs.csv and best_config.yaml
from its journal (tuning/results/export.py; the search does this itself); with --mlflow / --wandb,
push the search to a tracker too (tuning/results/mlflow_runs.py, wandb_runs.py)."""

from __future__ import annotations

from collections.abc import Sequence

from trainable.errors import UsageError
from tuning.commands.common import OneLineParser, add_tracker_args, fail
from tuning.results import mlflow_runs, wandb_runs
from tuning.results.experiment import Experiment, ExperimentError
from tuning.results.export import export

PROG = "hptune export"


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    parser = OneLineParser(prog=prog,
                           description="Rewrite an experiment's CSV files and best_config.yaml from its journal.")
    parser.add_argument("experiment", help="results/<name>")
    add_tracker_args(parser, "push (or bring up to date)")
    args = parser.parse_args(argv)
    try:
        experiment = Experiment.load(args.experiment)
        uri = None
        if args.mlflow is not None:
            uri = mlflow_runs.resolve_uri(args.mlflow)
            mlflow_runs.check(uri)
        if args.wandb is not None:
            wandb_runs.check(args.wandb)
        paths = export(experiment)
    except (ExperimentError, UsageError) as exc:
        return fail(parser.prog, str(exc))
    for path in paths.values():
        print(path)
    ended = experiment.meta.get("status") != "running"
    if uri is not None:
        try:
            mlflow_runs.MlflowRuns(uri).push(experiment, ended=ended)
        except Exception as exc:  # noqa: BLE001 - the store's own words, on one line
            return fail(parser.prog, f"MLflow ({uri}): {mlflow_runs.first_line(exc)}", status=1)
        print(f"MLflow: {uri}, experiment {mlflow_runs.experiment_name()!r}, run {experiment.name!r}")
    if args.wandb is not None:
        runs = wandb_runs.WandbRuns(experiment.folder, args.wandb)
        try:
            runs.push(experiment, ended=ended)
        except Exception as exc:  # noqa: BLE001 - W&B's own words, on one line
            return fail(parser.prog, f"W&B ({args.wandb}): {mlflow_runs.first_line(exc)}", status=1)
        where = f" (offline: wandb sync {experiment.folder / wandb_runs.WANDB_DIR}/offline-run-*)" \
            if runs.mode == "offline" else ""
        print(f"W&B: project {args.wandb!r}, group {experiment.name!r}{where}")
    return 0
