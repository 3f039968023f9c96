"""The Tuner that runs a search's trials on Ray Tune, journalling everything into the experiment.

Optuna (through StudySearcher) proposes, ASHA (keeping the baseline) stops, the callback
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
from ray.tune.schedulers import FIFOScheduler

from trainable.config import TrainConfig
from trainable.data import Data
from tuning.engine.arrays import start_server, why_not
from tuning.engine.callbacks import LINES, LIVE, QUIET, ExperimentCallback
from tuning.engine.hooks import Hooks
from tuning.engine.searcher import ASHAKeepingBaseline, StudySearcher
from tuning.engine.trial import TrialSetup, train_trial
from tuning.engine.usercode import UserCode
from tuning.results.experiment import Experiment
from tuning.results.journal import TrialRecord
from tuning.settings import Grace
from tuning.space import AnySpace
from tuning.study import make_sampler, open_or_rebuild, release_stale_trials, warm_start

# ASHA's last rung by epoch where the space does not say how many epochs a trial may run (a
# define-by-run function): far beyond any trial, so no trial is stopped for reaching it
UNKNOWN_MAX_EPOCHS = 10_000


class SearchIncompleteError(RuntimeError):
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
    everything into the experiment; returns 'finished' or 'budget'."""
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
    searcher = StudySearcher(study, space, fixed, base=base.to_dict(), metric="objective", mode=settings.mode,
                             first_number=len(experiment.trials) + 1)
    searcher.continued_numbers = {t.trial: t.number for t in pending}
    highest = space.high("epochs", base.epochs)
    max_epochs = max([UNKNOWN_MAX_EPOCHS if highest is None else int(highest),
                      *(c.get("epochs", base.epochs) for c in fixed)])
    if not settings.early_stop:
        scheduler = FIFOScheduler()
    else:
        scheduler = make_asha(settings.grace, settings.reduction_factor, max_epochs)
    resources = {"cpu": res["cpu"], "gpu": res["gpu"]}
    server, max_concurrent = None, settings.max_concurrent
    if settings.arrays > 1:
        reason = why_not(data, base.loop or code.loop, base, code.model)
        if reason:
            print(f"hptune: note: --arrays {settings.arrays}: {reason}, so trials train separately", file=sys.stderr,
                  flush=True)
        else:  # the server holds the device; a member's trial only waits for it
            server = start_server(data, settings.arrays, res, settings.challenge_window, code.model)
            resources = {"cpu": res["cluster_cpus"] / settings.arrays, "gpu": 0.0}
            max_concurrent = min(settings.max_concurrent or settings.arrays, settings.arrays)
    # Tune keeps only one trial pending at a time for a searcher; let every free slot fill at once.
    slots = res["cluster_cpus"] / resources["cpu"]
    if resources["gpu"] > 0:
        slots = min(slots, res["cluster_gpus"] / resources["gpu"])
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(max(1, int(slots)))
    setup = TrialSetup(
        base=base.to_dict(),
        objective=settings.objective,
        challenge_window=settings.challenge_window,
        threads=max(1, math.floor(res["cpu"])),
        stop_stalled=settings.early_stop,
        checkpoints={t.trial: t.checkpoint for t in pending if t.checkpoint},
        hooks=Hooks.from_environment(),
        code=code,
        array_server=server,
    )
    trainable = tune.with_parameters(train_trial, data=data, setup=setup)
    trainable = tune.with_resources(trainable, resources)
    experiment.journal.append("attempt", attempt=attempt, command=meta["command"], num_samples=num_samples)
    callback = ExperimentCallback(
        experiment,
        base=base,
        searcher=searcher,
        output=QUIET if settings.quiet else LIVE if sys.stdout.isatty() and not settings.verbose else LINES,
        slots=min(slots, max_concurrent or slots),
        tensorboard=settings.tensorboard,
    )
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
    if len(experiment.trials) < settings.samples or not all(t.done for t in experiment.trials):
        if settings.time_budget and time.time() - started >= settings.time_budget:
            release_stale_trials(study)  # trials the budget stopped
            return "budget"
        raise SearchIncompleteError("Ray Tune stopped before every trial ended")
    return "finished"
