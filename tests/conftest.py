from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest


@pytest.fixture
def cli(capsys) -> Callable[..., tuple[int, str, str]]:  # noqa: ANN001
    """Run a `main(argv)` as a user would: returns (exit status, stdout, stderr)."""

    def run(main: Callable[[Sequence[str]], int], argv: Sequence[str]) -> tuple[int, str, str]:
        try:
            status = main(list(argv))
        except SystemExit as exc:  # argparse exits on its own errors
            status = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return status, out, err

    return run
