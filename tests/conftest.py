from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001 - pytest's hook
    """Tests marked `gpu` run where CUDA is present and are skipped, saying why, everywhere else."""
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible to torch)")
    for item in gpu_tests:
        item.add_marker(skip)


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
