"""--mlflow and --wandb: a search and its trials in a real MLflow store (read back with MlflowClient)
and in Weights & Biases' offline run files (read back from the files, no network), held against
trials.csv and epochs.csv: one run per trial, the hyperparameters, every epoch once, the statuses and
the winner; the same after `hptune export`, after a SIGKILL and the same command again, and (MLflow)
after the server went away mid-search.

The local SQLite store needs no server; the heavy tests start a real `mlflow server` on
127.0.0.1, and stop it, also when they fail.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ensure_shared_ray
from tests.drivers import running, signal_and_wait, wait_until_mid_search
from tests.test_reliability import SEARCH, held_search, resume_to_exactly
from tuning.commands.main import main as hptune
from tuning.search import main as search

mlflow = pytest.importorskip("mlflow", reason="the [mlflow] extra is not installed")
pytest.importorskip("wandb", reason="the [wandb] extra is not installed")
from mlflow import MlflowClient  # noqa: E402

from tuning.results.wandb_files import offline_runs  # noqa: E402

PROJECT = "hptune-tests"


def offline_wandb(tmp: Path) -> dict[str, str]:
    """W&B with no key and no network: offline, its caches and settings in the test's folder."""
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CACHE_DIR": str(tmp / "wandb-cache"),
            "WANDB_CONFIG_DIR": str(tmp / "wandb-config"), "WANDB_DATA_DIR": str(tmp / "wandb-data")}

# Trials of both kinds a tracker must tell apart, finished and early-stopped, as in test_user_tools:
# one at a time, ASHA from epoch 1 keeping half, the random sampler's SGD trials stopped at chance.
SPACE = """
lr: {low: 3.0e-5, high: 3.0e-2, log: true}
batch_size: [256]
epochs: 4
optimizer: [adam, sgd]
"""


