"""Train one configuration: fit(config, data) yields one metrics dict per epoch. No Ray here.

Metric names (one name each, used unchanged in the CSV files, plots and README):
epoch, train_loss, train_accuracy, test_loss, test_accuracy, test_loss_se, epoch_seconds,
samples_per_second, diverged, train_below_test, still_decreasing, above_chance, challenge_met,
crossing_epoch.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from trainable import challenge
from trainable.config import TrainConfig
from trainable.data import Dataset
from trainable.fused import fused_bf16
from trainable.loops import evaluate, train_epoch
from trainable.model import build_model

METRICS = (
    "epoch",
    "train_loss",
    "train_accuracy",
    "test_loss",
    "test_accuracy",
    "test_loss_se",
    "epoch_seconds",
    "samples_per_second",
    "diverged",
    "train_below_test",
    "still_decreasing",
    "above_chance",
    "challenge_met",
    "crossing_epoch",
)


def select_device(requested: str = "auto") -> torch.device:
    """cuda -> mps -> cpu, as in the tutorial; or the device named."""
    if requested != "auto":
        device = torch.device(requested)  # RuntimeError for a name torch does not know
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"--device {requested}: CUDA is not available on this machine")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise RuntimeError(f"--device {requested}: MPS is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cuda_bf16_native(capability: tuple[int, int]) -> bool:
    """bf16 tensor cores exist from compute capability 8.0 (Ampere) on. Older GPUs (V100 7.0,
    T4 7.5) emulate bf16, although `torch.cuda.is_bf16_supported()` says yes there too."""
    return tuple(capability) >= (8, 0)


def fast_bf16(device: torch.device) -> bool:
    """Does this device run bf16 matrix multiplies faster than fp32?"""
    if device.type == "cuda":
        return cuda_bf16_native(torch.cuda.get_device_capability(device))
    if device.type == "cpu":
        # AVX512-BF16 or AMX: native bf16 dot products. Elsewhere bf16 is emulated and slower.
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means plain fp32."""
    if precision == "bf16" or (precision == "auto" and fast_bf16(device)):
        return torch.bfloat16
    return None


def flush_denormals(device: torch.device) -> None:
    """Treat subnormal floats as zero on the CPU (FTZ/DAZ), on every thread torch computes on.

    Weights and Adam's second moments drift into the subnormal range (below 1.2e-38) during
    training; x86 CPUs handle such numbers in microcode, and an epoch slowed from 15 s to 176 s
    on an Intel Xeon when 13% of the weights had become subnormal. Flushing them changes nothing
    a float32 training run can notice. The flag lives in each thread's MXCSR register:
    `torch.set_flush_denormal` sets the calling thread's, and threads created later inherit it,
    but torch's OpenMP threads may already exist, so each of them sets it too.
    """
    if device.type != "cpu":
        return
    torch.set_flush_denormal(True)
    _on_every_omp_thread(lambda: torch.set_flush_denormal(True))


