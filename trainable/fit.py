"""Train one configuration: fit(config, data) yields one metrics dict per epoch. No Ray here.

Metric names (one name each, used unchanged in the CSV files, plots and docs):
epoch, train_loss, train_accuracy, test_loss, test_accuracy, test_loss_se, test_accuracy_se,
epoch_seconds, samples_per_second, diverged, train_below_test, still_decreasing, above_chance, challenge_met,
crossing_epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from trainable import challenge
from trainable.config import TrainConfig
from trainable.data import Data, StreamedData, torch_tensor
from trainable.fused import fused_bf16
from trainable.hardware import (
    autocast_dtype,
    flush_denormals,
    fused_note,
    keep_freed_memory,
    precision_label,
    select_device,
)
from trainable.loops import evaluate, evaluate_streamed, to_unit, train_epoch, train_epoch_streamed
from trainable.models import ModelError, build_model, factory_of

METRICS = (
    "epoch",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "test_loss_se",
    "test_accuracy_se",
    "epoch_seconds",
    "samples_per_second",
    "diverged",
    "train_below_test",
    "still_decreasing",
    "above_chance",
    "challenge_met",
    "crossing_epoch",
)


def make_optimizer(config: TrainConfig, params: Any, device: torch.device | None = None) -> torch.optim.Optimizer:
    """SGD, Nesterov, Adam or AdamW as `config` says, with torch's fused kernels on the CPU and CUDA:
    one pass over each parameter per step instead of one per operation. At batch 64 the update
    costs as much as the matrix multiplies, so this is 1.2-1.7x per step (`hptune bench`)."""
    kernels = {"fused": True} if device is None or device.type in ("cpu", "cuda") else {"foreach": True}
    if config.optimizer in ("sgd", "nesterov"):
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.optimizer == "nesterov",
            weight_decay=config.weight_decay,
            **kernels,
        )
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay, **kernels)


def epoch_lr(config: TrainConfig, epoch: int) -> float:
    """The learning rate of `epoch` (1-based): constant, or cosine-annealed over the run."""
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / config.epochs))
    return config.lr


SLOW_EPOCH_FACTOR = 3.0  # an epoch this many times slower than the run's first is a stall


def slow_epochs(history: Sequence[Mapping[str, Any]],
                factor: float = SLOW_EPOCH_FACTOR) -> list[tuple[int, float, float]]:
    """(epoch, seconds, times epoch 1) for every epoch more than `factor` times slower than the
    first. Denormal floats, a swapping or shared machine: the user should see it, not wait."""
    timed = [(int(m["epoch"]), m.get("epoch_seconds")) for m in history]
    timed = [(e, float(t)) for e, t in timed if t is not None and math.isfinite(t)]
    if not timed or timed[0][0] != 1 or timed[0][1] <= 0:
        return []
    first = timed[0][1]
    return [(e, t, t / first) for e, t in timed[1:] if t > factor * first]


def slow_epoch_text(history: Sequence[Mapping[str, Any]]) -> str:
    """'slow epoch: 3 at 176 s, 10× epoch 1' for the slowest stalled epoch; '' if none."""
    slow = slow_epochs(history)
    if not slow:
        return ""
    epoch, seconds, ratio = max(slow, key=lambda s: s[2])
    more = f" (+{len(slow) - 1} more)" if len(slow) > 1 else ""
    return f"slow epoch: {epoch} at {seconds:.0f} s, {ratio:.0f}× epoch 1{more}"


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle of `epoch` depends only on (seed, epoch), so a resumed run shuffles the same."""
    return (seed * 1_000_003 + epoch) % (2**63)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch_tensor(array)
    return tensor.to(device) if device.type != "cpu" else tensor


def accuracy_se(accuracy: float | None, n: int) -> float | None:
    """The standard error of an accuracy measured on n samples: sqrt(p (1 - p) / n), the binomial
    noise of a count of right answers (0.5 points at 55% on CIFAR-10's 10,000 test images)."""
    if accuracy is None or n <= 0 or not math.isfinite(accuracy):
        return None
    p = min(max(float(accuracy), 0.0), 1.0)
    return math.sqrt(p * (1 - p) / n)


