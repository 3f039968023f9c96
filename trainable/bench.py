"""python -m trainable.bench: our training epoch against the tutorial's, in one process, same data.

The baseline is the tutorial's own pipeline: a torchvision-style data set that turns each uint8
image into a PIL image and then a float tensor with `ToTensor`, batched by a `DataLoader` (batch
64, no workers, fp32), and the tutorial's `train_loop`. Ours: `train_epoch` on tensor-resident
uint8 data at batch 64 with the default precision (and with fp32, to show where the time goes).
Each is timed for one training epoch, repeated, interleaved; the median is reported.

    python -m trainable.bench --data data/cifar10-jpeg --repeats 3
    python -m trainable.bench --data data/cifar10-jpeg --precision-check   # bf16 vs fp32 accuracy
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from trainable.cli import OneLineParser, fail, positive_int
from trainable.config import TrainConfig
from trainable.data import DataError, Dataset, load_dataset
from trainable.fit import Trainer, autocast_dtype, epoch_seed, fit
from trainable.loops import train_epoch
from trainable.model import build_model

PROG = "python -m trainable.bench"


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


def tutorial_train_loop(dataloader: torch.utils.data.DataLoader, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The tutorial's train_loop, minus its print."""
    model.train()
    for batch, (X, y) in enumerate(dataloader):
        pred = model(X)
        loss = loss_fn(pred, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if batch % 100 == 0:
            loss = loss.item()  # the tutorial reads the loss here to print it


def time_tutorial(data: Dataset, batch_size: int) -> Callable[[], float]:
    torch.manual_seed(42)
    model = build_model(data.input_shape, data.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(TutorialDataset(data.train_images, data.train_labels), batch_size=batch_size)

    def run() -> float:
        start = time.perf_counter()
        tutorial_train_loop(loader, model, nn.CrossEntropyLoss(), optimizer)
        return time.perf_counter() - start

    return run


def time_ours(data: Dataset, batch_size: int, precision: str) -> Callable[[], float]:
    trainer = Trainer(TrainConfig(batch_size=batch_size, precision=precision), data, device="cpu")
    epoch = iter(range(1, 1_000_000))

    def run() -> float:
        start = time.perf_counter()
        train_epoch(
            trainer.model,
            trainer.optimizer,
            trainer.train_images,
            trainer.train_labels,
            batch_size=batch_size,
            generator=torch.Generator().manual_seed(epoch_seed(42, next(epoch))),
            autocast_dtype=trainer.amp_dtype,
        )
        return time.perf_counter() - start

    return run


def speed(data: Dataset, batch_size: int, repeats: int) -> dict[str, float]:
    default = "bf16" if autocast_dtype("auto", torch.device("cpu")) is torch.bfloat16 else "fp32"
    contenders = {
        "tutorial (DataLoader + ToTensor, fp32)": time_tutorial(data, batch_size),
        "ours (tensor-resident, fp32)": time_ours(data, batch_size, "fp32"),
        f"ours (tensor-resident, auto = {default})": time_ours(data, batch_size, "auto"),
    }
    for run in contenders.values():  # warm-up: first-call allocations, thread pools
        run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits all alike
        for name, run in contenders.items():
            times[name].append(run())
    return {name: statistics.median(t) for name, t in times.items()}


def precision_check(data: Dataset) -> list[tuple[str, list[dict]]]:
    """The tutorial's configuration trained in fp32 and in bf16 autocast, every epoch."""
    return [(p, list(fit(TrainConfig(precision=p), data, device="cpu"))) for p in ("fp32", "bf16")]


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Time one training epoch: the tutorial's pipeline against ours.")
    p.add_argument("--data", default="cifar10", help=(
        "cifar10 (default), cifar100, mnist, fashion-mnist (torchvision's, by name), synthetic, "
        "or an image folder with train/<class>/ and test/<class>/"
    ))
    p.add_argument(
        "--data-root", default="data", help="where torchvision's data sets are found or downloaded (default ./data)"
    )
    p.add_argument("--cache-dir", help="image-folder cache (default ~/.cache/hptune)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--repeats", type=positive_int, default=3, help="timed epochs per contender; the median is reported")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--precision-check", action="store_true", help="instead: train the tutorial's config 10 epochs in fp32 and bf16 and compare")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        data = load_dataset(args.data, args.data_root, cache_dir=args.cache_dir)
    except DataError as exc:
        return fail(PROG, str(exc))
    print(f"{data!r}; CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    if args.precision_check:
        runs = precision_check(data)
        for precision, history in runs:
            curve = " ".join(f"{m['train_loss']:.3f}" for m in history)
            last = history[-1]
            print(f"{precision}: test_accuracy {100 * last['test_accuracy']:.2f}%  test_loss {last['test_loss']:.4f}  train_loss per epoch: {curve}")
        (_, fp32), (_, bf16) = runs
        gap = 100 * (bf16[-1]["test_accuracy"] - fp32[-1]["test_accuracy"])
        worst = max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(fp32, bf16))
        print(f"bf16 - fp32: test_accuracy {gap:+.2f} points; largest train_loss gap over the epochs {worst:.4f}")
        return 0
    medians = speed(data, args.batch_size, args.repeats)
    baseline = next(iter(medians.values()))
    print(f"one training epoch at batch {args.batch_size}, median of {args.repeats}:")
    for name, seconds in medians.items():
        print(f"  {name:<42} {seconds:7.2f} s   {baseline / seconds:5.2f}x")
    print(f"speed-up of ours (default precision) over the tutorial: {baseline / list(medians.values())[-1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
