"""The noise-aware stopping rule and the convergence stop (tuning/noise.py, tuning/engine/schedulers.py):
the rule's two numbers on plain curves, then real searches whose trials can or cannot change the answer.

The searches run one trial at a time (--max-concurrent 1), so which trials have finished when a
trial is judged is the order the sampler proposed them in, not the machine's speed. The ones about
convergence use a user's own loop that reports a set level of test accuracy per trial (reached
linearly over its schedule): what a trial can reach is then known exactly, and the test asserts what
the search did with it."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pandas as pd
import pytest

from tests.drivers import running, signal_and_wait, wait_until_mid_search
from tuning.engine.hooks import HOLD_ENV
from tuning.noise import Curve, Ended, StoppingRule, converged_at, curve_of, objective_se, tied
from tuning.results.experiment import Experiment
from tuning.results.journal import EARLY_STOPPED, FINISHED, Journal
from tuning.search import main as search

SEARCH = str(Path(__file__).resolve().parent.parent / "tuning" / "search.py")
SE = 0.005  # the noise of a test accuracy near 55% on 10,000 images


def curve(values: list[float], epochs: int | None = None, se: float = SE) -> Curve:
    return Curve(epochs or len(values), list(values), [se] * len(values))


# --- the rule's two numbers ------------------------------------------------------------------------


def test_a_trial_that_cannot_beat_the_incumbent_by_more_than_the_noise_stops():
    incumbent = curve([0.40, 0.46, 0.50, 0.53, 0.55, 0.56, 0.57, 0.58])  # gained 0.12 from epoch 2 (25%) on
    rule = StoppingRule([incumbent])
    behind = rule.judge(curve([0.30, 0.45], epochs=8))  # 0.45 + 0.12 + SE = 0.575 <= 0.58 + SE
    assert not behind.go
    assert behind.potential == pytest.approx(0.45 + 0.12 + SE) and behind.bar == pytest.approx(0.58 + SE)
    ahead = rule.judge(curve([0.35, 0.47], epochs=8))  # 0.47 + 0.12 + SE = 0.595 > 0.585
    assert ahead.go and ahead.potential > ahead.bar
    # a copy of the incumbent can only tie it: it stops too, and so does anything worse
    assert not rule.judge(curve(incumbent.values[:4], epochs=8)).go


def test_gains_are_taken_at_the_same_share_of_each_schedule():
    # a 4-epoch trial that gained 0.2 from its epoch 1 (25%) to its end, and a 20-epoch one at 25%
    rule = StoppingRule([curve([0.30, 0.40, 0.45, 0.50])])
    at_quarter = curve([0.10, 0.15, 0.20, 0.25, 0.31], epochs=20)  # 5/20 = 25%: 0.31 + 0.20 + SE > 0.50 + SE
    assert rule.judge(at_quarter).go
    assert not rule.judge(curve([0.10, 0.15, 0.20, 0.25, 0.29], epochs=20)).go


def test_nothing_is_judged_before_the_grace_period_or_without_a_finished_trial():
    finished = curve([0.5, 0.55, 0.6, 0.65, 0.7, 0.72, 0.74, 0.76, 0.78, 0.8])
    assert StoppingRule([finished]).judge(curve([0.1], epochs=20)).go  # 5% of its schedule
    assert not StoppingRule([finished]).judge(curve([0.1, 0.1], epochs=20)).go  # 10%: judged
    assert StoppingRule([finished], grace=0.25).judge(curve([0.1, 0.1], epochs=20)).go  # --grace-period 25%
    assert StoppingRule([finished], grace_epochs=3).judge(curve([0.1, 0.1], epochs=8)).go  # --grace-period 3
    assert StoppingRule([]).judge(curve([0.1, 0.1], epochs=8)).go
    assert StoppingRule([curve([0.5, 0.6], epochs=4)]).finished == []  # not its whole schedule: no incumbent


def test_a_loss_objective_is_judged_the_same_way_round():
    # --objective test_loss: smaller is better; curves hold it negated, as the scheduler builds them
    epochs = [{"objective": v, "test_loss_se": 0.01} for v in (1.6, 1.4, 1.3, 1.2)]
    incumbent = curve_of(epochs, 4, "test_loss", "min")
    assert incumbent.values == [-1.6, -1.4, -1.3, -1.2] and incumbent.ses == [0.01] * 4
    rule = StoppingRule([incumbent])
    assert not rule.judge(curve_of([{"objective": 1.7, "test_loss_se": 0.01}], 4, "test_loss", "min")).go
    assert rule.judge(curve_of([{"objective": 1.5, "test_loss_se": 0.01}], 4, "test_loss", "min")).go


def test_the_objective_has_its_own_standard_error():
    assert objective_se({"test_accuracy_se": 0.004, "test_loss_se": 0.01}, "test_accuracy") == 0.004
    assert objective_se({"test_accuracy_se": 0.004, "test_loss_se": 0.01}, "test_loss") == 0.01
    assert objective_se({}, "test_accuracy") == 0.0


# --- ties and convergence over a whole search ------------------------------------------------------


def ended(values: list[float | None], se: float = SE) -> list[Ended]:
    return [Ended(i + 1, 10.0 * (i + 1), v, se) for i, v in enumerate(values)]


def test_a_search_of_ties_converges_at_its_first_result_and_is_confirmed_after_the_window():
    found = converged_at(ended([0.55, 0.552, 0.549, 0.553, 0.551, 0.554, 0.55, 0.552]), window=5, min_trials=8)
    assert (found.number, found.after, found.confirmed) == (1, 7, True)
    assert found.moved == pytest.approx(0.004) and found.noise == SE
    assert not converged_at(ended([0.55, 0.552, 0.549, 0.553]), window=5, min_trials=8).confirmed


def test_a_search_whose_best_still_climbs_has_not_converged():
    found = converged_at(ended([0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80]), window=5, min_trials=8)
    assert found.number == 9 and found.after == 0 and not found.confirmed
    # small steps add up: the search converged where the rest stayed within the noise of the best then
    found = converged_at(ended([0.50, 0.504, 0.508, 0.512, 0.516, None, 0.40]), window=2, min_trials=2)
    assert found.number == 4 and found.moved == pytest.approx(0.004)  # 0.516 <= 0.512 + 0.005


def test_ties_are_the_trials_within_the_best_s_noise():
    assert tied([(2, 0.553, SE), (3, 0.556, SE), (7, 0.549, SE), (9, 0.54, SE)], (3, 0.556, SE)) == [3, 2]
    assert tied([(2, 0.553, SE), (3, 0.556, SE)], (2, 0.553, SE)) == [3, 2]


# --- real searches ------------------------------------------------------------------------------------

# A user's loop that reports, for a trial whose `lr` is L, a test accuracy of L x epoch / epochs:
# what each trial can reach is set by the space, and its curve rises linearly to it. Its test set
# has 512 images (synthetic data), so a standard error of about 2 points near 50%.
LEVELS = '''
def train(config, data, report):
    for epoch in range(report.epoch + 1, config["epochs"] + 1):
        accuracy = config["lr"] * epoch / config["epochs"]
        report(train_loss=2.5 - accuracy, test_loss=2.6 - accuracy, test_accuracy=accuracy)


def climbing(trial):  # each trial reaches 6 points more than the last: every one may beat the best
    return {"lr": trial.suggest_float("lr", 0.3 + 0.06 * trial.number, 0.3 + 0.06 * trial.number), "epochs": 4}


def ties(trial):  # every trial reaches 60%: none can beat the first
    return {"lr": trial.suggest_float("lr", 0.6, 0.6), "epochs": 4}


def one_better(trial):  # 50%, then 30% (cannot beat it), then 70% (can), then 50% again
    level = [0.5, 0.3, 0.7, 0.5][trial.number % 4]
    return {"lr": trial.suggest_float("lr", level, level), "epochs": 8}
'''


@pytest.fixture
def levels(tmp_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "levels.py").write_text(LEVELS)
    monkeypatch.chdir(folder)
    return folder


def run_levels(cli, space: str, samples: int, *extra: str, name: str = "levels"):
    return cli(search, ["--loop", "levels.py:train", "--data", "synthetic", "--space", f"levels.py:{space}",
                        "--samples", str(samples), "--no-baseline", "--no-center", "--sampler", "random",
                        "--max-concurrent", "1", "--num-cpus", "2", "--results-dir", "results", "--name", name,
                        "--quiet", *extra])


def replay(exp: Experiment) -> dict[int, int | None]:
    """The rule applied to the journal's own record, trial by trial in the order they ran: the epoch
    each trial should have stopped at (None: run to its end)."""
    rule, stops = StoppingRule(), {}
    for t in sorted(exp.trials, key=lambda t: t.started):
        growing = Curve(t.config["epochs"])
        stops[t.number] = None
        for m in t.epochs:
            growing.add(m["objective"], m["objective_se"])
            if not rule.judge(growing).go:
                stops[t.number] = m["epoch"]
                break
        rule.add_finished(curve_of(t.epochs, t.config["epochs"], "test_accuracy", "max"))
    return stops


@pytest.mark.slow
@pytest.mark.smoke
@pytest.mark.usefixtures("shared_ray")
def test_a_trial_that_cannot_change_the_answer_stops_at_its_first_judgement_and_one_that_can_runs_on(cli, levels):
    status, _, err = run_levels(cli, "one_better", 4)
    assert status == 0, err
    exp = Experiment.load(levels / "results" / "levels")
    by_number = {t.number: t for t in exp.trials}
    assert [round(t.last["test_accuracy"], 4) for t in exp.trials] == [0.5, 0.0375, 0.7, 0.0625]
    # trial 2 (reaches 30%) at its first judgement, epoch 1 of 8 (12.5%, past the 10% grace): 3.75%
    # + the 43.75 points trial 1 gained from there + its noise (0.8 points) stays below 50% + trial 1's
    # noise (2.2 points); trial 3 (reaches 70%) can beat it and runs on; trial 4 (a copy of trial 1)
    # can only tie the incumbent, trial 3, and stops at once too
    assert [(by_number[n].status, len(by_number[n].epochs)) for n in (1, 2, 3, 4)] == \
        [(FINISHED, 8), (EARLY_STOPPED, 1), (FINISHED, 8), (EARLY_STOPPED, 1)]
    assert replay(exp) == {1: None, 2: 1, 3: None, 4: 1}  # what ran is what the rule says, epoch by epoch
    epochs = pd.read_csv(levels / "results" / "levels" / "epochs.csv")
    assert {"test_accuracy_se", "objective_se"} <= set(epochs.columns)
    se = epochs.loc[epochs["number"] == 1, "test_accuracy_se"].iloc[-1]
    assert se == pytest.approx(math.sqrt(0.5 * 0.5 / 512))


@pytest.mark.slow
@pytest.mark.usefixtures("shared_ray")
def test_until_converged_ends_a_search_of_ties_and_says_so(cli, levels):
    status, out, err = run_levels(cli, "ties", 20, "--until-converged")
    assert status == 0, err
    exp = Experiment.load(levels / "results" / "levels")
    # converged at trial 1; confirmed once 5 trials after it and 8 in all had ended
    assert len(exp.trials) == 8 and exp.status == "finished"
    assert [t.status for t in exp.trials] == [FINISHED] + [EARLY_STOPPED] * 7
    found = exp.convergence()
    assert (found.number, found.after, found.confirmed) == (1, 7, True)
    assert "Converged at trial 1" in out and "--until-converged stopped the search there" in out
    assert "Tied" not in out  # the copies stopped at their first judgement: no final result to tie with
    # the same command again: the finished experiment is not run again
    status, _, err = run_levels(cli, "ties", 20, "--until-converged")
    assert status == 2 and "finished experiment" in err
    assert len(Experiment.load(levels / "results" / "levels").trials) == 8


@pytest.mark.slow
@pytest.mark.usefixtures("shared_ray")
def test_until_converged_runs_on_while_the_best_still_climbs(cli, levels):
    status, out, err = run_levels(cli, "climbing", 9, "--until-converged")
    assert status == 0, err
    exp = Experiment.load(levels / "results" / "levels")
    assert len(exp.trials) == 9 and all(t.status == FINISHED for t in exp.trials)
    assert exp.best.number == 9 and not exp.convergence().confirmed
    assert "Converged at trial 9" in out and "no trial after it yet" in out
    assert len(Journal(levels / "results" / "levels").times("end")) == 9


# Trial 1 climbs to 90% but waits after its first epoch until `release` exists; the trials after it
# reach 60% each, a tie, at once. The test releases trial 1 once 8 trials have ended: by then the
# convergence test has stopped proposing trials, and trial 1 then moves the best after that.
LATE = '''
import os, time

def train(config, data, report):
    for epoch in range(report.epoch + 1, config["epochs"] + 1):
        report(train_loss=2.5, test_loss=2.6, test_accuracy=config["lr"] * epoch / config["epochs"])
        deadline = time.monotonic() + 300  # never hang a test run: the test fails instead
        while config["lr"] > 0.8 and epoch == 1 and not os.path.exists(RELEASE) and time.monotonic() < deadline:
            time.sleep(0.05)

def late(trial):
    level = 0.9 if trial.number == 0 else 0.6
    return {"lr": trial.suggest_float("lr", level, level), "epochs": 4}
'''


@pytest.mark.slow
@pytest.mark.usefixtures("shared_ray")
def test_a_trial_still_running_when_the_search_converged_ends_it_without_reviving_it(cli, levels):
    import threading
    import time

    release = levels / "release"
    (levels / "late.py").write_text(LATE.replace("RELEASE", repr(str(release))))
    folder = levels / "results" / "late"

    def release_after_eight_ends() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not release.exists():
            if (folder / "journal.jsonl").exists() and len(Journal(folder).times("end")) >= 8:
                release.touch()
            time.sleep(0.05)

    releaser = threading.Thread(target=release_after_eight_ends, daemon=True)
    releaser.start()
    status, out, err = cli(search, ["--loop", "late.py:train", "--data", "synthetic", "--space", "late.py:late",
                                    "--samples", "20", "--no-baseline", "--no-center", "--sampler", "random",
                                    "--max-concurrent", "2", "--num-cpus", "2", "--results-dir", "results",
                                    "--name", "late", "--quiet", "--until-converged"])
    release.touch()
    assert status == 0, err
    exp = Experiment.load(folder)
    # trials 2-9 tied at 60% and ended; the convergence test proposed no 10th; trial 1 then ran on
    assert len(exp.trials) == 9 and exp.status == "finished" and all(t.done for t in exp.trials)
    assert exp.best.number == 1 and round(exp.best.last["test_accuracy"], 3) == 0.9
    assert "still running when --until-converged stopped proposing trials" in out
    assert len(Journal(folder).times("end")) == 9


@pytest.mark.heavy  # a driver process killed and resumed: test_reliability.py keeps one in the default run
@pytest.mark.usefixtures("shared_ray")
def test_a_search_killed_mid_way_resumes_with_the_same_decisions(cli, levels, tmp_path):
    # trial 1 (50%) finishes, trial 2 (30%) is stopped at its epoch 1; trial 3 (70%) then waits after
    # its epoch 3 (HPTUNE_HOLD_TRIALS: the first trial to get there goes on) and the command is killed
    argv = ["--loop", "levels.py:train", "--data", "synthetic", "--space", "levels.py:one_better", "--samples", "6",
            "--no-baseline", "--no-center", "--sampler", "random", "--max-concurrent", "1", "--num-cpus", "2",
            "--results-dir", "results", "--name", "killed", "--quiet"]
    exp_dir, markers, log = levels / "results" / "killed", tmp_path / "markers", tmp_path / "first-run.log"
    markers.mkdir()
    with running(log, [SEARCH, *argv], env={HOLD_ENV: f"3:1:{markers}"}) as proc:
        wait_until_mid_search(exp_dir, proc)
        signal_and_wait(proc, signal.SIGKILL, log)
    before = {t.number: (t.status, len(t.epochs)) for t in Experiment.load(exp_dir).trials if t.done}
    assert before == {1: (FINISHED, 8), 2: (EARLY_STOPPED, 1)}
    status, _, err = cli(search, argv)
    assert status == 0, err
    exp = Experiment.load(exp_dir)
    # exactly 6 trials; the stopped one stays stopped, the cut one ran on from its checkpoint and the
    # rest were judged as an uninterrupted search judges them (levels 50, 30, 70, 50, 50, 30%)
    assert [(t.number, t.status, len(t.epochs)) for t in exp.trials] == [
        (1, FINISHED, 8), (2, EARLY_STOPPED, 1), (3, FINISHED, 8), (4, EARLY_STOPPED, 1), (5, EARLY_STOPPED, 1),
        (6, EARLY_STOPPED, 1)]
    assert replay(exp) == {1: None, 2: 1, 3: None, 4: 1, 5: 1, 6: 1}
    ours = {alias: t.number for t in exp.trials for alias in (t.trial, *t.aliases)}
    ends = [ours[r["trial"]] for r in Journal(exp_dir).read() if r["event"] == "end"]
    assert sorted(ends) == [1, 2, 3, 4, 5, 6]  # one end each: none stopped twice, none revived
    assert len(pd.read_csv(exp_dir / "trials.csv")) == 6
