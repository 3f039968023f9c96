"""--mlflow: a search and every trial of it in MLflow, pushed from the journal.

    hptune search ... --mlflow                    # $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here
    hptune search ... --mlflow http://127.0.0.1:5000
    hptune export results/<name> --mlflow URI     # push a search that ran without it, or again

In the MLflow experiment "hptune" ($MLFLOW_EXPERIMENT_NAME names another): one parent run per
search, named after it (its settings, data and model as params; the winner's metrics, its
number and the challenge verdict as metrics and tags; best_config.yaml, trials.csv, epochs.csv
and the report as artifacts once the search ends), and one nested run per trial, trial-007 for
trial 7 (its hyperparameters under the names of trials.csv; every epoch's metrics with
step=epoch; its status, rank and challenge verdict as tags; its configuration as config.yaml,
re-trained without Ray by the command in its `hptune.retrain` tag). A trial's MLflow status is
FINISHED for a trial that ended (finished, early-stopped, stalled, diverged: see its
`hptune.status`), FAILED for an errored one, KILLED for one an interrupted search left unfinished.

Everything comes from the experiment's folder, never from Ray's callbacks, and runs are found
again by their tags (`hptune.search`, `hptune.trial_number`), so a push is idempotent: after a
SIGKILL and the same command again, or an `hptune export`, each trial has one run and each epoch
is logged once. An epoch is pushed when it can no longer change: when the trial has checkpointed
it (a restart reports only the epochs after its checkpoint again) or has ended.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from trainable.config import TrainConfig
from trainable.errors import UsageError
from tuning.results.experiment import Experiment
from tuning.results.journal import DONE, ERRORED, INTERRUPTED, TrialRecord
from tuning.results.listener import Tracker, TrialStart, first_line
from tuning.results.tables import params_of, trials_table

DEFAULT_URI = "sqlite:///mlflow.db"  # MLflow's own default store since 3.7, in the working directory
DEFAULT_EXPERIMENT = "hptune"
SEARCH_TAG, NUMBER_TAG, EPOCHS_TAG = "hptune.search", "hptune.trial_number", "hptune.epochs"
PROBE_SECONDS = 5.0
# the run's artifacts once the search has ended (those that exist)
ARTIFACTS = ("best_config.yaml", "trials.csv", "epochs.csv", "report")
# trials.csv's columns that are a trial's verdict rather than its metrics: tags of its run
VERDICT = ("status", "rank", "challenge_met", "crossing_epoch", "slow_epoch", "error")
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch


def resolve_uri(uri: str | None) -> str:
    """The tracking URI to use: the one given, else $MLFLOW_TRACKING_URI, else MLflow's default
    SQLite file in the working directory. A relative SQLite or file path is made absolute, so that
    a resumed search run from elsewhere writes to the same store."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if "://" not in uri:  # a folder: MLflow's file store
        return Path(uri).resolve().as_uri()
    return uri


