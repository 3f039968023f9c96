from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001 - pytest's hook
    """The fast tier (`-m fast`): every test that is neither slow nor heavy, and the `smoke` ones,
    one end-to-end search of each kind. Tests marked `gpu` run where CUDA is present and are
    skipped, saying why, everywhere else."""
    for item in items:
        keywords = item.keywords
        if "smoke" in keywords or ("slow" not in keywords and "heavy" not in keywords):
            item.add_marker(pytest.mark.fast)
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


# --- one local Ray for the searches that do not care which -------------------------------------
#
# A search started in this process finds Ray running and uses it (and leaves it running), instead
# of starting and stopping a private one: a Ray start costs seconds, more on a slow machine, and
# the default run holds dozens of searches. Tests about Ray itself (its start and stop, a cluster,
# logical GPUs) ask for `no_shared_ray`, which stops it first; the next test that asks for
# `shared_ray` starts it again. Its 2 CPUs are what every such test passes as --num-cpus.

SHARED_RAY_CPUS = 2


def ensure_shared_ray() -> None:
    import logging

    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=SHARED_RAY_CPUS, num_gpus=0, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.ERROR)


@pytest.fixture
def shared_ray() -> None:
    ensure_shared_ray()


@pytest.fixture
def no_shared_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def pytest_sessionfinish(session, exitstatus) -> None:  # noqa: ANN001 - pytest's hook
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
