"""hptune report results/<name>: figures and an HTML page from an experiment folder (no Ray)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import pandas as pd

from tuning.commands.common import OneLineParser, fail, positive_int
from tuning.results.experiment import ExperimentError
from tuning.results.report import write_report

PROG = "hptune report"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description="Plots and an HTML page from an experiment folder (no Ray needed).",
                      epilog="example:\n  hptune report results/example          writes results/example/report/",
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", metavar="FOLDER", help="the experiment folder, results/<name>")
    p.add_argument("--top", type=positive_int, default=5, metavar="K",
                   help="trials drawn in the learning curves (default 5)")
    return p


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        page = write_report(args.experiment, top=args.top)
    except ExperimentError as exc:
        return fail(prog, str(exc))
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as exc:  # unreadable CSVs, unwritable report/
        return fail(prog, f"{args.experiment}: cannot draw the report ({exc})")
    print(page)
    return 0
