"""One search, from typed settings to a finished experiment folder: what `hptune search`, `python
tuning/search.py` and the Python API (`tuning.search`) all run.

    plan(...)     everything that can be checked before anything is written: settings, space,
                  base configuration, references to the user's code, the cluster's address and
                  handshake, the results folder; ends holding the experiment's lock
    execute(...)  data loaded once (and the model tried on one batch of it), Ray started or joined,
                  the experiment folder written, the trials run, CSV files, confirmation, report,
                  summary; interruptions leave the experiment resumable

Errors before anything is written are exceptions with one-line messages (exit 2 on the command
line); the driver prints the rest itself (the resume command, the summary).
"""

from __future__ import annotations

import datetime as dt
import errno
import importlib.util
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainable.config import ConfigError, TrainConfig
from trainable.data import Data, DataError, StreamedData, from_splits, load_dataset
from trainable.errors import UsageError
from trainable.fileio import atomic_write_text, write_error
from trainable.models import DEFAULT_MODEL, ModelError, check_model_args, factory_of
from trainable.refs import UNNAMED, BadReferenceError, UserCodeError, call_user, reference_of
from tuning import interrupts, supervisor
from tuning.results import experiment as experiment_mod
from tuning.results import export as export_mod
from tuning.results import mlflow_runs, tensorboard, wandb_runs
from tuning.results.experiment import Experiment, ExperimentError
from tuning.results.journal import DONE, ERRORED
from tuning.results.show import print_summary
from tuning.settings import SearchSettings, format_size
from tuning.space import MODEL_PREFIX, AnySpace, SpaceError, flat, trial_config

# What a search can fail on before it writes anything: one line each, exit 2 on the command line.
INPUT_ERRORS = (UsageError, SpaceError, ConfigError, ExperimentError, DataError, ModelError, BadReferenceError,
                UserCodeError)


@dataclass
class Inputs:
    """What a search trains, besides its settings."""

    space: AnySpace
    base: TrainConfig  # everything the space does not set; its model and data references
    model: Callable[..., Any] | None = None  # a model factory passed as an object (Python API)
    loop: Callable[..., Any] | None = None  # a training loop passed as an object (Python API)
    data: Any = None  # the data itself or a data factory (Python API); None: base.data names it
    command: str = ""  # what continues this experiment, for messages


@dataclass
class Plan:
    settings: SearchSettings
    inputs: Inputs
    meta: dict[str, Any]
    claim: experiment_mod.Claim  # the lock on results/<name>, and what was there
    address: str | None = None  # HOST:PORT of the Ray cluster to attach to; None: a private local Ray
    prog: str = "hptune search"
    notes: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.claim.folder

    @property
    def resumed(self) -> bool:
        return self.claim.old_meta is not None and self.claim.replaces is None


@dataclass
class Outcome:
    status: int  # 0, 1 (failed, resumable), 130 (Ctrl-C) or 143 (SIGTERM): interrupted, resumable
    experiment: Experiment | None


# --- planning: everything that can be checked before Ray starts ------------------------------


