"""Trial arrays in a search (`--arrays K`): each member is still one trial, in the study, the
journal and the CSV files, trained as its separate run would be, stopped by ASHA or the stall
rule, resumed after SIGKILL (that test is test_reliability.py's, with arrays)."""

from __future__ import annotations

import re

import optuna
import pandas as pd
import pytest

from tuning.results.journal import Journal, trials
from tuning.search import main as search

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_ray")]

# One batch size, so that every trial can share an array. Learning rates where training is not
# chaotic: there a last-bit difference (the server's two threads sum a GEMM in another order than a
# trial's one) grows to percents within three epochs (AdamW at 3e-2 did). Each optimizer's exactness
# is tests/test_arrays.py's.
SHARED_SPACE = """
lr: {low: 3.0e-3, high: 3.0e-2, log: true}
batch_size: [128]
epochs: 3
optimizer: [sgd, nesterov]
momentum: {low: 0.5, high: 0.9}
"""


def run(cli, tmp_path, name: str, space: str, *extra: str) -> tuple[int, str, str]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(space)
    return cli(search, ["--data", "synthetic", "--results-dir", str(tmp_path / "results"), "--name", name,
                        "--num-cpus", "2", "--space", str(path), "--no-baseline", "--sampler", "random",
                        "--precision", "fp32", *extra])


def counts_agree(folder, samples: int) -> None:
    """The study, the journal and trials.csv hold the same trials, `samples` of them."""
    table = pd.read_csv(folder / "trials.csv")
    journal = trials(Journal(folder).read())
    study = optuna.load_study(study_name=folder.name, storage=f"sqlite:///{folder / 'optuna.db'}")
    assert len(table) == len(journal) == len(study.trials) == samples
    assert sorted(table["number"]) == sorted(t.number for t in journal) == list(range(1, samples + 1))
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


def each_array_reported_whole(epochs: pd.DataFrame) -> None:
    """An array of m members that trained an epoch left exactly m rows saying m: no member was
    trained unseen, none counted that was not there. (Its members may be at different epochs.)"""
    sizes = epochs["array_members"].value_counts()
    assert all(count % members == 0 for members, count in sizes.items()), sizes


# A user's model that the batched matmuls do not know (Tanh), so its array runs under torch.vmap;
# its width a model hyperparameter, so members of other widths train in arrays of their own.
USER = """
import torch
from torch import nn


def tanh_net(input_shape, num_classes, width=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], width), nn.Tanh(), nn.Linear(width, num_classes))


def splits(n=1200):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long() + 2 * (x[:, 2] > 0).long()
    return (x[: n - 200], y[: n - 200]), (x[n - 200 :], y[n - 200 :])
"""
USER_SPACE = SHARED_SPACE.replace("batch_size: [128]", "batch_size: [32]") + "model.width: [16, 32]\n"


@pytest.mark.parametrize("model", [pytest.param("mlp", marks=pytest.mark.smoke),
                                   pytest.param("own-model", marks=pytest.mark.heavy)])
def test_array_members_train_as_their_separate_runs_and_are_trials_of_their_own(cli, tmp_path, model):
    space, extra = SHARED_SPACE, []
    if model == "own-model":
        (tmp_path / "user.py").write_text(USER)
        space, extra = USER_SPACE, ["--model", f"{tmp_path / 'user.py'}:tanh_net", "--data",
                                    f"{tmp_path / 'user.py'}:splits"]
    status, out, err = run(cli, tmp_path, "arrays", space, "--samples", "5", "--no-early-stop", "--arrays", "4", *extra)
    assert status == 0, err
    status, _, err = run(cli, tmp_path, "separate", space, "--samples", "5", "--no-early-stop", *extra)
    assert status == 0, err
    together = pd.read_csv(tmp_path / "results" / "arrays" / "epochs.csv")
    alone = pd.read_csv(tmp_path / "results" / "separate" / "epochs.csv")
    assert together["array_members"].max() >= 2, together  # some epochs were trained as one stack
    assert "array_members" not in alone
    for folder in ("arrays", "separate"):
        counts_agree(tmp_path / "results" / folder, 5)
    rows = {name: pd.read_csv(tmp_path / "results" / name / "trials.csv").set_index("number")
            for name in ("arrays", "separate")}
    columns = ["lr", "optimizer", "momentum", "status", "epochs_run", "train_below_test", "still_decreasing",
               "above_chance", "challenge_met", "crossing_epoch", *(["model.width"] if extra else [])]
    # same trials, same ends, the same verdict on the challenge, part by part (on this data and in
    # three epochs, "not met" for every trial: each member's verdict is computed from its own history)
    pd.testing.assert_frame_equal(rows["arrays"][columns], rows["separate"][columns])
    if extra:  # members of different widths never share a stack: each width's arrays are whole on their own
        widths = rows["arrays"]["model.width"]
        for width, of_width in together.groupby(together["number"].map(widths)):
            assert of_width["array_members"].max() <= (widths == width).sum(), (width, of_width)
            each_array_reported_whole(of_width)
    merged = together.merge(alone, on=["number", "epoch"], suffixes=("_array", "_alone"))
    assert len(merged) == len(together) == len(alone) == 15
    for metric in ("train_loss", "test_loss", "test_accuracy"):  # fp32: the same numbers up to summation order
        assert merged[f"{metric}_array"].to_numpy() == pytest.approx(merged[f"{metric}_alone"].to_numpy(),
                                                                     rel=2e-3, abs=1e-4), metric


