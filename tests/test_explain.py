"""hptune explain: the tutorial's run is fp32, as in the tutorial, unless --precision says otherwise."""

from __future__ import annotations

import pytest

from tests.fixtures import write_image_folder
from trainable.config import TrainConfig
from trainable.data import load_image_folder
from trainable.explain import tutorial_epochs
from tuning.commands.explain import main as explain


def table(out: str) -> list[str]:
    """The printed rows of the first table (epoch lines), as printed."""
    rows = []
    for line in out.splitlines()[2:]:
        if not line.strip():
            break
        rows.append(line)
    return rows


def expected_rows(data, precision: str) -> list[str]:  # noqa: ANN001
    """The tutorial's loop run directly with `precision`, formatted the way the command prints it."""
    import io
    from contextlib import redirect_stdout

    from trainable.explain import print_table

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        print_table("", tutorial_epochs(data, TrainConfig(precision=precision)))
    return buffer.getvalue().splitlines()[2:]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    return write_image_folder(root / "imgs", per_class=(10, 4)), root / "cache"


def test_the_tutorials_run_is_fp32_by_default_and_bf16_when_asked(cli, folder):
    images, cache = folder
    data = load_image_folder(images, cache_dir=cache)
    fp32, bf16 = expected_rows(data, "fp32"), expected_rows(data, "bf16")
    assert fp32 != bf16  # the two precisions print different numbers, so the comparison below means something

    status, out, err = cli(explain, ["--data", str(images), "--cache-dir", str(cache)])
    assert status == 0, err
    assert out.splitlines()[0].endswith("(one fixed order, no reshuffling; fp32):")
    assert table(out) == fp32 and len(fp32) == 10  # whatever --precision auto would pick on this machine

    status, out, err = cli(explain, ["--data", str(images), "--cache-dir", str(cache), "--precision", "bf16"])
    assert status == 0, err
    assert out.splitlines()[0].endswith("; bf16):") and table(out) == bf16


def test_config_keeps_its_own_precision_unless_given(cli, folder, tmp_path):
    images, cache = folder
    config = tmp_path / "c.yaml"
    TrainConfig(epochs=1, precision="bf16").save(config)
    status, out, err = cli(explain, ["--data", str(images), "--cache-dir", str(cache), "--config", str(config)])
    assert status == 0, err
    assert "constant schedule; bf16):" in out
    argv = ["--data", str(images), "--cache-dir", str(cache), "--config", str(config), "--precision", "fp32"]
    status, out, err = cli(explain, argv)
    assert status == 0, err
    assert "constant schedule; fp32):" in out and "bf16" not in out


def test_bad_precision_is_one_line_exit_2(cli):
    status, _, err = cli(explain, ["--data", "synthetic", "--precision", "fp16"])
    assert status == 2 and len(err.strip().splitlines()) == 1