def plan(settings: SearchSettings, inputs: Inputs, *, prog: str = "hptune search") -> Plan:
    """Check everything that can be checked without the data, then lock results/<name>."""
    from tuning.engine.cluster import check_join, cluster_address

    if settings.tensorboard and not tensorboard.available():
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if settings.mlflow is not None:  # unreachable or not installed: one line now, not a warning per trial
        settings = settings.replace(mlflow=mlflow_runs.resolve_uri(settings.mlflow))
        mlflow_runs.check(settings.mlflow)
    if settings.wandb is not None:
        wandb_runs.check(settings.wandb)
    if settings.stopping == "syne-asha" and importlib.util.find_spec("syne_tune") is None:
        raise UsageError('--stopping syne-asha needs Syne Tune: pip install -e ".[compare]"')
    inputs = _named_code(inputs, cluster=settings.address is not None)
    address = cluster_address(settings.address) if settings.address else None  # before anything is written
    if address:
        check_join(address, settings.address)  # in seconds, where ray.init could retry for minutes
    if settings.warm_start:
        Experiment.load(settings.warm_start)  # an ExperimentError (exit 2) if it is not one
    space, base = inputs.space, inputs.base
    trial_config(base, space, {})  # the space's fixed values must make a valid configuration
    _check_user_code(inputs)
    meta_space = space.describe()
    fingerprint = {**settings.fingerprint(), "space": meta_space, "base": base.to_dict()}
    results = Path(settings.results_dir).expanduser().resolve()
    _check_writable(results)
    settings = settings.named()
    name = settings.name
    claimed = experiment_mod.claim(results, name, restart=settings.restart)
    old = claimed.old_meta
    if old is not None and claimed.replaces is None:
        recorded = old.get("fingerprint", {})
        changed = sorted(k for k in fingerprint if k in recorded and recorded[k] != fingerprint[k])
        if changed:
            claimed.release()
            raise UsageError(f"{claimed.folder} was started with different settings ({', '.join(changed)}); "
                             f"resume it with its own command:  {old.get('command')}  or use --restart")
        meta = {**old, "status": "running", "command": old.get("command", inputs.command),
                "settings": {**old.get("settings", {}), **settings.to_dict()}}
        meta.pop("exp_dir", None)  # written by earlier versions; readers use the folder they are given
    else:
        meta = {
            "name": name,
            "command": inputs.command,
            "samples": settings.samples,  # also in settings; kept for readers of older versions
            "objective": settings.objective,
            "mode": settings.mode,
            "challenge_window": settings.challenge_window,
            "settings": settings.to_dict(),
            "space": meta_space,
            "base_config": base.to_dict(),
            "fingerprint": fingerprint,
            "status": "running",
            "created": dt.datetime.now().isoformat(timespec="seconds"),
        }
    return Plan(settings, inputs, meta, claimed, address, prog)


def _named_code(inputs: Inputs, *, cluster: bool) -> Inputs:
    """Functions passed as objects get the references that find them again (recorded in the
    configuration and best_config.yaml); ones without (a lambda) only on a local Ray."""
    base = inputs.base
    for kind in ("model", "loop"):
        fn = getattr(inputs, kind)
        if fn is None:
            continue
        reference = reference_of(fn)
        if reference is None and cluster:
            raise UsageError(f"{kind}: {getattr(fn, '__qualname__', fn)!r} cannot be shipped to a cluster: it has no "
                             "importable name (a lambda, or a function defined inside another or in a notebook); "
                             "define it at the top level of a .py file or package")
        base = base.with_updates(**{kind: reference or UNNAMED})
        if reference is not None:
            setattr(inputs, kind, None)  # the trials resolve the reference themselves
    inputs.base = base
    return inputs


def _check_user_code(inputs: Inputs) -> None:
    """The model factory and loop resolve, and the factory accepts the space's model hyperparameters."""
    base, space = inputs.base, inputs.space
    factory = inputs.model or (factory_of(base.model) if base.model != UNNAMED else None)
    if base.loop and base.loop != UNNAMED and inputs.loop is None:
        from trainable.own_loop import loop_of

        loop_of(base.loop)
    names = [n[len(MODEL_PREFIX):] for n in space.names if n.startswith(MODEL_PREFIX)]
    names += list(base.model_args)
    own_loop = (base.loop is not None or inputs.loop is not None) and base.model == DEFAULT_MODEL and not inputs.model
    if factory is not None and names and not own_loop:  # an own loop without --model builds its own model
        check_model_args(factory, list(dict.fromkeys(names)),
                         where="the space" if any(n in space.model_args for n in names) else "the configuration")


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UsageError(f"{folder}: the results directory is not writable ({exc.strerror or exc})") from None


def baseline_params(space: AnySpace, base: TrainConfig) -> dict[str, Any]:
    """The base configuration's own values for every parameter the space names, searched or fixed
    (the tutorial's, unless --config or the API gave others); a model hyperparameter the base does
    not set keeps the factory's default."""
    values = flat(base.to_dict())
    return {name: values[name] for name in space.names if name in values}


