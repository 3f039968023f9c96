"""--wandb PROJECT: every trial of a search a Weights & Biases run, grouped by the search, from the journal.

    hptune search ... --wandb my-project
    hptune export results/<name> --wandb my-project    # a search that ran without it, or again
    wandb sync results/<name>/wandb/offline-run-*       # offline runs, once there is a network and a key

One run per trial (`trial-007`, job type "trial", its hyperparameters under the names of trials.csv
as its config, every epoch's metrics logged with step=epoch, its status, rank and challenge verdict in
its summary, exit code 0, or 1 for an errored trial) and one run for the search itself (named after it,
job type "search": its settings as config, the winner's number and metrics in its summary), all in the
group named after the search. Without an API key (no WANDB_API_KEY and no `wandb login`) the runs are
written offline, under results/<name>/wandb/, which is what the tests read; WANDB_MODE overrides.

Everything comes from the experiment's folder, never from Ray's callbacks. A run's id is derived from
the search and the trial's number, and what each run already holds is read back from its own files
(tuning/results/wandb_files.py), so a search killed with SIGKILL and run again, or an `hptune export`,
logs no epoch twice and loses none: an epoch is logged once the trial has checkpointed it or ended.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import netrc
import os
import sys
from pathlib import Path
from typing import Any

from trainable.errors import UsageError
from tuning.results.experiment import Experiment
from tuning.results.journal import DONE, ERRORED, INTERRUPTED, TrialRecord
from tuning.results.listener import Tracker
from tuning.results.tables import params_of, trials_table

WANDB_DIR = "wandb"  # under the experiment's folder: wandb writes its runs in <folder>/wandb/
VERDICT = ("status", "rank", "challenge_met", "crossing_epoch", "error")  # trials.csv's columns in a run's summary
INTERRUPTED_EXIT = 130  # an unfinished trial when the search stops, as a shell reports Ctrl-C


def mode() -> str:
    """"online" with an API key (WANDB_API_KEY or `wandb login`), else "offline"; WANDB_MODE decides if set."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    with contextlib.suppress(OSError, netrc.NetrcParseError):
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        if netrc.netrc().authenticators(host):
            return "online"
    return "offline"


def check(project: str) -> None:
    """UsageError (one line, exit 2) unless wandb is installed and the project a name W&B takes."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UsageError("--wandb needs the wandb package: pip install 'hptune[wandb]'") from None
    if not project or any(c in project for c in "/\\#?%:"):
        raise UsageError(f"--wandb {project!r}: a W&B project name cannot be empty or hold / \\ # ? % :")


def run_id(experiment: Experiment, number: int | None) -> str:
    """A run's W&B id: the search's (its name and creation time, hashed) and the trial's number."""
    key = f"{experiment.name}@{experiment.meta.get('created', '')}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return f"{digest}-search" if number is None else f"{digest}-{number:03d}"


