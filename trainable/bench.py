"""hptune bench: our epoch against the tutorial's, and against this machine's floor.

The baseline is the tutorial's own pipeline: a torchvision-style data set that turns each uint8
image into a PIL image and then a float tensor with `ToTensor`, batched by a `DataLoader` (batch
64, no workers, fp32), and the tutorial's `train_loop` and `test_loop`. Ours: `Trainer.run_epoch`
(train on tensor-resident uint8 data, then evaluate) with the default precision, and with fp32 to
show where the time goes. Each contender runs whole epochs (training and test), repeated and
interleaved; the median is reported.

The floor is what this machine needs for the epoch's matrix multiplies alone: the same GEMMs the
model runs (forward, and the weight and input gradients of every layer, at the same batch size;
the test split's forward passes), timed back to back with preallocated outputs, on the same
threads. An epoch's share of the floor says how close to the machine's limit it runs; the rest
is everything else (the optimizer's updates, gathering batches, the loss, Python).

    hptune bench --data data/cifar10-jpeg --repeats 3
    hptune bench --data data/cifar10-jpeg --precision-check   # bf16 vs fp32 accuracy
    hptune bench --data data/cifar10-jpeg --first-epochs      # malloc kept vs not
    hptune bench --data data/cifar10-jpeg --device cuda       # both pipelines on a GPU

`--device` (default auto: cuda -> mps -> cpu, as `python -m trainable`) runs both pipelines and the
floor's GEMMs there; the tutorial's loops then move each batch to the device, as its quickstart
does. On a GPU these small GEMMs are bound by kernel launches more than by arithmetic, so the
"floor" there is a launch-bound floor, not the chip's peak.

--first-epochs times what a trial's first epochs cost in a fresh process: `python -m trainable
--epochs 2 --json`, alternately with glibc's malloc as it is ($HPTUNE_KEEP_FREED_MEMORY=0) and
as the trainer sets it (freed memory kept for reuse), repeated; the medians of epoch 1 and 2.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from trainable.config import TrainConfig
from trainable.data import Dataset
from trainable.errors import moved_to
from trainable.fit import Trainer, fit
from trainable.hardware import (
    KEEP_FREED_MEMORY_ENV,
    cpu_name,
    fast_bf16,
    precision_of,
)
from trainable.models import build_model, factory_of

CPU = torch.device("cpu")


class TutorialDataset(torch.utils.data.Dataset):
    """Per item, what torchvision.datasets.CIFAR10 does: array -> PIL.Image -> transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        from torchvision.transforms import ToTensor

        self.images = images.transpose(0, 2, 3, 1)  # (N, H, W, C), as CIFAR10.data
        self.labels = labels.tolist()
        self.transform = ToTensor()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def tutorial_test_loop(dataloader: torch.utils.data.DataLoader, model: nn.Module,
                       loss_fn: nn.Module, device: torch.device = CPU) -> tuple[float, float]:
    """The tutorial's test_loop, minus its print; each batch moved to `device` as the tutorial's
    quickstart does (nothing moves on the CPU)."""
    model.eval()
    test_loss, correct = 0.0, 0.0
    with torch.no_grad():
        for x, y in dataloader:
            x, y = x.to(device), y.to(device)
            pred = model(x)
            test_loss += loss_fn(pred, y).item()
            correct += (pred.argmax(1) == y).type(torch.float).sum().item()
    return test_loss / len(dataloader), correct / len(dataloader.dataset)


