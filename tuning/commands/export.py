"""hptune export results/<name>: rewrite an experiment's trials.csv, epochs.csv and best_config.yaml
from its journal (tuning/results/export.py; the search does this itself)."""

from __future__ import annotations

from collections.abc import Sequence

from tuning.commands.common import OneLineParser, fail
from tuning.results.experiment import Experiment, ExperimentError
from tuning.results.export import export

PROG = "hptune export"


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    parser = OneLineParser(prog=prog,
                           description="Rewrite an experiment's CSV files and best_config.yaml from its journal.")
    parser.add_argument("experiment", help="results/<name>")
    args = parser.parse_args(argv)
    try:
        paths = export(Experiment.load(args.experiment))
    except ExperimentError as exc:
        return fail(parser.prog, str(exc))
    for path in paths.values():
        print(path)
    return 0
