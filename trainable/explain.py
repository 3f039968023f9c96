"""hptune explain: why the tutorial saw its test loss below its train loss.

Trains the tutorial's configuration exactly as the tutorial does (one fixed order, batch 64, SGD
lr 1e-3, seed 42, fp32 unless --precision says otherwise) and prints, per epoch, four numbers the tutorial conflates:

- the loss of the epoch's last batch: what the tutorial prints as its train loss (50,000 is not a
  multiple of 64, so that batch holds 16 images);
- the mean loss over all training samples of the epoch, measured while the weights were moving;
- the train loss measured after the epoch, with the epoch's final weights;
- the test loss, also measured after the epoch.

With --config (e.g. a search's best_config.yaml) the same table follows for that configuration,
trained as `python -m trainable` trains it.

    hptune explain --data data/cifar10-jpeg --config results/example/best_config.yaml
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from trainable.config import TrainConfig
from trainable.data import Dataset
from trainable.errors import moved_to
from trainable.fit import Trainer
from trainable.hardware import precision_of
from trainable.loops import autocast, evaluate, to_unit


def tutorial_epochs(data: Dataset, config: TrainConfig) -> Iterator[dict[str, Any]]:
    """The tutorial's loop (one fixed order, no reshuffling), with the extra measurements.

    CIFAR-10's own files hold the images in a random order, which the tutorial's DataLoader
    (shuffle off) reads the same way every epoch. An image folder is sorted by class, so the
    images are put in one random order first, the same for every epoch.
    """
    trainer = Trainer(config, data, device="cpu")
    order = torch.randperm(len(trainer.train_labels), generator=torch.Generator().manual_seed(0))
    images, labels = trainer.train_inputs[order], trainer.train_labels[order]
    n = len(labels)
    for epoch in range(1, config.epochs + 1):
        trainer.model.train()
        total = 0.0
        for start in range(0, n, config.batch_size):
            x = to_unit(images[start : start + config.batch_size], trainer.amp_dtype)
            y = labels[start : start + config.batch_size]
            with autocast(trainer.device, trainer.amp_dtype):
                loss = F.cross_entropy(trainer.model(x), y)
            loss.backward()
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()
            total += loss.item() * len(y)
        yield row(epoch, trainer, last_batch=(loss.item(), len(y)), epoch_mean=total / n)


def our_epochs(data: Dataset, config: TrainConfig) -> Iterator[dict[str, Any]]:
    trainer = Trainer(config, data, device="cpu")
    for metrics in trainer.run():
        yield row(metrics["epoch"], trainer, last_batch=None, epoch_mean=metrics["train_loss"])


def row(epoch: int, trainer: Trainer, last_batch: tuple[float, int] | None, epoch_mean: float) -> dict[str, Any]:
    after_train, _, _ = evaluate(trainer.model, trainer.train_inputs, trainer.train_labels,
                                 autocast_dtype=trainer.amp_dtype)
    test_loss, test_accuracy, _ = evaluate(trainer.model, trainer.test_inputs, trainer.test_labels,
                                           autocast_dtype=trainer.amp_dtype)
    return {"epoch": epoch, "last_batch": last_batch, "epoch_mean": epoch_mean, "after_epoch": after_train,
            "test_loss": test_loss, "test_accuracy": test_accuracy}


def print_table(title: str, rows: Iterator[dict[str, Any]]) -> None:
    print(title)
    print("epoch  last-batch loss (images)  epoch-mean train loss  train loss after epoch  test loss  test accuracy")
    for r in rows:
        last = f"{r['last_batch'][0]:.4f} ({r['last_batch'][1]})" if r["last_batch"] else "-"
        print(f"{r['epoch']:>5}  {last:>24}  {r['epoch_mean']:>21.4f}  {r['after_epoch']:>22.4f}  "
              f"{r['test_loss']:>9.4f}  {100 * r['test_accuracy']:>12.1f}%", flush=True)


def explain(data: Dataset, precision: str | None = None, other: TrainConfig | None = None, name: str = "") -> None:
    """The tutorial's configuration trained as the tutorial does (fp32 unless `precision`), then
    `other` (the configuration in file `name`) as `python -m trainable` trains it, as tables."""
    tutorial = TrainConfig(precision=precision or "fp32")
    print_table(
        "The tutorial's configuration, trained as the tutorial does "
        f"(one fixed order, no reshuffling; {_precision(tutorial)}):",
        tutorial_epochs(data, tutorial),
    )
    if other is not None:
        print()
        print_table(
            f"{name} ({other.optimizer}, lr {other.lr:g}, batch {other.batch_size}, {other.schedule} schedule; "
            f"{_precision(other)}):",
            our_epochs(data, other),
        )


def _precision(config: TrainConfig) -> str:
    """The precision the CPU run of `config` uses: fp32 or bf16 (what `auto` means here)."""
    return precision_of(config.precision, "cpu")


if __name__ == "__main__":  # the command is `hptune explain`, in tuning/commands/
    sys.exit(moved_to("python -m trainable.explain", "hptune explain"))