def test_asha_and_the_stall_rule_take_members_out_of_the_array(cli, tmp_path):
    # 1e-6 learns nothing: ASHA stops it at a rung, or the stall rule after two epochs at chance
    space = "lr: [0.03, 1.0e-6]\nbatch_size: [128]\nepochs: 4\noptimizer: [nesterov]\nmomentum: 0.9\n"
    status, out, err = run(cli, tmp_path, "cut", space, "--samples", "6", "--arrays", "6", "--stopping", "asha",
                           "--grace-period", "1", "--reduction-factor", "2")
    assert status == 0, err
    folder = tmp_path / "results" / "cut"
    counts_agree(folder, 6)
    table = pd.read_csv(folder / "trials.csv")
    hopeless, good = table[table["lr"] < 1e-5], table[table["lr"] > 1e-2]
    assert len(hopeless) >= 1 and len(good) >= 1, table
    assert set(hopeless["status"]) <= {"early-stopped", "stalled"}, hopeless[["number", "status", "epochs_run"]]
    assert (hopeless["epochs_run"] < 4).all()
    assert (good["status"] == "finished").all() and (good["epochs_run"] == 4).all()
    epochs = pd.read_csv(folder / "epochs.csv")
    assert epochs["array_members"].max() >= 2, epochs  # they trained as arrays
    # Once a member has left, the array goes on without it: each trial has one row per epoch it ran,
    # and every array is accounted for by its members' rows. (Members of an array need not be at the
    # same epoch: a trial that started later joins the others' array, so "after epoch e" says
    # nothing about who had left.)
    assert epochs.groupby("number").size().to_dict() == table.set_index("number")["epochs_run"].to_dict()
    each_array_reported_whole(epochs)
    study = optuna.load_study(study_name="cut", storage=f"sqlite:///{folder / 'optuna.db'}")
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(pruned) == len(hopeless)


@pytest.mark.heavy
def test_arrays_fall_back_to_separate_trials_where_they_cannot_apply_and_say_so(cli, tmp_path):
    loop = tmp_path / "loop.py"
    loop.write_text("def train(config, data, report):\n"
                    "    for epoch in range(report.epoch, config['epochs']):\n"
                    "        report(train_loss=1.0 / (epoch + 1), test_loss=1.2 / (epoch + 1), test_accuracy=0.5)\n")
    status, out, err = run(cli, tmp_path, "own", "lr: {low: 1.0e-3, high: 1.0e-2}\nepochs: 2\n", "--samples", "2",
                           "--arrays", "2", "--loop", f"{loop}:train")
    assert status == 0, err
    notes = [line for line in err.splitlines() if "--arrays 2" in line]
    assert len(notes) == 1 and "training loop of your own" in notes[0], err
    counts_agree(tmp_path / "results" / "own", 2)


@pytest.mark.heavy
def test_bench_search_compares_arrays_with_separate_trials_in_one_run(capsys):
    from tuning.commands.bench import search_main as bench_search

    status = bench_search(["--data", "synthetic", "--samples", "3", "--epochs", "2", "--batch-size", "128",
                           "--num-cpus", "2", "--arrays", "3"])
    out = capsys.readouterr().out
    assert status == 0, out
    rows = re.findall(r"^  (separate trials|arrays of 3) +([\d.]+) trials/s +([\d.]+) trial-epochs/s +[\d.]+ s +"
                      r"([\d.]+)x$", out, re.MULTILINE)
    assert [row[0] for row in rows] == ["separate trials", "arrays of 3"], out
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in rows), out
    assert rows[0][3] == "1.00" and float(rows[1][3]) > 0, out