def check(uri: str) -> None:
    """UsageError (one line, exit 2) unless MLflow is installed and the store answers."""
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UsageError("--mlflow needs the mlflow package: pip install 'hptune[mlflow]'") from None
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
        except OSError as exc:
            raise UsageError(f"--mlflow {uri}: cannot reach the tracking server ({exc.strerror or exc})") from None
    try:
        _client(uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - whatever the store says is the user's to fix
        raise UsageError(f"--mlflow {uri}: {first_line(exc)}") from None


def _client(uri: str) -> Any:
    # an unreachable server costs seconds, not MLflow's minutes of retries (unless the user set them)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_name() -> str:
    """The MLflow experiment the searches go to: $MLFLOW_EXPERIMENT_NAME, else "hptune"."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def search_key(experiment: Experiment) -> str:
    """What tells this search apart from any other in the store: its name and when it was created."""
    return f"{experiment.name}@{experiment.meta.get('created', '')}"


class MlflowRuns:
    """Pushes an experiment to MLflow; remembers the runs it found or made, so that a search's
    pushes after the first cost one call per changed trial."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.client = _client(uri)
        self.parent: str | None = None
        self.parent_state: dict[str, Any] = {}  # its tags, latest metrics and status, as last pushed
        self.runs: dict[int, dict[str, Any]] = {}  # trial number -> {"id", "epochs", "tags", "status"}

    def push(self, experiment: Experiment, *, ended: bool = False) -> None:
        """Bring the store up to the experiment's journal. `ended`: the search is over (finished,
        interrupted or exported): the parent gets its artifacts and an unfinished trial is KILLED."""
        from mlflow.entities import Metric, RunTag

        self._find_runs(experiment)
        table = trials_table(experiment.trials, experiment.mode, running=not ended).set_index("number")
        for t in experiment.trials:
            run = self.runs.get(t.number) or self._create_trial(experiment, t)
            settled = t.epochs if t.done else [m for m in t.epochs if m["epoch"] <= t.checkpoint_epoch]
            new = [m for m in settled if m["epoch"] > run["epochs"]]
            stamp = int(time.time() * 1000)
            batch: list[Any] = []
            for m in new:  # whole epochs per batch: a batch's metrics are stored together
                metrics = [Metric(k, float(v), stamp, int(m["epoch"])) for k, v in m.items()
                           if isinstance(v, (int, float)) and k != "epoch"]
                metrics.append(Metric("epoch", float(m["epoch"]), stamp, int(m["epoch"])))  # what was pushed
                if len(batch) + len(metrics) > MAX_BATCH:
                    self.client.log_batch(run["id"], metrics=batch)
                    batch = []
                batch += metrics
            if batch:
                self.client.log_batch(run["id"], metrics=batch)
            if new:
                run["epochs"] = int(new[-1]["epoch"])
            tags = {f"hptune.{k}": _text(table.loc[t.number, k]) for k in VERDICT}
            tags[EPOCHS_TAG] = str(run["epochs"])
            changed = {k: v for k, v in tags.items() if run["tags"].get(k) != v}
            if changed:
                self.client.log_batch(run["id"], tags=[RunTag(k, v) for k, v in changed.items()])
                run["tags"].update(changed)
            status = _run_status(t, ended)
            if status != run["status"]:
                self._set_status(run["id"], status, t.finished_at)
                run["status"] = status
        self._push_search(experiment, ended)

    def _find_runs(self, experiment: Experiment) -> None:
        if self.parent is not None:
            return
        name = experiment_name()
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:  # a SQLite store keeps its artifacts beside it (MLflow's own default: ./mlruns, wherever that is)
            beside = (Path(self.uri.removeprefix("sqlite:///")).parent / "mlruns").as_uri() \
                if self.uri.startswith("sqlite:///") else None
            self.experiment_id = self.client.create_experiment(name, artifact_location=beside)
        key = search_key(experiment)
        runs = self._search(f"tags.`{SEARCH_TAG}` = '{_quoted(key)}'")
        parents = [r for r in runs if NUMBER_TAG not in r.data.tags]
        if parents:
            self.parent = parents[0].info.run_id
            self.parent_state = {"tags": dict(parents[0].data.tags), "metrics": dict(parents[0].data.metrics),
                                 "status": parents[0].info.status}
        else:
            from mlflow.entities import Param

            self.parent = self.client.create_run(self.experiment_id, run_name=experiment.name,
                                                 tags={SEARCH_TAG: key}).info.run_id
            self.client.log_batch(self.parent, params=[Param(k, _text(v)[:6000])
                                                       for k, v in _search_params(experiment).items()])
            self.parent_state = {"tags": {SEARCH_TAG: key}, "metrics": {}, "status": "RUNNING"}
        for r in runs:
            number = r.data.tags.get(NUMBER_TAG)
            if number is None or int(number) in self.runs:
                continue
            epochs = [m.step for m in self.client.get_metric_history(r.info.run_id, "epoch")]
            self.runs[int(number)] = {"id": r.info.run_id, "epochs": max(epochs, default=0),
                                      "tags": dict(r.data.tags), "status": r.info.status}

    def _search(self, filter_string: str) -> list[Any]:
        runs, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=filter_string, page_token=token)
            runs += list(page)
            token = page.token
            if not token:
                return runs

    def _create_trial(self, experiment: Experiment, t: TrialRecord) -> dict[str, Any]:
        from mlflow.entities import Param

        tags = {SEARCH_TAG: search_key(experiment), NUMBER_TAG: str(t.number), "hptune.trial": t.trial,
                "mlflow.parentRunId": self.parent, "hptune.retrain": "python -m trainable --config config.yaml"}
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{t.number:03d}", tags=tags,
                                     start_time=int(1000 * t.started) if t.started else None)
        run_id = run.info.run_id
        params = {**params_of(t.config), "baseline": t.baseline}
        self.client.log_batch(run_id, params=[Param(k, _text(v)) for k, v in params.items()])
        self.client.log_text(run_id, TrainConfig.from_dict(t.config).to_yaml(), "config.yaml")
        record = {"id": run_id, "epochs": 0, "tags": tags, "status": "RUNNING"}
        self.runs[t.number] = record
        return record

    def _push_search(self, experiment: Experiment, ended: bool) -> None:
        from mlflow.entities import Metric, RunTag

        best = experiment.best
        last = (best.last or {}) if best is not None else {}
        state = self.parent_state
        tags = {"hptune.status": experiment.meta.get("status", "running") if ended else "running",
                "hptune.trials": str(len(experiment.trials)),
                "hptune.best_trial": str(best.number) if best is not None else "",
                "hptune.challenge_met": _text(last.get("challenge_met"))}
        changed = {k: v for k, v in tags.items() if state["tags"].get(k) != v}
        if changed:
            self.client.log_batch(self.parent, tags=[RunTag(k, v) for k, v in changed.items()])
            state["tags"].update(changed)
        stamp, step = int(time.time() * 1000), sum(t.done for t in experiment.trials)
        metrics = {f"best_{k}": float(v) for k, v in last.items() if isinstance(v, (int, float)) and k != "epoch"}
        metrics = {k: v for k, v in metrics.items() if state["metrics"].get(k) != v}
        if metrics:
            self.client.log_batch(self.parent, metrics=[Metric(k, v, stamp, step) for k, v in metrics.items()])
            state["metrics"].update(metrics)
        if ended:
            for name in ARTIFACTS:
                path = experiment.folder / name
                if path.is_dir():
                    self.client.log_artifacts(self.parent, str(path), name)
                elif path.exists():
                    self.client.log_artifact(self.parent, str(path))
        status = ("FINISHED" if experiment.meta.get("status") == "finished" else "KILLED") if ended else "RUNNING"
        if state["status"] != status:
            self._set_status(self.parent, status, None)
            state["status"] = status

    def _set_status(self, run_id: str, status: str, ended: float | None) -> None:
        if status == "RUNNING":  # a trial or search that goes on after an interruption
            self.client.update_run(run_id, status=status)
        else:  # without MLflow's "View run ... at" lines on the search's console
            with contextlib.redirect_stdout(io.StringIO()):
                self.client.set_terminated(run_id, status, end_time=int(1000 * (ended or time.time())))


