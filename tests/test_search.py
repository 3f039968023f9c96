"""tuning/search.py end to end: a real local Ray, a real SQLite-backed Optuna study, synthetic data."""

from __future__ import annotations

import json

import optuna
import pandas as pd
import pytest

from tests.drivers import trial_lines
from trainable.config import TrainConfig
from tuning.engine.hooks import HOLD_ENV
from tuning.results.journal import Journal
from tuning.search import main as search

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_ray")]

# Small trials: 2 epochs on synthetic data.
FAST_SPACE = """
lr: {low: 1.0e-3, high: 3.0e-2, log: true}
batch_size: [128, 256]
epochs: 2
optimizer: [sgd, nesterov, adamw]
momentum: {low: 0.5, high: 0.95}
"""


def run(cli, tmp_path, *extra: str, name: str = "exp") -> tuple[int, str, str]:
    return cli(search, ["--data", "synthetic", "--results-dir", str(tmp_path / "results"), "--name", name, "--num-cpus",
                        "2", *extra])


def space_file(tmp_path, text: str = FAST_SPACE):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.smoke
def test_search_writes_consistent_outputs(cli, tmp_path):
    status, out, err = run(cli, tmp_path, "--samples", "4", "--space", space_file(tmp_path), "--no-baseline")
    assert status == 0, err
    exp = tmp_path / "results" / "exp"
    trials = pd.read_csv(exp / "trials.csv")
    epochs = pd.read_csv(exp / "epochs.csv")
    assert len(trials) == 4 and trials["trial"].is_unique
    assert set(trials["status"]) <= {"finished", "early-stopped", "diverged"}
    # epochs.csv has every epoch of every trial, with the trainable's metric names
    assert epochs.groupby("trial").size().reindex(trials["trial"]).tolist() == trials["epochs_run"].tolist()
    assert ({"train_loss", "test_loss", "test_accuracy", "samples_per_second", "challenge_met", "objective"}
            <= set(epochs.columns))
    last = epochs.sort_values("epoch").groupby("trial").tail(1).set_index("trial")
    assert (last.loc[trials["trial"], "test_accuracy"].values == trials["test_accuracy"].values).all()
    # best_config.yaml is the best row's configuration, loadable unchanged by python -m trainable
    best_row = trials[trials["rank"] == 1].iloc[0]
    best = TrainConfig.load(exp / "best_config.yaml")
    assert (best.lr, best.batch_size, best.optimizer) == (best_row["lr"], best_row["batch_size"], best_row["optimizer"])
    assert best.epochs == 2 and best.data == "synthetic"
    # the Optuna study in optuna.db saw every trial: finished ones with the objective as their value
    study = optuna.load_study(study_name="exp", storage=f"sqlite:///{exp / 'optuna.db'}")
    assert len(study.trials) == 4
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    finished = trials[trials["status"] == "finished"]
    assert sorted(round(t.value, 6) for t in complete) == sorted(round(v, 6) for v in finished["objective"])
    # the console: one line per trial and a summary naming the files
    assert len(trial_lines(out)) == 4
    assert "trials.csv" in out and "best_config.yaml" in out


def test_custom_space_random_sampler_and_storage_are_honoured(cli, tmp_path):
    space = "lr: {low: 0.01, high: 0.02}\nbatch_size: [256]\nepochs: 2\noptimizer: [adam]\n"
    storage = tmp_path / "shared-storage"
    status, _, err = run(cli, tmp_path, "--samples", "3", "--space", space_file(tmp_path, space), "--sampler", "random",
                         "--no-baseline", "--storage", str(storage))
    assert status == 0, err
    # Ray's checkpoints went to --storage, in a folder of this experiment's own
    assert len(list((storage / "exp" / "attempt-1").glob("*/checkpoint_*/state.pt"))) == 3
    assert not (tmp_path / "results" / "exp" / "ray").exists()
    trials = pd.read_csv(tmp_path / "results" / "exp" / "trials.csv")
    assert len(trials) == 3
    assert (trials["lr"].between(0.01, 0.02).all() and set(trials["batch_size"]) == {256}
            and set(trials["optimizer"]) == {"adam"})
    assert len(set(trials["lr"])) == 3  # sampled, not repeated


