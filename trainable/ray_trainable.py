"""The Ray Tune function trainable: the same Trainer as `python -m trainable`, reporting to Tune.

The only module of trainable/ that imports Ray. Per epoch it calls `tune.report` with the epoch's
metrics (plus `objective`, the scalar the search steers by) and a checkpoint holding model,
optimizer and history. A trial restarted by Tune (after a failure) or continued by a resumed
search picks up from its checkpoint at the next epoch, and reports `epoch` as the epoch number,
so the scheduler counts epochs, not restarts.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import ray
import torch
from ray import tune

from trainable.challenge import objective_value
from trainable.config import TrainConfig
from trainable.data import Dataset
from trainable.fit import Trainer

STATE_FILE = "state.pt"
# Read by the search driver (not the workers) and handed to every trial: tests use it to make
# trials raise. "EPOCH:TIMES:MARKER_DIR[:KEY=VALUE]": at EPOCH, the first TIMES times a trial gets
# there (counted in MARKER_DIR), only in trials whose config has KEY == VALUE if given.
FAULT_ENV = "HPTUNE_INJECT_FAULT"


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
    checkpoints: Mapping[str, str] | None = None,
    inject_fault: str | None = None,
) -> None:
    """Run one trial: `params` (from the searcher) over the `base` configuration.

    Keys of `params` starting with "__" are the searcher's tags, not hyperparameters; the tag
    "__continues__" names an interrupted trial whose checkpoint (in `checkpoints`) to resume.
    """
    torch.set_num_threads(threads)
    continues = params.get("__continues__")
    config = TrainConfig.from_dict({**base, **{k: v for k, v in params.items() if not k.startswith("__")}})
    trainer = Trainer(config, data, device=trial_device(ray.get_gpu_ids()), challenge_window=challenge_window)
    checkpoint = tune.get_checkpoint()  # set when Tune restarts this trial after a failure
    if checkpoint is None and continues and checkpoints and continues in checkpoints:
        checkpoint = tune.Checkpoint(checkpoints[continues])  # a resumed search
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_state_dict(torch.load(os.path.join(folder, STATE_FILE), map_location=trainer.device, weights_only=False))
    for metrics in trainer.run():
        if inject_fault:
            _inject_fault(inject_fault, metrics["epoch"], config)
        metrics["objective"] = objective_value(metrics, objective)
        metrics["data_device"] = str(trainer.train_images.device)  # in Ray's result.json: where the data set lives
        with tempfile.TemporaryDirectory() as folder:
            torch.save(trainer.state_dict(), os.path.join(folder, STATE_FILE))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


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
