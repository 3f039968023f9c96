"""Errors and exit statuses, for every module to import: bad input from the user is a UsageError,
printed as one line with exit status 2; an interrupted command exits as a shell reports its signal."""

from __future__ import annotations

import sys

USAGE_ERROR = 2  # exit status for bad input, as argparse uses
INTERRUPTED_STATUS = 130  # what a shell reports for Ctrl-C (128 + SIGINT)
TERMINATED_STATUS = 143  # ... and for SIGTERM (128 + SIGTERM), what schedulers send before SIGKILL


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def moved_to(old: str, new: str) -> int:
    """A retired `python -m` entry point: one line naming the command that replaced it; exit 2."""
    print(f"{old}: this is now `{new}` (same flags; {new} --help)", file=sys.stderr)
    return USAGE_ERROR
