"""An experiment folder copied anywhere is read, reported and re-trained from where it is.

A real search (local Ray on loopback, SQLite-backed Optuna) on Fashion-MNIST files in their own
format, run with relative paths as a user types them; then the folder and the data are copied
elsewhere, the original is deleted, and everything is done again from the copy.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from tests.fixtures import mnist_files, patch_mnist_mirrors, write_mnist_files
from trainable.__main__ import main as trainable_main
from trainable.config import TrainConfig
from tuning.commands.export import main as export_main
from tuning.commands.report import main as report_main
from tuning.results.journal import Journal, trials
from tuning.search import main as search

SPACE = """
lr: {low: 1.0e-3, high: 3.0e-2, log: true}
batch_size: [16, 32]
epochs: 2
optimizer: [sgd, adam]
"""


@pytest.fixture
def ray_tmp(monkeypatch):
    """Ray's session files in a private, short folder (socket paths are limited), not /tmp/ray."""
    folder = tempfile.mkdtemp(prefix="rt")
    monkeypatch.setenv("RAY_TMPDIR", folder)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def files_holding(folder: Path, needles: list[str]) -> list[str]:
    """Every file under `folder` (Ray's own ray/ folder aside) whose bytes contain one of `needles`."""
    found = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "ray" not in p.relative_to(folder).parts[:1]):
        data = path.read_bytes()
        found += [f"{path.relative_to(folder)}: {n}" for n in needles if n.encode() in data]
    return found


@pytest.mark.slow
def test_a_copied_experiment_is_reported_and_retrained_from_its_new_place(cli, tmp_path, monkeypatch, ray_tmp):
    from torchvision.datasets import FashionMNIST

    orig = tmp_path / "orig"
    files = mnist_files(n_train=60, n_test=20)
    write_mnist_files(orig / "data" / "FashionMNIST" / "raw", files)
    patch_mnist_mirrors(monkeypatch, FashionMNIST, files, "http://127.0.0.1:9/")  # offline: the files are there
    (orig / "space.yaml").write_text(SPACE)
    monkeypatch.chdir(orig)

    argv = ["--data", "fashion-mnist", "--samples", "3", "--space", "space.yaml", "--num-cpus", "2", "--name", "exp"]
    status, out, err = cli(search, argv)
    assert status == 0, err
    exp = orig / "results" / "exp"
    table = pd.read_csv(exp / "trials.csv")
    # the tutorial's configuration is the baseline on Fashion-MNIST as on CIFAR-10
    baseline = table[table["baseline"]].iloc[0]
    tutorial = TrainConfig()
    assert (baseline["lr"], baseline["batch_size"], baseline["epochs"], baseline["optimizer"]) == (
        tutorial.lr, tutorial.batch_size, tutorial.epochs, tutorial.optimizer)
    # data sources as the user gave them, a relative re-train command, no absolute path anywhere
    best = TrainConfig.load(exp / "best_config.yaml")
    assert (best.data, best.data_root) == ("fashion-mnist", "data")
    retrain = "# Re-train without Ray: python -m trainable --config results/exp/best_config.yaml\n"
    assert retrain in (exp / "best_config.yaml").read_text()
    assert not (exp / "confirm.csv").exists()
    roots = sorted({str(tmp_path), str(tmp_path.resolve())})
    assert files_holding(exp, roots) == []

    # copy the experiment (without Ray's own checkpoints) and the data elsewhere; delete the original
    new = tmp_path / "elsewhere"
    shutil.copytree(exp, new / "results" / "exp", ignore=shutil.ignore_patterns("ray"))
    shutil.copytree(orig / "data", new / "data")
    shutil.rmtree(orig)
    monkeypatch.chdir(new)
    copy = new / "results" / "exp"

    # the command written in best_config.yaml works from the copy, its relative data root included;
    # --seeds writes confirm.csv beside the configuration: in the copy
    lines = (copy / "best_config.yaml").read_text().splitlines()
    line = next(x for x in lines if x.startswith("# Re-train without Ray: "))
    argv = shlex.split(line.split(": ", 1)[1])
    assert argv[:3] == ["python", "-m", "trainable"]
    status, out, err = cli(trainable_main, [*argv[3:], "--epochs", "1", "--seeds", "2"])
    assert status == 0, err
    assert "Confirmation: 2 new seeds" in out
    assert (copy / "confirm.csv").exists()

    # the readers take the folder they are given: the confirmation comes from the copy
    assert cli(export_main, ["results/exp"])[0] == 0
    assert cli(report_main, ["results/exp"])[0] == 0
    text = (copy / "best_config.yaml").read_text()
    assert "# confirmed with 2 new seeds" in text and "(per seed: confirm.csv)" in text
    assert "Confirmed with new seeds" in (copy / "report" / "index.html").read_text()
    # checkpoints the journal names are found relative to the folder it is read from
    checkpoints = [t.checkpoint for t in trials(Journal(copy).read()) if t.checkpoint]
    assert checkpoints and all(c.startswith(str(copy.resolve()) + "/ray/") for c in checkpoints)
    assert files_holding(copy, roots) == []


EXAMPLE = Path(__file__).resolve().parent.parent / "results" / "example"
MACHINE_ROOTS = ("/work/", "/home/", "/root/", "/tmp/", "/Users/", "/mnt/", "/srv/", "/opt/", "/var/", "C:\\")


# what is committed: Ray's checkpoint folder stays on the machine that ran the search (.gitignore)
COMMITTED = sorted(p.relative_to(EXAMPLE).as_posix() for p in EXAMPLE.rglob("*")
                   if p.is_file() and p.relative_to(EXAMPLE).parts[0] != "ray")


@pytest.mark.parametrize("path", COMMITTED)
def test_the_committed_example_holds_no_absolute_path(path):
    data = (EXAMPLE / path).read_bytes()
    assert [root for root in MACHINE_ROOTS if root.encode() in data] == []


def test_the_committed_example_names_its_data_as_typed():
    best = TrainConfig.load(EXAMPLE / "best_config.yaml")
    assert (best.data, best.data_root) == ("data/cifar10-jpeg", "data")
    assert "# Re-train without Ray: python -m trainable --config results/example/best_config.yaml\n" in (
        EXAMPLE / "best_config.yaml").read_text()


def test_the_committed_example_re_exports_to_the_same_bytes(tmp_path, monkeypatch, cli):
    """What export writes from the journal is what the search wrote: the committed files come back
    byte for byte (the refactors of the readers and writers keep their output)."""
    written = ("trials.csv", "epochs.csv", "best_config.yaml")
    copy = tmp_path / "results" / "example"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("ray", "report", *written))
    monkeypatch.chdir(tmp_path)
    assert cli(export_main, ["results/example"])[0] == 0
    assert [name for name in written if (copy / name).read_bytes() != (EXAMPLE / name).read_bytes()] == []
