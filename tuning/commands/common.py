"""Command-line plumbing shared by every command: the one-line usage error, argparse types, and the
flag groups several commands declare alike (data, model)."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from trainable.errors import USAGE_ERROR


def command_line(prog: str, argv: Sequence[str]) -> str:
    """What a user types to run `prog` with `argv` again, quoted for a shell."""
    return " ".join([prog, *map(shlex.quote, argv)])


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the message and where to get help), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def fail(prog: str, message: str, status: int = USAGE_ERROR) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status


def int_at_least(minimum: int, name: str) -> Callable[[str], int]:
    """An argparse type: a whole number >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = name
    return parse


positive_int = int_at_least(1, "positive_int")
non_negative_int = int_at_least(0, "non_negative_int")


DATA_HELP = ("cifar10 (default), cifar100, mnist, fashion-mnist (torchvision's, by name), synthetic, "
             "an image folder with train/<class>/ and test/<class>/, or a data factory MODULE:NAME or FILE.py:NAME")


def add_data_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--data, --data-root and --cache-dir, declared alike by every command."""
    parser.add_argument("--data", metavar="NAME|FOLDER|REF", help=DATA_HELP)
    parser.add_argument("--data-root", metavar="FOLDER",
                        help="where torchvision's data sets are found or downloaded (default ./data)")
    parser.add_argument("--cache-dir", metavar="FOLDER",
                        help="where decoded image folders are cached (default ~/.cache/hptune or $HPTUNE_CACHE)")


def data_overrides(args: argparse.Namespace) -> dict[str, str]:
    """The configuration fields the data flags set (only those given)."""
    return {k: getattr(args, k) for k in ("data", "data_root") if getattr(args, k, None) is not None}


def data_flags(args: argparse.Namespace) -> list[str]:
    """The data flags as given, to pass on to another command."""
    flags: list[str] = []
    for key in ("data", "data_root", "cache_dir"):
        if getattr(args, key, None) is not None:
            flags += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    return flags


def model_arg(text: str) -> tuple[str, Any]:
    """argparse type of --model-arg: NAME=VALUE, the value read as YAML (64, 0.5, true, [64, 32], relu)."""
    import yaml

    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. width=256), got {text!r}")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    return name, parsed


def add_model_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, model_help: str,
                   arg_help: str | None = None, default: str | None = None) -> None:
    """--model, and --model-arg unless `arg_help` is None, declared alike by every command that
    builds a model; each command says in its help what they mean to it."""
    parser.add_argument("--model", default=default, metavar="REF", help=model_help)
    if arg_help is not None:
        parser.add_argument("--model-arg", type=model_arg, action="append", default=[], metavar="NAME=VALUE",
                            help=arg_help)


def add_tracker_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, what: str) -> None:
    """--mlflow [URI] and --wandb PROJECT, for the commands that log a search to a tracker: `what`
    says what they do there ("also log", "push")."""
    parser.add_argument("--mlflow", nargs="?", const="", metavar="URI",
                        help=f"{what} the search and each trial to MLflow (default store: $MLFLOW_TRACKING_URI, "
                             "else sqlite:///mlflow.db here; pip install 'hptune[mlflow]')")
    parser.add_argument("--wandb", metavar="PROJECT",
                        help=f"{what} each trial to Weights & Biases as a run, grouped by the search (offline, "
                             "under results/<name>/wandb, without an API key; pip install 'hptune[wandb]')")
