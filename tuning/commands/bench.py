"""hptune bench-search: does a search spend its time training?

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
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from trainable.cli import OneLineParser, add_data_args, data_flags, positive_int
from tuning.commands.search import main as search
from tuning.results.journal import Journal, trials

PROG = "hptune bench-search"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
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


def run_search(args: argparse.Namespace, folder: str, name: str, arrays: int = 0) -> tuple[list, float, float]:
    """One search of the bench's fixed space: its trials, seconds to the last trial's end, and to its return."""
    space = Path(folder) / "space.yaml"
    # Fixed work per trial, so every run of the bench measures the same thing.
    space.write_text(f"lr: {{low: 0.01, high: 0.05, log: true}}\nbatch_size: [{args.batch_size}]\n"
                     f"epochs: {args.epochs}\noptimizer: [nesterov]\nmomentum: 0.9\n")
    argv_search = [*data_flags(args), "--results-dir", folder, "--name", name, "--samples", str(args.samples),
                   "--space", str(space), "--no-baseline", "--no-early-stop",
                   "--cpus-per-trial", str(args.cpus_per_trial), *(["--arrays", str(arrays)] if arrays else [])]
    if args.num_cpus:
        argv_search += ["--num-cpus", str(args.num_cpus)]
    start = time.time()
    status = search(argv_search)
    wall = time.time() - start
    if status != 0:
        raise SearchFailedError(status)
    journal = Journal(Path(folder) / name)
    return trials(journal.read()), max(journal.times("end")) - start, wall


class SearchFailedError(RuntimeError):
    def __init__(self, status: int) -> None:
        super().__init__(f"the search failed (exit {status})")
        self.status = status


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    import os

    cpus = args.num_cpus or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as folder:
        try:
            records, trained, wall = run_search(args, folder, "bench")
            compared = {k: run_search(args, folder, f"arrays-{k}", k) for k in args.arrays or []}
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


if __name__ == "__main__":
    sys.exit(main())