def test_baseline_runs_first_in_full_and_is_marked(cli, tmp_path):
    # ASHA from epoch 1 on, keeping half: the baseline is the worst trial, yet it runs to the end.
    # ASHA is asynchronous: a trial is stopped at a rung only if it is below the median of the
    # results that reached the rung BEFORE it, so which trials it stops depends on the order in
    # which they get there. One trial at a time (--max-concurrent 1) fixes that order: the
    # baseline, then the space's center (the list's first lr, 0.03: 80% after one epoch on the
    # synthetic set), then the sampler's own trials (seed 0 draws at least one hopeless lr of
    # 1e-6..4e-6: chance, 10%, after its epoch 1). A hopeless trial then meets a rung holding the
    # baseline (10%) and the center (80%), whose median (45%) it is far below on any machine, in
    # fp32 or bf16: it is stopped after epoch 1, before the stall rule could judge it at epoch 2.
    space = ("lr: [0.03, 1.0e-6, 2.0e-6, 4.0e-6]\nbatch_size: [128]\nepochs: 3\noptimizer: [nesterov]\n"
             "momentum: 0.9\n")
    status, out, err = run(cli, tmp_path, "--samples", "5", "--space", space_file(tmp_path, space), "--stopping",
                           "asha", "--grace-period", "1", "--reduction-factor", "2", "--max-concurrent", "1")
    assert status == 0, err
    trials = pd.read_csv(tmp_path / "results" / "exp" / "trials.csv")
    baseline = trials[trials["baseline"]]
    assert len(baseline) == 1 and baseline.iloc[0]["number"] == 1
    row = baseline.iloc[0]
    assert (row["lr"], row["batch_size"], row["optimizer"], row["epochs"]) == (1e-3, 64, "sgd", 10)
    assert row["epochs_run"] == 10 and row["status"] == "finished"
    assert "Baseline  trial  1" in out
    # Optuna has every trial: the baseline as a finished trial of its own (its momentum and weight
    # decay of 0 lie outside the space and are named), the early-stopped ones as PRUNED with the
    # objective of each epoch they ran, and the challenge's constraints on each
    study = optuna.load_study(study_name="exp", storage=f"sqlite:///{tmp_path / 'results' / 'exp' / 'optuna.db'}")
    assert len(study.trials) == 5
    (base_trial,) = [t for t in study.trials if t.user_attrs.get("baseline")]
    assert base_trial.state == optuna.trial.TrialState.COMPLETE and len(base_trial.intermediate_values) == 10
    # this space cannot hold them, and the baseline does not share its fixed epochs and momentum
    assert base_trial.user_attrs["outside_space"] == {"lr": 1e-3, "optimizer": "sgd", "batch_size": 64,
                                                      "epochs": 10, "momentum": 0.0}
    stopped = trials[trials["status"] == "early-stopped"]
    assert (stopped["lr"] < 1e-5).all() and (stopped["epochs_run"] == 1).all(), stopped[["number", "lr"]]
    # a later hopeless trial may tie with the rung's median (all at chance) and run on to be stopped
    # as stalled at epoch 2 instead: both reach Optuna as PRUNED
    ended_early = trials[trials["status"].isin(["early-stopped", "stalled"])]
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(stopped) >= 1 and len(pruned) == len(ended_early)
    assert sorted(len(t.intermediate_values) for t in pruned) == sorted(ended_early["epochs_run"])
    assert all(any(k.startswith("constraints") for k in t.system_attrs) for t in study.trials)


def test_asha_judges_each_trial_at_the_same_share_of_its_own_schedule(cli, tmp_path):
    # The default rungs are by schedule progress: with --grace-period 50%, a 2-epoch trial is
    # judged after epoch 1 and a 4-epoch trial after epoch 2, never a 4-epoch trial at epoch 1.
    # One trial at a time, so rungs fill in the seeded sampler's order; learning rates over two
    # decades give rung values far apart, so some trials fall below the rung's median.
    space = ("lr: {low: 3.0e-4, high: 0.03, log: true}\nbatch_size: [128]\nepochs: [2, 4]\noptimizer: [nesterov]\n"
             "momentum: 0.9\n")
    status, _, err = run(cli, tmp_path, "--samples", "8", "--space", space_file(tmp_path, space), "--no-baseline",
                         "--max-concurrent", "1", "--sampler", "random", "--stopping", "asha", "--grace-period",
                         "50%", "--reduction-factor", "2")
    assert status == 0, err
    trials = pd.read_csv(tmp_path / "results" / "exp" / "trials.csv")
    stopped = trials[trials["status"] == "early-stopped"]
    assert set(stopped["epochs"]) == {2, 4}  # both lengths were judged
    assert (stopped["epochs_run"] * 2 == stopped["epochs"]).all(), stopped[["epochs", "epochs_run"]]


