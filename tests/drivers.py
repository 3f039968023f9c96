"""A search (or compare) driver in a process group of its own: start it, wait until it is mid-way,
signal it, and never leave it (or the Ray it started) behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tuning.results.journal import Journal, trials


def trial_lines(out: str) -> list[str]:
    """The console's line per ended trial (`[  3/20] trial ...`), not the `[slow] trial N: ...` notes a
    loaded machine adds when an epoch takes 3x its trial's first (speed decides those)."""
    return [line for line in out.splitlines() if re.match(r"\[\s*\d+/\d+\] trial ", line)]


@contextmanager
def running(log: Path, argv: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """`python ARGV...` with its output in `log`; on leaving, whatever happened, a driver that has not
    exited is killed with its whole group, so it cannot leave its Ray (and held trials) behind."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **(env or {})})
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_until_mid_search(exp: Path, proc: subprocess.Popen, ended: int = 2, timeout: float = 900) -> None:
    """Until `ended` trials ended and a running one has saved a checkpoint."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the search ended before it could be interrupted"
        ts = trials(Journal(exp).read())
        if sum(t.done for t in ts) >= ended and any(not t.done and t.checkpoint for t in ts):
            return
        time.sleep(0.05)
    raise AssertionError("the search did not get far enough in time")


def job_processes(leader: int) -> list[int]:
    """Every process of the session `leader` leads (a driver started by `running`, its watched search
    process and the Ray they started), leader first: what Slurm's scancel or systemd signals."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # gone meanwhile
            fields = stat.rpartition(")")[2].split()  # after "pid (comm)": state, ppid, pgrp, session, ...
            if int(fields[3]) == leader:
                found.append(int(entry))
    return sorted(found, key=lambda pid: (pid != leader, pid))


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except OSError:
        return None


# Ray's per-node agents outlive a killed raylet by a minute (seen on Ray 2.60: both exited 60 s
# after it) and hold nothing of the experiment: waiting for them cost each SIGKILL test a minute.
LINGERING_AGENTS = (b"ray::DashboardAgent", b"ray::RuntimeEnvAgent")


def wait_for_job_end(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until every process of the driver's job is gone but Ray's agents: after a SIGKILL to the
    command, its search process (killed with it) and Ray's raylet and workers are freed a moment
    later, and hold the experiment until then."""
    deadline = time.time() + timeout
    while [pid for pid in job_processes(proc.pid) if _alive(pid) and not _lingering_agent(pid)]:
        if time.time() > deadline:
            raise AssertionError(f"processes of the killed search still running after {timeout:.0f} s")
        time.sleep(0.05)


def _lingering_agent(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(LINGERING_AGENTS)
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"  # a zombie is gone
    except OSError:
        return False


def signal_and_wait(proc: subprocess.Popen, sig: int, log: Path, timeout: float = 120) -> int:
    """Send `sig` (SIGINT to the whole group, as a terminal's Ctrl-C does) and return the exit status;
    if the driver does not exit, its output goes into the failure."""
    os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)
    try:
        status = proc.wait(timeout=timeout)
        if sig == signal.SIGKILL:
            wait_for_job_end(proc)
        return status
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the driver did not exit within {timeout:.0f} s of the signal; its output:\n"
                             + log.read_text()[-4000:]) from None