def tutorial_train_loop(dataloader: torch.utils.data.DataLoader, model: nn.Module, loss_fn: nn.Module,
                        optimizer: torch.optim.Optimizer, device: torch.device = CPU) -> None:
    """The tutorial's train_loop, minus its print; batches moved to `device` as in test_loop."""
    model.train()
    for batch, (x, y) in enumerate(dataloader):
        x, y = x.to(device), y.to(device)
        pred = model(x)
        loss = loss_fn(pred, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if batch % 100 == 0:
            loss = loss.item()  # the tutorial reads the loss here to print it


def usual_dataset(inputs: np.ndarray, labels: np.ndarray) -> torch.utils.data.Dataset:
    """The data set as a user would hand it to a DataLoader: images through PIL and ToTensor, as
    torchvision's data sets do; other inputs as a TensorDataset of float32 (or integer) tensors."""
    if inputs.dtype == np.uint8 and inputs.ndim == 4 and inputs.shape[1] in (1, 3):
        return TutorialDataset(inputs, labels)
    x = torch.from_numpy(np.array(inputs))
    return torch.utils.data.TensorDataset(x.float() if x.is_floating_point() else x, torch.from_numpy(labels))


def time_tutorial(data: Dataset, batch_size: int, device: torch.device = CPU, model_ref: str = "mlp",
                  model_args: dict[str, Any] | None = None) -> Callable[[], float]:
    """The usual pipeline: a DataLoader over the data set (shuffled for a user's model; the
    tutorial does not shuffle), the tutorial's train_loop and test_loop, SGD, fp32."""
    torch.manual_seed(42)
    model = build_model(factory_of(model_ref), model_args or {}, data.input_shape, data.num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    shuffle = model_ref != "mlp"
    train = torch.utils.data.DataLoader(usual_dataset(data.train_inputs, data.train_labels), batch_size=batch_size,
                                        shuffle=shuffle)
    test = torch.utils.data.DataLoader(usual_dataset(data.test_inputs, data.test_labels), batch_size=batch_size)
    loss_fn = nn.CrossEntropyLoss()

    def run() -> float:
        start = time.perf_counter()
        tutorial_train_loop(train, model, loss_fn, optimizer, device)
        tutorial_test_loop(test, model, loss_fn, device)  # its .item() per batch waits for the device
        return time.perf_counter() - start

    return run


class TutorialProcess:
    """The tutorial's pipeline in a Python process of its own, as the tutorial's script runs:
    none of our process settings (malloc thresholds, subnormal flushing) reach it. Called, it
    runs one whole epoch there and returns its seconds; interleaving with ours still works."""

    def __init__(self, data: Dataset, batch_size: int, threads: int, device: torch.device = CPU,
                 model_ref: str = "mlp", model_args: dict[str, Any] | None = None) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_tutorial_worker, daemon=True,
                                       args=(child, data, batch_size, threads, str(device), model_ref, model_args))
        self.process.start()

    def __call__(self) -> float:
        self.connection.send("epoch")
        return self.connection.recv()

    def close(self) -> None:
        self.connection.send(None)
        self.process.join(timeout=30)


def _tutorial_worker(connection: Any, data: Dataset, batch_size: int, threads: int, device: str, model_ref: str,
                     model_args: dict[str, Any] | None) -> None:
    torch.set_num_threads(threads)
    run = time_tutorial(data, batch_size, torch.device(device), model_ref, model_args)
    while connection.recv() is not None:
        connection.send(run())


def time_ours(data: Dataset, batch_size: int, precision: str, device: torch.device = CPU,
              fused: bool = True, model_ref: str = "mlp",
              model_args: dict[str, Any] | None = None) -> Callable[[], float]:
    """One whole epoch of `python -m trainable` (train, then evaluate), as the trainer runs it;
    `fused=False`: bf16 with autocast and torch's optimizer step, as before the fused step."""
    config = TrainConfig(batch_size=batch_size, precision=precision, epochs=1_000_000, model=model_ref,
                         model_args=model_args or {})
    trainer = Trainer(config, data, device=device)
    if not fused:
        trainer.fused = None

    def run() -> float:
        return trainer.run_epoch()["epoch_seconds"]

    run.fused = trainer.fused is not None  # type: ignore[attr-defined]
    return run


def gemm_shapes(input_dim: int, hidden: Sequence[int], classes: int) -> list[tuple[int, int]]:
    """(in, out) of every linear layer of the model."""
    widths = [input_dim, *hidden, classes]
    return list(zip(widths, widths[1:]))


def epoch_flops(data: Dataset, hidden: Sequence[int] = (512, 512), batch_size: int = 64) -> float:
    """Multiply-add FLOPs of one epoch's GEMMs: 2 x (forward + weight gradient + input gradient
    except the first layer's) per training image, 2 x forward per test image."""
    layers = gemm_shapes(math.prod(data.input_shape), hidden, data.num_classes)
    forward = sum(i * o for i, o in layers)
    train = forward * 2 + sum(i * o for i, o in layers[1:])
    return 2.0 * (train * len(data.train_labels) + forward * len(data.test_labels))


def time_floor(data: Dataset, batch_size: int, dtype: torch.dtype,
               hidden: Sequence[int] = (512, 512), device: torch.device = CPU) -> Callable[[], float]:
    """The epoch's matrix multiplies alone, back to back, outputs preallocated."""
    layers = gemm_shapes(math.prod(data.input_shape), hidden, data.num_classes)
    n_train, n_test = len(data.train_labels), len(data.test_labels)

    def operands(batch: int, backward: bool) -> list[Callable[[], None]]:
        calls: list[Callable[[], None]] = []
        for index, (i, o) in enumerate(layers):
            x, w, y = (torch.rand(batch, i, dtype=dtype, device=device), torch.rand(o, i, dtype=dtype, device=device),
                       torch.empty(batch, o, dtype=dtype, device=device))
            calls.append(lambda x=x, w=w, y=y: torch.mm(x, w.t(), out=y))
            if backward:
                g, dw = torch.rand(batch, o, dtype=dtype, device=device), torch.empty(o, i, dtype=dtype, device=device)
                calls.append(lambda g=g, x=x, dw=dw: torch.mm(g.t(), x, out=dw))
                if index > 0:  # the first layer's input needs no gradient
                    dx = torch.empty(batch, i, dtype=dtype, device=device)
                    calls.append(lambda g=g, w=w, dx=dx: torch.mm(g, w, out=dx))
        return calls

    def steps(n: int, batch: int) -> list[int]:
        return [batch] * (n // batch) + ([n % batch] if n % batch else [])

    plan = [(operands(b, True), count) for b, count in _counts(steps(n_train, batch_size))]
    plan += [(operands(b, False), count) for b, count in _counts(steps(n_test, 1024))]

    def run() -> float:
        start = time.perf_counter()
        for calls, count in plan:
            for _ in range(count):
                for call in calls:
                    call()
        synchronize(device)
        return time.perf_counter() - start

    return run


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so a timer around them measures them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _counts(batches: list[int]) -> list[tuple[int, int]]:
    return [(b, batches.count(b)) for b in dict.fromkeys(batches)]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    return cpu_name() if device.type == "cpu" else device.type


def speed(data: Dataset, batch_size: int, repeats: int, device: torch.device = CPU, model_ref: str = "mlp",
          model_args: dict[str, Any] | None = None) -> dict[str, float]:
    """Median seconds of one whole epoch per contender: the usual pipeline (the tutorial's, for its
    MLP), ours in fp32 and in the default precision, and, for the tutorial's MLP, the floor."""
    default = precision_of("auto", device)
    own = {"model_ref": model_ref, "model_args": model_args}
    ours = time_ours(data, batch_size, "auto", device, **own)
    with_fused = default == "bf16" and ours.fused  # type: ignore[attr-defined]
    tutorial = TutorialProcess(data, batch_size, torch.get_num_threads(), device, model_ref, model_args)
    usual = ("tutorial (DataLoader + ToTensor, fp32)" if model_ref == "mlp" else
             f"usual (DataLoader{' + ToTensor' if isinstance(tutorial_data(data), TutorialDataset) else ''}, fp32)")
    contenders = {
        usual: tutorial,
        "ours (tensor-resident, fp32)": time_ours(data, batch_size, "fp32", device, **own),
        f"ours (tensor-resident, auto = {default}{', fused step' if with_fused else ''})": ours,
    }
    if with_fused:  # the same bf16 epoch with autocast and torch's optimizer step: what the fused step saves
        contenders["ours (bf16, autocast + torch's step)"] = time_ours(data, batch_size, "auto", device, fused=False,
                                                                       **own)
    if model_ref != "mlp":  # the floor counts the MLP's GEMMs; a user's model has its own
        return _timed(contenders, repeats, tutorial)
    contenders["floor fp32 (the epoch's GEMMs alone)"] = time_floor(data, batch_size, torch.float32, device=device)
    if default == "bf16":
        contenders["floor bf16 (the epoch's GEMMs alone)"] = time_floor(data, batch_size, torch.bfloat16,
                                                                        device=device)
    return _timed(contenders, repeats, tutorial)


def tutorial_data(data: Dataset) -> torch.utils.data.Dataset:
    return usual_dataset(data.test_inputs[:1], data.test_labels[:1])


def _timed(contenders: dict[str, Callable[[], float]], repeats: int, tutorial: TutorialProcess) -> dict[str, float]:
    try:
        for run in contenders.values():  # warm-up: first-call allocations, thread pools
            run()
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(repeats):  # interleaved, so drift on a shared machine hits all alike
            for name, run in contenders.items():
                times[name].append(run())
    finally:
        tutorial.close()
    return {name: statistics.median(t) for name, t in times.items()}


def precision_check(data: Dataset, device: torch.device = CPU) -> list[tuple[str, list[dict]]]:
    """The tutorial's configuration trained in fp32 and in bf16 autocast, every epoch."""
    return [(p, list(fit(TrainConfig(precision=p), data, device=device))) for p in ("fp32", "bf16")]


def machine_line(data: Dataset, device: torch.device) -> str:
    """What a bench ran on: the data, the device, torch's threads and version."""
    bf16 = "native bf16" if fast_bf16(device) else "no native bf16"
    return f"{data!r}; {device_name(device)} ({bf16}), {torch.get_num_threads()} threads, torch {torch.__version__}"


def print_first_epochs(medians: dict[str, tuple[float, float]], batch_size: int, repeats: int) -> None:
    print(f"epochs 1 and 2 of a fresh `python -m trainable` process at batch {batch_size}, "
          f"median of {repeats}:")
    base, ours = medians.values()
    for label, (one, two) in medians.items():
        print(f"  {label:<52} epoch 1 {one:6.2f} s   epoch 2 {two:6.2f} s")
    print(f"speed-up of keeping freed memory: epoch 1 {base[0] / ours[0]:.2f}x, epoch 2 {base[1] / ours[1]:.2f}x")


def print_precision_check(runs: list[tuple[str, list[dict]]]) -> None:
    for precision, history in runs:
        curve = " ".join(f"{m['train_loss']:.3f}" for m in history)
        last = history[-1]
        print(f"{precision}: test_accuracy {100 * last['test_accuracy']:.2f}%  test_loss {last['test_loss']:.4f}  "
              f"train_loss per epoch: {curve}")
    (_, fp32), (_, bf16) = runs
    gap = 100 * (bf16[-1]["test_accuracy"] - fp32[-1]["test_accuracy"])
    worst = max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(fp32, bf16))
    print(f"bf16 - fp32: test_accuracy {gap:+.2f} points; largest train_loss gap over the epochs {worst:.4f}")


def first_epochs(data_args: list[str], batch_size: int, repeats: int,
                 threads: int | None) -> dict[str, tuple[float, float]]:
    """Median seconds of epochs 1 and 2 of fresh `python -m trainable` processes, with glibc's
    malloc as it is and as the trainer sets it, alternating."""
    command = [sys.executable, "-m", "trainable", *data_args, "--batch-size", str(batch_size), "--epochs", "2",
               "--json", *(["--threads", str(threads)] if threads else [])]
    contenders = {"malloc as glibc has it (HPTUNE_KEEP_FREED_MEMORY=0)": "0", "ours (freed memory kept)": "1"}
    seconds: dict[str, list[list[float]]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, keep in contenders.items():
            env = {**os.environ, KEEP_FREED_MEMORY_ENV: keep}
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            seconds[name].append([json.loads(line)["epoch_seconds"] for line in out.splitlines()])
    return {name: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
            for name, runs in seconds.items()}


def print_speed(medians: dict[str, float], data: Dataset, batch_size: int, repeats: int) -> None:
    pipelines = [n for n in medians if not n.startswith("floor")]
    tutorial, fp32, ours = (medians[n] for n in pipelines[:3])
    floors = {n.split()[1]: medians[n] for n in medians if n.startswith("floor")}
    print(f"one whole epoch (train + test) at batch {batch_size}, median of {repeats}:")
    for name in pipelines:
        print(f"  {name:<48} {medians[name]:7.2f} s   {tutorial / medians[name]:5.2f}x")
    baseline = pipelines[0].split(" (")[0]
    print(f"speed-up of ours (default precision) over the {baseline}: {tutorial / ours:.2f}x")
    if len(pipelines) > 3:
        print(f"speed-up of the fused bf16 step over autocast + torch's step: {medians[pipelines[3]] / ours:.2f}x")
    if not floors:
        return
    flops = epoch_flops(data, batch_size=batch_size)
    for name, seconds in medians.items():
        if name.startswith("floor"):
            print(f"  {name:<48} {seconds:7.2f} s   {flops / seconds / 1e9:5.0f} GFLOP/s")
    own = "bf16" if "bf16" in floors and "auto = bf16" in pipelines[2] else "fp32"
    print(f"share of this machine's floor: ours {own} {100 * floors[own] / ours:.0f}% of the {own} floor; "
          f"ours fp32 {100 * floors['fp32'] / fp32:.0f}% of the fp32 floor")


if __name__ == "__main__":  # the command is `hptune bench`, in tuning/commands/
    sys.exit(moved_to("python -m trainable.bench", "hptune bench"))
