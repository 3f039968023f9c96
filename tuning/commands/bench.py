"""hptune bench-search: does a search spend its time training?

Runs a small but real search (a local Ray started by the search itself, the data loaded once,
checkpoints every epoch, the journal and CSV files kept current) and compares the time trials
spent inside train/evaluate with what the machine had to give: wall time from the moment the
search was called (imports done; data loading and Ray's start included) times the CPUs Ray
used, up to the last trial's end, and up to the search's return (CSV files and report written,
Ray shut down).

    hptune bench-search --data data/cifar10-jpeg              # 12 trials x 8 epochs, batch 256
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
    return p


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        space = Path(folder) / "space.yaml"
        # Fixed work per trial, so every run of the bench measures the same thing.
        space.write_text(f"lr: {{low: 0.01, high: 0.05, log: true}}\nbatch_size: [{args.batch_size}]\n"
                         f"epochs: {args.epochs}\noptimizer: [nesterov]\nmomentum: 0.9\n")
        argv_search = [*data_flags(args), "--results-dir", folder, "--name", "bench", "--samples", str(args.samples),
                       "--space", str(space), "--no-baseline", "--no-early-stop",
                       "--cpus-per-trial", str(args.cpus_per_trial)]
        if args.num_cpus:
            argv_search += ["--num-cpus", str(args.num_cpus)]
        import os

        cpus = args.num_cpus or os.cpu_count() or 1
        start = time.time()
        status = search(argv_search)
        wall = time.time() - start
        if status != 0:
            print(f"{prog}: the search failed (exit {status})", file=sys.stderr)
            return status
        journal = Journal(Path(folder) / "bench")
        records = trials(journal.read())
        trained = max(journal.times("end")) - start
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
