"""The live line's estimate of the time left, on numbers made up for the purpose, and the per-epoch bar
of python -m trainable: drawn on a terminal, absent when the output is a file or a pipe."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import sys
import termios
from pathlib import Path

import pytest

from trainable.__main__ import main as trainable_main
from tuning.results.progress_line import LineState, estimate_seconds_left, format_duration

ROOT = Path(__file__).resolve().parent.parent


def test_nothing_measured_yet_means_no_estimate():
    assert estimate_seconds_left([], running=[(0, 10)], unstarted=5, ended_epochs=[], slots=2) is None
    assert format_duration(None) == "time left: estimating"


def test_running_trials_finish_their_epochs_and_new_ones_run_like_the_ended_ones():
    # 2 s per epoch; running: 8 and 2 epochs to go; 3 trials to start, the ended ones ran 3 and 5 epochs
    # (early stopping included) -> 10 + 3 * 4 = 22 epochs over 2 slots -> 22 s
    left = estimate_seconds_left([1.0, 3.0, 2.0], running=[(2, 10), (8, 10)], unstarted=3, ended_epochs=[3, 5], slots=2)
    assert left == pytest.approx(2.0 * 22 / 2)


def test_before_any_trial_ended_new_trials_are_expected_to_run_as_planned():
    left = estimate_seconds_left([4.0], running=[(1, 6), (0, 10)], unstarted=2, ended_epochs=[], slots=2)
    assert left == pytest.approx(4.0 * (5 + 10 + 2 * 8) / 2)


def test_fewer_trials_left_than_slots_do_not_divide_the_time():
    # one trial with 5 epochs to go on a machine with 4 slots: it still takes 5 epochs of time
    left = estimate_seconds_left([3.0], running=[(5, 10)], unstarted=0, ended_epochs=[10, 10], slots=4)
    assert left == pytest.approx(15.0)
    assert estimate_seconds_left([3.0], running=[], unstarted=0, ended_epochs=[10], slots=4) == 0.0


def test_the_line_reads_done_running_best_and_time_left():
    state = LineState(total=20, done=6, running=2, best="trial 4 test_accuracy 53.7%", seconds_left=200)
    assert state.text() == "2 running | best trial 4 test_accuracy 53.7% | about 3 min left"
    assert format_duration(40) == "about 40 s left" and format_duration(3 * 3600) == "about 3.0 h left"
    assert LineState(total=20, done=20, running=0, best="", seconds_left=0.0).text() == "0 running | all done"


def test_trainable_prints_plain_lines_when_not_a_terminal(cli):
    status, out, err = cli(trainable_main, ["--data", "synthetic", "--epochs", "2", "--batch-size", "256"])
    assert status == 0, err
    assert "\r" not in out and "epoch 1/2 |" not in out
    assert sum(line.startswith("Epoch ") for line in out.splitlines()) == 2


def run_in_terminal(argv: list[str], columns: int = 160, env: dict[str, str] | None = None) -> str:
    """Run `python argv...` with a pseudo-terminal as its stdout, as a user's shell would; its output."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the repository importable, as in the tests' own process
        os.environ.update(env or {})
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        os.execv(sys.executable, [sys.executable, *argv])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))  # a window, so tqdm knows its width
    out = b""
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, out.decode(errors="replace")[-2000:]
    return out.decode(errors="replace")


@pytest.mark.slow
def test_trainable_draws_an_epoch_bar_in_a_terminal():
    out = run_in_terminal(["-m", "trainable", "--data", "synthetic", "--epochs", "3", "--batch-size", "256"])
    assert "epoch 1/3 |" in out and "epoch 2/3 |" in out and "left" in out  # the bar, with the time left
    shown = [line.rstrip("\r").split("\r")[-1] for line in out.split("\n")]  # what the terminal keeps of each line
    assert sum(line.startswith("Epoch ") for line in shown) == 3  # the epoch lines stay, above the bar
    assert "Challenge not met (" in out or "Challenge met (" in out