def _search_params(experiment: Experiment) -> dict[str, Any]:
    settings = {f"settings.{k}": v for k, v in experiment.meta.get("settings", {}).items() if v not in (None, "", [])}
    space = {f"space.{k}": v for k, v in (experiment.meta.get("space") or {}).items()}
    base = experiment.meta.get("base_config") or {}
    return {"command": experiment.meta.get("command"), "data": base.get("data"), "model": base.get("model"),
            **settings, **space}


def _run_status(t: TrialRecord, ended: bool) -> str:
    if t.status == ERRORED:
        return "FAILED"
    if t.status in DONE:
        return "FINISHED"
    return "KILLED" if ended and t.status == INTERRUPTED else "RUNNING"


def _text(value: Any) -> str:
    try:
        if value is None or value != value:  # None, NaN, pandas' NA
            return ""
    except (TypeError, ValueError):
        pass
    if hasattr(value, "item"):
        value = value.item()
    return str(value)


def _quoted(text: str) -> str:
    return text.replace("'", "\\'")


class MlflowTracker(Tracker):
    """The search's listener for --mlflow (listener.Tracker): a trial's run appears as it starts."""

    name, flag = "MLflow", "--mlflow"

    def __init__(self, experiment: Experiment, uri: str) -> None:
        super().__init__(experiment, MlflowRuns(uri), uri)

    def trial_started(self, start: TrialStart) -> None:
        if not self.down:
            self.push()

    def close(self) -> None:
        self.push(ended=True)
