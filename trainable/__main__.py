"""python -m trainable: train ONE configuration without Ray, one line per epoch.

    python -m trainable --tutorial --data data/cifar10-jpeg        # the tutorial's run
    python -m trainable --config results/<name>/best_config.yaml   # re-train a search's winner
    python -m trainable --lr 0.01 --batch-size 128 --epochs 15 --json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainable import challenge, fused
from trainable.cli import OneLineParser, add_data_args, data_overrides, dumps, fail, positive_int
from trainable.config import OPTIMIZERS, PRECISIONS, SCHEDULES, ConfigError, TrainConfig
from trainable.confirm import CONFIRM_FILE, confirm, describe, write_confirm
from trainable.data import DataError, Dataset, load_dataset
from trainable.fit import Trainer, flush_denormals, select_device, slow_epochs

PROG = "python -m trainable"
# flag dest -> TrainConfig field, for the flags that override one field each
HYPERPARAMETER_FLAGS = ("lr", "batch_size", "epochs", "optimizer", "momentum", "weight_decay", "schedule", "seed",
                        "hidden")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Train one configuration of the tutorial's MLP (no Ray).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="YAML",
                     help="start from this configuration (e.g. a search's best_config.yaml)")
    src.add_argument("--tutorial", action="store_true",
                     help="exactly the tutorial's hyperparameters (SGD, lr 1e-3, batch 64, 10 epochs, seed 42)")
    h = p.add_argument_group("hyperparameters (override --config; the default is the tutorial's)")
    h.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    h.add_argument("--batch-size", type=positive_int, help="images per step (default 64)")
    h.add_argument("--epochs", type=positive_int, help="passes over the training set (default 10)")
    h.add_argument("--optimizer", choices=OPTIMIZERS, help="default sgd")
    h.add_argument("--momentum", type=float, help="SGD/Nesterov momentum (default 0)")
    h.add_argument("--weight-decay", type=float, help="default 0")
    h.add_argument("--schedule", choices=SCHEDULES,
                   help="learning rate per epoch: constant (default) or cosine (from lr towards 0)")
    h.add_argument("--seed", type=int, help="weight init and shuffling (default 42)")
    h.add_argument("--hidden", type=positive_int, nargs="+", metavar="WIDTH",
                   help="hidden layer widths (default 512 512)")
    r = p.add_argument_group("data and hardware")
    add_data_args(r)
    r.add_argument("--precision", choices=PRECISIONS,
                   help="auto (default): bf16 where the hardware runs it fast, else fp32")
    r.add_argument("--device", default="auto", help="auto (cuda -> mps -> cpu), cpu, cuda, cuda:1, mps")
    r.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice)")
    o = p.add_argument_group("output")
    o.add_argument("--challenge-window", type=positive_int, default=challenge.DEFAULT_WINDOW, metavar="K",
                   help="the train loss must fall in each of the last K epochs (default 3)")
    o.add_argument("--json", action="store_true", help="print one JSON object per epoch instead of text")
    o.add_argument("--seeds", type=positive_int, metavar="N",
                   help="instead: re-train with N new seeds (seed+1 .. seed+N) and report mean ± std of the final "
                        "metrics; writes confirm.csv beside --config (confirm-2.csv ... if taken)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides: dict[str, Any] = {k: getattr(args, k) for k in HYPERPARAMETER_FLAGS if getattr(args, k) is not None}
    if args.tutorial and overrides:
        flags = ", ".join("--" + k.replace("_", "-") for k in overrides)
        raise ConfigError(f"--tutorial runs the tutorial's hyperparameters exactly; drop {flags}")
    overrides.update(data_overrides(args))
    if args.precision is not None:
        overrides["precision"] = args.precision
    base = TrainConfig.load(args.config) if args.config else TrainConfig()
    return base.with_updates(**overrides)  # data paths as given: relative ones stay relative


def format_epoch(m: dict[str, Any], epochs: int, history: list[dict[str, Any]] | None = None) -> str:
    line = (
        f"Epoch {m['epoch']:>3}/{epochs}  train_loss {m['train_loss']:.4f}  "
        f"train_accuracy {100 * m['train_accuracy']:5.1f}%  "
        f"test_loss {m['test_loss']:.4f}  test_accuracy {100 * m['test_accuracy']:5.1f}%  "
        f"[{m['epoch_seconds']:.1f} s, {m['samples_per_second']:,.0f} samples/s]"
    )
    if m["diverged"]:
        line += "  DIVERGED"
    slow = [s for s in slow_epochs(history or []) if s[0] == m["epoch"]]
    if slow:
        line += f"  slow epoch: {slow[0][2]:.0f}× epoch 1"
    return line


def epoch_bar(epochs: int):  # noqa: ANN201 - a tqdm bar
    """A progress bar over the epochs, with tqdm's time left; only drawn on a terminal."""
    from tqdm import tqdm

    return tqdm(total=epochs, file=sys.stdout, unit="epoch", leave=False, dynamic_ncols=True,
                bar_format="epoch {n_fmt}/{total_fmt} |{bar:30}| {elapsed} elapsed, about {remaining} left")


