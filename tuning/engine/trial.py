"""The trial: one configuration trained in a Ray worker, reporting every epoch to Tune.

The trial is the same Trainer as `python -m trainable` (or the user's own loop, with the same
metrics). Per epoch it calls `tune.report` with the epoch's metrics (plus `objective`, the scalar
the search steers by, and `progress`, its epoch over its epochs, for ASHA's rungs) and a
checkpoint holding model, optimizer and history. A trial restarted by Tune (after a failure) or
continued by a resumed search picks up from its checkpoint at the next epoch, and reports `epoch`
as the epoch number, so the scheduler counts epochs, not restarts. A trial whose last two epochs
sit at chance level with a flat test loss stops there as `stalled` (unless early stopping is off).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray import tune

from trainable.config import TrainConfig
from trainable.data import Data
from trainable.fit import METRICS, Trainer
from trainable.hardware import flush_denormals
from trainable.own_loop import loop_of, run_own_loop
from tuning.engine.hooks import Hooks
from tuning.engine.searcher import BASELINE, CONTINUES, hyperparameters
from tuning.engine.usercode import UserCode
from tuning.noise import objective_se
from tuning.objective import objective_value, stalled
from tuning.space import apply_params

STATE_FILE = "state.pt"
# what a trial reports, and the journal keeps (a user's loop may report more: `EXTRA`)
TRIAL_METRICS = (*METRICS, "objective", "objective_se", "stalled", "data_device")
EXTRA = "_extra_metrics"  # names of the other numbers a user's own loop reported


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a search shares: handed to each through Ray's object store."""

    base: dict[str, Any]  # the base TrainConfig, as a dict
    objective: str
    challenge_window: int
    threads: int  # torch threads: the trial's whole CPUs
    stop_stalled: bool = True
    checkpoints: Mapping[str, str] = field(default_factory=dict)  # interrupted trial -> its last checkpoint
    hooks: Hooks | None = None  # test hooks, only where the environment asks for them
    code: UserCode = field(default_factory=UserCode)
    arrays: Any = None  # --arrays: an ArrayPlan (tuning/engine/arrays.py), whose members replace the Trainer


def trial_device(gpu_ids: list) -> torch.device:
    """The GPU Ray assigned to this trial if CUDA can see it, else the CPU."""
    if gpu_ids and torch.cuda.is_available():
        return torch.device("cuda")  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU
    return torch.device("cpu")


def train_trial(params: dict[str, Any], *, data: Data, setup: TrialSetup) -> None:
    """Run one trial: `params` (from the searcher) over the base configuration.

    Keys of `params` starting with "__" are the searcher's tags, not hyperparameters; the tag
    "__continues__" names an interrupted trial whose checkpoint (in `setup.checkpoints`) to resume.
    """
    setup.code.install()  # the user's files, where nothing was shipped (a local Ray)
    device = trial_device(ray.get_gpu_ids())
    flush_denormals(device)  # in this worker process, before torch starts its threads
    torch.set_num_threads(setup.threads)
    config = TrainConfig.from_dict(apply_params(setup.base, hyperparameters(params)))
    state = _restored(params, setup, device)
    baseline = bool(params.get(BASELINE))

    def report(metrics: dict[str, Any], history: list[dict[str, Any]], data_device: str,
               save: Any) -> bool:
        """Report one epoch to Tune with its checkpoint; True if the trial stops here (stalled)."""
        metrics["objective"] = objective_value(metrics, setup.objective)
        metrics["objective_se"] = objective_se(metrics, setup.objective)  # its noise (tuning/noise.py)
        metrics["progress"] = metrics["epoch"] / config.epochs  # ASHA's rungs by share of the schedule
        metrics["data_device"] = data_device  # where the data set lives (cpu, the GPU, or streamed)
        metrics["stalled"] = setup.stop_stalled and not baseline and stalled(history, data.num_classes)
        extra = [k for k in metrics if k not in TRIAL_METRICS and k != "progress"]
        if extra:
            metrics[EXTRA] = extra
        with tempfile.TemporaryDirectory() as folder:
            torch.save(save(), os.path.join(folder, STATE_FILE))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        return bool(metrics["stalled"])

    if setup.hooks is not None:  # the test suite's fault or hold, around every report of this trial
        report = setup.hooks.around(report, config, tune.get_context().get_trial_id())

    if config.loop is not None or setup.code.loop is not None:
        loop = setup.code.loop or loop_of(config.loop)  # type: ignore[arg-type]
        history = list((state or {}).get("history", []))

        def on_epoch(metrics: dict[str, Any], loop_state: Any) -> bool:
            done = [*history, metrics]
            history.append(metrics)
            return report(metrics, done, "cpu", lambda: {"history": done, "loop_state": loop_state})

        run_own_loop(loop, config, data, on_epoch, challenge_window=setup.challenge_window,
                     history=list(history), state=(state or {}).get("loop_state"))
        return
    trainer: Any
    if setup.arrays is not None:  # its epochs run in the ArrayServer, with other trials'
        trainer = setup.arrays.trainer(config, tune.get_context().get_trial_id())
    else:
        trainer = Trainer(config, data, device=device, challenge_window=setup.challenge_window,
                          model_factory=setup.code.model)
    if state is not None:
        trainer.load_state_dict(state)
    for metrics in trainer.run():
        if report(metrics, trainer.history, trainer.data_device, trainer.state_dict):
            return


def _restored(params: dict[str, Any], setup: TrialSetup, device: torch.device) -> dict[str, Any] | None:
    """The state to continue from: Tune's checkpoint of this trial after a failure, or, in a
    resumed search, the last checkpoint of the interrupted trial it continues; else None."""
    checkpoint = tune.get_checkpoint()
    continues = params.get(CONTINUES)
    if checkpoint is None and continues and continues in setup.checkpoints:
        checkpoint = tune.Checkpoint(setup.checkpoints[continues])
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(os.path.join(folder, STATE_FILE), map_location=device, weights_only=False)
