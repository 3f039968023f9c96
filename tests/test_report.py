"""tuning/report.py: tables from a hand-made experiment journal, figures smoke-rendered, clear errors."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest

from tuning.commands.report import main as report
from tuning.results.report import (
    FIGURES,
    convergence_table,
    curves_table,
    lr_table,
    progress_table,
    top_trials,
    write_report,
)

# One row per trial: how it ended (its epochs are below)
TRIALS = """trial,number,baseline,lr,batch_size,epochs,optimizer,momentum,weight_decay,schedule,error
a,1,True,0.001,64,3,sgd,0.0,0.0,constant,
b,2,False,0.02,256,3,nesterov,0.9,1e-4,cosine,
c,3,False,0.0005,128,3,adam,0.9,0.0,constant,
d,4,False,5.0,64,3,sgd,0.9,0.0,constant,
e,5,False,0.01,512,3,adamw,0.9,0.0,constant,RuntimeError: injected fault at epoch 1 (test)
f,6,False,0.01,128,3,sgd,0.9,0.0,constant,
"""
EPOCHS = """trial,epoch,train_loss,train_accuracy,test_loss,test_accuracy,test_loss_se,epoch_seconds,diverged,\
train_below_test,still_decreasing,above_chance,challenge_met,crossing_epoch
a,1,2.28,0.12,2.26,0.18,0.01,3,False,False,False,True,False,
a,2,2.10,0.22,2.05,0.25,0.01,3,False,False,False,True,False,
a,3,1.95,0.30,1.93,0.31,0.01,3,False,False,True,True,False,
b,1,1.90,0.35,1.70,0.40,0.01,2,False,False,False,True,False,
b,2,1.40,0.50,1.45,0.48,0.01,2,False,True,False,True,False,2
b,3,1.10,0.60,1.30,0.53,0.01,2,False,True,True,True,True,2
c,1,2.00,0.25,1.90,0.33,0.01,2,False,False,False,True,False,
d,1,2.30,0.10,2.20,0.12,0.01,1.5,False,False,False,False,False,
d,2,,0.10,,0.10,,1.5,True,False,False,False,False,
f,1,1.95,0.30,1.80,0.36,0.01,2,False,False,False,True,False,
f,2,1.50,0.45,1.55,0.44,0.01,2,False,True,False,True,False,2
f,3,1.20,0.57,1.35,0.50,0.01,2,False,True,True,True,True,3
"""
META = {"name": "hand", "command": "python tuning/search.py --samples 6 --name hand", "samples": 6,
        "objective": "test_accuracy", "metric": "objective", "mode": "max", "challenge_window": 1,
        "space": {"lr": "0.0001 .. 0.3 (log)"}, "status": "finished"}


def write_journal(exp, trials_csv=TRIALS, epochs_csv=EPOCHS):
    """The journal a search would have written for these trials and epochs."""
    import io

    from tuning.results.journal import Journal

    journal = Journal(exp)
    trials, epochs = pd.read_csv(io.StringIO(trials_csv)), pd.read_csv(io.StringIO(epochs_csv))
    for _, t in trials.iterrows():
        params = {k: t[k].item() if hasattr(t[k], "item") else t[k]
                  for k in ("lr", "batch_size", "epochs", "optimizer", "momentum", "weight_decay", "schedule")}
        config = {**params, "seed": 42, "precision": "auto", "hidden": [512, 512], "data": "synthetic",
                  "data_root": "data"}
        journal.append("trial", trial=t["trial"], number=int(t["number"]), params=params, config=config,
                       baseline=bool(t["baseline"]))
        for _, m in epochs[epochs["trial"] == t["trial"]].iterrows():
            metrics = {k: (None if pd.isna(v) else (v.item() if hasattr(v, "item") else v))
                       for k, v in m.items() if k != "trial"}
            metrics["objective"] = -1.0 if metrics["diverged"] else metrics["test_accuracy"]
            journal.append("epoch", trial=t["trial"], **metrics)
        journal.append("end", trial=t["trial"], error=None if pd.isna(t["error"]) else t["error"])


@pytest.fixture
def hand_made(tmp_path):
    exp = tmp_path / "hand"
    exp.mkdir()
    write_journal(exp)
    (exp / "experiment.json").write_text(json.dumps(META))
    (exp / "best_config.yaml").write_text("lr: 0.02\nbatch_size: 256\n")
    return exp


def tables(exp):
    from tuning.results.experiment import Experiment
    from tuning.results.report import read_tables

    return read_tables(Experiment.load(exp))


def test_top_k_is_best_objective_first_without_errored(hand_made):
    trials, _ = tables(hand_made)
    # the two meeting the challenge first (most accurate first), then the others by accuracy
    assert top_trials(trials, 3)["trial"].tolist() == ["b", "f", "c"]
    assert top_trials(trials, 10)["trial"].tolist() == ["b", "f", "c", "a"]  # not diverged d, errored e


def test_curves_are_the_top_trials_and_the_baseline(hand_made):
    trials, epochs = tables(hand_made)
    curves = curves_table(trials, epochs, "max", 2)
    assert curves.groupby("trial", sort=False).size().to_dict() == {"b": 3, "f": 3, "a": 3}
    assert curves[curves["trial"] == "a"]["label"].iloc[0] == "trial 1 (tutorial baseline)"
    assert curves[curves["trial"] == "b"]["crossing_epoch"].iloc[0] == 2


def test_progress_keeps_the_best_so_far_and_the_statuses(hand_made):
    trials, _ = tables(hand_made)
    progress = progress_table(trials, "max")
    assert progress["number"].tolist() == [1, 2, 3, 4, 5, 6]
    assert progress["best_so_far"].tolist() == [0.31, 0.53, 0.53, 0.53, 0.53, 0.53]
    assert math.isnan(progress["objective"][4]) and progress["status"][4] == "errored"
    assert progress["status"][3] == "diverged"


def test_convergence_is_the_best_answer_so_far_by_trial_epochs_spent(hand_made):
    from tuning.results.experiment import Experiment

    exp = Experiment.load(hand_made)
    table = convergence_table(exp)
    # in the order the trials ended (here their start order), epochs counted as they were reported
    assert table["number"].tolist() == [1, 2, 3, 4, 5, 6]
    assert table["trial_epochs"].tolist() == [3, 6, 7, 9, 9, 12]
    # no standard error in this journal: the noise is 0 and every rise of the best is beyond it
    assert table["best_so_far"].tolist() == [0.31, 0.53, 0.53, 0.53, 0.53, 0.53]
    assert table["objective"].isna().tolist() == [False, False, False, True, True, False]  # diverged, errored
    found = exp.convergence()
    assert (found.number, found.after, found.confirmed) == (2, 4, False)


def test_lr_table_has_every_trial_with_an_accuracy(hand_made):
    trials, _ = tables(hand_made)
    assert lr_table(trials)["number"].tolist() == [1, 2, 3, 4, 6]


def test_report_renders_with_diverged_and_errored_trials(hand_made):
    page = write_report(hand_made, top=3)
    for name in FIGURES:
        data = (hand_made / "report" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
    text = page.read_text()
    assert "Challenge met</b> by 2 of 6 trials" in text
    assert "Baseline, the base configuration (trial 1)" in text and "challenge not met (" in text
    assert "injected fault at epoch 1" in text  # the errored trial's message, in the table
    assert "python tuning/search.py --samples 6 --name hand" in text
    assert text.count("data:image/png;base64,") == len(FIGURES) == 4  # self-contained
    assert "lr: 0.02" in text


def test_report_works_on_a_copied_folder(hand_made, tmp_path):
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(hand_made, copy)
    write_report(copy)
    assert (copy / "report" / "index.html").exists()


def test_missing_or_empty_experiment_is_one_clear_error(cli, tmp_path):
    status, _, err = cli(report, [str(tmp_path / "nope")])
    assert status == 2 and "no such experiment folder" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    status, _, err = cli(report, [str(tmp_path / "empty")])
    assert status == 2 and "not an experiment folder" in err and len(err.strip().splitlines()) == 1
    exp = tmp_path / "notrials"
    exp.mkdir()
    (exp / "experiment.json").write_text(json.dumps(META))
    status, _, err = cli(report, [str(exp)])
    assert status == 2 and "has no trials yet" in err


def _column(page_html: str, name: str) -> list[str]:
    """The cells of one column of the trials table, top to bottom, as the page shows them."""
    import re

    table = page_html[re.search("class=.trials.", page_html).start():]  # a browser's DOM dump quotes "trials"
    heads = [re.sub("<[^>]+>", "", h) for h in re.findall(r"<th[^>]*>(.*?)</th>", table)]
    col = heads.index(name)
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", table.split("</thead>", 1)[1].split("</table>", 1)[0])
    return [re.findall(r"<td[^>]*>(.*?)</td>", r)[col] for r in rows]


def test_trials_table_puts_results_first_and_marks_best_and_baseline(hand_made):
    text = write_report(hand_made).read_text()
    assert _column(text, "number") == ["2", "6", "3", "1", "4", "5"]  # by rank; diverged and errored last
    assert _column(text, "rank") == ["1", "2", "3", "4", "", ""]
    assert "<tr class='best'><td data-v='1'>1</td><td data-v='2'>2</td>" in text
    assert "<tr class='baseline'><td data-v='4'>4</td><td data-v='1'>1</td>" in text
    heads = text.split("<thead>", 1)[1].split("</thead>", 1)[0]
    assert heads.index(">test_accuracy<") < heads.index(">lr<")  # results before hyperparameters


@pytest.mark.slow
def test_trials_table_sorts_by_number_in_a_real_browser(hand_made, tmp_path):
    import shutil as sh
    import subprocess

    browser = sh.which("chromium") or sh.which("chromium-browser") or sh.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium installed (Debian: apt-get install chromium)")
    text = write_report(hand_made).read_text()
    heads = text.split("<thead>", 1)[1].split("</thead>", 1)[0].count("<th")
    lr, crossing = _column_index(text, "lr"), _column_index(text, "crossing_epoch")
    assert heads > crossing
    # a click on lr sorts ascending by value (0.0005 before 0.001: numbers, not text); then crossing_epoch,
    # whose empty cells go last whichever way it sorts
    clicks = (f"<script>const h = document.querySelectorAll('table.trials th'); "
              f"h[{lr}].click(); h[{crossing}].click();</script>")
    page = tmp_path / "clicked.html"
    page.write_text(text.replace("</body>", clicks + "</body>"))
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    assert _column(dom, "crossing_epoch") == ["2", "3", "", "", "", ""]
    assert _column(dom, "lr")[2:] == ["0.0005", "0.001", "0.01", "5"]  # the trials without a crossing, by lr ascending


def _column_index(page_html: str, name: str) -> int:
    import re

    heads = page_html.split("<thead>", 1)[1].split("</thead>", 1)[0]
    return [re.sub("<[^>]+>", "", h) for h in re.findall(r"<th[^>]*>(.*?)</th>", heads)].index(name)