def complete_metrics(metrics: dict[str, Any], history: Sequence[Mapping[str, Any]], window: int,
                     classes: int) -> dict[str, Any]:
    """Add what every epoch's metrics carry beside the measurements: diverged, and the challenge's
    verdict over the history so far (trainable/challenge.py)."""
    finite = all(math.isfinite(float(metrics[k])) for k in ("train_loss", "test_loss"))
    metrics["diverged"] = not finite
    metrics.update(challenge.verdict([*history, metrics], window, classes))
    return metrics


def epoch_metrics(epoch: int, *, train_loss: float, train_accuracy: float, test_loss: float, test_accuracy: float,
                  test_loss_se: float, test_size: int, epoch_seconds: float, samples_per_second: float,
                  history: Sequence[Mapping[str, Any]], window: int, classes: int) -> dict[str, Any]:
    """One epoch's metrics as every trainer reports them (METRICS): the measurements, their noise,
    and the verdicts over the history so far (complete_metrics)."""
    metrics: dict[str, Any] = {
        "epoch": epoch,
        "train_loss": train_loss,
        "train_accuracy": train_accuracy,
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "test_loss_se": test_loss_se,  # standard error of test_loss: its noise
        "test_accuracy_se": accuracy_se(test_accuracy, test_size),  # and of test_accuracy
        "epoch_seconds": epoch_seconds,  # training and evaluation
        "samples_per_second": samples_per_second,  # training only
    }
    return complete_metrics(metrics, history, window, classes)


