"""The Tuner that runs a search's trials on Ray Tune, journalling everything into the experiment.

Optuna (through StudySearcher) proposes, the stopping rule (tuning/engine/schedulers.py: the
noise rule by default, ASHA on request; the baseline always runs to its end) stops, the callback
journals; the trial function is tuning/engine/trial.py and Ray itself tuning/engine/cluster.py.
Takes SearchSettings, never the command line.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from trainable.config import TrainConfig
from trainable.data import Data
from tuning.engine.arrays import plan_arrays
from tuning.engine.callbacks import ExperimentCallback
from tuning.engine.hooks import Hooks
from tuning.engine.schedulers import make_scheduler
from tuning.engine.searcher import StudySearcher
from tuning.engine.trial import TrialSetup, train_trial
from tuning.engine.usercode import UserCode
from tuning.noise import StoppingRule, curve_of
from tuning.results.console import LINES, LIVE, QUIET, Console
from tuning.results.experiment import Experiment
from tuning.results.export import CsvFiles
from tuning.results.journal import FINISHED, TrialRecord
from tuning.results.listener import Listener
from tuning.results.mlflow_runs import MlflowTracker
from tuning.results.tensorboard import TrialBoards
from tuning.results.wandb_runs import WandbTracker
from tuning.settings import SearchSettings
from tuning.space import AnySpace
from tuning.study import make_sampler, open_or_rebuild, release_stale_trials, warm_start

# ASHA's last rung by epoch where the space does not say how many epochs a trial may run (a
# define-by-run function): far beyond any trial, so no trial is stopped for reaching it
UNKNOWN_MAX_EPOCHS = 10_000


class SearchIncompleteError(RuntimeError):
    """Tune returned with trials still to run."""


def scheduler_for(experiment: Experiment, pending: list[TrialRecord], max_epochs: int) -> TrialScheduler:
    """The search's stopping rule, knowing what the journal holds: the curves of the trials that
    ran their whole schedule (the noise rule's incumbent and gains), and the epochs the interrupted
    trials have already run."""
    settings: SearchSettings = experiment.settings
    if not settings.early_stop:
        return FIFOScheduler()
    objective, mode = settings.objective, settings.mode
    finished = [curve_of(t.epochs, t.config["epochs"], objective, mode) for t in experiment.trials
                if t.status == FINISHED]
    grace = settings.grace_period()
    rule = StoppingRule(finished, **({"grace": grace.value} if grace.time_attr == "progress"
                                     else {"grace_epochs": int(grace.value)}))
    earlier = {t.trial: curve_of(t.epochs, t.config["epochs"], objective, mode) for t in pending}
    return make_scheduler(settings.stopping, grace, settings.reduction_factor, max_epochs, mode=mode,
                          seed=settings.seed, rule=rule, earlier=earlier)


def listeners(experiment: Experiment, *, slots: float) -> list[Listener]:
    """What the search does with each event after journalling it, in this order: the CSV files,
    TensorBoard (--tensorboard), MLflow (--mlflow), W&B (--wandb), the console."""
    settings = experiment.settings
    output = QUIET if settings.quiet else LIVE if sys.stdout.isatty() and not settings.verbose else LINES
    return [CsvFiles(), *([TrialBoards(experiment.folder)] if settings.tensorboard else []),
            *([MlflowTracker(experiment, settings.mlflow)] if settings.mlflow is not None else []),
            *([WandbTracker(experiment, settings.wandb)] if settings.wandb is not None else []),
            Console(experiment, output=output, slots=slots)]


def run_trials(
    experiment: Experiment,
    space: AnySpace,
    base: TrainConfig,
    fixed: list[dict[str, Any]],
    pending: list[TrialRecord],
    num_samples: int,
    data: Data,
    code: UserCode,
    res: dict[str, float],
    started: float,
) -> str:
    """Run `num_samples` trials (the `fixed` ones first, then Optuna's) on Ray Tune, journalling
    everything into the experiment; returns 'finished', 'converged' (--until-converged ended it
    before --samples) or 'budget'."""
    meta, settings = experiment.meta, experiment.settings
    attempt = 1 + experiment.journal.attempts()
    # a resumed search must not replay the first attempt's random start-up samples
    sampler = make_sampler(settings.sampler, settings.seed if attempt == 1 else settings.seed * 1000 + attempt)
    study, rebuilt = open_or_rebuild(experiment, space, "maximize" if settings.mode == "max" else "minimize", sampler)
    if rebuilt:  # the journal is the record; the study is what the sampler learns from, rebuilt from it
        print(f"hptune: {rebuilt}", file=sys.stderr, flush=True)
    release_stale_trials(study)
    if attempt == 1 and settings.warm_start:
        added, skipped = warm_start(study, space, Experiment.load(settings.warm_start), settings.objective)
        if not settings.quiet:
            note = f"; {skipped} outside this space skipped" if skipped else ""
            print(f"Warm start: {added} trials of {settings.warm_start} given to the sampler{note}", flush=True)
    elif attempt == 1 and settings.center and num_samples > len(fixed):
        center = space.center()
        if center:  # a fresh study: its first sampled trial is the space's center
            study.enqueue_trial(center, user_attrs={"center": True})
    converged = None
    if settings.until_converged:  # read from the journal when a trial is to be proposed, so a resumed search agrees

        def converged() -> bool:
            found = Experiment.load(experiment.folder).convergence()
            return found is not None and found.confirmed

    searcher = StudySearcher(study, space, fixed, base=base.to_dict(), metric="objective", mode=settings.mode,
                             first_number=len(experiment.trials) + 1, converged=converged)
    searcher.continued_numbers = {t.trial: t.number for t in pending}
    highest = space.high("epochs", base.epochs)
    max_epochs = max([UNKNOWN_MAX_EPOCHS if highest is None else int(highest),
                      *(c.get("epochs", base.epochs) for c in fixed)])
    scheduler = scheduler_for(experiment, pending, max_epochs)
    resources = {"cpu": res["cpu"], "gpu": res["gpu"]}
    max_concurrent = settings.max_concurrent
    arrays = plan_arrays(settings, data, base, code, res)  # None without --arrays
    if arrays is not None:  # a member's trial only waits for the ArrayServer, which holds the device
        resources, max_concurrent = arrays.resources, arrays.max_concurrent
    # Tune keeps only one trial pending at a time for a searcher; let every free slot fill at once.
    slots = res["cluster_cpus"] / resources["cpu"]
    if resources["gpu"] > 0:
        slots = min(slots, res["cluster_gpus"] / resources["gpu"])
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(max(1, int(slots)))
    if converged is not None and max_concurrent is None:
        max_concurrent = max(1, int(slots))  # no trial proposed ahead of the results that may settle the search
    setup = TrialSetup(
        base=base.to_dict(),
        objective=settings.objective,
        challenge_window=settings.challenge_window,
        threads=max(1, math.floor(res["cpu"])),
        stop_stalled=settings.early_stop,
        checkpoints={t.trial: t.checkpoint for t in pending if t.checkpoint},
        hooks=Hooks.from_environment(),
        code=code,
        arrays=arrays,
    )
    trainable = tune.with_parameters(train_trial, data=data, setup=setup)
    trainable = tune.with_resources(trainable, resources)
    experiment.journal.append("attempt", attempt=attempt, command=meta["command"], num_samples=num_samples)
    callback = ExperimentCallback(experiment, base=base, searcher=searcher,
                                  listeners=listeners(experiment, slots=min(slots, max_concurrent or slots)))
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric="objective",
            mode=settings.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent,
            time_budget_s=settings.time_budget,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"attempt-{attempt}",
            # one folder per experiment under a shared --storage, as under results/<name>/ray
            storage_path=(f"{settings.storage.rstrip('/')}/{experiment.name}" if settings.storage
                          else str(experiment.folder / "ray")),
            callbacks=[callback],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            verbose=2 if settings.verbose else 0,
        ),
    )
    try:
        tuner.fit()
    except Exception as exc:
        if callback.failed_write is not None:  # Tune hands on a callback's exception as text: the write, named
            raise callback.failed_write from exc
        raise
    finally:
        callback.close()
    experiment.reload()
    if converged is not None and all(t.done for t in experiment.trials) and (searcher.stopped_converged
                                                                             or converged()):
        # stopped by the convergence test when it proposed no more trials; the trials running then
        # ended as they would have, and the summary says where the search converged in the end
        return "converged" if len(experiment.trials) < settings.samples else "finished"
    if len(experiment.trials) < settings.samples or not all(t.done for t in experiment.trials):
        if settings.time_budget and time.time() - started >= settings.time_budget:
            release_stale_trials(study)  # trials the budget stopped
            return "budget"
        raise SearchIncompleteError("Ray Tune stopped before every trial ended")
    return "finished"