def test_a_quarter_gpu_per_trial_runs_four_trials_at_once(cli, tmp_path, monkeypatch, no_shared_ray):
    # One logical GPU (no CUDA needed): scheduling is what is tested. Every trial waits after its
    # epoch 1 until the test releases it, and the test releases them only once four are waiting at
    # the same time: that happens only if four trials hold a quarter of the GPU each at once,
    # however fast or slow the machine starts and trains them.
    import threading
    import time

    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv(HOLD_ENV, f"1:0:{markers}")
    four_waiting = threading.Event()

    def release_when_four_wait() -> None:
        deadline = time.monotonic() + 600  # a broken scheduler fails the test instead of hanging it
        while time.monotonic() < deadline and not (markers / "arrived-3").exists():
            time.sleep(0.05)
        if (markers / "arrived-3").exists():
            four_waiting.set()
        (markers / "release").touch()

    watcher = threading.Thread(target=release_when_four_wait, daemon=True)
    watcher.start()
    space = "lr: {low: 1.0e-3, high: 1.0e-2}\nbatch_size: [32]\nepochs: 2\noptimizer: [sgd]\n"
    status, _, err = cli(
        search,
        ["--data", "synthetic", "--results-dir", str(tmp_path / "results"), "--name", "gpu", "--num-cpus", "2",
         "--num-gpus", "1", "--gpus-per-trial", "0.25", "--cpus-per-trial", "0.5", "--samples", "4", "--no-baseline",
         "--no-early-stop", "--space", space_file(tmp_path, space)],
    )
    watcher.join()
    assert status == 0, err
    assert four_waiting.is_set(), "four trials never waited at once"
    records = Journal(tmp_path / "results" / "gpu").read()
    assert len({r["trial"] for r in records if r["event"] == "end"}) == 4


def test_finished_experiment_is_not_overwritten(cli, tmp_path):
    argv = ("--samples", "1", "--space", space_file(tmp_path), "--no-baseline")
    assert run(cli, tmp_path, *argv)[0] == 0
    exp = tmp_path / "results" / "exp"
    before = (exp / "trials.csv").read_text()
    status, _, err = run(cli, tmp_path, *argv)
    assert status == 2 and "is a finished experiment; use --restart" in err and len(err.strip().splitlines()) == 1
    assert (exp / "trials.csv").read_text() == before
    # --restart with bad input: exit 2, and the finished experiment stays where it was
    status, _, err = cli(search, ["--data", "/no/such/folder", "--results-dir", str(tmp_path / "results"), "--name",
                                  "exp", *argv, "--restart"])
    assert status == 2 and (exp / "trials.csv").read_text() == before
    assert not [p for p in (tmp_path / "results").iterdir() if ".replaced-" in p.name]
    status, out, err = run(cli, tmp_path, *argv, "--restart")
    assert status == 0, err
    kept = [p for p in (tmp_path / "results").iterdir() if p.name.startswith("exp.replaced-")]
    assert len(kept) == 1 and (kept[0] / "trials.csv").read_text() == before
    # the command that would resume it does not restart it again
    assert "--restart" not in json.loads((exp / "experiment.json").read_text())["command"]


def test_experiment_json_records_the_command(cli, tmp_path):
    assert run(cli, tmp_path, "--samples", "1", "--space", space_file(tmp_path), "--no-baseline")[0] == 0
    meta = json.loads((tmp_path / "results" / "exp" / "experiment.json").read_text())
    assert meta["status"] == "finished" and meta["samples"] == 1
    assert meta["command"].startswith("python tuning/search.py ") and "--name exp" in meta["command"]


CHALLENGE_SPACE = """
lr: {low: 0.01, high: 0.03, log: true}
batch_size: [128]
epochs: 8
optimizer: [nesterov]
momentum: 0.9
"""


def test_synthetic_search_meets_the_challenge_and_the_baseline_does_not(cli, tmp_path):
    status, out, err = run(cli, tmp_path, "--samples", "3", "--space", space_file(tmp_path, CHALLENGE_SPACE),
                           "--no-early-stop", "--confirm-seeds", "1")
    assert status == 0, err
    exp = tmp_path / "results" / "exp"
    trials = pd.read_csv(exp / "trials.csv")
    baseline = trials[trials["baseline"]].iloc[0]
    assert baseline["epochs"] == 10 and baseline["lr"] == 1e-3  # the tutorial's run, not the space's 8 epochs
    assert not baseline["challenge_met"] and baseline["train_loss"] >= baseline["test_loss"]
    best = trials[trials["rank"] == 1].iloc[0]
    assert (best["challenge_met"] and not best["baseline"]
            and best["train_loss"] < best["test_loss"] - 2 * best["test_loss_se"])
    assert ("Challenge (train loss below test loss by more than 2 standard errors, still falling, above chance): "
            "met by") in out
    assert "(the tutorial's configuration)" in out and "challenge not met (train_loss" in out and "(2 SE)" in out
    assert best_config_header(exp).startswith("# Best trial of experiment exp")
    assert "# confirmed with 1 new seeds; test_accuracy" in best_config_header(exp)
    assert "lucky seed" in best_config_header(exp)
    # --confirm-seeds: the winner re-trained with a new seed, written beside best_config.yaml
    confirm = pd.read_csv(exp / "confirm.csv")
    assert confirm["seed"].tolist() == [43] and "Confirmation: 1 new seeds" in out
    # ... and the report drawn from it all
    page = (exp / "report" / "index.html").read_text()
    assert "Challenge met</b>" in page and "Confirmed with new seeds" in page
    assert all((exp / "report" / f).exists() for f in ("learning_curves.png", "progress.png", "convergence.png",
                                                                "what_mattered.png"))


