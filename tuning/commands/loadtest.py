"""hptune loadtest: a long search of tiny trials; is every trial accounted for, and does
the driver's memory stay flat?

Runs tuning/search.py as its own process (synthetic data, 1-epoch trials), samples the driver's
resident memory (VmRSS) while it runs, and checks trials.csv at the end.

    hptune loadtest --samples 200
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from tuning.commands.common import OneLineParser, positive_int
from tuning.results.journal import Journal, trials

PROG = "hptune loadtest"
SEARCH = Path(__file__).resolve().parent.parent / "search.py"  # python tuning/search.py


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run(samples: int, num_cpus: int | None, folder: Path) -> tuple[int, list[tuple[int, float]], str]:
    space = folder / "space.yaml"
    space.write_text("lr: {low: 0.001, high: 0.1, log: true}\nbatch_size: [256]\nepochs: 1\n"
                     "optimizer: [sgd, nesterov, adam]\nmomentum: 0.9\n")
    argv = [sys.executable, str(SEARCH), "--data", "synthetic", "--results-dir", str(folder), "--name", "load",
            "--samples", str(samples), "--space", str(space), "--no-baseline", "--no-early-stop"]
    if num_cpus:
        argv += ["--num-cpus", str(num_cpus)]
    log = open(folder / "search.log", "w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    journal = Journal(folder / "load")
    samples_rss: list[tuple[int, float]] = []  # (trials ended so far, driver RSS in MiB)
    while proc.poll() is None:
        rss = rss_mib(proc.pid)
        if rss is not None:
            ended = len(journal.times("end"))
            samples_rss.append((ended, rss))
        time.sleep(0.5)
    log.close()
    return proc.returncode, samples_rss, (folder / "search.log").read_text()


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    p = OneLineParser(prog=prog, description="Many tiny trials: all accounted for, driver memory flat.")
    p.add_argument("--samples", type=positive_int, default=200, metavar="N", help="trials (default 200)")
    p.add_argument("--num-cpus", type=positive_int, metavar="N", help="CPUs for the local Ray (default: all)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        status, rss, log = run(args.samples, args.num_cpus, folder)
        wall = time.perf_counter() - start
        if status != 0:
            print(log[-3000:])
            print(f"{prog}: the search failed (exit {status})", file=sys.stderr)
            return 1
        table = pd.read_csv(folder / "load" / "trials.csv")
        journal_trials = trials(Journal(folder / "load").read())
    print(f"{args.samples}-sample search of 1-epoch trials: {wall:.0f} s")
    print(f"trials.csv: {len(table)} rows, {table['trial'].nunique()} distinct trials, statuses "
          f"{table['status'].value_counts().to_dict()}")
    print(f"journal: {len(journal_trials)} trials, {sum(t.done for t in journal_trials)} ended")
    if not rss:
        print(f"{prog}: the search ended before its memory could be sampled", file=sys.stderr)
        return 1
    for fraction in (0.1, 0.25, 0.5, 0.75, 1.0):
        mark = next(((n, r) for n, r in rss if n >= fraction * args.samples), rss[-1])
        print(f"driver RSS when {mark[0]:>4} trials had ended: {mark[1]:7.1f} MiB")
    print(f"driver peak RSS: {max(r for _, r in rss):.1f} MiB")
    ok = len(table) == args.samples and table["trial"].is_unique
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
