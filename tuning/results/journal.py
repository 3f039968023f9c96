"""The experiment's own record of what happened: the source of truth for export, report and resume.

Ray's result files are written by the driver into a staging folder and synced later, and its
searcher state is pickled separately from the Optuna study, so after a hard kill of the driver
`Tuner.restore` can find neither. Instead, the driver appends one JSON line per event to
``results/<name>/journal.jsonl`` the moment it happens (flushed and fsynced):

    {"event": "trial", "trial": id, "number": n, "params": {...}, "config": {...}, ...}  (at its start;
        a trial the sampler proposed also has "optuna": its Optuna params and distributions, as JSON)
    {"event": "epoch", "trial": id, "epoch": 3, "train_loss": ..., "objective": ..., ...}
    {"event": "checkpoint", "trial": id, "epoch": 3, "path": ...}  (relative to the folder if in it)
    {"event": "end", "trial": id, "error": null | "message"}

Reading it back gives every trial with its epochs, latest checkpoint and status. A line cut short
by a kill is ignored (and the next record starts on a line of its own). Nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainable.fileio import writing

JOURNAL = "journal.jsonl"

# Trial statuses, as shown in trials.csv and the report.
FINISHED, EARLY_STOPPED, DIVERGED, ERRORED, INTERRUPTED = (
    "finished", "early-stopped", "diverged", "errored", "interrupted")
STALLED = "stalled"  # stopped after its first epoch at chance level: it could not learn
RUNNING = "running"  # shown instead of "interrupted" while the search is still going
DONE = (FINISHED, EARLY_STOPPED, STALLED, DIVERGED, ERRORED)


class Journal:
    def __init__(self, exp_dir: str | os.PathLike[str]) -> None:
        self.path = Path(exp_dir) / JOURNAL

    def append(self, event: str, **fields: Any) -> None:
        """One record, whole or not at all: a write that fails (a full disk) is taken back, and a
        line a kill cut short is ended first, so it cannot swallow the next record. A failure is
        a WriteError naming the journal."""
        if event == "checkpoint" and fields.get("path"):
            fields["path"] = self._relative(fields["path"])
        record = {"event": event, "time": time.time(), **fields}
        data = (json.dumps(_finite(record), allow_nan=False) + "\n").encode()
        with writing(self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                start = os.lseek(fd, 0, os.SEEK_END)
                if start and os.pread(fd, 1, start - 1) != b"\n":
                    data = b"\n" + data
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                except OSError:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, start)
                    raise
            finally:
                os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        folder = str(self.path.parent.resolve())  # once: resolving it per checkpoint record was most of a read
        with open(self.path) as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the tail of a write cut short by a kill
                if record.get("event") == "checkpoint" and record.get("path"):
                    record["path"] = _absolute(record["path"], folder)
                records.append(record)
        return records

    # --- what other readers need, so that no one else parses the records ---------------------

    def times(self, event: str) -> list[float]:
        """When each record of `event` ("trial" starts, "end"s, "attempt"s, "epoch"s) was written."""
        return [r["time"] for r in self.read() if r.get("event") == event]

    def epochs(self, since: float = 0.0) -> list[dict[str, Any]]:
        """Every epoch's metrics as reported, in the order written (with its trial id and time),
        from `since` on (a resumed search's own epochs)."""
        return [r for r in self.read() if r.get("event") == "epoch" and r["time"] >= since]

    def working_clock(self) -> Callable[[float], float]:
        """A function of a time: the seconds from the first trial's start to it, the spans between
        runs of the command left out, i.e. how long the search had worked by then."""
        records = self.read()
        start = min((r["time"] for r in records if r.get("event") == "trial"), default=0.0)
        idle = _idle_spans(records)

        def working(until: float) -> float:
            return until - start - sum(max(0.0, min(b, until) - max(a, start)) for a, b in idle)

        return working

    def attempts(self) -> int:
        """How many runs of the command have worked on this experiment."""
        return len(self.times("attempt"))

    # A checkpoint in the experiment's folder (Ray's default storage, results/<name>/ray) is
    # written relative to it, so a copied folder holds no absolute path; it is made absolute again
    # on reading, because a trial resuming from it runs in a folder of Ray's choosing.

    def _relative(self, path: str) -> str:
        if "://" in path or not os.path.isabs(path):
            return path
        folder = self.path.parent.resolve()
        try:
            return Path(path).resolve().relative_to(folder).as_posix()
        except ValueError:  # elsewhere (--storage): as Ray gave it
            return path



def _absolute(path: str, folder: str) -> str:
    """A checkpoint's path as journalled (relative to the experiment folder where it lies inside it)
    made whole again against `folder`, the folder the journal is read from."""
    if "://" in path or os.path.isabs(path):
        return path
    return os.path.join(folder, path)


def _idle_spans(records: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """When no run of the command was working on the experiment: from the last record one run
    wrote to the start of the next (the driver killed, the machine down, the command not yet
    run again)."""
    spans, last = [], None
    for record in records:
        if record.get("event") == "attempt" and last is not None:
            spans.append((last, record["time"]))
        last = record["time"]
    return spans


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@dataclass
class TrialRecord:
    trial: str  # our id: Ray's id of the trial's first run
    number: int  # 1, 2, ... in the order trials started
    params: dict[str, Any]  # what the searcher chose
    config: dict[str, Any]  # the full TrainConfig
    baseline: bool = False
    epochs: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: str | None = None
    checkpoint_epoch: int = 0
    ended: bool = False
    error: str | None = None
    started: float = 0.0
    finished_at: float | None = None
    aliases: list[str] = field(default_factory=list)  # Ray ids of the runs that continued it
    optuna: dict[str, Any] | None = None  # {"params", "distributions"} of a trial the sampler proposed

    @property
    def last(self) -> dict[str, Any] | None:
        return self.epochs[-1] if self.epochs else None

    @property
    def status(self) -> str:
        last = self.last
        if self.error is not None:
            return ERRORED
        if last is not None and last.get("diverged"):
            return DIVERGED
        if last is not None and last["epoch"] >= self.config["epochs"]:
            return FINISHED
        if last is not None and last.get("stalled"):
            return STALLED
        if self.ended:
            return EARLY_STOPPED
        return INTERRUPTED

    @property
    def done(self) -> bool:
        return self.status in DONE


def trials(records: list[dict[str, Any]]) -> list[TrialRecord]:
    """Every trial in the journal, in start order, with its epochs merged across restarts."""
    by_id: dict[str, TrialRecord] = {}
    alias: dict[str, str] = {}  # Ray id of a continuation -> our id of the trial it continues
    for r in records:
        event = r.get("event")
        if event == "trial":
            continues = r.get("continues")
            if continues in by_id:
                alias[r["trial"]] = continues
                by_id[continues].aliases.append(r["trial"])
                by_id[continues].ended = False
                continue
            by_id[r["trial"]] = TrialRecord(
                trial=r["trial"],
                number=r.get("number", len(by_id) + 1),
                params=r["params"],
                config=r["config"],
                baseline=bool(r.get("baseline")),
                started=r["time"],
                optuna=r.get("optuna"),
            )
            continue
        trial = by_id.get(alias.get(r.get("trial", ""), r.get("trial", "")))
        if trial is None:
            continue
        if event == "epoch":
            metrics = {k: v for k, v in r.items() if k not in ("event", "trial", "time")}
            # a retried or continued run reports its epochs again from its checkpoint on
            trial.epochs = [m for m in trial.epochs if m["epoch"] < metrics["epoch"]] + [metrics]
        elif event == "checkpoint":
            trial.checkpoint, trial.checkpoint_epoch = r["path"], r["epoch"]
        elif event == "end":
            trial.ended, trial.error, trial.finished_at = True, r.get("error"), r["time"]
    return sorted(by_id.values(), key=lambda t: t.number)
