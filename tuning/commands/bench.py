"""The benches: hptune bench, hptune bench-search and hptune bench-arrays; what they time is
trainable/bench.py, trainable/arrays_bench.py and a real search. Below, bench-search: does a
search spend its time training?

Runs a small but real search (a local Ray started by the search itself, the data loaded once,
checkpoints every epoch, the journal and CSV files kept current) and compares the time trials
spent inside train/evaluate with what the machine had to give: wall time from the moment the
search was called (imports done; data loading and Ray's start included) times the CPUs Ray
used, up to the last trial's end, and up to the search's return (CSV files and report written,
Ray shut down).

    hptune bench-search --data data/cifar10-jpeg              # 12 trials x 8 epochs, batch 256

With `--arrays K [K ...]` it runs the same search again with trial arrays of each K (`--arrays`
of `hptune search`) and prints, for each, trials and trial-epochs per second from the call to the
last trial's end, and the ratio against separate trials, all measured in the one run:

    hptune bench-search --data data/cifar10-jpeg --batch-size 128 --arrays 4 16 64
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from trainable import arrays_bench, bench, fused
from trainable.config import PRECISIONS
from trainable.data import DataError, Dataset, load_dataset
from trainable.hardware import flush_denormals, fused_note, select_device
from trainable.models import ModelError
from trainable.refs import BadReferenceError, UserCodeError
from tuning.commands.common import (
    OneLineParser,
    add_data_args,
    add_model_args,
    command_line,
    data_flags,
    data_overrides,
    fail,
    non_negative_int,
    positive_int,
)
from tuning.results.journal import Journal, trials

PROG = "hptune bench-search"
PROG_EPOCH = "hptune bench"
PROG_ARRAYS = "hptune bench-arrays"


# --- hptune bench: one epoch, ours against the tutorial's and the machine's floor -----------------


def epoch_parser(prog: str = PROG_EPOCH) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description="Time one training epoch: the tutorial's pipeline against ours.")
    add_data_args(p)
    p.add_argument("--batch-size", type=positive_int, default=64, metavar="N", help="images per step (default 64)")
    p.add_argument("--repeats", type=positive_int, default=3, metavar="N",
                   help="timed epochs per contender; the median is reported (default 3)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto (cuda -> mps -> cpu, as `python -m trainable`), cpu, cuda, cuda:1: where both "
                        "pipelines and the floor's GEMMs run")
    add_model_args(p, "the model: mlp (the tutorial's, default) or your factory MODULE:NAME / FILE.py:NAME; for "
                      "yours the baseline is the usual DataLoader pipeline and there is no floor",
                   "a keyword argument of the model factory (repeatable)", default="mlp")
    p.add_argument("--precision-check", action="store_true",
                   help="instead: train the tutorial's config 10 epochs in fp32 and bf16 and compare")
    p.add_argument("--first-epochs", action="store_true",
                   help="instead: epochs 1 and 2 of fresh `python -m trainable` processes, with and without "
                        "the trainer's malloc setting, alternating (--repeats each)")
    return p


def epoch_main(argv: Sequence[str] | None = None, prog: str = PROG_EPOCH) -> int:
    args = epoch_parser(prog).parse_args(argv)
    opened = open_bench(args, "cifar10", prog)
    if isinstance(opened, int):
        return opened
    device, data = opened
    if args.first_epochs:
        medians = bench.first_epochs([*data_flags(args), "--device", args.device], args.batch_size, args.repeats,
                                     args.threads)
        bench.print_first_epochs(medians, args.batch_size, args.repeats)
        return 0
    if args.precision_check:
        bench.print_precision_check(bench.precision_check(data, device))
        return 0
    try:
        medians = bench.speed(data, args.batch_size, args.repeats, device, args.model, dict(args.model_arg))
    except (BadReferenceError, ModelError, UserCodeError) as exc:
        return fail(prog, str(exc))
    bench.print_speed(medians, data, args.batch_size, args.repeats)
    if fused.unavailable_reason():
        print(f"bf16 {fused_note()}")
    return 0


def open_bench(args: argparse.Namespace, default_data: str, prog: str) -> tuple[torch.device, Dataset] | int:
    """The device, torch's threads and the data set of a bench (--device, --threads, the data flags),
    said in one line; an exit status instead where one cannot be had."""
    try:
        device = select_device(args.device)
    except RuntimeError as exc:
        return fail(prog, str(exc))
    flush_denormals(torch.device("cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        data = load_dataset(args.data or default_data, args.data_root or "data", cache_dir=args.cache_dir)
    except DataError as exc:
        return fail(prog, str(exc))
    print(bench.machine_line(data, device))
    return device, data


# --- hptune bench-arrays: K trials one after another against one trial array ---------


def arrays_parser(prog: str = PROG_ARRAYS) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description="Trial-epochs per second: K trials one after another against one "
                                             "trial array of K.")
    add_data_args(p)
    p.add_argument("--k", type=positive_int, nargs="+", default=[4, 16, 64], metavar="K",
                   help="array sizes (default 4 16 64)")
    p.add_argument("--batch-size", type=positive_int, default=128, metavar="N", help="images per step (default 128)")
    p.add_argument("--epochs", type=positive_int, default=1, metavar="N", help="timed epochs per trial (default 1)")
    p.add_argument("--warmup", type=non_negative_int, default=1, metavar="N", help="untimed epochs first (default 1)")
    p.add_argument("--repeats", type=positive_int, default=1, metavar="N",
                   help="times to run each (separate, array) pair, interleaved; medians are reported (default 1)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="the trials' precision (default auto)")
    p.add_argument("--distinct-seeds", action="store_true",
                   help="members seeded 42, 43, ... (each its own data order) instead of all 42 as in a search")
    p.add_argument("--threads", type=positive_int, metavar="N", help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help="auto (cuda -> mps -> cpu), cpu, cuda, cuda:1")
    return p


def arrays_main(argv: Sequence[str] | None = None, prog: str = PROG_ARRAYS) -> int:
    args = arrays_parser(prog).parse_args(argv)
    opened = open_bench(args, "synthetic", prog)
    if isinstance(opened, int):
        return opened
    device, data = opened
    arrays_bench.compare(data, device, args.k, args.batch_size, args.epochs, args.warmup, args.repeats,
                         args.precision, args.distinct_seeds)
    return 0


# --- hptune bench-search -------------------------------------------------------------------------

def search_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description="Fraction of the machine's time a search spends in train/evaluate.")
    add_data_args(p)
    p.add_argument("--samples", type=positive_int, default=12, metavar="N", help="trials (default 12)")
    p.add_argument("--epochs", type=positive_int, default=8, metavar="N", help="epochs per trial (default 8)")
    p.add_argument("--batch-size", type=positive_int, default=256, metavar="N", help="images per step (default 256)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, metavar="N", help="CPUs per trial (default 1)")
    p.add_argument("--num-cpus", type=positive_int, metavar="N", help="CPUs for the local Ray (default: all)")
    p.add_argument("--arrays", type=positive_int, nargs="+", metavar="K",
                   help="also run the search with trial arrays of K members, for each K, and compare")
    return p


def run_search(args: argparse.Namespace, folder: str, name: str, arrays: int = 0,
               command: str = "") -> tuple[list, float, float]:
    """One search of the bench's fixed space: its trials, seconds to the last trial's end, and to its return.
    `command` is what the search's messages name to run again (the bench's own command)."""
    from tuning.commands.search import base_config, search  # Optuna and the driver: the search's alone
    from tuning.settings import SearchSettings

    space = Path(folder) / "space.yaml"
    # Fixed work per trial, so every run of the bench measures the same thing.
    space.write_text(f"lr: {{low: 0.01, high: 0.05, log: true}}\nbatch_size: [{args.batch_size}]\n"
                     f"epochs: {args.epochs}\noptimizer: [nesterov]\nmomentum: 0.9\n")
    settings = SearchSettings(samples=args.samples, results_dir=folder, name=name, baseline=False, early_stop=False,
                              cpus_per_trial=args.cpus_per_trial, arrays=arrays, num_cpus=args.num_cpus,
                              cache_dir=args.cache_dir)
    start = time.time()
    status = search(settings, lambda: base_config(overrides=data_overrides(args)), str(space), lambda _: command)
    wall = time.time() - start
    if status != 0:
        raise SearchFailedError(status)
    journal = Journal(Path(folder) / name)
    return trials(journal.read()), max(journal.times("end")) - start, wall


class SearchFailedError(RuntimeError):
    def __init__(self, status: int) -> None:
        super().__init__(f"the search failed (exit {status})")
        self.status = status


def search_main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = search_parser(prog).parse_args(argv)
    cpus = args.num_cpus or os.cpu_count() or 1
    command = command_line(prog, sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as folder:
        try:
            records, trained, wall = run_search(args, folder, "bench", command=command)
            compared = {k: run_search(args, folder, f"arrays-{k}", k, command) for k in args.arrays or []}
        except SearchFailedError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return exc.status
    threads = max(1, math.floor(args.cpus_per_trial))
    busy = sum(m["epoch_seconds"] for t in records for m in t.epochs) * threads
    epochs = sum(len(t.epochs) for t in records)
    print()
    print(f"{len(records)} trials, {epochs} epochs, {cpus} CPUs, {threads} thread(s) per trial")
    print(f"inside train/evaluate, over all trials:        {busy:7.1f} CPU-seconds")
    print(f"from the call to the last trial's end:         {trained:7.1f} s wall = {trained * cpus:7.1f} CPU-seconds "
          f"-> {100 * busy / (trained * cpus):.1f}% training")
    print(f"... and to the report written, Ray shut down:  {wall:7.1f} s wall = {wall * cpus:7.1f} CPU-seconds -> "
          f"{100 * busy / (wall * cpus):.1f}% training")
    if compared:
        print("\nfrom the call to the last trial's end:")
        rows = [("separate trials", records, trained)] + [(f"arrays of {k}", r, t) for k, (r, t, _) in compared.items()]
        base = epochs / trained
        for label, runs, seconds in rows:
            done = sum(len(t.epochs) for t in runs)
            print(f"  {label:<16} {len(runs) / seconds:7.3f} trials/s  {done / seconds:7.3f} trial-epochs/s  "
                  f"{seconds:7.1f} s  {done / seconds / base:5.2f}x")
    return 0
