"""hptune explain: why the tutorial saw its test loss below its
train loss; the measuring is trainable/explain.py."""

from __future__ import annotations

from collections.abc import Sequence

from trainable.config import PRECISIONS, ConfigError, TrainConfig
from trainable.data import DataError, load_dataset
from trainable.explain import explain
from tuning.commands.common import OneLineParser, add_data_args, fail

PROG = "hptune explain"


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    p = OneLineParser(prog=prog, description="The tutorial's train/test loss puzzle, measured.")
    add_data_args(p)
    p.add_argument("--config", metavar="YAML",
                   help="also explain this configuration (e.g. a search's best_config.yaml)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="fp32 for the tutorial's run unless given (the tutorial is fp32); --config's own precision unless given",
    )
    args = p.parse_args(argv)
    try:
        other = TrainConfig.load(args.config) if args.config else None
        if other is not None and args.precision:
            other = other.with_updates(precision=args.precision)
        data = load_dataset(args.data or "cifar10", args.data_root or "data", cache_dir=args.cache_dir)
    except (ConfigError, DataError) as exc:
        return fail(prog, str(exc))
    explain(data, args.precision, other, args.config)
    return 0
