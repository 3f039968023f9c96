"""The tools users already open, on a real search: TensorBoard (--tensorboard) and optuna-dashboard,
and what the console shows (plain lines when not a terminal, --quiet, the live line on a terminal).

One small synthetic search with the tutorial's baseline and early stopping is shared by the
TensorBoard and dashboard tests: a real local Ray (its temp folder inside pytest's) and a real
SQLite-backed Optuna study.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import tempfile
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import optuna
import pandas as pd
import pytest

from tests.conftest import ensure_shared_ray
from tests.drivers import trial_lines
from tuning.search import main as search

pytestmark = pytest.mark.slow

# The fixture's search needs trials of both kinds the dashboard must show, finished and early-stopped,
# in any order of events. ASHA (from epoch 1 on, keeping half) stops a trial only if it is below the
# median of the results that reached the rung before it, so the trials run one at a time
# (--max-concurrent 1), in a fixed order: the baseline (SGD lr 1e-3: 10%, chance, after epoch 1),
# which runs to its end, then the space's center (Adam lr 9.5e-4: 80% after epoch 1), then the random
# sampler's own (seed 0): an SGD trial (lr at most 0.03, 8 steps an epoch) stays near chance after
# epoch 1, far below the rung's median of 45% on any machine, and is stopped there. The tutorial's values (lr
# 1e-3, sgd) lie inside the space, so Optuna can hold the baseline.
SPACE = """
lr: {low: 3.0e-5, high: 3.0e-2, log: true}
batch_size: [256]
epochs: 4
optimizer: [adam, sgd]
"""


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> dict:
    """A finished 6-trial search with --tensorboard: its folder, trials.csv and console output."""
    tmp = tmp_path_factory.mktemp("search")
    (tmp / "space.yaml").write_text(SPACE)
    argv = ["--data", "synthetic", "--results-dir", str(tmp / "results"), "--name", "tools", "--num-cpus", "2",
            "--samples", "6", "--space", str(tmp / "space.yaml"), "--sampler", "random",
            "--stopping", "asha", "--grace-period", "1", "--reduction-factor", "2", "--max-concurrent", "1",
            "--tensorboard"]
    out, err = io.StringIO(), io.StringIO()
    ensure_shared_ray()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = search(argv)
    assert status == 0, err.getvalue()
    exp = tmp / "results" / "tools"
    trials = pd.read_csv(exp / "trials.csv")
    # the fixture is only useful with both kinds of trial the dashboard must show
    assert {"finished", "early-stopped"} <= set(trials["status"]) <= {"finished", "early-stopped", "stalled"}, \
        trials[["number", "status", "lr"]]
    return {"exp": exp, "trials": trials, "out": out.getvalue()}


# --- the console, not a terminal ---------------------------------------------------------------


def test_not_a_terminal_gives_one_plain_line_per_trial_and_no_live_line(searched):
    out = searched["out"]
    assert "\r" not in out and "trials done |" not in out
    assert len(trial_lines(out)) == 6
    assert "tensorboard:" in out  # the summary names the folder


def test_quiet_prints_only_the_summary(cli, tmp_path, shared_ray):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {low: 0.01, high: 0.02}\nbatch_size: [256]\nepochs: 1\noptimizer: [adam]\n")
    argv = ["--data", "synthetic", "--results-dir", str(tmp_path / "results"), "--name", "q", "--num-cpus", "2",
            "--samples", "2", "--no-baseline", "--space", str(space), "--quiet"]
    status, out, err = cli(search, argv)
    assert status == 0, err
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[0].startswith("Search q: 2 trials (2 finished)")  # nothing before the summary
    assert not any(line.startswith("[") or "loaded in" in line for line in lines)
    assert any(line.strip().startswith("trials:") for line in lines)


def test_a_terminal_gets_the_live_line_with_the_time_left_and_the_trial_lines_above_it(tmp_path):
    from tests.test_progress import ROOT, run_in_terminal

    folder = tempfile.mkdtemp(prefix="hpt-ray-")  # Ray's temp folder, short for its socket paths
    try:
        argv = [str(ROOT / "tuning" / "search.py"), "--smoke-test", "--num-cpus", "2",
                "--results-dir", str(tmp_path), "--name", "tty"]
        out = run_in_terminal(argv, env={"RAY_TMPDIR": folder})
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    segments = out.replace("\r\n", "\n").replace("\n", "\r").split("\r")  # every state the line was drawn in
    states = [seg.strip() for seg in segments if "trials done |" in seg]
    assert any(" running | " in s and s.endswith(" left") for s in states), states  # an estimate was shown
    assert states[-1].startswith("3/3 trials done") and states[-1].endswith("all done")
    shown = [line.rstrip("\r").split("\r")[-1] for line in out.split("\n")]
    assert len(trial_lines("\n".join(shown))) == 3  # the plain trial lines, kept above the live line
    assert any(line.startswith("Search tty: 3 trials") for line in shown)


def test_quiet_and_verbose_together_is_a_usage_error(cli, tmp_path):
    status, out, err = cli(search, ["--data", "synthetic", "--results-dir", str(tmp_path), "--quiet", "--verbose"])
    assert status == 2 and err.count("\n") == 1 and "--quiet" in err and "Traceback" not in err
    assert not any(p.is_dir() for p in tmp_path.iterdir())  # no experiment folder was made


# --- TensorBoard ----------------------------------------------------------------------------------


def test_tensorboard_has_every_trials_metrics_per_epoch_and_its_hyperparameters(searched):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    exp, trials = searched["exp"], searched["trials"]
    epochs = pd.read_csv(exp / "epochs.csv")
    runs = sorted(p.name for p in (exp / "tensorboard").iterdir())
    assert runs == [f"trial-{n:03d}" for n in sorted(trials["number"])]  # one run per trial, named by its number
    for _, t in trials.iterrows():
        acc = EventAccumulator(str(exp / "tensorboard" / f"trial-{t['number']:03d}"))
        acc.Reload()
        assert {"train_loss", "test_loss", "test_accuracy", "train_accuracy", "objective"} <= set(acc.Tags()["scalars"])
        mine = epochs[epochs["trial"] == t["trial"]].sort_values("epoch")
        for name in ("train_loss", "test_loss", "test_accuracy"):  # the epoch is the step; values as in epochs.csv
            logged = acc.Scalars(name)
            assert [e.step for e in logged] == mine["epoch"].tolist()
            assert [e.value for e in logged] == pytest.approx(mine[name].tolist(), rel=1e-6)
        # TensorBoard's HPARAMS tab: the trial's hyperparameters, and the metrics listed beside them
        content = acc.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
        assert start.hparams["lr"].number_value == pytest.approx(t["lr"])
        assert start.hparams["optimizer"].string_value == t["optimizer"]
        assert start.hparams["baseline"].string_value == str(bool(t["baseline"]))
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        assert {"test_accuracy", "objective"} <= {m.name.tag for m in experiment.metric_infos}


# --- optuna-dashboard -------------------------------------------------------------------------------


def wsgi_get(app, path: str) -> tuple[str, bytes]:  # noqa: ANN001 - a WSGI application
    """One GET request to a WSGI application, in this process, as a server would make it."""
    environ: dict = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    started: dict = {}
    body = b"".join(app(environ, lambda status, headers, exc_info=None: started.update(status=status)))
    return started["status"], body


def dashboard_trials(exp: Path) -> tuple[list[dict], object]:
    """The study of optuna.db as optuna-dashboard's own HTTP API lists it: its trials."""
    optuna_dashboard = pytest.importorskip("optuna_dashboard")
    app = optuna_dashboard.wsgi(f"sqlite:///{exp / 'optuna.db'}")
    status, body = wsgi_get(app, "/api/studies")
    assert status.startswith("200")
    studies = json.loads(body)["study_summaries"]
    assert [s["study_name"] for s in studies] == ["tools"]
    status, body = wsgi_get(app, f"/api/studies/{studies[0]['study_id']}")
    assert status.startswith("200")
    return json.loads(body)["trials"], app