class Trainer:
    """Model, optimizer and device-resident data for one configuration; resumable by state.

    `model_factory` overrides the factory the configuration names (a function passed to the
    Python API that has no importable name); by default `config.model` is resolved."""

    def __init__(
        self,
        config: TrainConfig,
        data: Data,
        *,
        device: torch.device | str | None = None,
        challenge_window: int = challenge.DEFAULT_WINDOW,
        model_factory: Callable[..., Any] | None = None,
    ) -> None:
        self.config = config
        self.device = select_device() if device is None else torch.device(device)
        self.amp_dtype = autocast_dtype(config.precision, self.device)
        flush_denormals(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.challenge_window = challenge_window
        self.classes = data.num_classes
        factory = model_factory or factory_of(config.model)
        torch.manual_seed(config.seed)
        self.model = build_model(factory, config.model_args, data.input_shape, data.num_classes).to(self.device)
        self.optimizer = make_optimizer(config, self.model.parameters(), self.device)
        # bf16 on a CPU: the optimizer step fused with autocast's casts (trainable/fused.py), for
        # the layers it handles; `fused_reason` says why not where it is not used
        self.fused, self.fused_reason = fused_bf16(self.model, self.optimizer, self.device, self.amp_dtype)
        self.streamed = isinstance(data, StreamedData)
        if isinstance(data, StreamedData):  # too large to hold: read through a DataLoader each epoch
            self.train_set, self.test_set = data.train, data.test
        else:  # on a GPU the whole data set moves there once (CIFAR-10: 184 MB as uint8)
            self.train_inputs = _to_device(data.train_inputs, self.device)
            self.train_labels = _to_device(data.train_labels, self.device)
            self.test_inputs = _to_device(data.test_inputs, self.device)
            self.test_labels = _to_device(data.test_labels, self.device)
        self.train_size, self.test_size = data.train_size, data.test_size
        self.history: list[dict[str, Any]] = []

    @property
    def precision(self) -> str:
        return precision_label(self.amp_dtype)

    @property
    def precision_text(self) -> str:
        """'bf16, fused step', 'bf16; fused step not used: ...' or 'fp32', for a run's first line."""
        if self.fused is not None:
            return f"{self.precision}, fused step"
        if self.fused_reason:
            return f"{self.precision}; {fused_note(self.fused_reason)}"
        return self.precision

    @property
    def data_device(self) -> str:
        """Where the data set lives during training: the device, or 'streamed'."""
        return "streamed" if self.streamed else str(self.train_inputs.device)

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    @property
    def finished(self) -> bool:
        return self.epochs_done >= self.config.epochs or bool(self.history and self.history[-1]["diverged"])

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = list(state["history"])

    def run_epoch(self) -> dict[str, Any]:
        epoch = self.epochs_done + 1
        generator = torch.Generator().manual_seed(epoch_seed(self.config.seed, epoch))
        for group in self.optimizer.param_groups:
            group["lr"] = epoch_lr(self.config, epoch)
        start = time.perf_counter()
        if self.streamed:
            train_loss, train_accuracy = train_epoch_streamed(
                self.model, self.optimizer, self.train_set, self.device, batch_size=self.config.batch_size,
                generator=generator, autocast_dtype=self.amp_dtype, fused=self.fused)
        else:
            train_loss, train_accuracy = train_epoch(
                self.model, self.optimizer, self.train_inputs, self.train_labels, batch_size=self.config.batch_size,
                generator=generator, autocast_dtype=self.amp_dtype, fused=self.fused)
        train_seconds = time.perf_counter() - start
        if self.streamed:
            test_loss, test_accuracy, test_loss_se = evaluate_streamed(self.model, self.test_set, self.device,
                                                                       autocast_dtype=self.amp_dtype)
        else:
            test_loss, test_accuracy, test_loss_se = evaluate(self.model, self.test_inputs, self.test_labels,
                                                              autocast_dtype=self.amp_dtype)
        seconds = time.perf_counter() - start
        metrics = epoch_metrics(epoch, train_loss=train_loss, train_accuracy=train_accuracy, test_loss=test_loss,
                                test_accuracy=test_accuracy, test_loss_se=test_loss_se, test_size=self.test_size,
                                epoch_seconds=seconds, samples_per_second=self.train_size / train_seconds,
                                history=self.history, window=self.challenge_window, classes=self.classes)
        self.history.append(metrics)
        return metrics

    def run(self) -> Iterator[dict[str, Any]]:
        """Train the remaining epochs, yielding each epoch's metrics; stops early on divergence."""
        while not self.finished:
            yield self.run_epoch()


def fit(
    config: TrainConfig,
    data: Data,
    *,
    device: torch.device | str | None = None,
    challenge_window: int = challenge.DEFAULT_WINDOW,
    model_factory: Callable[..., Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Train `config` on `data` from scratch, yielding one metrics dict per epoch."""
    yield from Trainer(config, data, device=device, challenge_window=challenge_window,
                       model_factory=model_factory).run()


def check_model(config: TrainConfig, data: Data, model_factory: Callable[..., Any] | None = None) -> nn.Module:
    """Build the configuration's model and run one small batch through it on the CPU: ModelError
    if it cannot be built or its output does not fit the data (one score per class)."""
    factory = model_factory or factory_of(config.model)
    model = build_model(factory, config.model_args, data.input_shape, data.num_classes)
    if isinstance(data, StreamedData):
        x = torch.stack([torch_tensor(np.asarray(data.train[i][0])) for i in range(min(2, len(data.train)))])
    else:
        x = torch_tensor(data.train_inputs[:2])
    model.eval()
    try:
        with torch.no_grad():
            out = model(to_unit(x, None))
    except Exception as exc:  # noqa: BLE001 - the user's model: say what it said on a real batch
        raise ModelError(f"the model ({config.model}) raised {type(exc).__name__} on a batch of the data "
                         f"(inputs {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}): {exc}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(x), data.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"the model ({config.model}) gives {shape} for a batch of {len(x)}; expected "
                         f"({len(x)}, {data.num_classes}): one score per class ({data.num_classes} classes in the "
                         "data)")
    return model
