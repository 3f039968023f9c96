"""Warm start and tuning.compare, end to end: a real local Ray, real SQLite-backed Optuna studies."""

from __future__ import annotations

import signal

import optuna
import pandas as pd
import pytest

from tests.drivers import running, signal_and_wait, wait_until_mid_search
from tuning.commands.compare import main as compare
from tuning.engine.hooks import HOLD_ENV
from tuning.search import main as search

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_ray")]
COMPARE = ["-m", "tuning.commands.main", "compare"]

SPACE = """
optimizer: [sgd, adam]
lr:
  - {when: {optimizer: sgd}, low: 1.0e-3, high: 3.0e-2, log: true}
  - {when: {optimizer: adam}, low: 1.0e-4, high: 3.0e-3, log: true}
momentum: {when: {optimizer: sgd}, low: 0.8, high: 0.95}
batch_size: [256]
epochs: 2
"""


def run(cli, tmp_path, name, *extra):
    return cli(search, ["--data", "synthetic", "--results-dir", str(tmp_path / "results"), "--name", name,
                        "--num-cpus", "2", "--no-baseline", *extra])


def test_warm_start_gives_the_new_study_the_earlier_trials(cli, tmp_path):
    (tmp_path / "wide.yaml").write_text(SPACE)
    status, _, err = run(cli, tmp_path, "first", "--samples", "4", "--space", str(tmp_path / "wide.yaml"))
    assert status == 0, err
    first = pd.read_csv(tmp_path / "results" / "first" / "trials.csv")
    # a narrower space: the earlier trials whose learning rate it cannot hold are skipped
    narrow = SPACE.replace("low: 1.0e-3, high: 3.0e-2", "low: 1.0e-2, high: 3.0e-2")
    (tmp_path / "narrow.yaml").write_text(narrow)
    inside = sum((first["optimizer"] == "adam") | (first["lr"] >= 1e-2))
    status, out, err = run(cli, tmp_path, "second", "--samples", "2", "--space", str(tmp_path / "narrow.yaml"),
                           "--warm-start", str(tmp_path / "results" / "first"))
    assert status == 0, err
    assert f"Warm start: {inside} trials of" in out
    if inside < 4:
        assert f"{4 - inside} outside this space skipped" in out
    study = optuna.load_study(study_name="second", storage=f"sqlite:///{tmp_path / 'results' / 'second' / 'optuna.db'}")
    warm = [t for t in study.trials if "warm_start" in t.user_attrs]
    assert len(warm) == inside and len(study.trials) == inside + 2  # the earlier ones, then its own 2
    assert all(t.intermediate_values for t in warm)
    # the experiment itself holds only its own trials
    assert len(pd.read_csv(tmp_path / "results" / "second" / "trials.csv")) == 2


def test_a_fresh_search_samples_the_center_of_its_space_first_unless_told_not_to(cli, tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE)
    center = {"optimizer": "sgd", "lr": (1e-3 * 3e-2) ** 0.5, "momentum": 0.875}
    for name, extra in (("centered", []), ("sampled", ["--no-center"])):
        status, _, err = run(cli, tmp_path, name, "--samples", "3", "--max-concurrent", "1", "--seed", "3",
                             "--space", str(tmp_path / "space.yaml"), *extra)
        assert status == 0, err
        trials = pd.read_csv(tmp_path / "results" / name / "trials.csv").sort_values("number")
        first = trials.iloc[0]
        at_center = first["optimizer"] == "sgd" and abs(first["lr"] - center["lr"]) < 1e-12 \
            and abs(first["momentum"] - center["momentum"]) < 1e-12
        assert at_center == (name == "centered"), first.to_dict()
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'results' / name / 'optuna.db'}")
        marked = [t.number for t in study.trials if t.user_attrs.get("center")]
        assert marked == ([0] if name == "centered" else [])
        assert len({(r.optimizer, r.lr) for r in trials.itertuples()}) == 3  # then the sampler's own
    # a search whose only trial is the baseline leaves no waiting center trial in its study
    status, _, err = cli(search, ["--data", "synthetic", "--results-dir", str(tmp_path / "results"), "--name", "base",
                                  "--num-cpus", "2", "--samples", "1", "--space", str(tmp_path / "space.yaml")])
    assert status == 0, err
    study = optuna.load_study(study_name="base", storage=f"sqlite:///{tmp_path / 'results' / 'base' / 'optuna.db'}")
    assert [t.user_attrs.get("baseline") for t in study.trials] == [True]