class WandbRuns:
    """Pushes an experiment to W&B; keeps a running trial's run open between pushes."""

    def __init__(self, folder: Path, project: str) -> None:
        self.folder = Path(folder)
        self.project = project
        self.mode = mode()
        self.open: dict[str, Any] = {}  # run id -> wandb Run, open in this process
        self.held: dict[str, dict[str, Any]] | None = None  # run id -> {"epochs", "summary", "exit"} as logged

    def push(self, experiment: Experiment, *, ended: bool = False) -> None:
        """Bring W&B up to the journal. `ended`: the search is over: every run is finished, an
        unfinished trial's with exit code 130 (it continues if the search is resumed)."""
        held = self._held()
        table = trials_table(experiment.trials, experiment.mode, running=not ended).set_index("number")
        for t in experiment.trials:
            rid = run_id(experiment, t.number)
            state = held.setdefault(rid, {"epochs": 0, "summary": {}, "exit": None})
            settled = t.epochs if t.done else [m for m in t.epochs if m["epoch"] <= t.checkpoint_epoch]
            new = [m for m in settled if m["epoch"] > state["epochs"]]
            summary = {k: _value(table.loc[t.number, k]) for k in VERDICT}
            finish = t.done or (ended and t.status == INTERRUPTED)
            # a finished trial's rank moves as others end: brought up to date when the search ends,
            # not by reopening its run at each end
            changed = {k: v for k, v in summary.items() if state["summary"].get(k) != v and (ended or k != "rank")}
            if not new and not (finish and (changed or state["exit"] is None)):
                continue
            run = self._run(rid, f"trial-{t.number:03d}", experiment, "trial", _trial_config(t))
            for m in new:
                run.log({k: v for k, v in m.items() if isinstance(v, (int, float, bool)) or v is None},
                        step=int(m["epoch"]))
                state["epochs"] = int(m["epoch"])
            if finish:
                run.summary.update(summary)
                state["summary"].update(summary)
                code = 1 if t.status == ERRORED else 0 if t.status in DONE else INTERRUPTED_EXIT
                self._finish(rid, code)
                state["exit"] = code
        if ended:
            self._push_search(experiment, held)
            self.close()

    def close(self) -> None:
        """Finish the runs still open (an unfinished trial's with exit code 130) and wait until
        wandb has written every run's file: whoever reads them next reads them whole."""
        for rid in list(self.open):
            self._finish(rid, INTERRUPTED_EXIT)
        import wandb

        with _quiet():
            wandb.teardown()

    def _held(self) -> dict[str, dict[str, Any]]:
        """What each run already holds, read once from its files: the last epoch logged, the
        summary, the exit code (a run killed before wandb wrote it holds nothing)."""
        if self.held is None:
            from tuning.results.wandb_files import offline_runs

            self.held = {}
            for run in offline_runs(self.folder / WANDB_DIR):  # in the order written
                if not run.start_time:  # no run record: a process killed mid-write; nothing wandb sync can send
                    continue
                state = self.held.setdefault(run.id, {"epochs": 0, "summary": {}, "exit": None})
                steps = [h["_step"] for h in run.history if "_step" in h]
                state["epochs"] = max([state["epochs"], *steps])
                state["summary"].update(run.summary)
                if run.exit_code is not None:
                    state["exit"] = run.exit_code
        return self.held

    def _run(self, rid: str, name: str, experiment: Experiment, job_type: str, config: dict[str, Any]) -> Any:
        run = self.open.get(rid)
        if run is None:
            import wandb

            with _quiet():
                run = wandb.init(project=self.project, group=experiment.name, name=name, id=rid, job_type=job_type,
                                 config=config, dir=str(self.folder), mode=self.mode, resume="allow",
                                 reinit="create_new", settings=wandb.Settings(silent=True, console="off"))
            self.open[rid] = run
        return run

    def _finish(self, rid: str, code: int) -> None:
        run = self.open.pop(rid, None)
        if run is not None:
            with _quiet():
                run.finish(exit_code=code)

    def _push_search(self, experiment: Experiment, held: dict[str, dict[str, Any]]) -> None:
        rid = run_id(experiment, None)
        best = experiment.best
        summary: dict[str, Any] = {"status": experiment.meta.get("status", ""), "trials": len(experiment.trials),
                                   "best_trial": best.number if best is not None else None}
        summary.update({f"best_{k}": v for k, v in ((best.last or {}) if best is not None else {}).items()
                        if isinstance(v, (int, float, bool))})
        state = held.setdefault(rid, {"epochs": 0, "summary": {}, "exit": None})
        if state["exit"] is not None and all(state["summary"].get(k) == v for k, v in summary.items()):
            return
        config = {"command": experiment.meta.get("command"), **experiment.meta.get("settings", {}),
                  **{f"space.{k}": v for k, v in (experiment.meta.get("space") or {}).items()}}
        run = self._run(rid, experiment.name, experiment, "search", config)
        run.summary.update(summary)
        self._finish(rid, 0 if experiment.meta.get("status") == "finished" else INTERRUPTED_EXIT)
        state.update(summary=summary, exit=0)


def _trial_config(t: TrialRecord) -> dict[str, Any]:
    return {**params_of(t.config), "baseline": t.baseline, "number": t.number, "trial": t.trial}


def _value(value: Any) -> Any:
    """A trials.csv cell as W&B keeps it: numbers and text as they are, a missing one as None."""
    if hasattr(value, "item"):
        value = value.item()
    try:
        if value is None or value != value:  # None, NaN, pandas' NA
            return None
    except (TypeError, ValueError):
        return None
    return value


@contextlib.contextmanager
def _quiet() -> Any:
    """wandb's own lines stay off the search's console."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


class WandbTracker(Tracker):
    """The search's listener for --wandb (listener.Tracker): a trial's run opens with its first
    settled epoch."""

    name, flag = "W&B", "--wandb"

    def __init__(self, experiment: Experiment, project: str) -> None:
        super().__init__(experiment, WandbRuns(experiment.folder, project), project)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the search's last push comes after, from the files
            self.runs.close()
