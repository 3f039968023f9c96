"""Command-line plumbing shared by `python -m trainable` and `tuning/*.py`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, NoReturn

USAGE_ERROR = 2  # exit status for bad input, as argparse uses


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the message and where to get help), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def fail(prog: str, message: str, status: int = USAGE_ERROR) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return status


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    """Strict-JSON copy of a metrics dict: NaN and infinities become null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def dumps(metrics: dict[str, Any]) -> str:
    return json.dumps(jsonable(metrics), allow_nan=False)