def test_warm_start_from_a_folder_that_is_not_an_experiment_is_one_line_exit_2(cli, tmp_path):
    status, _, err = run(cli, tmp_path, "x", "--warm-start", str(tmp_path / "nope"))
    assert status == 2 and "no such experiment folder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "results" / "x").exists()


@pytest.mark.heavy
def test_compare_runs_each_strategy_and_writes_the_table_and_figure(cli, tmp_path):
    out = tmp_path / "compare"
    status, stdout, err = cli(compare, ["--data", "synthetic", "--samples", "3", "--seeds", "0", "--num-cpus", "2",
                                        "--strategies", "ours", "ray-tutorial", "--out", str(out)])
    assert status == 0, err
    runs = pd.read_csv(out / "runs.csv")
    assert runs["strategy"].tolist() == ["ours", "ray-tutorial"] and (runs["trial_epochs"] > 0).all()
    # the Ray tutorial's recipe really ran: SGD with momentum 0.9, its batch sizes, up to 10 epochs
    recipe = pd.read_csv(out / "runs" / "ray-tutorial-seed0" / "trials.csv")
    assert set(recipe["optimizer"]) == {"sgd"} and set(recipe["momentum"]) == {0.9}
    assert set(recipe["batch_size"]) <= {32, 64, 128, 256} and (recipe["epochs_run"] <= 10).all()
    assert "| ours |" in (out / "summary.md").read_text() and "| ray-tutorial |" in stdout
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")
    # a second call reuses the finished runs instead of searching again
    status, stdout, _ = cli(compare, ["--data", "synthetic", "--samples", "3", "--seeds", "0", "--num-cpus", "2",
                                      "--strategies", "ours", "--out", str(out)])
    assert status == 0 and "ours, seed 0 ..." not in stdout


def test_a_resumed_search_is_timed_without_the_time_between_its_runs(tmp_path):
    """compare's wall seconds are the time a search worked: one killed after its second epoch and
    run again half an hour later must not look half an hour slower than one that ran through."""
    import json

    from tuning.commands.compare import progress
    from tuning.results.experiment import Experiment

    records = [("attempt", 0, {}), ("trial", 10, {"trial": "a"}),
               ("epoch", 40, {"trial": "a", "test_accuracy": 0.3}), ("epoch", 70, {"trial": "a", "test_accuracy": 0.4}),
               ("attempt", 1875, {}),  # the driver was killed at 70 s; the command ran again at 1875 s
               ("epoch", 1910, {"trial": "a", "test_accuracy": 0.5}), ("end", 1911, {})]
    (tmp_path / "journal.jsonl").write_text("".join(
        json.dumps({"event": event, "time": 1.8e9 + t, **fields}) + "\n" for event, t, fields in records))
    curve = progress(Experiment(tmp_path, {}))
    assert curve["seconds"].tolist() == pytest.approx([30, 60, 95])
    assert curve["best_test_accuracy"].tolist() == [0.3, 0.4, 0.5]


@pytest.mark.heavy
def test_ctrl_c_stops_compare_with_its_own_message_and_the_same_command_goes_on(cli, tmp_path):
    out = tmp_path / "compare"
    argv = ["--data", "synthetic", "--samples", "3", "--seeds", "0", "--num-cpus", "2",
            "--strategies", "optuna-tpe", "--out", str(out)]
    markers, log = tmp_path / "markers", tmp_path / "first-run.log"
    markers.mkdir()
    # two trials run to their end, the third waits after its epoch 3: mid-search on any machine
    with running(log, [*COMPARE, *argv], env={HOLD_ENV: f"3:2:{markers}"}) as proc:
        wait_until_mid_search(out / "runs" / "optuna-tpe-seed0", proc)
        status = signal_and_wait(proc, signal.SIGINT, log)
    output = log.read_text()
    assert status == 130, output
    assert "failed" not in output and "Finished searches are kept in" in output
    assert f"hptune compare {' '.join(argv)}" in output
    assert not (out / "runs.csv").exists()
    # the same command resumes the interrupted search and compares
    status, stdout, err = cli(compare, argv)
    assert status == 0, err
    assert pd.read_csv(out / "runs.csv")["strategy"].tolist() == ["optuna-tpe"]
    table = pd.read_csv(out / "runs" / "optuna-tpe-seed0" / "trials.csv")
    assert len(table) == 3 and set(table["status"]) == {"finished"}
