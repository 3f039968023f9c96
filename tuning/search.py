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
import logging
import math
import os
import shlex
import socket
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python tuning/search.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from filelock import FileLock, Timeout

from trainable import challenge
from trainable.cli import OneLineParser, UsageError, fail, non_negative_int, positive_int
from trainable.config import PRECISIONS, ConfigError, TrainConfig
from trainable.data import DataError, Dataset, load_dataset
from trainable.fileio import atomic_write_text
from tuning import export as export_mod
from tuning.console import fmt_params, fmt_result, verdict_text
from tuning.report import write_report
from tuning.journal import DIVERGED, EARLY_STOPPED, ERRORED, FINISHED, INTERRUPTED, Journal, TrialRecord, trials
from tuning.space import SpaceError, Space, default_space, load_space, trial_config

PROG = "python tuning/search.py"
SAMPLERS = ("tpe", "random", "cmaes", "gp", "qmc")
DEFAULT_SAMPLES, SMOKE_SAMPLES = 20, 3
INTERRUPTED_STATUS = 130  # what a shell reports for Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    s = p.add_argument_group("search")
    s.add_argument("--samples", type=positive_int, help=f"trials in all, the baseline included (default {DEFAULT_SAMPLES}; {SMOKE_SAMPLES} with --smoke-test)")
    s.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="Optuna sampler (default tpe)")
    s.add_argument("--seed", type=int, default=0, help="seed of the sampler (default 0); training seeds come from the configuration")
    s.add_argument("--space", metavar="YAML", help="search space replacing the default (same parameter names as the configuration)")
    s.add_argument("--config", metavar="YAML", help="base configuration for everything the space does not search (default: the tutorial's)")
    s.add_argument("--objective", choices=list(challenge.OBJECTIVES), default="challenge", help="challenge (default): trials meeting the tutorial's challenge rank first, then by test accuracy")
    s.add_argument("--challenge-window", type=positive_int, default=challenge.DEFAULT_WINDOW, metavar="K", help="the train loss must fall in each of the last K epochs (default 3)")
    s.add_argument("--no-baseline", action="store_true", help="do not run the tutorial's configuration as the first trial")
    s.add_argument("--no-early-stop", action="store_true", help="no ASHA: every trial runs all its epochs")
    s.add_argument("--grace-period", type=positive_int, default=3, help="ASHA: epochs every trial gets before it can be stopped (default 3)")
    s.add_argument("--reduction-factor", type=float, default=3.0, help="ASHA: keep the best 1/N at each rung (default 3)")
    s.add_argument("--time-budget", type=float, metavar="SECONDS", help="stop starting new trials after this much time")
    s.add_argument("--smoke-test", action="store_true", help="synthetic data, 3 samples, 2 epochs: a fast end-to-end check")
    r = p.add_argument_group("resources")
    r.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial; torch threads follow (default 1)")
    r.add_argument("--gpus-per-trial", type=float,
                   help="GPU fraction per trial, at most 1: a trial trains on one device "
                   "(default 0.25 when the cluster has a GPU, so four trials share one; else 0)")
    r.add_argument("--max-concurrent", type=positive_int, help="at most this many trials at once (default: as resources allow)")
    r.add_argument("--max-failures", type=non_negative_int, default=2, help="retries of a trial that raises, from its last checkpoint (default 2)")
    r.add_argument("--num-cpus", type=positive_int, help="local cluster only: CPUs Ray may use (default: all it detects)")
    r.add_argument("--num-gpus", type=non_negative_int, help="local cluster only: GPUs Ray may use (default: all it detects)")
    r.add_argument("--address", help="without it: a private local Ray, whatever else runs on this machine "
                   "($RAY_ADDRESS is ignored). auto: attach to the cluster $RAY_ADDRESS names, else the one "
                   "`ray start` last started here; HOST:PORT: attach to that head node")
    r.add_argument("--storage", help="where Ray keeps trial checkpoints (a path or URI every node can reach; default results/<name>/ray)")
    d = p.add_argument_group("data")
    d.add_argument("--data", help="cifar10 (default), synthetic, or an image folder with train/<class>/ and test/<class>/")
    d.add_argument("--data-root", help="where cifar10 is found or downloaded (default ./data)")
    d.add_argument("--cache-dir", help="image-folder cache (default ~/.cache/hptune or $HPTUNE_CACHE)")
    d.add_argument("--precision", choices=PRECISIONS, help="auto (default), fp32 or bf16")
    o = p.add_argument_group("output")
    o.add_argument("--results-dir", default="results", help="where experiment folders go (default results/)")
    o.add_argument("--name", help="experiment name (default: search-<date>-<time>); the same name resumes an interrupted search")
    o.add_argument("--restart", action="store_true", help="start the named experiment anew; the old folder is kept as <name>.replaced-<time>")
    o.add_argument("--top", type=positive_int, default=5, help="trials drawn in the report's learning curves (default 5)")
    o.add_argument("--confirm-seeds", type=non_negative_int, default=0, metavar="N", help="re-train the best configuration with N new seeds and report mean and spread (default 0)")
    o.add_argument("--verbose", action="store_true", help="Ray's own progress tables and logs as well")
    return p


