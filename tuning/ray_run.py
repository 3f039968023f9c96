"""Everything Ray: the trial function, starting or joining Ray, and the Tuner that runs the trials.

The trial is the same Trainer as `python -m trainable`. Per epoch it calls `tune.report` with the
epoch's metrics (plus `objective`, the scalar the search steers by) and a checkpoint holding
model, optimizer and history. A trial restarted by Tune (after a failure) or continued by a
resumed search picks up from its checkpoint at the next epoch, and reports `epoch` as the epoch
number, so the scheduler counts epochs, not restarts. A trial whose last two epochs sit at chance
level with a flat test loss stops there as `stalled` (unless early stopping is off): after its
second epoch if it never learned, or two epochs after it collapsed if it learned and then died.

The data set is loaded once by the driver and reaches every trial through Ray's object store
(`tune.with_parameters`). Without --address the search starts a private local Ray on loopback,
whatever a stale /tmp/ray or a running `ray start` says; with --address it joins that cluster.
The searcher (tuning.searcher) and the callback that journals (tuning.callbacks) are the other
two modules that import Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
import torch
from ray import tune
from ray.tune.schedulers import FIFOScheduler

from trainable.config import TrainConfig
from trainable.data import Dataset
from trainable.fit import METRICS, Trainer, flush_denormals
from tuning.callbacks import LINES, LIVE, QUIET, ExperimentCallback
from tuning.ctrl_c import sigint_handler
from trainable.cli import UsageError
from tuning.experiment import Experiment
from tuning.journal import TrialRecord
from tuning.objective import objective_value, stalled
from tuning.searcher import BASELINE, CONTINUES, ASHAKeepingBaseline, StudySearcher
from tuning.space import Space
from tuning.study import make_sampler, open_study, release_stale_trials, warm_start

if TYPE_CHECKING:
    from tuning.search import Grace  # the parsed --grace-period (search.py imports this module)

STATE_FILE = "state.pt"
# Read by the search driver (not the workers) and handed to every trial: tests use it to make
# trials raise. "EPOCH:TIMES:MARKER_DIR[:KEY=VALUE]": at EPOCH, the first TIMES times a trial gets
# there (counted in MARKER_DIR), only in trials whose config has KEY == VALUE if given.
FAULT_ENV = "HPTUNE_INJECT_FAULT"
# Also for tests, so that they wait for events instead of guessing how fast a machine is:
# "EPOCH:FREE:MARKER_DIR": after reporting EPOCH, every trial but the first FREE to get there
# waits until MARKER_DIR/release exists (the search cannot end while one waits).
HOLD_ENV = "HPTUNE_HOLD_TRIALS"
TRIAL_METRICS = (*METRICS, "objective", "stalled", "data_device")  # what a trial reports, and the journal keeps


class SearchIncomplete(RuntimeError):
    """Tune returned with trials still to run."""


def make_asha(grace: Grace, reduction_factor: float, max_epochs: int) -> ASHAKeepingBaseline:
    """ASHA with rungs by share of each trial's schedule (`grace.time_attr == "progress"`: a
    20-epoch cosine trial is judged at epoch 5 beside a 8-epoch one at epoch 2, both a quarter
    through their schedules) or by epoch (Ray Tune's examples: every trial judged at epoch N)."""
    if grace.time_attr == "progress":
        return ASHAKeepingBaseline(time_attr="progress", max_t=1.0, grace_period=grace.value,
                                   reduction_factor=reduction_factor)
    return ASHAKeepingBaseline(time_attr="epoch", max_t=max_epochs, grace_period=min(grace.value, max_epochs),
                               reduction_factor=reduction_factor)


# --- the trial -----------------------------------------------------------------------------


def trial_device(gpu_ids: list) -> torch.device:
    """The GPU Ray assigned to this trial if CUDA can see it, else the CPU."""
    if gpu_ids and torch.cuda.is_available():
        return torch.device("cuda")  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU
    return torch.device("cpu")


def train_trial(
    params: dict[str, Any],
    *,
    data: Dataset,
    base: dict[str, Any],
    objective: str,
    challenge_window: int,
    threads: int,
    stop_stalled: bool = True,
    checkpoints: Mapping[str, str] | None = None,
    inject_fault: str | None = None,
    hold: str | None = None,
) -> None:
    """Run one trial: `params` (from the searcher) over the `base` configuration.

    Keys of `params` starting with "__" are the searcher's tags, not hyperparameters; the tag
    "__continues__" names an interrupted trial whose checkpoint (in `checkpoints`) to resume.
    """
    device = trial_device(ray.get_gpu_ids())
    flush_denormals(device)  # in this worker process, before torch starts its threads
    torch.set_num_threads(threads)
    continues = params.get(CONTINUES)
    config = TrainConfig.from_dict({**base, **{k: v for k, v in params.items() if not k.startswith("__")}})
    trainer = Trainer(config, data, device=device, challenge_window=challenge_window)
    checkpoint = tune.get_checkpoint()  # set when Tune restarts this trial after a failure
    if checkpoint is None and continues and checkpoints and continues in checkpoints:
        checkpoint = tune.Checkpoint(checkpoints[continues])  # a resumed search
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, STATE_FILE), map_location=trainer.device, weights_only=False)
            trainer.load_state_dict(state)
    for metrics in trainer.run():
        if inject_fault:
            _inject_fault(inject_fault, metrics["epoch"], config)
        metrics["objective"] = objective_value(metrics, objective)
        metrics["progress"] = metrics["epoch"] / config.epochs  # ASHA's rungs by share of the schedule
        metrics["data_device"] = str(trainer.train_images.device)  # where the data set lives (CPU or the GPU)
        metrics["stalled"] = stop_stalled and not params.get(BASELINE) and stalled(trainer.history, data.num_classes)
        with tempfile.TemporaryDirectory() as folder:
            torch.save(trainer.state_dict(), os.path.join(folder, STATE_FILE))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        if hold:
            _hold(hold, metrics["epoch"])
        if metrics["stalled"]:
            return


