"""python tuning/search.py --samples 20: search the tutorial's hyperparameters with Optuna on Ray Tune.

The data set is loaded once here, in the driver, and reaches every trial through Ray's object
store. Optuna (TPE by default, its study in results/<name>/optuna.db) proposes learning rate,
batch size, epochs, optimizer, momentum and weight decay; ASHA stops unpromising trials by epoch;
the tutorial's own configuration runs first as the baseline. Every result is journalled in
results/<name>/ as it arrives, so an interrupted search resumes with the same command, and the
CSV files, best_config.yaml and the report are rebuilt from those files alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python tuning/search.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from trainable import challenge, fused
from trainable.cli import INTERRUPTED_STATUS, OneLineParser, command_line, UsageError, add_data_args, data_overrides, fail, non_negative_int, positive_int
from trainable.config import PRECISIONS, ConfigError, TrainConfig
from trainable.data import DataError, Dataset, load_dataset
from trainable.fileio import atomic_write_text
from trainable.fit import autocast_dtype
from tuning import ctrl_c
from tuning import experiment as experiment_mod
from tuning import export as export_mod
from tuning import tboard
from tuning.console import fmt_params, fmt_result, verdict_text
from tuning.experiment import Experiment, ExperimentError
from tuning.journal import DIVERGED, DONE, EARLY_STOPPED, ERRORED, FINISHED, INTERRUPTED, STALLED
from tuning.objective import DEFAULT_OBJECTIVE, OBJECTIVES
from tuning.report import write_report
from tuning.space import Space, SpaceError, default_space, load_space, trial_config
from tuning.study import SAMPLERS

PROG = "python tuning/search.py"
DEFAULT_SAMPLES, SMOKE_SAMPLES = 20, 3


DEFAULT_GRACE = "25%"


@dataclass(frozen=True)
class Grace:
    """ASHA's first rung: a share of each trial's schedule (`progress`), or a number of epochs."""

    time_attr: str  # "progress" (epoch / epochs, 0..1) or "epoch"
    value: float


def grace_period(text: str) -> Grace:
    """argparse type of --grace-period: "25%" (of each trial's schedule) or "3" (epochs)."""
    try:
        if text.endswith("%"):
            share = float(text[:-1]) / 100
            if 0 < share < 1:
                return Grace("progress", share)
        elif int(text) >= 1:
            return Grace("epoch", int(text))
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected a share of the schedule such as 25% (above 0, below 100) "
                                     f"or a whole number of epochs, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    s = p.add_argument_group("search")
    s.add_argument("--samples", type=positive_int,
                   help=f"trials in all, the baseline included "
                        f"(default {DEFAULT_SAMPLES}; {SMOKE_SAMPLES} with --smoke-test)")
    s.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="Optuna sampler (default tpe)")
    s.add_argument("--seed", type=int, default=0,
                   help="seed of the sampler (default 0); training seeds come from the configuration")
    s.add_argument("--space", metavar="YAML",
                   help="search space replacing the default (same parameter names as the configuration)")
    s.add_argument("--config", metavar="YAML",
                   help="base configuration for everything the space does not search (default: the tutorial's)")
    s.add_argument("--objective", choices=list(OBJECTIVES), default=DEFAULT_OBJECTIVE,
                   help="what ASHA and Optuna steer by (default test_accuracy); the challenge is a constraint, and the "
                        "winner is the best trial that meets it")
    s.add_argument("--challenge-window", type=positive_int, default=challenge.DEFAULT_WINDOW, metavar="K",
                   help="the train loss must fall in each of the last K epochs (default 3)")
    s.add_argument("--warm-start", metavar="EXPERIMENT",
                   help="give the new study the finished trials of an earlier experiment folder (results/<name>), "
                        "so the sampler starts from what that search learned; trials outside this space are skipped")
    s.add_argument("--no-baseline", action="store_true",
                   help="do not run the tutorial's configuration as the first trial")
    s.add_argument("--no-center", action="store_true",
                   help="let the sampler choose the first sampled trial too (default: it is the center of the "
                        "space: each range's midpoint, geometric on a log scale, and each list's first choice)")
    s.add_argument("--no-early-stop", action="store_true", help="no ASHA: every trial runs all its epochs")
    s.add_argument("--grace-period", type=grace_period, default=DEFAULT_GRACE, metavar="P%|N",
                   help="ASHA's first rung: P%% of each trial's own schedule (default 25%%; later rungs at P%% times "
                        "the reduction factor, so trials are compared at the same point of their schedules, before "
                        "or after annealing alike), or N epochs (rungs by epoch, as in Ray Tune's examples)")
    s.add_argument("--reduction-factor", type=float, default=3.0,
                   help="ASHA: keep the best 1/F at each rung (default 3)")
    s.add_argument("--time-budget", type=float, metavar="SECONDS", help="stop starting new trials after this much time")
    s.add_argument("--smoke-test", action="store_true",
                   help="synthetic data, 3 samples, 2 epochs: a fast end-to-end check")
    r = p.add_argument_group("resources")
    r.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial; torch threads follow (default 1)")
    r.add_argument("--gpus-per-trial", type=float,
                   help="GPU fraction per trial, at most 1: a trial trains on one device "
                   "(default 0.25 when the cluster has a GPU, so four trials share one; else 0)")
    r.add_argument("--max-concurrent", type=positive_int,
                   help="at most this many trials at once (default: as resources allow)")
    r.add_argument("--max-failures", type=non_negative_int, default=2,
                   help="retries of a trial that raises, from its last checkpoint (default 2)")
    r.add_argument("--num-cpus", type=positive_int,
                   help="local cluster only: CPUs Ray may use (default: all it detects)")
    r.add_argument("--num-gpus", type=non_negative_int,
                   help="local cluster only: GPUs Ray may use (default: all it detects)")
    r.add_argument("--address", help="without it: a private local Ray, whatever else runs on this machine "
                   "($RAY_ADDRESS is ignored). auto: attach to the cluster $RAY_ADDRESS names, else the one "
                   "`ray start` last started here; HOST:PORT: attach to that head node")
    r.add_argument("--storage",
                   help="where Ray keeps trial checkpoints "
                        "(a path or URI every node can reach; default results/<name>/ray)")
    d = p.add_argument_group("data")
    add_data_args(d)
    d.add_argument("--precision", choices=PRECISIONS, help="auto (default), fp32 or bf16")
    o = p.add_argument_group("output")
    o.add_argument("--results-dir", default="results", help="where experiment folders go (default results/)")
    o.add_argument("--name",
                   help="experiment name (default: search-<date>-<time>); the same name resumes an interrupted search")
    o.add_argument("--restart", action="store_true",
                   help="start the named experiment anew; the old folder is kept as <name>.replaced-<time>")
    o.add_argument("--top", type=positive_int, default=5,
                   help="trials drawn in the report's learning curves (default 5)")
    o.add_argument("--confirm-seeds", type=non_negative_int, default=0, metavar="N",
                   help="re-train the best configuration with N new seeds and report mean and spread (default 0)")
    o.add_argument("--tensorboard", action="store_true",
                   help="also write each trial's metrics and hyperparameters to results/<name>/tensorboard/")
    o.add_argument("--quiet", action="store_true", help="print only the summary: no line per trial, no live line")
    o.add_argument("--verbose", action="store_true", help="Ray's own progress tables and logs as well")
    return p