KEEP_FREED_MEMORY_ENV = "HPTUNE_KEEP_FREED_MEMORY"  # "0": leave malloc as it is (for the bench's baseline)
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks for reuse instead of handing them back to the kernel.

    Every training step frees and reallocates the same few megabytes (the weight gradients, the
    bf16 copies of the weights, activations). glibc serves blocks that large with a fresh `mmap`
    and unmaps them on free until its adaptive threshold catches up, which with CIFAR-10 loaded
    took a whole epoch: about 3,000 page faults a step at batch 64 in bf16 (450 in fp32), and a
    first epoch 1.8x slower (`python -m trainable.bench --first-epochs`). With the thresholds
    raised, freed memory stays in the process and the next step reuses it. Process-wide; returns False where it cannot be set
    (not glibc), or when $HPTUNE_KEEP_FREED_MEMORY is 0. Numerics are untouched.
    """
    if not sys.platform.startswith("linux") or os.environ.get(KEEP_FREED_MEMORY_ENV) == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # 32 MiB: the largest threshold glibc itself would reach; trimming only above 1 GiB free
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def _on_every_omp_thread(action: Callable[[], object]) -> None:
    """Run `action` once on each thread of torch's OpenMP team (libgomp), if torch uses one."""
    threads = torch.get_num_threads()
    if threads < 2:
        return
    try:
        with open("/proc/self/maps") as maps:
            path = next((line.split()[-1] for line in maps if "libgomp" in line), None)
    except OSError:
        return  # not Linux: no libgomp to reach this way; the calling thread has the flag
    if path is None:
        return
    callback_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    callback = callback_type(lambda _: action())
    parallel = ctypes.CDLL(path).GOMP_parallel  # what `#pragma omp parallel num_threads(n)` calls
    parallel.argtypes = [callback_type, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None
    parallel(callback, None, threads, 0)


def make_optimizer(config: TrainConfig, params: Any, device: torch.device | None = None) -> torch.optim.Optimizer:
    """SGD, Nesterov, Adam or AdamW as `config` says, with torch's fused kernels on the CPU and CUDA:
    one pass over each parameter per step instead of one per operation. At batch 64 the update
    costs as much as the matrix multiplies, so this is 1.2-1.7x per step (`trainable.bench`)."""
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
    with warnings.catch_warnings():
        # Ray's object store hands out read-only arrays; we only ever read them.
        warnings.filterwarnings("ignore", message=".*not writable.*")
        tensor = torch.from_numpy(array)
    return tensor.to(device) if device.type != "cpu" else tensor


class Trainer:
    """Model, optimizer and device-resident data for one configuration; resumable by state."""

    def __init__(
        self,
        config: TrainConfig,
        data: Dataset,
        *,
        device: torch.device | str | None = None,
        challenge_window: int = challenge.DEFAULT_WINDOW,
    ) -> None:
        self.config = config
        self.device = select_device() if device is None else torch.device(device)
        self.amp_dtype = autocast_dtype(config.precision, self.device)
        flush_denormals(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.challenge_window = challenge_window
        self.classes = data.num_classes
        torch.manual_seed(config.seed)
        self.model = build_model(data.input_shape, data.num_classes, config.hidden).to(self.device)
        self.optimizer = make_optimizer(config, self.model.parameters(), self.device)
        # bf16 on a CPU: the optimizer step fused with autocast's casts (trainable/fused.py)
        self.fused = fused_bf16(self.model, self.optimizer, self.device, self.amp_dtype)
        # On a GPU the whole data set moves there once (CIFAR-10: 184 MB as uint8).
        self.train_images = _to_device(data.train_images, self.device)
        self.train_labels = _to_device(data.train_labels, self.device)
        self.test_images = _to_device(data.test_images, self.device)
        self.test_labels = _to_device(data.test_labels, self.device)
        self.history: list[dict[str, Any]] = []

    @property
    def precision(self) -> str:
        return "bf16" if self.amp_dtype is torch.bfloat16 else "fp32"

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
        train_loss, train_accuracy = train_epoch(
            self.model,
            self.optimizer,
            self.train_images,
            self.train_labels,
            batch_size=self.config.batch_size,
            generator=generator,
            autocast_dtype=self.amp_dtype,
            fused=self.fused,
        )
        train_seconds = time.perf_counter() - start
        test_loss, test_accuracy, test_loss_se = evaluate(
            self.model, self.test_images, self.test_labels, autocast_dtype=self.amp_dtype
        )
        seconds = time.perf_counter() - start
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_accuracy": train_accuracy,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "test_loss_se": test_loss_se,  # standard error of test_loss: its noise
            "epoch_seconds": seconds,  # training and evaluation
            "samples_per_second": len(self.train_labels) / train_seconds,  # training only
            "diverged": not (math.isfinite(train_loss) and math.isfinite(test_loss)),
        }
        metrics.update(challenge.verdict([*self.history, metrics], self.challenge_window, self.classes))
        self.history.append(metrics)
        return metrics

    def run(self) -> Iterator[dict[str, Any]]:
        """Train the remaining epochs, yielding each epoch's metrics; stops early on divergence."""
        while not self.finished:
            yield self.run_epoch()


def fit(
    config: TrainConfig,
    data: Dataset,
    *,
    device: torch.device | str | None = None,
    challenge_window: int = challenge.DEFAULT_WINDOW,
) -> Iterator[dict[str, Any]]:
    """Train `config` on `data` from scratch, yielding one metrics dict per epoch."""
    yield from Trainer(config, data, device=device, challenge_window=challenge_window).run()
