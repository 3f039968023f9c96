"""python -m trainable, called the way a user types it."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from trainable.__main__ import main
from trainable.config import TrainConfig


def test_prints_one_line_per_epoch_and_the_verdict(capsys):
    assert main(["--data", "synthetic", "--epochs", "2", "--optimizer", "adam"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out if line.startswith("Epoch")] == ["1/2", "2/2"]
    assert "test_accuracy" in out[1] and out[-1].startswith("Challenge ")


def test_json_prints_one_object_per_epoch_with_the_metric_names(capsys):
    assert main(["--data", "synthetic", "--epochs", "2", "--lr", "0.01", "--batch-size", "128", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_loss", "test_loss", "test_accuracy", "samples_per_second", "challenge_met"} <= set(rows[0])


def test_config_file_is_used_and_flags_override_it(tmp_path, capsys):
    path = tmp_path / "best.yaml"
    TrainConfig(lr=0.02, epochs=1, optimizer="nesterov", momentum=0.5,
                data="synthetic").save(path, header="verdict: met")
    assert main(["--config", str(path), "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert main(["--config", str(path), "--epochs", "2", "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_json_has_no_nan_when_training_diverges(capsys):
    assert main(["--data", "synthetic", "--epochs", "3", "--lr", "10000", "--momentum", "0.9", "--json"]) == 0
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert last["diverged"] is True and (last["train_loss"] is None or math.isfinite(last["train_loss"]))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
        (["--tutorial", "--lr", "0.1"], "--tutorial runs the tutorial's hyperparameters exactly; drop --lr"),
        (["--config", "/no/such.yaml"], "/no/such.yaml: cannot read"),
        (["--data", "/no/such/folder"], "/no/such/folder: no such folder"),
        (["--momentum", "1.5", "--data", "synthetic"], "momentum: must be in [0, 1)"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(cli, argv, message):
    status, out, err = cli(main, argv)
    assert status == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert out == ""


def test_a_device_this_machine_lacks_is_one_line_exit_2(cli):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    status, _, err = cli(main, ["--data", "synthetic", "--device", "cuda"])
    assert status == 2 and "--device cuda: CUDA is not available" in err and len(err.strip().splitlines()) == 1


def test_module_runs_as_a_script():
    result = subprocess.run([sys.executable, "-m", "trainable", "--data", "synthetic", "--epochs", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Epoch   1/1" in result.stdout


def test_seeds_retrains_with_new_seeds_and_writes_confirm_csv(tmp_path, capsys):
    path = tmp_path / "best_config.yaml"
    TrainConfig(lr=0.02, epochs=2, optimizer="nesterov", momentum=0.9, batch_size=128, data="synthetic",
                seed=7).save(path)
    assert main(["--config", str(path), "--seeds", "2"]) == 0
    out = capsys.readouterr().out
    assert "seed 8:" in out and "seed 9:" in out and "Confirmation: 2 new seeds; test_accuracy" in out and "±" in out
    lines = (tmp_path / "confirm.csv").read_text().splitlines()
    assert lines[0].startswith("seed,") and [line.split(",")[0] for line in lines[1:]] == ["8", "9"]
    # a second confirmation never overwrites the first
    assert main(["--config", str(path), "--seeds", "1"]) == 0
    assert (tmp_path / "confirm.csv").read_text().splitlines() == lines
    assert (tmp_path / "confirm-2.csv").read_text().splitlines()[1].startswith("8,")


def test_the_lucky_seed_line_never_prints_a_negative_zero():
    from trainable.confirm import lucky_seed_check

    rows = [{"test_accuracy": a, "train_loss": 1.04, "test_loss": 1.26, "challenge_met": True}
            for a in (0.555, 0.5568, 0.5542)]
    line = lucky_seed_check(rows, 0.5552)  # 0.02 points under the mean: rounds to zero
    assert "+0.0 points from the new seeds' mean: not a lucky seed" in line
    assert "+2.0 points" in lucky_seed_check(rows, 0.5753)
