"""The search command runs in a child process that a small parent watches, so that whatever ends the
search, the experiment is left saying so and the user is told how to resume.

Why: Ray's C++ core ends the driver's process at once (exit status 1, nothing printed, no Python
code run) when its local raylet or object store goes away. Slurm's `scancel` and systemd send
SIGTERM to every process of the job, Ray's own among them; when the raylet died of it before the
driver had saved, the search ended silently, experiment.json still said `running`. The OOM killer
taking the raylet does the same. The journal already holds everything, so nothing was lost, but
the user was told nothing.

The parent imports neither Ray nor torch. It starts the same command again with
$HPTUNE_SUPERVISED set (the child runs the search as before), in a process group of its own so
that a terminal's Ctrl-C or a signal to the parent's group reaches the search once, through the
parent, which passes on SIGINT and SIGTERM (and Ctrl-Z: SIGTSTP stops the search's group and the
parent, SIGCONT continues both). The child dies with the parent (PR_SET_PDEATHSIG): a
SIGKILL to the parent ends the search as a SIGKILL to the search itself always has. When the child
ends and its experiment still says `running`, the parent does what the search would have done:
marks it interrupted, writes the CSV files and the report from the journal, and prints the resume
command; exit status 128 + the signal if one came, else 1 with a line saying the search ended
abruptly. Only the command line is supervised: `hptune.search()` in a user's Python runs in the
caller's process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

SUPERVISED_ENV = "HPTUNE_SUPERVISED"  # in the child: the pipe (a file descriptor) on which it tells the parent
PR_SET_PDEATHSIG = 1


ENDED = "ended"  # the child's last line: it returned, its outcome said


def command(run: Callable[[], int], prog: str) -> int:
    """The exit status of the search command `run`: run in a watched child process (here, the
    parent), or here (in the child, or with HPTUNE_SUPERVISED=0)."""
    status = supervised(prog)
    if status is not None:
        return status
    try:
        status = run()
    except SystemExit:  # argparse, or a usage error said in one line: said, so ended
        _tell_parent(ENDED)
        raise
    _tell_parent(ENDED)
    return status


def announce(folder: Path) -> None:
    """In the child: tell the parent which experiment folder this search holds."""
    _tell_parent(str(folder))


def _tell_parent(line: str) -> None:
    fd = os.environ.get(SUPERVISED_ENV, "")
    if fd.isdigit() and fd != "0":
        try:
            os.set_inheritable(int(fd), False)  # not passed on to Ray's processes
            os.write(int(fd), (line + "\n").encode())
        except OSError:  # not a pipe from a parent (an environment copied from a child): nobody to tell
            pass


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: a SIGKILL to the parent alone leaves the child running
        pass


def supervised(prog: str) -> int | None:
    """Run this command again as a watched child and return the exit status to give; None where
    this process should run the search itself (it is the child, or supervision is off:
    HPTUNE_SUPERVISED=0)."""
    if os.environ.get(SUPERVISED_ENV) or sys.platform == "win32":
        return None
    told_r, told_w = os.pipe()
    received: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        if child is not None and child.poll() is None:
            os.kill(child.pid, signum)

    def pause(signum: int, frame: object) -> None:  # Ctrl-Z: the search's whole group stops with this process
        if child is not None and child.poll() is None:
            os.killpg(child.pid, signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGSTOP)  # here until SIGCONT (`fg`, `bg`, kill -CONT)
        if child is not None and child.poll() is None:
            os.killpg(child.pid, signal.SIGCONT)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, pause)
    try:
        try:
            child = subprocess.Popen([sys.executable, *sys.orig_argv[1:]], pass_fds=(told_w,), process_group=0,
                                     env={**os.environ, SUPERVISED_ENV: str(told_w)}, preexec_fn=_die_with_parent)
        finally:
            os.close(told_w)  # the child's copy is the only writer: its end is the pipe's end
        status = child.wait()
        os.set_blocking(told_r, False)  # what the child wrote; a process it left behind cannot hold this up
        told = _read_all(told_r).decode(errors="replace").splitlines()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.close(told_r)
    code = status if status >= 0 else 128 - status  # killed by signal N: 128 + N, as a shell says
    folders = [line for line in told if line != ENDED]
    if folders and ENDED not in told and (Path(folders[-1]) / "experiment.json").exists():
        return finish_for_the_child(Path(folders[-1]), code, received, prog)
    return code


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def finish_for_the_child(folder: Path, code: int, received: list[int], prog: str) -> int:
    """The child ended before it could say how: mark its experiment interrupted (unless it had
    finished), write what the search writes when interrupted, and say how to resume; the exit
    status to give."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(folder.parent / f".{folder.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:  # another search took the folder over: it is theirs to finish
        return code
    try:
        from tuning.results.experiment import Experiment
        from tuning.results.report import save_interrupted

        experiment = Experiment.load(folder)
        if experiment.meta.get("status") != "finished":
            experiment.mark("interrupted")
        if len(received) < 2:  # a second signal: whoever sent it wants the process gone now
            save_interrupted(experiment, experiment.settings.top, prog)
        command = experiment.meta.get("command", "the same command")
    except Exception as exc:  # noqa: BLE001 - the journal is the record; the next search reads it
        print(f"{prog}: warning: could not mark {folder} interrupted ({exc}); the same command resumes it",
              file=sys.stderr)
        command = "the same command"
    finally:
        lock.release()
    if received:
        name = "Ctrl-C" if received[0] == signal.SIGINT else signal.Signals(received[0]).name
        print(f"\nInterrupted ({name}). Finished trials are kept in {folder}; resume with:\n  {command}",
              file=sys.stderr, flush=True)
        return 128 + received[0]
    how = f"killed by {signal.Signals(code - 128).name}" if code > 128 else f"exit status {code}"
    print(f"{prog}: error: the search's process ended abruptly ({how}; Ray ends it when its own local processes "
          f"die, e.g. killed for memory). Finished trials are kept in {folder}; resume with:\n  {command}",
          file=sys.stderr, flush=True)
    return 1