# --- planning: everything that can be checked before Ray starts ------------------------------


class SearchIncomplete(RuntimeError):
    """Tune returned with trials still to run."""


@dataclass
class Plan:
    exp_dir: Path
    meta: dict[str, Any]
    space: Space
    base: TrainConfig
    resumed: bool
    replaces: Path | None = None  # an earlier experiment of this name, moved aside on --restart
    lock: Any = None  # held while this process runs the experiment
    address: str | None = None  # HOST:PORT of the Ray cluster to attach to; None: a private local Ray


def command_line(argv: Sequence[str]) -> str:
    return " ".join([PROG, *map(shlex.quote, argv)])


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
        raise UsageError("--address ray://...: Ray Client runs Tune on the head node, away from this folder's journal; run the search on the head node with --address auto")
    if args.address and (args.num_cpus or args.num_gpus is not None):
        raise UsageError("--num-cpus/--num-gpus describe a local cluster; with --address the cluster's own resources are used")
    if args.time_budget is not None and args.time_budget <= 0:
        raise UsageError(f"--time-budget must be > 0 seconds, got {args.time_budget}")
    address = cluster_address(args.address) if args.address else None  # before anything is written
    space = load_space(args.space) if args.space else default_space(args.smoke_test)
    base = TrainConfig.load(args.config) if args.config else TrainConfig()
    overrides = {k: getattr(args, k) for k in ("data", "data_root", "precision") if getattr(args, k) is not None}
    if args.smoke_test:
        overrides.setdefault("data", "synthetic")
        overrides["epochs"] = 2  # the baseline too
    base = base.with_updates(**overrides).resolved_paths()
    trial_config(base, space, {})  # the space's fixed values must make a valid configuration
    if not args.no_baseline:
        try:
            TrainConfig.from_dict(baseline_params(space), base=trial_config(base, space, {}))
        except ConfigError as exc:
            raise UsageError(f"the tutorial's baseline is not a valid configuration over this base ({exc}); use --no-baseline") from None
    samples = args.samples or (SMOKE_SAMPLES if args.smoke_test else DEFAULT_SAMPLES)
    metric_mode = challenge.OBJECTIVES[args.objective][1]
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
    }
    results = Path(args.results_dir).expanduser().resolve()
    _check_writable(results)
    name = args.name or dt.datetime.now().strftime("search-%Y%m%d-%H%M%S")
    if not name or "/" in name or name.startswith("."):
        raise UsageError(f"--name {name!r}: use a plain folder name")
    exp_dir = results / name
    lock = FileLock(str(results / f".{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UsageError(f"another search is running experiment {exp_dir} right now") from None
    resumed, replaces = False, None
    if exp_dir.exists() and any(exp_dir.iterdir()):
        if not (exp_dir / export_mod.EXPERIMENT).exists():
            raise UsageError(f"{exp_dir} exists and is not an experiment folder; choose another --name")
        old = export_mod.read_experiment(exp_dir)
        if args.restart:
            replaces = exp_dir  # moved aside only once the input has been checked
        elif old.get("status") == "finished":
            raise UsageError(f"{exp_dir} is a finished experiment; use --restart to run it again (the old one is kept) or choose another --name")
        else:
            changed = sorted(k for k in fingerprint if old.get("fingerprint", {}).get(k) != fingerprint[k])
            if changed:
                raise UsageError(f"{exp_dir} was started with different settings ({', '.join(changed)}); resume it with its own command:  {old.get('command')}  or use --restart")
            resumed = True
    meta = {
        "name": name,
        "exp_dir": str(exp_dir),
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
    if resumed:
        meta = {**old, "status": "running", "command": old.get("command", meta["command"])}
    return Plan(exp_dir, meta, space, base, resumed, replaces, lock, address)


def resume_command(argv: Sequence[str], name: str) -> str:
    """The command that continues this experiment: the user's, with --name, without --restart."""
    argv = [a for a in argv if a != "--restart"]
    return command_line(argv if "--name" in argv else [*argv, "--name", name])


def create_experiment(plan: Plan) -> None:
    """Write experiment.json: only once the data loaded and the cluster can run the trials."""
    if plan.replaces is not None and plan.replaces.exists():
        aside = plan.replaces.with_name(f"{plan.replaces.name}.replaced-{dt.datetime.now():%Y%m%d-%H%M%S}")
        plan.replaces.rename(aside)
        print(f"--restart: the earlier experiment is kept as {aside}")
    plan.exp_dir.mkdir(parents=True, exist_ok=True)
    export_mod.write_experiment(plan.exp_dir, plan.meta)


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UsageError(f"{folder}: the results directory is not writable ({exc.strerror or exc})") from None


def baseline_params(space: Space) -> dict[str, Any]:
    """The tutorial's values for every parameter the space names, searched or fixed."""
    tutorial = TrainConfig()
    return {name: getattr(tutorial, name) for name in space.names}


# --- Ray ----------------------------------------------------------------------------------


def quiet_ray(verbose: bool) -> None:
    """Our own one line per trial instead of Ray's tables; Ctrl-C reaches us, not Tune."""
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # we add JSON + CSV ourselves, not TensorBoard
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        for name in ("ray", "ray.tune", "ray.train", "ray.data"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


PROBE_SECONDS = 3.0  # a head node that does not accept a TCP connection in this time is not there


def ray_address_file() -> Path:
    """Where `ray start --head` records its address: Ray's temp dir ($RAY_TMPDIR, else $TMPDIR, else /tmp) + ray/."""
    root = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(root) / "ray" / "ray_current_cluster"


def cluster_address(flag: str) -> str:
    """--address as HOST:PORT of a head node that answers; UsageError (one line) if there is none.

    `auto` reads what Ray itself reads: $RAY_ADDRESS, else the address file of the last `ray start`.
    A short TCP connect to the head's GCS port tells a dead cluster in seconds, instead of the
    minutes of retries ray.init would spend on it.
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


def auth_token_available() -> bool:
    """A Ray token where Ray looks for one: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return os.path.isfile(path)


def enable_token_auth() -> None:
    """RAY_AUTH_MODE=token for this process, as ray.init does for `auto` (Ray read its config at import)."""
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:  # another Ray version: the environment variable alone, read by a fresh config
        os.environ["RAY_AUTH_MODE"] = "token"
    else:
        _enable_token_auth()


def code_runtime_env() -> dict[str, Any]:
    """The packages a trial imports, uploaded by Ray to every node (which needs Ray, torch and the
    dependencies, but not this repository); results/ and data/ stay behind, being outside them."""
    import trainable
    import tuning

    return {"py_modules": [str(Path(m.__file__).parent) for m in (trainable, tuning)], "excludes": ["__pycache__"]}


def start_ray(args: argparse.Namespace, address: str | None = None) -> bool:
    """Start a private local Ray, or attach to the cluster at `address`; True if this call started
    or joined it (and should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": args.verbose, "logging_level": logging.INFO if args.verbose else logging.ERROR}
    if address:
        # Ray turns token authentication on by itself only for a cluster it finds; for HOST:PORT too,
        # use the token the head's `ray start` wrote (a client with a token also joins a cluster without).
        if "RAY_AUTH_MODE" not in os.environ and auth_token_available():
            enable_token_auth()
        try:
            ray.init(address=address, runtime_env=code_runtime_env(), **kwargs)
        except (ConnectionError, RuntimeError) as exc:  # AuthenticationError is a RuntimeError
            hint = ("if it uses token authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or copy the head's "
                    "~/.ray/auth_token to this machine)")
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UsageError(f"could not join the Ray cluster at {address}: {first}; {hint}") from None
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cluster = ray.cluster_resources()
        print(f"Attached to the Ray cluster at {address}: {len(nodes)} nodes, {cluster.get('CPU', 0):g} CPUs, "
              f"{cluster.get('GPU', 0):g} GPUs; trainable/ and tuning/ are shipped to them", flush=True)
    else:
        # "local": always a private Ray, never a cluster found in /tmp/ray or $RAY_ADDRESS
        ray.init(address="local", num_cpus=args.num_cpus, num_gpus=args.num_gpus, **kwargs)
    return True


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


def resources(args: argparse.Namespace) -> dict[str, float]:
    """Per-trial resources, checked against what the cluster has."""
    import ray

    cluster = ray.cluster_resources()
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    gpus_per_trial = args.gpus_per_trial if args.gpus_per_trial is not None else (0.25 if gpus > 0 else 0.0)
    if args.cpus_per_trial > cpus:
        raise UsageError(f"--cpus-per-trial {args.cpus_per_trial:g}: the cluster has only {cpus:g} CPUs")
    if gpus_per_trial > gpus:
        raise UsageError(f"--gpus-per-trial {gpus_per_trial:g}: the cluster has {gpus:g} GPUs, so no trial could ever start")
    return {"cpu": args.cpus_per_trial, "gpu": gpus_per_trial, "cluster_cpus": cpus, "cluster_gpus": gpus}


def make_sampler(name: str, seed: int):  # noqa: ANN201 - an optuna sampler
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=6, multivariate=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=6, warn_independent_sampling=False)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)


def release_stale_optuna_trials(storage_url: str, study_name: str) -> int:
    """Trials a killed driver left RUNNING (or queued) would stay so forever: mark them failed."""
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=study_name, storage=storage_url)
    except KeyError:  # no such study yet
        return 0
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    for t in stale:
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return len(stale)


def run_search(plan: Plan, data: Dataset, args: argparse.Namespace, res: dict[str, float], started: float) -> str:
    """Run the trials the experiment still needs; returns 'finished' or 'budget'."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from trainable.fit import METRICS
    from trainable.ray_trainable import FAULT_ENV, train_trial
    from tuning.callbacks import ExperimentCallback
    from tuning.searcher import BASELINE, CONTINUES, ASHAKeepingBaseline, FixedFirst

    meta, space = plan.meta, plan.space
    base = trial_config(plan.base, space, {})  # the base with the space's fixed values
    journal = Journal(plan.exp_dir)
    existing = trials(journal.read())
    pending = [t for t in existing if not t.done]
    new = max(meta["samples"] - len(existing), 0)
    num_samples = len(pending) + new
    if num_samples == 0:
        return "finished"
    if plan.resumed:
        done = sum(t.done for t in existing)
        print(f"Resuming {plan.exp_dir.name}: {done} trials done, {len(pending)} to continue from their checkpoints, {new} new")
    # Interrupted trials first (each continues its own checkpoint), then the baseline, then Optuna.
    fixed = [{**t.params, CONTINUES: t.trial, **({BASELINE: True} if t.baseline else {})} for t in pending]
    if new > 0 and not args.no_baseline and not any(t.baseline for t in existing):
        fixed.append({**baseline_params(space), BASELINE: True})
    attempt = 1 + sum(1 for r in journal.read() if r.get("event") == "attempt")
    storage_url = f"sqlite:///{plan.exp_dir / 'optuna.db'}"
    if (plan.exp_dir / "optuna.db").exists():
        release_stale_optuna_trials(storage_url, meta["name"])
    import optuna

    optuna_search = OptunaSearch(
        space=space.distributions,
        metric="objective",
        mode=meta["mode"],
        # a resumed search must not replay the first attempt's random start-up samples
        sampler=make_sampler(args.sampler, args.seed if attempt == 1 else args.seed * 1000 + attempt),
        study_name=meta["name"],
        storage=optuna.storages.RDBStorage(storage_url),
    )
    searcher = FixedFirst(optuna_search, fixed, metric="objective", mode=meta["mode"], first_number=len(existing) + 1)
    max_epochs = max([_max_epochs(space, base), *(c.get("epochs", base.epochs) for c in fixed if c.get(BASELINE))])
    if args.no_early_stop:
        scheduler = FIFOScheduler()
    else:
        scheduler = ASHAKeepingBaseline(time_attr="epoch", max_t=max_epochs, grace_period=min(args.grace_period, max_epochs), reduction_factor=args.reduction_factor)
    threads = max(1, math.floor(res["cpu"]))
    # Tune keeps only one trial pending at a time for a searcher; let every free slot fill at once.
    slots = res["cluster_cpus"] / res["cpu"]
    if res["gpu"] > 0:
        slots = min(slots, res["cluster_gpus"] / res["gpu"])
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(max(1, int(slots)))
    trainable = tune.with_parameters(
        train_trial,
        data=data,
        base=base.to_dict(),
        objective=meta["objective"],
        challenge_window=meta["challenge_window"],
        threads=threads,
        checkpoints={t.trial: t.checkpoint for t in pending if t.checkpoint},
        inject_fault=os.environ.get(FAULT_ENV),
    )
    trainable = tune.with_resources(trainable, {"cpu": res["cpu"], "gpu": res["gpu"]})
    journal.append("attempt", attempt=attempt, command=meta["command"], num_samples=num_samples)
    callback = ExperimentCallback(
        plan.exp_dir,
        journal,
        base=base,
        searcher=searcher,
        samples=meta["samples"],
        mode=meta["mode"],
        metrics=(*METRICS, "objective"),
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric="objective",
            mode=meta["mode"],
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=args.max_concurrent,
            time_budget_s=args.time_budget,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"attempt-{attempt}",
            # one folder per experiment under a shared --storage, as under results/<name>/ray
            storage_path=f"{args.storage.rstrip('/')}/{meta['name']}" if args.storage else str(plan.exp_dir / "ray"),
            callbacks=[callback, JsonLoggerCallback(), CSVLoggerCallback()],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=args.max_failures),
            verbose=2 if args.verbose else 0,
        ),
    )
    tuner.fit()
    after = trials(journal.read())
    if len(after) < meta["samples"] or not all(t.done for t in after):
        if args.time_budget and time.time() - started >= args.time_budget:
            release_stale_optuna_trials(storage_url, meta["name"])  # trials the budget stopped
            return "budget"
        raise SearchIncomplete("Ray Tune stopped before every trial ended")
    return "finished"


def _max_epochs(space: Space, base: TrainConfig) -> int:
    dist = space.distributions.get("epochs")
    if dist is None:
        return int(space.fixed.get("epochs", base.epochs))
    return int(max(dist.choices) if hasattr(dist, "choices") else dist.high)


# --- the end of a search -------------------------------------------------------------------


def summarize(plan: Plan, all_trials: list[TrialRecord], wall: float, res: dict[str, float], paths: dict[str, Path], since: float) -> None:
    meta = plan.meta
    window = meta["challenge_window"]
    counts = {s: sum(t.status == s for t in all_trials) for s in (FINISHED, EARLY_STOPPED, DIVERGED, ERRORED, INTERRUPTED)}
    parts = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    # only the epochs of this run of the command: a resumed search's wall time covers no others
    this_run = [r for r in Journal(plan.exp_dir).read() if r.get("event") == "epoch" and r["time"] >= since]
    busy = sum(r.get("epoch_seconds") or 0.0 for r in this_run) * max(1, math.floor(res["cpu"]))
    print()
    print(f"Search {meta['name']}: {len(all_trials)} trials ({parts}) in {wall:.0f} s; "
          f"train/evaluate used {100 * busy / (wall * max(res['cluster_cpus'], 1)):.0f}% of {res['cluster_cpus']:g} CPUs x wall time")
    met = [t for t in all_trials if (t.last or {}).get("challenge_met")]
    print(f"Challenge (train loss below test loss and still falling): met by {len(met)} of {len(all_trials)} trials")
    best = export_mod.best_trial(all_trials, meta["mode"])
    if best is not None:
        print(f"Best      trial {best.number:>2} ({best.trial}): {fmt_params(best.config)}")
        print(f"          {fmt_result(best)}; {verdict_text(best, window)}")
    for t in all_trials:
        if t.baseline:
            print(f"Baseline  trial {t.number:>2} (the tutorial's configuration): {fmt_result(t)}; {verdict_text(t, window)}")
    for t in all_trials:
        if t.status == ERRORED:
            print(f"Errored   trial {t.number:>2} ({t.trial}): {t.error}")
    table = export_mod.trials_table(all_trials)
    if not table.empty:
        ascending = meta["mode"] == "min"
        shown = table.sort_values("objective", ascending=ascending, na_position="last").head(10)
        cols = ["number", "status", "lr", "batch_size", "epochs", "optimizer", "epochs_run", "train_loss", "test_loss", "test_accuracy", "challenge_met"]
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
    except (UsageError, SpaceError, ConfigError, export_mod.ExperimentError) as exc:
        return fail(PROG, str(exc))
    try:
        return run(plan, args, started)
    finally:
        plan.lock.release()


def run(plan: Plan, args: argparse.Namespace, started: float) -> int:
    meta = plan.meta
    started_ray = False
    if plan.address:  # the first line names the cluster, wherever its address came from
        via = " via $RAY_ADDRESS" if args.address == "auto" and os.environ.get("RAY_ADDRESS") else ""
        print(f"Ray cluster: {plan.address} (--address {args.address}{via})", flush=True)
    try:
        data = load_dataset(plan.base.data, plan.base.data_root, cache_dir=args.cache_dir)
        print(f"{data!r}, loaded in {time.time() - started:.1f} s. Experiment: {plan.exp_dir}", flush=True)
        quiet_ray(args.verbose)
        started_ray = start_ray(args, plan.address)
        warning = storage_warning(args)
        if warning:
            print(f"{PROG}: {warning}", file=sys.stderr, flush=True)
        res = resources(args)
        create_experiment(plan)
        attempt_started = time.time()
        outcome = run_search(plan, data, args, res, started)
        if started_ray:
            import ray

            ray.shutdown()
            started_ray = False
        paths = export_mod.export(plan.exp_dir)
        _, all_trials = export_mod.load_trials(plan.exp_dir)
        paths["optuna"] = plan.exp_dir / "optuna.db"
        wall = time.time() - started  # the search itself; confirmation and report come after
        if outcome == "finished" and args.confirm_seeds and "best_config" in paths:
            paths["confirm"] = confirm_best(plan, data, args.confirm_seeds)
            paths.update(export_mod.export(plan.exp_dir))  # best_config.yaml now states the confirmation
        try:
            paths["report"] = write_report(plan.exp_dir, top=args.top)
        except Exception as exc:  # noqa: BLE001 - the results are written; a drawing problem must not hide them
            print(f"{PROG}: warning: the report could not be drawn ({exc}); the CSV files are complete", file=sys.stderr)
        _mark(plan, "finished" if outcome == "finished" else "interrupted")
    except (UsageError, DataError) as exc:
        return fail(PROG, str(exc))
    except KeyboardInterrupt:
        _mark(plan, "interrupted")
        print(f"\nInterrupted. Finished trials are kept in {plan.exp_dir}; resume with:\n  {meta['command']}", file=sys.stderr)
        return INTERRUPTED_STATUS
    except Exception as exc:  # noqa: BLE001 - keep the experiment resumable whatever went wrong
        _mark(plan, "interrupted")
        log = plan.exp_dir / "error.log"
        if plan.exp_dir.exists():
            atomic_write_text(log, traceback.format_exc())
        print(f"{PROG}: error: {exc} (details in {log}). Finished trials are kept; resume with:\n  {meta['command']}", file=sys.stderr)
        return 1
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    summarize(plan, all_trials, wall, res, paths, since=attempt_started)
    if outcome == "budget":
        done = sum(t.done for t in all_trials)
        print(f"Time budget of {args.time_budget:g} s reached: {done} of {meta['samples']} trials done; "
              f"trials it stopped are kept as interrupted. Continue with:\n  {meta['command']}")
    if not any(t.status in (FINISHED, EARLY_STOPPED, DIVERGED) for t in all_trials):
        print(f"{PROG}: error: no trial finished; see the errors in {paths['trials']}", file=sys.stderr)
        return 1
    return 0


def confirm_best(plan: Plan, data: Dataset, n: int) -> Path:
    """Re-train the best configuration with n new seeds, in this process (Ray is done by now)."""
    import torch

    from trainable.confirm import CONFIRM_FILE, confirm, describe, lucky_seed_check, write_confirm

    config = TrainConfig.load(plan.exp_dir / export_mod.BEST_CONFIG)
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"Confirming the best configuration with {n} new seeds ...", flush=True)
    rows = confirm(config, data, n, challenge_window=plan.meta["challenge_window"])
    path = plan.exp_dir / CONFIRM_FILE
    write_confirm(path, rows)
    print(f"Confirmation: {describe(rows)}")
    _, all_trials = export_mod.load_trials(plan.exp_dir)
    best = export_mod.best_trial(all_trials, plan.meta["mode"])
    if best is not None and best.last and best.last.get("test_accuracy") is not None:
        print(f"              {lucky_seed_check(rows, best.last['test_accuracy'])}")
    return path


def _mark(plan: Plan, status: str) -> None:
    if not (plan.exp_dir / export_mod.EXPERIMENT).exists():
        return  # stopped before the experiment was created
    meta = export_mod.read_experiment(plan.exp_dir)
    meta["status"] = status
    export_mod.write_experiment(plan.exp_dir, meta)
    plan.meta = meta


if __name__ == "__main__":
    sys.exit(main())