def find(dashboard: list[dict], row: pd.Series) -> dict | None:
    """The dashboard's trial with this trials.csv row's hyperparameters."""
    for t in dashboard:
        params = {p["name"]: p["param_external_value"] for p in t["params"]}
        same_lr = math.isclose(float(params.get("lr", "nan")), row["lr"], rel_tol=1e-9)
        if same_lr and params.get("optimizer") == row["optimizer"]:
            return t
    return None


def test_dashboard_serves_the_study_with_every_optuna_trial(searched):
    dashboard, app = dashboard_trials(searched["exp"])
    status, page = wsgi_get(app, "/dashboard")
    assert status.startswith("200") and b"Optuna Dashboard" in page
    study = optuna.load_study(study_name="tools", storage=f"sqlite:///{searched['exp'] / 'optuna.db'}")
    assert sorted(t["number"] for t in dashboard) == sorted(t.number for t in study.trials)
    # every trial Optuna proposed is there, with its hyperparameters and a final state
    proposed = searched["trials"][~searched["trials"]["baseline"]]
    for _, row in proposed.iterrows():
        shown = find(dashboard, row)
        assert shown is not None, f"trial {row['number']} is not on the dashboard"
        assert shown["state"] in ("Complete", "Pruned")


def test_dashboard_lists_the_baseline(searched):
    dashboard, _ = dashboard_trials(searched["exp"])
    trials = searched["trials"]
    assert len(dashboard) == len(trials)
    baseline = trials[trials["baseline"]].iloc[0]
    shown = find(dashboard, baseline)
    assert shown is not None and shown["state"] == "Complete"


def test_dashboard_shows_early_stopped_trials_as_pruned(searched):
    dashboard, _ = dashboard_trials(searched["exp"])
    proposed = searched["trials"][~searched["trials"]["baseline"]]
    states = {r["number"]: (r["status"], (find(dashboard, r) or {}).get("state")) for _, r in proposed.iterrows()}
    assert "early-stopped" in {s for s, _ in states.values()}
    expected = {n: (status, "Pruned" if status in ("early-stopped", "stalled") else "Complete")
                for n, (status, _) in states.items()}
    assert states == expected


def test_dashboard_and_trials_csv_share_trial_numbers_and_final_results(searched):
    """optuna-dashboard beside trials.csv: each study trial carries the experiment's trial number,
    the values the sampler did not choose, and its final metrics, as user attributes."""
    dashboard, _ = dashboard_trials(searched["exp"])
    rows = searched["trials"].set_index("number")
    for t in dashboard:
        attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
        number = int(attrs["number"])
        row = rows.loc[number]
        assert float(attrs["final_test_accuracy"]) == pytest.approx(row["test_accuracy"])
        assert int(attrs["final_epoch"]) == row["epochs_run"]
        shown = find(dashboard, row.rename({"number": "n"}))  # the same trial, found by its hyperparameters
        assert shown is not None and shown["trial_id"] == t["trial_id"]
        if not row["baseline"]:
            assert json.loads(attrs["fixed"]) == {"epochs": 4, "momentum": 0.0, "weight_decay": 0.0,
                                                  "schedule": "constant", "seed": 42, "model": "mlp"}
            if row["status"] == "early-stopped":
                assert attrs["stopped"] == "early-stopped"
    assert sorted(int({a["key"]: a["value"] for a in t["user_attrs"]}["number"]) for t in dashboard) == \
        sorted(rows.index)
