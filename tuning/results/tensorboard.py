"""--tensorboard: every trial's per-epoch metrics and its hyperparameters, in TensorBoard's format.

    tensorboard --logdir results/<name>/tensorboard

One run (sub-folder) per trial, ``trial-007`` for trial 7, written by ``torch.utils.tensorboard``'s
``SummaryWriter`` from the driver's callback: scalars under the metric names of
``python -m trainable`` (train_loss, test_loss, test_accuracy, ...) with the epoch as the step, and
the trial's hyperparameters for TensorBoard's HPARAMS tab, which shows them next to the final
values of the metrics below.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from tuning.results.experiment import Experiment
from tuning.results.listener import Listener, TrialStart

TENSORBOARD_DIR = "tensorboard"
# metrics the HPARAMS tab lists beside each trial's hyperparameters (their last value per run)
HPARAM_METRICS = ("objective", "test_accuracy", "train_loss", "test_loss", "challenge_met")


def available() -> bool:
    """torch.utils.tensorboard needs the `tensorboard` package (pip install 'hptune[tensorboard]')."""
    return importlib.util.find_spec("tensorboard") is not None


def run_name(number: int) -> str:
    return f"trial-{number:03d}"


class TrialBoards(Listener):
    """The search's listener for --tensorboard: one SummaryWriter per running trial, under
    exp_dir/tensorboard/trial-NNN/."""

    def __init__(self, exp_dir: Path) -> None:
        self.root = Path(exp_dir) / TENSORBOARD_DIR
        self.writers: dict[str, Any] = {}  # Ray trial id -> SummaryWriter

    def trial_started(self, start: TrialStart) -> None:
        run = run_name(start.number) if start.number is not None else f"trial-{start.trial}"
        self.open(start.trial, run, {**start.params, "baseline": start.baseline}, resumes_after=start.resumes_after)

    def trial_ended(self, trial: str, experiment: Experiment) -> None:
        self.close(trial)

    def open(self, trial_id: str, run: str, hyperparameters: dict[str, Any], *, resumes_after: int = 0) -> None:
        """Start (or continue) the trial's run (its folder name, run_name(number)); a continued run drops
        what it logged after its checkpoint's epoch, since those epochs are trained and reported again."""
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.close(trial_id)
        purge = resumes_after + 1 if resumes_after else None
        writer = SummaryWriter(log_dir=str(self.root / run), purge_step=purge, flush_secs=10)
        if not resumes_after:  # the hyperparameters, once per trial
            values = {k: _hparam_value(v) for k, v in hyperparameters.items()}
            exp, ssi, _ = hparams(values, {m: 0.0 for m in HPARAM_METRICS})  # metric values: read from the scalars
            for summary in (exp, ssi):
                writer.file_writer.add_summary(summary)
        self.writers[trial_id] = writer

    def epoch(self, trial: str, metrics: dict[str, Any]) -> None:
        writer = self.writers.get(trial)
        epoch = metrics.get("epoch")
        if writer is None or epoch is None:
            return
        for name, value in metrics.items():
            if name != "epoch" and isinstance(value, (int, float)):
                writer.add_scalar(name, float(value), global_step=int(epoch))
        writer.flush()  # an epoch takes seconds at least: TensorBoard shows it as it happens

    def close(self, trial_id: str | None = None) -> None:  # type: ignore[override]
        """Close one trial's run, or (no trial: the search ended) all of them."""
        for trial in list(self.writers) if trial_id is None else [trial_id]:
            writer = self.writers.pop(trial, None)
            if writer is not None:
                writer.close()


def _hparam_value(value: Any) -> int | float | str:
    """TensorBoard's hyperparameters are numbers or strings (torch stores a bool as 1/0): the rest as text."""
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return value
    return str(value)