def plan_trials(experiment: Experiment, space: AnySpace, base: TrainConfig,
                baseline: bool) -> tuple[list[dict[str, Any]], list, int]:
    """What this run must do: (fixed configurations, interrupted trials, number of trials to run).
    Interrupted trials come first (each continues its own checkpoint), then the baseline, then
    Optuna's samples, until the experiment has exactly `samples` trials."""
    from tuning.engine.searcher import BASELINE, CONTINUES

    existing = experiment.trials
    pending = [t for t in existing if not t.done]
    new = max(experiment.settings.samples - len(existing), 0)
    fixed = [{**t.params, CONTINUES: t.trial, **({BASELINE: True} if t.baseline else {})} for t in pending]
    if new > 0 and baseline and not any(t.baseline for t in existing):
        fixed.append({**baseline_params(space, base), BASELINE: True})
    return fixed, pending, len(pending) + new


# --- running ------------------------------------------------------------------------------------


def load_data(plan: Plan) -> Data:
    """The data set, once, in the driver: given (API), from a factory, or by name."""
    settings, inputs, base = plan.settings, plan.inputs, plan.inputs.base
    given = inputs.data
    if given is None:
        return load_dataset(base.data, base.data_root, cache_dir=settings.cache_dir,
                            memory_limit=settings.data_memory)
    if callable(given) and not hasattr(given, "__getitem__"):
        result = call_user(given, "the data factory")
        return from_splits(result, base.data, memory_limit=settings.data_memory,
                           what=f"the data factory {base.data}")
    return from_splits(given, base.data, memory_limit=settings.data_memory, what="the data")


def check_trainable(plan: Plan, data: Data) -> None:
    """The base configuration's model on one batch of the data, and the notes a user should see
    once: data streamed rather than held, bf16 without the fused step."""
    import torch

    from trainable.fit import check_model
    from trainable.fused import fused_bf16
    from trainable.hardware import autocast_dtype, fused_note

    base, inputs = trial_config(plan.inputs.base, plan.inputs.space, {}), plan.inputs
    if base.loop is None and inputs.loop is None or base.model != DEFAULT_MODEL or inputs.model is not None:
        model = check_model(base, data, inputs.model)
    else:
        model = None
    if isinstance(data, StreamedData):
        plan.notes.append(f"the data set would take {format_size(data.nbytes)} in memory, more than --data-memory "
                          f"{format_size(plan.settings.data_memory)}: each trial reads it through a DataLoader "
                          f"(raise --data-memory to {format_size(data.nbytes)} or more to load it once)")
    if model is not None and base.loop is None and autocast_dtype(base.precision, torch.device("cpu")) is \
            torch.bfloat16 and not plan.address:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        started = time.time()
        fused, reason = fused_bf16(model, opt, torch.device("cpu"), torch.bfloat16)
        if reason:
            plan.notes.append(f"trials train bf16 with autocast; {fused_note(reason)}")
        elif time.time() - started > 1 and not plan.settings.quiet:
            print(f"Built the fused bf16 optimizer step in {time.time() - started:.0f} s (once per machine)",
                  flush=True)