def test_smoke_test_runs_three_trials_of_two_epochs(cli, tmp_path):
    status, out, err = cli(search, ["--smoke-test", "--results-dir", str(tmp_path / "results"), "--name", "smoke",
                                    "--num-cpus", "2"])
    assert status == 0, err
    trials = pd.read_csv(tmp_path / "results" / "smoke" / "trials.csv")
    assert len(trials) == 3 and set(trials["epochs"]) == {2}
    assert trials[trials["baseline"]].iloc[0]["lr"] == 1e-3  # the tutorial's hyperparameters, for 2 epochs
    assert (tmp_path / "results" / "smoke" / "report" / "index.html").exists()


def best_config_header(exp) -> str:
    return (exp / "best_config.yaml").read_text()


def test_time_budget_stops_the_search_and_keeps_what_finished(cli, tmp_path, monkeypatch):
    # The first trial runs to its end; every other one waits after its first epoch, so the search
    # cannot end by itself and the budget must cut it, on a fast machine or a slow one. The budget
    # leaves a slow machine ample time to start Ray and train one tiny trial.
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv(HOLD_ENV, f"1:1:{markers}")
    space = "lr: {low: 0.01, high: 0.03}\nbatch_size: [256]\nepochs: 2\noptimizer: [sgd]\n"
    status, out, err = run(cli, tmp_path, "--samples", "50", "--space", space_file(tmp_path, space), "--no-baseline",
                           "--no-early-stop", "--time-budget", "30")
    assert status == 0, err
    trials = pd.read_csv(tmp_path / "results" / "exp" / "trials.csv")
    assert 2 <= len(trials) < 50 and "Time budget of 30 s reached" in out
    assert (trials["status"] == "finished").sum() == 1 and (trials["status"] == "interrupted").sum() >= 1
    assert "Continue with:" in out and "--name exp" in out
    meta = json.loads((tmp_path / "results" / "exp" / "experiment.json").read_text())
    assert meta["status"] == "interrupted"  # the same command continues it
    # the trials the budget stopped are not left RUNNING in the Optuna study
    study = optuna.load_study(study_name="exp", storage=f"sqlite:///{tmp_path / 'results' / 'exp' / 'optuna.db'}")
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    # one ranking: the summary, best_config.yaml, trials.csv and the report name the same winner,
    # the finished trial (interrupted trials have no final result to rank)
    winner = trials[trials["status"] == "finished"].iloc[0]
    assert trials[trials["rank"] == 1]["trial"].tolist() == [winner["trial"]]
    assert f"Best      trial {winner['number']:>2} ({winner['trial']})" in out
    header = best_config_header(tmp_path / "results" / "exp")
    assert header.startswith(f"# Best trial of experiment exp: {winner['trial']} ")
    page = (tmp_path / "results" / "exp" / "report" / "index.html").read_text()
    assert f"Best: trial {winner['number']} " in page


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "gp", "qmc"])
def test_every_sampler_can_search_the_default_space(sampler):  # no Ray: the shared one is started all the same
    from tuning.space import default_space
    from tuning.study import make_sampler

    space = default_space()
    study = optuna.create_study(sampler=make_sampler(sampler, seed=0), direction="maximize")
    for _ in range(8):  # past the samplers' start-up trials
        trial = study.ask()
        values = space.suggest(trial)
        study.tell(trial, -abs(values["lr"] - 0.02))
    assert len(study.trials) == 8
    assert all(1e-4 <= t.params["lr"] <= 0.15 for t in study.trials)  # the two families' lr ranges


def test_a_ray_trial_flushes_subnormal_floats(tmp_path, no_shared_ray):
    """Inside a trial's own Ray worker process, not only in the driver."""
    import ray
    import torch
    from ray import tune

    from trainable.data import make_synthetic
    from tuning.engine.trial import TrialSetup, train_trial

    def trial(config, data):
        torch.set_flush_denormal(False)  # a fresh worker's default
        train_trial(config, data=data, setup=TrialSetup(base=TrainConfig(data="synthetic", epochs=1).to_dict(),
                                                        objective="test_accuracy", challenge_window=3, threads=1))
        tune.report({"flushed": bool(((torch.full((1 << 20,), 1e-39) * 0.5) == 0).all())})

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(tune.with_parameters(trial, data=make_synthetic(seed=0)),
                           run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0))
        result = tuner.fit()[0]
    finally:
        ray.shutdown()
    assert result.error is None and result.metrics["flushed"] is True
