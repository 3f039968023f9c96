"""hptune show results/<name>: the summary a search prints at its end, for any experiment folder."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from tuning.commands.common import OneLineParser, fail
from tuning.results.experiment import Experiment, ExperimentError
from tuning.results.show import summary, summary_lines

PROG = "hptune show"
EXAMPLES = """examples:
  hptune show results/example              the summary of a finished search
  hptune show results/big                  a running one: what is running, the best so far
  hptune show results/big --json           the same as JSON, for scripts"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description="The summary of a search, finished, interrupted or running.",
                      epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", metavar="FOLDER", help="the experiment folder, results/<name>")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        experiment = Experiment.load(args.experiment)
    except ExperimentError as exc:
        return fail(prog, str(exc))
    if args.json:
        print(json.dumps(summary(experiment), indent=2, allow_nan=False))
        return 0
    for line in summary_lines(experiment):
        print(line)
    return 0