def execute(plan: Plan, started: float, interrupt: interrupts.Interrupts) -> Outcome:
    """Run the planned search; the experiment is left resumable whatever happens."""
    from tuning.engine import cluster
    from tuning.engine.usercode import prepare

    settings, meta, prog = plan.settings, plan.meta, plan.prog
    experiment = Experiment(plan.folder, meta)
    started_ray = False
    code = None
    outcome, attempt_started, wall = "finished", started, 0.0
    paths: dict[str, Path] = {}
    res: dict[str, float] = {}
    if plan.address:  # the first line names the cluster, wherever its address came from
        via = " via $RAY_ADDRESS" if settings.address == "auto" and os.environ.get("RAY_ADDRESS") else ""
        print(f"Ray cluster: {plan.address} (--address {settings.address}{via})", flush=True)
    try:
        data = load_data(plan)
        check_trainable(plan, data)
        if not settings.quiet:
            print(f"{data!r}, loaded in {time.time() - started:.1f} s. Experiment: {plan.folder}", flush=True)
        for note in plan.notes:
            print(f"{prog}: note: {note}", file=sys.stderr, flush=True)
        code = prepare(plan.inputs.base, model=plan.inputs.model, loop=plan.inputs.loop, ship=plan.address is not None)
        cluster.quiet_ray(settings.verbose)
        started_ray = cluster.start_ray(settings, plan.address, code)
        warning = cluster.storage_warning(settings)
        if warning:
            print(f"{prog}: {warning}", file=sys.stderr, flush=True)
        res = cluster.resources(settings)
        experiment = experiment_mod.create(plan.claim, meta)
        attempt_started = time.time()
        base = trial_config(plan.inputs.base, plan.inputs.space, {})  # the base with the space's fixed values
        fixed, pending, num_samples = plan_trials(experiment, plan.inputs.space, plan.inputs.base, settings.baseline)
        outcome = "finished"
        if num_samples:
            from tuning.engine.run import run_trials

            if plan.resumed and not settings.quiet:
                print(f"Resuming {experiment.name}: {sum(t.done for t in experiment.trials)} trials done, "
                      f"{len(pending)} to continue from their checkpoints, {num_samples - len(pending)} new")
            outcome = run_trials(experiment, plan.inputs.space, base, fixed, pending, num_samples, data, code, res,
                                 started)
        if outcome == "budget":
            experiment.mark("interrupted")  # before export, so trials.csv says interrupted, not running
        if started_ray:
            cluster.stop_ray()
            started_ray = False
        experiment.reload()
        paths = export_mod.export(experiment)
        paths["optuna"] = plan.folder / "optuna.db"
        if settings.tensorboard:
            paths["tensorboard"] = plan.folder / tensorboard.TENSORBOARD_DIR
        wall = time.time() - started  # the search itself; confirmation and report come after
        if outcome != "budget" and settings.confirm_seeds and "best_config" in paths:
            paths["confirm"] = confirm_best(experiment, data, settings.confirm_seeds, plan.inputs.model)
            paths.update(export_mod.export(experiment))  # best_config.yaml now states the confirmation
        try:
            from tuning.results.report import write_report

            paths["report"] = write_report(experiment, top=settings.top)
        except Exception as exc:  # noqa: BLE001 - the results are written; a drawing problem must not hide them
            if write_error(exc) is not None:
                raise  # a full disk is not a drawing problem: said below, as any failed write
            print(f"{prog}: warning: the report could not be drawn ({exc}); the CSV files are complete",
                  file=sys.stderr)
        experiment.mark("interrupted" if outcome == "budget" else "finished")  # converged: finished
    except INPUT_ERRORS as exc:
        _log_error(plan)
        raise InputError(str(exc)) from None
    except KeyboardInterrupt:
        interrupt.handled()
        _mark(experiment, "interrupted")
        if started_ray:  # the trials stop here; what they reported is in the journal
            cluster.stop_ray()
            started_ray = False
        from tuning.results.report import save_interrupted

        save_interrupted(experiment, settings.top, prog)
        print(f"\nInterrupted ({interrupt.name}). Finished trials are kept in {plan.folder}; resume with:\n  "
              f"{meta['command']}", file=sys.stderr, flush=True)
        return Outcome(interrupt.status, experiment)
    except Exception as exc:  # noqa: BLE001 - keep the experiment resumable whatever went wrong
        _mark(experiment, "interrupted")
        log = _log_error(plan)
        failed = write_error(exc)
        if failed is not None:  # a full disk, a quota, a read-only disk: what to do about it, no traceback
            print(f"{prog}: error: {write_failure_text(failed, plan.folder, log)}:\n  {meta['command']}",
                  file=sys.stderr)
            return Outcome(1, experiment)
        details = f" (details in {log})" if log else ""
        print(f"{prog}: error: {exc}{details}. Finished trials are kept; resume with:\n  "
              f"{meta['command']}", file=sys.stderr)
        return Outcome(1, experiment)
    finally:
        if started_ray:
            cluster.stop_ray()
        if code is not None:
            code.cleanup()
        _push_to_trackers(experiment, settings, prog)
    print_summary(experiment, wall=wall, res=res, paths=paths, since=attempt_started)
    if outcome == "budget":
        done = sum(t.done for t in experiment.trials)
        print(f"Time budget of {settings.time_budget:g} s reached: {done} of {settings.samples} trials done; "
              f"trials it stopped are kept as interrupted. Continue with:\n  {meta['command']}")
    if not any(t.status in DONE and t.status != ERRORED for t in experiment.trials):
        print(f"{prog}: error: no trial finished; see the errors in {paths['trials']}", file=sys.stderr)
        return Outcome(1, experiment)
    return Outcome(0, experiment)