# --- planning: everything that can be checked before Ray starts ------------------------------


@dataclass
class Plan:
    meta: dict[str, Any]
    space: Space
    base: TrainConfig
    claim: experiment_mod.Claim  # the lock on results/<name>, and what was there
    address: str | None = None  # HOST:PORT of the Ray cluster to attach to; None: a private local Ray

    @property
    def folder(self) -> Path:
        return self.claim.folder

    @property
    def resumed(self) -> bool:
        return self.claim.old_meta is not None and self.claim.replaces is None


def make_plan(args: argparse.Namespace, argv: Sequence[str]) -> Plan:
    if args.gpus_per_trial is not None and args.gpus_per_trial < 0:
        raise UsageError(f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}")
    if args.gpus_per_trial is not None and args.gpus_per_trial > 1:
        raise UsageError(f"--gpus-per-trial {args.gpus_per_trial:g}: a trial trains on one device, "
                         "so at most 1 (a fraction shares a GPU)")
    if args.cpus_per_trial <= 0:
        raise UsageError(f"--cpus-per-trial must be > 0, got {args.cpus_per_trial}")
    if args.reduction_factor <= 1:
        raise UsageError(f"--reduction-factor must be > 1, got {args.reduction_factor}")
    if args.address and args.address.startswith("ray://"):
        raise UsageError("--address ray://...: Ray Client runs Tune on the head node, away from this folder's journal; "
                         "run the search on the head node with --address auto")
    if args.address and (args.num_cpus or args.num_gpus is not None):
        raise UsageError("--num-cpus/--num-gpus describe a local cluster; "
                         "with --address the cluster's own resources are used")
    if args.time_budget is not None and args.time_budget <= 0:
        raise UsageError(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    if args.quiet and args.verbose:
        raise UsageError("--quiet and --verbose contradict each other; choose one")
    if args.tensorboard and not tboard.available():
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard")
    address = cluster_address(args.address) if args.address else None  # before anything is written
    space = load_space(args.space) if args.space else default_space(args.smoke_test)
    if args.warm_start:
        Experiment.load(args.warm_start)  # an ExperimentError (exit 2) if it is not one
    base = TrainConfig.load(args.config) if args.config else TrainConfig()
    overrides = {**data_overrides(args), **({"precision": args.precision} if args.precision else {})}
    if args.smoke_test:
        overrides.setdefault("data", "synthetic")
        overrides["epochs"] = 2  # the baseline too
    # Data paths are kept as the user gave them (relative to the working directory), so the
    # experiment folder holds no absolute path; trials get the data through Ray's object store.
    base = base.with_updates(**overrides)
    trial_config(base, space, {})  # the space's fixed values must make a valid configuration
    if not args.no_baseline:
        try:
            TrainConfig.from_dict(baseline_params(space), base=trial_config(base, space, {}))
        except ConfigError as exc:
            raise UsageError(f"the tutorial's baseline is not a valid configuration over this base ({exc}); "
                             "use --no-baseline") from None
    samples = args.samples or (SMOKE_SAMPLES if args.smoke_test else DEFAULT_SAMPLES)
    metric_mode = OBJECTIVES[args.objective][1]
    fingerprint = {
        "samples": samples,
        "space": space.describe(),
        "base": base.to_dict(),
        "sampler": args.sampler,
        "seed": args.seed,
        "objective": args.objective,
        "challenge_window": args.challenge_window,
        "baseline": not args.no_baseline,
        "early_stop": not args.no_early_stop,
        "warm_start": args.warm_start,
    }
    results = Path(args.results_dir).expanduser().resolve()
    _check_writable(results)
    name = args.name or dt.datetime.now().strftime("search-%Y%m%d-%H%M%S")
    claimed = experiment_mod.claim(results, name, restart=args.restart)
    old = claimed.old_meta
    if old is not None and claimed.replaces is None:
        changed = sorted(k for k in fingerprint if old.get("fingerprint", {}).get(k) != fingerprint[k])
        if changed:
            claimed.release()
            raise UsageError(f"{claimed.folder} was started with different settings ({', '.join(changed)}); "
                             f"resume it with its own command:  {old.get('command')}  or use --restart")
        meta = {**old, "status": "running", "command": old.get("command", resume_command(argv, name))}
        meta.pop("exp_dir", None)  # written by earlier versions; readers use the folder they are given
    else:
        meta = {
            "name": name,
            "command": resume_command(argv, name),
            "samples": samples,
            "objective": args.objective,
            "metric": "objective",
            "mode": metric_mode,
            "challenge_window": args.challenge_window,
            "space": space.describe(),
            "base_config": base.to_dict(),
            "fingerprint": fingerprint,
            "status": "running",
            "created": dt.datetime.now().isoformat(timespec="seconds"),
        }
    return Plan(meta, space, base, claimed, address)


def resume_command(argv: Sequence[str], name: str) -> str:
    """The command that continues this experiment: the user's, with --name, without --restart."""
    argv = [a for a in argv if a != "--restart"]
    return command_line(PROG, argv if "--name" in argv else [*argv, "--name", name])


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UsageError(f"{folder}: the results directory is not writable ({exc.strerror or exc})") from None


PROBE_SECONDS = 3.0  # a head node that does not accept a TCP connection in this time is not there


def ray_address_file() -> Path:
    """Where `ray start --head` records its address: Ray's temp dir ($RAY_TMPDIR, else $TMPDIR, else /tmp) + ray/."""
    root = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(root) / "ray" / "ray_current_cluster"


def cluster_address(flag: str) -> str:
    """--address as HOST:PORT of a head node that answers; UsageError (one line) if there is none.

    `auto` reads what Ray itself reads: $RAY_ADDRESS, else the address file of the last `ray start`.
    A short TCP connect to the head's GCS port tells a dead cluster in seconds, instead of the
    minutes of retries ray.init would spend on it. No Ray is imported for this.
    """
    address, source = flag, ""
    if flag == "auto":
        if os.environ.get("RAY_ADDRESS") not in (None, "", "auto"):
            address, source = os.environ["RAY_ADDRESS"], " (from $RAY_ADDRESS)"
        else:
            path = ray_address_file()
            try:
                address, source = path.read_text().strip(), f" (from {path})"
            except OSError:
                raise UsageError(f"--address auto: no Ray cluster was started on this machine ({path} does not exist); "
                                 "start one with `ray start --head`, or give --address HOST:PORT") from None
    if "://" in address:
        raise UsageError(f"--address {flag}: {address}{source} is a Ray Client address; give the head node's HOST:PORT")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {flag}: expected auto or HOST:PORT, got {address!r}{source}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise UsageError(f"--address {flag}: no Ray cluster answers at {address}{source} ({reason}); "
                         "start it with `ray start --head` or correct the address") from None
    return address


def storage_warning(args: argparse.Namespace) -> str | None:
    """With a cluster, checkpoints in a folder of the driver's disk are lost to trials restarted elsewhere."""
    if not args.address or (args.storage and "://" in args.storage):
        return None
    if args.storage:
        where = f"--storage {args.storage} is a local path"
    else:
        where = "without --storage, checkpoints go to results/<name>/ray"
    return (f"warning: {where} on this machine: a trial restarted on another node cannot read its checkpoint there "
            "unless every node mounts it at the same path; use a shared folder or an s3:// / gs:// URI")


def baseline_params(space: Space) -> dict[str, Any]:
    """The tutorial's values for every parameter the space names, searched or fixed."""
    tutorial = TrainConfig()
    return {name: getattr(tutorial, name) for name in space.names}


def plan_trials(experiment: Experiment, space: Space, no_baseline: bool) -> tuple[list[dict[str, Any]], list, int]:
    """What this run must do: (fixed configurations, interrupted trials, number of trials to run).
    Interrupted trials come first (each continues its own checkpoint), then the baseline, then
    Optuna's samples, until the experiment has exactly `samples` trials."""
    from tuning.searcher import BASELINE, CONTINUES

    existing = experiment.trials
    pending = [t for t in existing if not t.done]
    new = max(experiment.meta["samples"] - len(existing), 0)
    fixed = [{**t.params, CONTINUES: t.trial, **({BASELINE: True} if t.baseline else {})} for t in pending]
    if new > 0 and not no_baseline and not any(t.baseline for t in existing):
        fixed.append({**baseline_params(space), BASELINE: True})
    return fixed, pending, len(pending) + new


# --- the end of a search -------------------------------------------------------------------


def summarize(experiment: Experiment, wall: float, res: dict[str, float], paths: dict[str, Path], since: float) -> None:
    meta, all_trials = experiment.meta, experiment.trials
    window = meta["challenge_window"]
    statuses = (FINISHED, EARLY_STOPPED, STALLED, DIVERGED, ERRORED, INTERRUPTED)
    counts = {s: sum(t.status == s for t in all_trials) for s in statuses}
    parts = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    # only the epochs of this run of the command: a resumed search's wall time covers no others
    this_run = [r for r in experiment.journal.read() if r.get("event") == "epoch" and r["time"] >= since]
    busy = sum(r.get("epoch_seconds") or 0.0 for r in this_run) * max(1, math.floor(res["cpu"]))
    print()
    print(f"Search {meta['name']}: {len(all_trials)} trials ({parts}) in {wall:.0f} s; "
          f"train/evaluate used {100 * busy / (wall * max(res['cluster_cpus'], 1)):.0f}% "
          f"of {res['cluster_cpus']:g} CPUs x wall time")
    met = [t for t in all_trials if experiment_mod.met(t)]
    print(f"Challenge (train loss below test loss by more than 2 standard errors, still falling, above chance): "
          f"met by {len(met)} of {len(all_trials)} trials")
    best = experiment.best
    if best is not None:
        print(f"Best      trial {best.number:>2} ({best.trial}): {fmt_params(best.config)}")
        print(f"          {fmt_result(best)}; {verdict_text(best, window)}")
        if not experiment_mod.met(best):
            print(f"          No trial met the challenge: this is the best by {meta['objective']} alone.")
    for t in all_trials:
        if t.baseline:
            print(f"Baseline  trial {t.number:>2} (the tutorial's configuration): {fmt_result(t)}; "
                  f"{verdict_text(t, window)}")
    for t in all_trials:
        if t.status == ERRORED:
            print(f"Errored   trial {t.number:>2} ({t.trial}): {t.error}")
    table = export_mod.trials_table(all_trials, experiment.mode)
    if not table.empty:
        shown = table.sort_values(["rank", "number"], na_position="last").head(10)
        cols = ["rank", "number", "status", "lr", "batch_size", "epochs", "optimizer", "epochs_run",
                "train_loss", "test_loss", "test_accuracy", "challenge_met"]
        print()
        print(shown[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print()
    for label, path in paths.items():
        print(f"{label:>12}: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    started = time.time()
    try:
        plan = make_plan(args, argv)
    except (UsageError, SpaceError, ConfigError, ExperimentError) as exc:
        return fail(PROG, str(exc))
    try:
        with ctrl_c.delivered_until_handled() as interrupt:
            return run(plan, args, started, interrupt)
    finally:
        plan.claim.release()


def prepare_fused_step(precision: str, quiet: bool) -> None:
    """Trials that train bf16 on this machine's CPU use the fused optimizer step, built on first
    use (about 25 s, once per machine). Built here, before the trials start, they find it ready
    instead of waiting for one another; where it cannot be built, the user is told once."""
    if autocast_dtype(precision, torch.device("cpu")) is not torch.bfloat16:
        return
    began = time.time()
    if fused.kernels() is None:
        print(f"{PROG}: note: trials train bf16 with autocast, not the fused step: {fused.unavailable_reason()}",
              file=sys.stderr, flush=True)
    elif time.time() - began > 1 and not quiet:
        print(f"Built the fused bf16 optimizer step in {time.time() - began:.0f} s (once per machine)", flush=True)


def run(plan: Plan, args: argparse.Namespace, started: float, interrupt: ctrl_c.CtrlC) -> int:
    from tuning import ray_run  # Ray is imported only once the input has been checked

    meta = plan.meta
    experiment = Experiment(plan.folder, meta)
    started_ray = False
    if plan.address:  # the first line names the cluster, wherever its address came from
        via = " via $RAY_ADDRESS" if args.address == "auto" and os.environ.get("RAY_ADDRESS") else ""
        print(f"Ray cluster: {plan.address} (--address {args.address}{via})", flush=True)
    try:
        data = load_dataset(plan.base.data, plan.base.data_root, cache_dir=args.cache_dir)
        if not args.quiet:
            print(f"{data!r}, loaded in {time.time() - started:.1f} s. Experiment: {plan.folder}", flush=True)
        ray_run.quiet_ray(args.verbose)
        started_ray = ray_run.start_ray(args, plan.address)
        warning = storage_warning(args)
        if warning:
            print(f"{PROG}: {warning}", file=sys.stderr, flush=True)
        res = ray_run.resources(args)
        if not res["gpu"] and not plan.address:
            prepare_fused_step(plan.base.precision, args.quiet)
        experiment = experiment_mod.create(plan.claim, meta)
        attempt_started = time.time()
        fixed, pending, num_samples = plan_trials(experiment, plan.space, args.no_baseline)
        outcome = "finished"
        if num_samples:
            if plan.resumed and not args.quiet:
                print(f"Resuming {experiment.name}: {sum(t.done for t in experiment.trials)} trials done, "
                      f"{len(pending)} to continue from their checkpoints, {num_samples - len(pending)} new")
            base = trial_config(plan.base, plan.space, {})  # the base with the space's fixed values
            outcome = ray_run.run_trials(experiment, plan.space, base, fixed, pending, num_samples, data, args,
                                         res, started)
        if outcome == "budget":
            experiment.mark("interrupted")  # before export, so trials.csv says interrupted, not running
        if started_ray:
            ray_run.stop_ray()
            started_ray = False
        experiment.reload()
        paths = export_mod.export(experiment)
        paths["optuna"] = plan.folder / "optuna.db"
        if args.tensorboard:
            paths["tensorboard"] = plan.folder / tboard.TENSORBOARD_DIR
        wall = time.time() - started  # the search itself; confirmation and report come after
        if outcome == "finished" and args.confirm_seeds and "best_config" in paths:
            paths["confirm"] = confirm_best(experiment, data, args.confirm_seeds)
            paths.update(export_mod.export(experiment))  # best_config.yaml now states the confirmation
        try:
            paths["report"] = write_report(experiment, top=args.top)
        except Exception as exc:  # noqa: BLE001 - the results are written; a drawing problem must not hide them
            print(f"{PROG}: warning: the report could not be drawn ({exc}); the CSV files are complete",
                  file=sys.stderr)
        experiment.mark("finished" if outcome == "finished" else "interrupted")
    except (UsageError, DataError) as exc:
        return fail(PROG, str(exc))
    except KeyboardInterrupt:
        interrupt.handled()
        experiment.mark("interrupted")
        print(f"\nInterrupted. Finished trials are kept in {plan.folder}; resume with:\n  {meta['command']}",
              file=sys.stderr)
        return INTERRUPTED_STATUS
    except Exception as exc:  # noqa: BLE001 - keep the experiment resumable whatever went wrong
        experiment.mark("interrupted")
        log = plan.folder / "error.log"
        if plan.folder.exists():
            atomic_write_text(log, traceback.format_exc())
        print(f"{PROG}: error: {exc} (details in {log}). Finished trials are kept; resume with:\n  {meta['command']}",
              file=sys.stderr)
        return 1
    finally:
        if started_ray:
            ray_run.stop_ray()
    summarize(experiment, wall, res, paths, since=attempt_started)
    if outcome == "budget":
        done = sum(t.done for t in experiment.trials)
        print(f"Time budget of {args.time_budget:g} s reached: {done} of {meta['samples']} trials done; "
              f"trials it stopped are kept as interrupted. Continue with:\n  {meta['command']}")
    if not any(t.status in DONE and t.status != ERRORED for t in experiment.trials):
        print(f"{PROG}: error: no trial finished; see the errors in {paths['trials']}", file=sys.stderr)
        return 1
    return 0


def confirm_best(experiment: Experiment, data: Dataset, n: int) -> Path:
    """Re-train the best configuration with n new seeds, in this process (Ray is done by now)."""
    import torch

    from trainable.confirm import CONFIRM_FILE, confirm, describe, lucky_seed_check, write_confirm

    config = TrainConfig.load(experiment.folder / export_mod.BEST_CONFIG)
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"Confirming the best configuration with {n} new seeds ...", flush=True)
    rows = confirm(config, data, n, challenge_window=experiment.meta["challenge_window"])
    path = experiment.folder / CONFIRM_FILE
    write_confirm(path, rows)
    print(f"Confirmation: {describe(rows)}")
    best = experiment.best
    if best is not None and best.last and best.last.get("test_accuracy") is not None:
        print(f"              {lucky_seed_check(rows, best.last['test_accuracy'])}")
    return path


if __name__ == "__main__":
    sys.exit(main())