def read_back(uri: str, folder: Path) -> dict:
    """The MLflow record of the search in `folder`, checked against its trials.csv and epochs.csv."""
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("hptune")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    trials = pd.read_csv(folder / "trials.csv").set_index("number")
    epochs = pd.read_csv(folder / "epochs.csv")
    parents = [r for r in runs if r.info.run_name == folder.name and "hptune.trial_number" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    numbers = sorted(int(r.data.tags["hptune.trial_number"]) for r in children)
    assert numbers == sorted(trials.index), "one run per trial, no more"
    for run in children:
        n = int(run.data.tags["hptune.trial_number"])
        row = trials.loc[n]
        assert run.info.run_name == f"trial-{n:03d}"
        assert float(run.data.params["lr"]) == pytest.approx(row["lr"], rel=1e-12)
        assert run.data.params["optimizer"] == row["optimizer"]
        assert int(run.data.params["batch_size"]) == row["batch_size"]
        assert run.data.tags["hptune.status"] == row["status"]
        assert run.data.tags["hptune.rank"] == ("" if pd.isna(row["rank"]) else str(int(row["rank"])))
        assert run.info.status == ("FAILED" if row["status"] == "errored" else "FINISHED")
        mine = epochs[epochs["number"] == n].set_index("epoch")
        for metric in ("test_accuracy", "train_loss", "test_loss"):
            history = client.get_metric_history(run.info.run_id, metric)
            steps = [m.step for m in history]
            assert sorted(steps) == list(mine.index), f"trial {n}'s {metric}: each epoch once, none missing"
            for m in history:
                assert m.value == pytest.approx(mine.loc[m.step, metric], rel=1e-12, abs=1e-15)
    winner = trials[trials["rank"] == 1].index[0]
    assert parent.data.tags["hptune.best_trial"] == str(winner)
    assert parent.data.metrics["best_test_accuracy"] == pytest.approx(trials.loc[winner, "test_accuracy"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "epochs.csv", "best_config.yaml", "report"} <= artifacts
    assert parent.info.status == "FINISHED"
    return {"parent": parent, "children": children}


def read_back_wandb(folder: Path) -> dict:
    """The W&B runs of the search in `folder` (its offline files, a run resumed after a kill being
    several files with one id), checked against its trials.csv and epochs.csv."""
    trials = pd.read_csv(folder / "trials.csv").set_index("number")
    epochs = pd.read_csv(folder / "epochs.csv")
    files = offline_runs(folder / "wandb", wait_s=10)
    runs: dict[str, dict] = {}
    for f in files:  # in the order written
        run = runs.setdefault(f.id, {"names": set(), "groups": set(), "config": {}, "steps": [], "summary": {},
                                     "exit": None, "project": f.project})
        if f.start_time:  # the file holds its run record: a process killed before wandb wrote it may not
            run["names"].add(f.name)
            run["groups"].add(f.group)
        run["config"].update(f.config)
        run["steps"] += [h for h in f.history if "test_accuracy" in h]
        run["summary"].update(f.summary)
        run["exit"] = f.exit_code if f.exit_code is not None else run["exit"]
    trial_runs = {r["config"]["number"]: r for r in runs.values() if "number" in r["config"]}
    assert sorted(trial_runs) == sorted(trials.index), "one run per trial, no more"
    for n, run in trial_runs.items():
        row = trials.loc[n]
        assert run["names"] == {f"trial-{n:03d}"} and run["groups"] == {folder.name} and run["project"] == PROJECT
        assert run["config"]["lr"] == pytest.approx(row["lr"], rel=1e-12)
        assert run["config"]["optimizer"] == row["optimizer"]
        mine = epochs[epochs["number"] == n].set_index("epoch")
        assert sorted(h["_step"] for h in run["steps"]) == list(mine.index), f"trial {n}: each epoch once, none missing"
        for h in run["steps"]:
            assert h["test_accuracy"] == pytest.approx(mine.loc[h["_step"], "test_accuracy"], rel=1e-12)
            assert h["train_loss"] == pytest.approx(mine.loc[h["_step"], "train_loss"], rel=1e-12)
        assert run["summary"]["status"] == row["status"]
        assert run["summary"]["rank"] == (None if pd.isna(row["rank"]) else int(row["rank"]))
        assert run["exit"] == (1 if row["status"] == "errored" else 0)
    searches = [r for r in runs.values() if "number" not in r["config"]]
    assert len(searches) == 1 and searches[0]["names"] == {folder.name}
    assert searches[0]["summary"]["best_trial"] == trials[trials["rank"] == 1].index[0]
    return trial_runs


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> Iterator[dict]:
    """A finished 6-trial search with --mlflow into a local SQLite store and --wandb offline."""
    tmp = tmp_path_factory.mktemp("tracked")
    saved = dict(os.environ)
    os.environ.update(offline_wandb(tmp))
    (tmp / "space.yaml").write_text(SPACE)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    argv = ["--data", "synthetic", "--results-dir", str(tmp / "results"), "--name", "tracked", "--num-cpus", "2",
            "--samples", "6", "--space", str(tmp / "space.yaml"), "--sampler", "random",
            "--stopping", "asha", "--grace-period", "1", "--reduction-factor", "2", "--max-concurrent", "1",
            "--mlflow", uri, "--wandb", PROJECT]
    out, err = io.StringIO(), io.StringIO()
    ensure_shared_ray()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = search(argv)
        assert status == 0, err.getvalue()
        assert "warning:" not in err.getvalue(), err.getvalue()  # neither tracker failed
        assert "wandb" not in out.getvalue().lower(), out.getvalue()  # W&B's own lines stay off the console
        yield {"tmp": tmp, "uri": uri, "exp": tmp / "results" / "tracked"}
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.slow
def test_mlflow_has_one_parent_and_one_run_per_trial_equal_to_the_csv_files(tracked):
    record = read_back(tracked["uri"], tracked["exp"])
    statuses = {r.data.tags["hptune.status"] for r in record["children"]}
    assert {"finished", "early-stopped"} <= statuses  # the fixture's point: both kinds, each named
    child = record["children"][0]
    config = MlflowClient(tracking_uri=tracked["uri"]).download_artifacts(child.info.run_id, "config.yaml",
                                                                          str(tracked["tmp"]))
    assert "lr:" in Path(config).read_text()  # what `hptune.retrain` re-trains
    assert child.data.tags["hptune.retrain"] == "python -m trainable --config config.yaml"


@pytest.mark.slow
def test_wandb_has_a_run_per_trial_grouped_by_the_search_equal_to_the_csv_files(tracked):
    runs = read_back_wandb(tracked["exp"])
    assert {"finished", "early-stopped"} <= {r["summary"]["status"] for r in runs.values()}


@pytest.mark.slow
def test_export_pushes_again_without_doubling_and_fills_a_new_store(tracked, cli):
    files = sorted((tracked["exp"] / "wandb").rglob("run-*.wandb"))
    status, out, err = cli(hptune, ["export", str(tracked["exp"]), "--mlflow", tracked["uri"], "--wandb", PROJECT])
    assert status == 0, err
    read_back(tracked["uri"], tracked["exp"])  # the same record: no run, no epoch twice
    assert sorted((tracked["exp"] / "wandb").rglob("run-*.wandb")) == files  # W&B held it all: nothing reopened
    read_back_wandb(tracked["exp"])
    fresh = f"sqlite:///{tracked['tmp'] / 'fresh.db'}"
    status, out, err = cli(hptune, ["export", str(tracked["exp"]), "--mlflow", fresh])
    assert status == 0, err
    read_back(fresh, tracked["exp"])  # a search that ran without a tracker, pushed afterwards


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_tracking_server_is_one_line_exit_2_before_anything_runs(cli, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    status, out, err = cli(search, ["--data", "synthetic", "--results-dir", str(tmp_path / "results"),
                                    "--smoke-test", "--mlflow", uri])
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1 and uri in err and "Traceback" not in err, err
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())
    import hptune
    from trainable.errors import UsageError

    with pytest.raises(UsageError, match="cannot reach the tracking server"):  # the Python API, alike
        hptune.search(smoke_test=True, results_dir=str(tmp_path / "results"), mlflow=uri)
    with pytest.raises(UsageError, match="a W&B project name cannot"):
        hptune.search(smoke_test=True, results_dir=str(tmp_path / "results"), wandb="team/project")
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


@contextlib.contextmanager
def mlflow_server(folder: Path, port: int | None = None) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with its store in `folder`, stopped on leaving."""
    port = port or free_port()
    log = open(folder / f"server-{port}.log", "a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination",
         str(folder / "artifacts")], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                MlflowClient(tracking_uri=f"http://127.0.0.1:{port}").search_experiments(max_results=1)
                break
            except Exception:  # noqa: BLE001 - not answering yet, whatever the client says
                assert proc.poll() is None and time.time() < deadline, (folder / f"server-{port}.log").read_text()
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
@pytest.mark.heavy  # a real server and a search killed and resumed
def test_a_killed_and_resumed_search_has_each_trial_and_epoch_once_in_both(cli, tmp_path, shared_ray, monkeypatch):
    argv, exp, log, hold = held_search(tmp_path, "k", samples=6)
    for key, value in offline_wandb(tmp_path).items():
        monkeypatch.setenv(key, value)
    with mlflow_server(tmp_path) as uri:
        argv += ["--mlflow", uri, "--wandb", PROJECT]
        with running(log, [SEARCH, *argv], env=hold) as proc:
            wait_until_mid_search(exp, proc)
            signal_and_wait(proc, signal.SIGKILL, log)
        resume_to_exactly(cli, argv, exp, 6)
        read_back(uri, exp)
    read_back_wandb(exp)


@pytest.mark.slow
@pytest.mark.heavy  # a real server stopped mid-search, then started again
def test_a_server_that_goes_away_costs_no_trial_and_export_completes_the_record(cli, tmp_path, shared_ray):
    argv, exp, log, hold = held_search(tmp_path, "d", samples=4)
    port = free_port()
    with contextlib.ExitStack() as server:
        uri = server.enter_context(mlflow_server(tmp_path, port))
        argv += ["--mlflow", uri]
        with running(log, [SEARCH, *argv], env=hold) as proc:
            wait_until_mid_search(exp, proc)
            server.close()  # the server goes away mid-search ...
            (tmp_path / "markers" / "release").touch()  # ... and the held trials go on
            status = proc.wait(timeout=600)
    output = log.read_text()
    assert status == 0, output
    assert len(pd.read_csv(exp / "trials.csv")) == 4  # no trial lost to the tracker
    assert "View run" not in output  # MLflow's own lines stay off the search's console
    warnings = [line for line in output.splitlines() if "MLflow" in line]
    assert warnings and "warning" in warnings[0] and f"hptune export {exp} --mlflow {uri}" in warnings[0], output
    with mlflow_server(tmp_path, port) as uri:  # the same store, back
        status, out, err = cli(hptune, ["export", str(exp), "--mlflow", uri])
        assert status == 0, err
        read_back(uri, exp)