def _push_to_trackers(experiment: Experiment, settings: SearchSettings, prog: str) -> None:
    """The search's last push to --mlflow and --wandb, its status and files included; a tracker that
    fails is a warning."""
    if not experiment.journal.path.exists():
        return
    pushes = {"MLflow": (settings.mlflow, lambda: mlflow_runs.MlflowRuns(settings.mlflow), "--mlflow"),
              "W&B": (settings.wandb, lambda: wandb_runs.WandbRuns(experiment.folder, settings.wandb), "--wandb")}
    for tracker, (target, runs, flag) in pushes.items():
        if target is None:
            continue
        try:
            runs().push(Experiment.load(experiment.folder), ended=True)
        except Exception as exc:  # noqa: BLE001 - the results are in the folder; the tracker can catch up
            print(f"{prog}: warning: {tracker} ({target}) failed: {exc}; `hptune export {experiment.folder} {flag} "
                  f"{target}` completes the record", file=sys.stderr)


class InputError(ValueError):
    """Bad input found once the search had begun (the data, the model on a batch): one line, exit 2."""


def _log_error(plan: Plan) -> Path | None:
    """The traceback in the experiment's error.log, where the folder exists and the disk has room
    for it; None where it could not be written."""
    log = plan.folder / "error.log"
    if not plan.folder.exists():
        return None
    details = traceback.format_exc()
    exc = sys.exc_info()[1]
    if isinstance(exc, UserCodeError) and exc.details:
        details = exc.details
    try:
        atomic_write_text(log, details)
    except OSError:
        return None
    return log


def _mark(experiment: Experiment, status: str) -> None:
    """experiment.mark, where the disk allows: if it cannot be written, experiment.json keeps
    `running`, which the next search of the experiment overwrites (the lock, not the status, keeps
    two searches apart)."""
    try:
        experiment.mark(status)
    except OSError:
        pass


def write_failure_text(failed: OSError, folder: Path, log: Path | None) -> str:
    """What a user is told when a write fails: which file, what the disk said, that nothing
    finished is lost, and what to do before running the same command."""
    where = failed.filename or folder
    if failed.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space on that disk"
    elif failed.errno == errno.EFBIG:
        fix = "raise the file-size limit (ulimit -f)"
    else:
        fix = f"make {folder} writable again"
    details = f"; the traceback is in {log}" if log else ""
    return (f"cannot write {where}: {failed.strerror or failed}{details}. Nothing finished is lost: {fix} (or move "
            f"{folder} to a disk with room and give its new parent as --results-dir), then run the same command")


def confirm_best(experiment: Experiment, data: Data, n: int, model: Callable[..., Any] | None = None) -> Path:
    """Re-train the best configuration with n new seeds, in this process (Ray is done by now)."""
    import torch

    from trainable.confirm import CONFIRM_FILE, confirm, describe, lucky_seed_check, write_confirm

    config = TrainConfig.load(experiment.folder / export_mod.BEST_CONFIG)
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"Confirming the best configuration with {n} new seeds ...", flush=True)
    rows = confirm(config, data, n, challenge_window=experiment.settings.challenge_window, model_factory=model)
    path = experiment.folder / CONFIRM_FILE
    write_confirm(path, rows)
    print(f"Confirmation: {describe(rows)}")
    best = experiment.best
    if best is not None and best.last and best.last.get("test_accuracy") is not None:
        print(f"              {lucky_seed_check(rows, best.last['test_accuracy'])}")
    return path


def run(settings: SearchSettings, inputs: Inputs, *, prog: str) -> Outcome:
    """plan + execute, with Ctrl-C (and SIGTERM) delivered to the search until it has handled it."""
    started = time.time()
    the_plan = plan(settings, inputs, prog=prog)
    supervisor.announce(the_plan.folder)
    try:
        with interrupts.delivered_until_handled() as interrupt:
            return execute(the_plan, started, interrupt)
    finally:
        the_plan.claim.release()

