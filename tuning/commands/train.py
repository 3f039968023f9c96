"""hptune train (also `python -m trainable`): train ONE configuration without Ray, one line per epoch.

    python -m trainable --tutorial --data data/cifar10-jpeg        # the tutorial's run
    python -m trainable --config results/<name>/best_config.yaml   # re-train a search's winner
    python -m trainable --lr 0.01 --batch-size 128 --epochs 15 --json
    python -m trainable --model examples/ray_tutorial_cnn.py:net --model-arg l1=64 --data data/cifar10-jpeg
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainable import challenge
from trainable.config import OPTIMIZERS, PRECISIONS, SCHEDULES, ConfigError, TrainConfig
from trainable.confirm import CONFIRM_FILE, confirm, describe, write_confirm
from trainable.data import Data, DataError, load_dataset
from trainable.fileio import jsonable
from trainable.fit import Trainer, check_model, slow_epochs
from trainable.hardware import flush_denormals, select_device
from trainable.models import ModelError
from trainable.own_loop import loop_of, run_own_loop
from trainable.refs import BadReferenceError, UserCodeError
from tuning.commands.common import OneLineParser, add_data_args, add_model_args, data_overrides, fail, positive_int

PROG = "python -m trainable"
# flag dest -> TrainConfig field, for the flags that override one field each
HYPERPARAMETER_FLAGS = ("lr", "batch_size", "epochs", "optimizer", "momentum", "weight_decay", "schedule", "seed",
                        "model", "loop")
EXAMPLES = """examples:
  python -m trainable --tutorial --data data/cifar10-jpeg          the tutorial's run
  python -m trainable --config results/NAME/best_config.yaml       re-train a search's winner
  python -m trainable --model examples/ray_tutorial_cnn.py:net --model-arg l1=64 --data data/cifar10-jpeg"""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description="Train one configuration, the tutorial's MLP or your own model (no Ray).",
                      epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="YAML",
                     help="start from this configuration (e.g. a search's best_config.yaml)")
    src.add_argument("--tutorial", action="store_true",
                     help="exactly the tutorial's hyperparameters (SGD, lr 1e-3, batch 64, 10 epochs, seed 42)")
    h = p.add_argument_group("hyperparameters (override --config; the default is the tutorial's)")
    h.add_argument("--lr", type=float, metavar="LR", help="learning rate (default 1e-3)")
    h.add_argument("--batch-size", type=positive_int, metavar="N", help="images per step (default 64)")
    h.add_argument("--epochs", type=positive_int, metavar="N", help="passes over the training set (default 10)")
    h.add_argument("--optimizer", choices=OPTIMIZERS, help="default sgd")
    h.add_argument("--momentum", type=float, metavar="M", help="SGD/Nesterov momentum (default 0)")
    h.add_argument("--weight-decay", type=float, metavar="WD", help="L2 (decoupled for adamw) weight decay (default 0)")
    h.add_argument("--schedule", choices=SCHEDULES,
                   help="learning rate per epoch: constant (default) or cosine (from lr towards 0)")
    h.add_argument("--seed", type=int, metavar="N", help="weight init and shuffling (default 42)")
    h.add_argument("--hidden", type=positive_int, nargs="+", metavar="WIDTH",
                   help="the tutorial MLP's hidden layer widths (default 512 512)")
    m = p.add_argument_group("model")
    add_model_args(m, "model factory: mlp (the tutorial's, default), MODULE:NAME or path/to/file.py:NAME",
                   "a model hyperparameter, passed to the factory as a keyword argument (repeatable)")
    m.add_argument("--loop", metavar="REF",
                   help="your own training loop (config, data, report) instead of ours: MODULE:NAME or FILE.py:NAME")
    r = p.add_argument_group("data and hardware")
    add_data_args(r)
    r.add_argument("--precision", choices=PRECISIONS,
                   help="auto (default): bf16 where the hardware runs it fast, else fp32")
    r.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto (cuda -> mps -> cpu), cpu, cuda, cuda:1, mps")
    r.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads for torch (default: torch's choice)")
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
    if args.hidden or args.model_arg:
        overrides["model_args"] = {**base.model_args, **({"hidden": args.hidden} if args.hidden else {}),
                                   **dict(args.model_arg)}
    return base.with_updates(**overrides)  # data paths as given: relative ones stay relative


def dumps(metrics: dict[str, Any]) -> str:
    return json.dumps(jsonable(metrics), allow_nan=False)


def format_epoch(m: dict[str, Any], epochs: int, history: list[dict[str, Any]] | None = None) -> str:
    train_accuracy = m.get("train_accuracy")
    speed = f", {m['samples_per_second']:,.0f} samples/s" if m.get("samples_per_second") else ""
    line = (
        f"Epoch {m['epoch']:>3}/{epochs}  train_loss {m['train_loss']:.4f}  "
        + (f"train_accuracy {100 * train_accuracy:5.1f}%  " if train_accuracy is not None else "")
        + f"test_loss {m['test_loss']:.4f}  test_accuracy {100 * m['test_accuracy']:5.1f}%  "
        f"[{m['epoch_seconds']:.1f} s{speed}]"
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


def free_path(path: Path) -> Path:
    """`path`, or path-2, path-3 ... if it exists: earlier results are never overwritten."""
    n = 2
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def run_seeds(args: argparse.Namespace, config: TrainConfig, data: Data, device: torch.device) -> int:
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


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        config = config_from_args(args)
        device = select_device(args.device)
    except (ConfigError, RuntimeError) as exc:
        return fail(prog, str(exc))
    flush_denormals(device)  # before torch starts its threads; see flush_denormals
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        data = load_dataset(config.data, config.data_root, cache_dir=args.cache_dir)
        loop = loop_of(config.loop) if config.loop else None
        if loop is None or config.model != "mlp":
            check_model(config, data)
    except (DataError, ModelError, BadReferenceError, UserCodeError) as exc:
        return fail(prog, str(exc))
    if args.seeds:
        return run_seeds(args, config, data, device)
    try:
        if loop is not None:
            return train_own_loop(args, config, data, loop)
        return train(args, config, data, device)
    except (ModelError, UserCodeError) as exc:
        return fail(prog, str(exc), status=1)


def train(args: argparse.Namespace, config: TrainConfig, data: Data, device: torch.device) -> int:
    trainer = Trainer(config, data, device=device, challenge_window=args.challenge_window)
    if not args.json:
        print(f"{data!r} on {device} ({trainer.precision_text}); {config.to_dict()}")
    last: dict[str, Any] | None = None
    bar = epoch_bar(config.epochs) if sys.stdout.isatty() and not args.json else None
    for last in trainer.run():
        show_epoch(args, last, config, trainer.history, bar)
    if bar is not None:
        bar.close()
    if last is not None and not args.json:
        print(_capital(challenge.verdict_text(last, args.challenge_window)))
    return 0


def show_epoch(args: argparse.Namespace, metrics: dict[str, Any], config: TrainConfig,
               history: list[dict[str, Any]], bar: Any = None) -> None:
    line = dumps(metrics) if args.json else format_epoch(metrics, config.epochs, history)
    if bar is None:
        print(line, flush=True)
    else:  # the epoch's line above the bar, which moves on by one
        bar.write(line, file=sys.stdout)
        bar.update(1)


def train_own_loop(args: argparse.Namespace, config: TrainConfig, data: Data, loop: Any) -> int:
    """The configuration's own training loop (`loop:`), its reported epochs printed as ours."""
    if not args.json:
        print(f"{data!r}; your training loop {config.loop}; {config.to_dict()}")
    seen: list[dict[str, Any]] = []

    def on_epoch(metrics: dict[str, Any], state: Any) -> None:
        seen.append(metrics)
        show_epoch(args, metrics, config, seen)

    history = run_own_loop(loop, config, data, on_epoch, challenge_window=args.challenge_window)
    if not args.json:
        print(_capital(challenge.verdict_text(history[-1], args.challenge_window)))
    return 0


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


if __name__ == "__main__":
    sys.exit(main())