def format_verdict(m: dict[str, Any], window: int) -> str:
    if m["diverged"]:
        return "Challenge: not met (training diverged: the loss became NaN or infinite)"
    falling = "still falling" if m["still_decreasing"] else f"not falling in each of the last {window} epochs"
    crossing = f", below since epoch {m['crossing_epoch']}" if m["crossing_epoch"] is not None else ""
    chance = "" if m["above_chance"] else "; test accuracy within 3 points of chance"
    met = "met" if m["challenge_met"] else "not met"
    return f"Challenge: {met} ({challenge.gap_text(m)}{crossing}; train loss {falling}{chance})"


def free_path(path: Path) -> Path:
    """`path`, or path-2, path-3 ... if it exists: earlier results are never overwritten."""
    n = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def run_seeds(args: argparse.Namespace, config: TrainConfig, data: Dataset, device: torch.device) -> int:
    def show(row: dict[str, Any]) -> None:
        if args.json:
            print(dumps(row), flush=True)
        else:
            print(f"seed {row['seed']}: test_accuracy {100 * row['test_accuracy']:.1f}%  "
                  f"train_loss {row['train_loss']:.4f}  test_loss {row['test_loss']:.4f}  "
                  f"challenge {'met' if row['challenge_met'] else 'not met'}", flush=True)

    rows = confirm(config, data, args.seeds, challenge_window=args.challenge_window, device=device, on_run=show)
    if not args.json:
        print(f"Confirmation: {describe(rows)}")
    if args.config:
        path = free_path(Path(args.config).resolve().parent / CONFIRM_FILE)
        write_confirm(path, rows)
        if not args.json:
            print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        device = select_device(args.device)
    except (ConfigError, RuntimeError) as exc:
        return fail(PROG, str(exc))
    flush_denormals(device)  # before torch starts its threads; see flush_denormals
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        data = load_dataset(config.data, config.data_root, cache_dir=args.cache_dir)
    except DataError as exc:
        return fail(PROG, str(exc))
    if args.seeds:
        return run_seeds(args, config, data, device)
    trainer = Trainer(config, data, device=device, challenge_window=args.challenge_window)
    if not args.json:
        step = ", fused step" if trainer.fused else ""
        if trainer.precision == "bf16" and device.type == "cpu" and fused.unavailable_reason():
            step = f"; fused step not used: {fused.unavailable_reason()}"
        print(f"{data!r} on {device} ({trainer.precision}{step}); {config.to_dict()}")
    last: dict[str, Any] | None = None
    bar = epoch_bar(config.epochs) if sys.stdout.isatty() and not args.json else None
    for last in trainer.run():
        line = dumps(last) if args.json else format_epoch(last, config.epochs, trainer.history)
        if bar is None:
            print(line, flush=True)
        else:  # the epoch's line above the bar, which moves on by one
            bar.write(line, file=sys.stdout)
            bar.update(1)
    if bar is not None:
        bar.close()
    if last is not None and not args.json:
        print(format_verdict(last, args.challenge_window))
    return 0


if __name__ == "__main__":
    sys.exit(main())