def _inject_fault(spec: str, epoch: int, config: TrainConfig) -> None:
    at, times, marker_dir, *only = spec.split(":")
    if epoch != int(at):
        return
    if only:
        key, value = only[0].split("=", 1)
        if str(getattr(config, key)) != value:
            return
    trial_id = tune.get_context().get_trial_id()
    marker = os.path.join(marker_dir, f"{trial_id}.faults")
    count = int(open(marker).read()) if os.path.exists(marker) else 0
    if count < int(times):
        with open(marker, "w") as fh:
            fh.write(str(count + 1))
        raise RuntimeError(f"injected fault at epoch {epoch} (test)")


def _hold(spec: str, epoch: int, most_seconds: float = 900.0) -> None:
    at, free, marker_dir = spec.split(":", 2)
    if epoch != int(at):
        return
    arrival = 0
    while True:  # the n-th trial to get here creates arrived-n (atomically, across processes)
        try:
            os.close(os.open(os.path.join(marker_dir, f"arrived-{arrival}"), os.O_CREAT | os.O_EXCL))
            break
        except FileExistsError:
            arrival += 1
    deadline = time.monotonic() + most_seconds  # never hang a forgotten test run for ever
    while (arrival >= int(free) and not os.path.exists(os.path.join(marker_dir, "release"))
           and time.monotonic() < deadline):
        time.sleep(0.05)


# --- Ray itself ----------------------------------------------------------------------------


def quiet_ray(verbose: bool) -> None:
    """Our own one line per trial instead of Ray's tables; Ctrl-C reaches us, not Tune."""
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # the journal is the record
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        for name in ("ray", "ray.tune", "ray.train", "ray.data"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


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
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": args.verbose,
        "logging_level": logging.INFO if args.verbose else logging.ERROR,
    }
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
        with daemons_ignoring_ctrl_c():
            ray.init(address="local", num_cpus=args.num_cpus, num_gpus=args.num_gpus, **kwargs)
    return True


def daemons_ignoring_ctrl_c() -> contextlib.AbstractContextManager[None]:
    """Start Ray's local daemons with SIGINT ignored (children inherit an ignored signal).

    They run in the driver's process group, so Ctrl-C in a terminal reaches the GCS server and the
    raylet as well as the driver; when they died of it first, the driver's clean-up talked to a
    dead GCS and could hang for minutes instead of saving the experiment and printing how to
    resume. The driver keeps its own Ctrl-C handling and stops the daemons itself (`stop_ray`)."""
    return sigint_handler(signal.SIG_IGN)


def stop_ray() -> None:
    ray.shutdown()


def resources(args: argparse.Namespace) -> dict[str, float]:
    """Per-trial resources, checked against what the cluster has."""
    cluster = ray.cluster_resources()
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    gpus_per_trial = args.gpus_per_trial if args.gpus_per_trial is not None else (0.25 if gpus > 0 else 0.0)
    if args.cpus_per_trial > cpus:
        raise UsageError(f"--cpus-per-trial {args.cpus_per_trial:g}: the cluster has only {cpus:g} CPUs")
    if gpus_per_trial > gpus:
        raise UsageError(f"--gpus-per-trial {gpus_per_trial:g}: the cluster has {gpus:g} GPUs, "
                         "so no trial could ever start")
    return {"cpu": args.cpus_per_trial, "gpu": gpus_per_trial, "cluster_cpus": cpus, "cluster_gpus": gpus}


# --- the Tuner -----------------------------------------------------------------------------


def run_trials(
    experiment: Experiment,
    space: Space,
    base: TrainConfig,
    fixed: list[dict[str, Any]],
    pending: list[TrialRecord],
    num_samples: int,
    data: Dataset,
    args: argparse.Namespace,
    res: dict[str, float],
    started: float,
) -> str:
    """Run `num_samples` trials (the `fixed` ones first, then Optuna's) on Ray Tune, journalling
    everything into the experiment; returns 'finished' or 'budget'."""
    meta = experiment.meta
    attempt = 1 + sum(1 for r in experiment.journal.read() if r.get("event") == "attempt")
    # a resumed search must not replay the first attempt's random start-up samples
    sampler = make_sampler(args.sampler, args.seed if attempt == 1 else args.seed * 1000 + attempt)
    study = open_study(experiment.folder, meta["name"], "maximize" if meta["mode"] == "max" else "minimize", sampler)
    release_stale_trials(study)
    if attempt == 1 and getattr(args, "warm_start", None):
        added, skipped = warm_start(study, space, Experiment.load(args.warm_start), meta["objective"])
        if not args.quiet:
            note = f"; {skipped} outside this space skipped" if skipped else ""
            print(f"Warm start: {added} trials of {args.warm_start} given to the sampler{note}", flush=True)
    elif attempt == 1 and not args.no_center and num_samples > len(fixed):
        center = space.center()
        if center:  # a fresh study: its first sampled trial is the space's center
            study.enqueue_trial(center, user_attrs={"center": True})
    searcher = StudySearcher(study, space, fixed, base=base.to_dict(), metric="objective", mode=meta["mode"],
                             first_number=len(experiment.trials) + 1)
    max_epochs = max([int(space.high("epochs", base.epochs)), *(c.get("epochs", base.epochs) for c in fixed)])
    if args.no_early_stop:
        scheduler = FIFOScheduler()
    else:
        scheduler = make_asha(args.grace_period, args.reduction_factor, max_epochs)
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
        threads=max(1, math.floor(res["cpu"])),
        stop_stalled=not args.no_early_stop,
        checkpoints={t.trial: t.checkpoint for t in pending if t.checkpoint},
        inject_fault=os.environ.get(FAULT_ENV),
        hold=os.environ.get(HOLD_ENV),
    )
    trainable = tune.with_resources(trainable, {"cpu": res["cpu"], "gpu": res["gpu"]})
    experiment.journal.append("attempt", attempt=attempt, command=meta["command"], num_samples=num_samples)
    callback = ExperimentCallback(
        experiment,
        base=base,
        searcher=searcher,
        metrics=TRIAL_METRICS,
        output=QUIET if args.quiet else LIVE if sys.stdout.isatty() and not args.verbose else LINES,
        slots=min(slots, args.max_concurrent or slots),
        tensorboard=args.tensorboard,
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
            storage_path=(f"{args.storage.rstrip('/')}/{meta['name']}" if args.storage
                          else str(experiment.folder / "ray")),
            callbacks=[callback],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=args.max_failures),
            verbose=2 if args.verbose else 0,
        ),
    )
    try:
        tuner.fit()
    finally:
        callback.close()
    experiment.reload()
    if len(experiment.trials) < meta["samples"] or not all(t.done for t in experiment.trials):
        if args.time_budget and time.time() - started >= args.time_budget:
            release_stale_trials(study)  # trials the budget stopped
            return "budget"
        raise SearchIncomplete("Ray Tune stopped before every trial ended")
    return "finished"
