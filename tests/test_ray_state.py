"""What Ray already holds on the machine never changes the default search; --address attaches, or says why not.

Every Ray started here is a real `ray start` (token authentication on, as Ray 2.60 starts it when a
token exists) with its own temp dir and home, stopped by the fixture that started it by killing its
process group: never `ray stop`, which would stop every Ray of the machine's user.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from tuning.commands.search import build_parser, settings_from_args
from tuning.engine.cluster import storage_warning
from tuning.results.journal import Journal, trials
from tuning.search import main as search

REPO = Path(__file__).resolve().parent.parent
SEARCH = str(REPO / "tuning" / "search.py")
RAY = str(Path(sys.executable).parent / "ray")
FAST_SPACE = "lr: {low: 0.005, high: 0.02}\nbatch_size: [128]\nepochs: 2\noptimizer: [nesterov]\nmomentum: 0.9\n"


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayMachine:
    """A Ray temp dir and home of its own (short: Ray's socket paths must stay under 108 characters)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="rayst-", dir="/tmp"))
        self.home = self.root / "home"
        (self.home / ".ray").mkdir(parents=True)
        (self.home / ".ray" / "auth_token").write_text(os.urandom(16).hex())  # so `ray start` turns on token auth
        self.groups: list[int] = []
        self.children: list[subprocess.Popen] = []  # reaped while they are killed, or their group outlives them

    @property
    def address_file(self) -> Path:
        return self.root / "ray" / "ray_current_cluster"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        # a home of its own for Ray's token, but the machine's cache: the fused bf16 step built
        # once is found there, instead of being built again (25 s and more) for every such test
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return {**env, "RAY_TMPDIR": str(self.root), "HOME": str(self.home), "XDG_CACHE_HOME": cache,
                "PYTHONPATH": str(REPO), **extra}

    def ray_start(self, *argv: str, python: str | None = None, env: dict[str, str] | None = None) -> int:
        """`ray start ...` in a new process group; the node's daemons stay in that group."""
        command = [python, "-c", "from ray.scripts.scripts import main; main()"] if python else [RAY]
        proc = subprocess.Popen(
            [*command, "start", "--node-ip-address", "127.0.0.1", "--temp-dir", str(self.root / "ray"),
             "--disable-usage-stats",
             *(["--include-dashboard", "false"] if "--head" in argv else []), *argv],
            env=env or self.env(), cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        self.groups.append(proc.pid)
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out
        return proc.pid  # the node's process group

    def head(self, *argv: str) -> str:
        self.ray_start("--head", "--port", "0", *argv)
        return self.address_file.read_text().strip()

    def search(self, argv: list[str], cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, SEARCH, *argv], env=self.env(**env), cwd=cwd, capture_output=True,
                              text=True,
                              timeout=timeout)

    def loopback_cluster(self) -> str:
        """A two-node `ray.cluster_utils.Cluster` that listens on 127.0.0.1 only, without token
        authentication (its home has no token), in a process group of its own; returns its address."""
        home = self.root / "home-without-token"
        home.mkdir(exist_ok=True)
        code = ("import sys, time\nfrom ray.cluster_utils import Cluster\n"
                "args = {'num_cpus': 1, 'node_ip_address': '127.0.0.1'}\n"
                "c = Cluster(initialize_head=True, head_node_args={**args, 'include_dashboard': False})\n"
                "c.add_node(**args)\nprint(c.address, flush=True)\n"
                # until the test ends; its SIGTERM ends it at once (its nodes die with it: Ray's fate sharing)
                "import os, signal\nsignal.signal(signal.SIGTERM, lambda *_: os._exit(0))\nsys.stdin.read()\n")
        proc = subprocess.Popen([sys.executable, "-c", code], env=self.env(HOME=str(home)), cwd=self.root,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                start_new_session=True)
        self.groups.append(proc.pid)
        self.children.append(proc)
        address = proc.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), address or "the cluster did not start"
        return address

    def kill(self, group: int) -> None:
        """SIGTERM the process group, SIGKILL what is left once Ray had its time to exit."""
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                return
            deadline = time.time() + wait
            while time.time() < deadline:
                for child in self.children:
                    child.poll()
                try:
                    os.killpg(group, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.1)

    def stop(self) -> None:
        for group in self.groups:
            self.kill(group)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def machine() -> Iterator[RayMachine]:
    m = RayMachine()
    try:
        yield m
    finally:
        m.stop()


def space(tmp_path: Path, text: str = FAST_SPACE) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


# --- the default search: a private local Ray ------------------------------------------------


@pytest.mark.slow
def test_a_stale_address_file_and_ray_address_do_not_change_the_default_search(machine, tmp_path):
    # what a killed `ray start --head` leaves behind, and a stale RAY_ADDRESS in the shell
    dead = f"127.0.0.1:{closed_port()}"
    machine.address_file.parent.mkdir(parents=True)
    machine.address_file.write_text(dead)
    result = machine.search(["--smoke-test", "--num-cpus", "2", "--results-dir", str(tmp_path / "results"), "--name",
                             "smoke"],
                            cwd=tmp_path, RAY_ADDRESS=dead)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(pd.read_csv(tmp_path / "results" / "smoke" / "trials.csv")) == 3
    assert ("Failed to connect" not in result.stderr
            and "num_cpus and num_gpus must not be provided" not in result.stderr)


@pytest.mark.slow
@pytest.mark.heavy
def test_a_running_cluster_is_not_joined_by_the_default_search(machine, tmp_path):
    address = machine.head("--num-cpus", "1")
    # --num-cpus is refused by Ray when joining a cluster, and the head has 1 CPU, not 2
    result = machine.search(["--data", "synthetic", "--num-cpus", "2", "--samples", "2", "--no-baseline", "--space",
                             space(tmp_path),
                             "--results-dir", str(tmp_path / "results"), "--name", "own"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "of 2 CPUs" in result.stdout and "Ray cluster:" not in result.stdout
    host, port = address.rsplit(":", 1)
    socket.create_connection((host, int(port)), timeout=5).close()  # the cluster is still there


# --- --address: attach, or one line and exit 2 ----------------------------------------------


def test_a_dead_address_is_one_line_exit_2_and_nothing_written(cli, tmp_path):
    results = tmp_path / "results"
    started = time.time()
    status, out, err = cli(search, ["--smoke-test", "--address", f"127.0.0.1:{closed_port()}", "--results-dir",
                                    str(results), "--name", "x"])
    assert status == 2, (out, err)
    assert ("no Ray cluster answers at 127.0.0.1:" in err and len(err.strip().splitlines()) == 1
            and "Traceback" not in err)
    assert not results.exists()  # no experiment folder, no lock file
    assert time.time() - started < 60  # seconds, not Ray's minutes of retries (a generous bound for a slow box)


# What a driver may wait for a cluster it cannot join: the join's deadline (20 s) and Ray's import,
# generously; ray.init alone retried for over ten minutes.
JOIN_BOUND = 120
BEFORE = 300  # the search's own limit in these tests, so that a hang fails them instead of holding them


def one_line_exit_2(result: subprocess.CompletedProcess, took: float, *words: str) -> None:
    err = result.stderr.strip()
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "cannot join the Ray cluster" in err and all(w in err for w in words), err
    assert took < JOIN_BOUND, took


def timed_search(machine: RayMachine, argv: list[str], cwd: Path, **env: str) -> tuple[subprocess.CompletedProcess,
                                                                                      float]:
    started = time.monotonic()
    try:
        result = machine.search(argv, cwd=cwd, timeout=BEFORE, **env)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the search was still joining after {BEFORE} s") from None
    return result, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.heavy  # a two-node cluster started and stopped
def test_a_cluster_on_loopback_only_is_one_line_exit_2_in_seconds(machine, tmp_path):
    """The cluster without token authentication, the driver with a token (its home has one): what
    looked like an authentication hang is Ray dialling 127.0.0.1 at this machine's own address."""
    import ray._private.services as services

    if services.get_node_ip_address() == "127.0.0.1":
        pytest.skip("this machine has no address but loopback, so Ray dials loopback as given")
    address = machine.loopback_cluster()
    assert (machine.home / ".ray" / "auth_token").exists()  # the driver's
    result, took = timed_search(machine, ["--smoke-test", "--address", address, "--results-dir",
                                          str(tmp_path / "results")], tmp_path)
    one_line_exit_2(result, took, "loopback only", "--node-ip-address")
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
@pytest.mark.heavy  # a cluster started and stopped
def test_token_authentication_on_one_side_only_is_one_line_exit_2_in_seconds(machine, tmp_path):
    address = machine.head("--num-cpus", "1")  # with token authentication: its home has a token
    argv = ["--smoke-test", "--address", address, "--results-dir", str(tmp_path / "results")]
    no_token = tmp_path / "home-without-token"
    (no_token / ".ray").mkdir(parents=True)
    result, took = timed_search(machine, argv, tmp_path, HOME=str(no_token))
    one_line_exit_2(result, took, "token authentication", "has no token", "auth_token")
    other = tmp_path / "home-with-another-token"
    (other / ".ray").mkdir(parents=True)
    (other / ".ray" / "auth_token").write_text(os.urandom(16).hex())
    result, took = timed_search(machine, argv, tmp_path, HOME=str(other))
    one_line_exit_2(result, took, "refused this machine's token")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("host, cause", [("127.0.0.1", "loopback only"), ("127.0.0.2", "not a Ray head node's GCS")])
def test_an_address_where_something_else_listens_is_one_line_exit_2_in_seconds(tmp_path, host, cause):
    """A port that accepts connections but is not a Ray head's GCS (a typo, the dashboard's port).
    Ray dials 127.0.0.1 at this machine's own address (where this one does not listen); 127.0.0.2
    as given."""
    with socket.socket() as listener:
        listener.bind((host, 0))
        listener.listen()
        argv = ["--smoke-test", "--address", f"{host}:{listener.getsockname()[1]}", "--results-dir",
                str(tmp_path / "results")]
        started = time.monotonic()
        try:
            result = subprocess.run([sys.executable, SEARCH, *argv], cwd=tmp_path, capture_output=True, text=True,
                                    timeout=BEFORE, env={**os.environ, "PYTHONPATH": str(REPO),
                                                         "HPTUNE_JOIN_SECONDS": "8"})
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the search was still joining after {BEFORE} s") from None
    one_line_exit_2(result, time.monotonic() - started, cause)
    assert not (tmp_path / "results").exists()


def test_auto_with_a_stale_address_file_or_none_is_one_line_exit_2(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "raytmp"))
    results = tmp_path / "results"
    status, _, err = cli(search, ["--smoke-test", "--address", "auto", "--results-dir", str(results)])
    assert status == 2 and "--address auto: no Ray cluster was started on this machine" in err
    (tmp_path / "raytmp" / "ray").mkdir(parents=True)
    (tmp_path / "raytmp" / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{closed_port()}")
    status, _, err = cli(search, ["--smoke-test", "--address", "auto", "--results-dir", str(results)])
    assert status == 2 and "no Ray cluster answers" in err and "ray_current_cluster" in err
    assert len(err.strip().splitlines()) == 1 and not results.exists()


def test_a_cluster_without_shared_storage_is_warned_about():
    def warning(*argv: str) -> str | None:
        return storage_warning(settings_from_args(build_parser().parse_args(list(argv))))

    assert warning() is None  # a local Ray: one disk
    assert ("without --storage" in warning("--address", "auto")
            and "cannot read its checkpoint" in warning("--address", "auto"))
    assert "--storage /data/ckpt is a local path" in warning("--address", "auto", "--storage", "/data/ckpt")
    assert warning("--address", "auto", "--storage", "s3://bucket/hptune") is None


# --- a real cluster on one machine ----------------------------------------------------------


def bare_worker_env(machine: RayMachine) -> tuple[str, dict[str, str]]:
    """A Python with Ray, torch and the dependencies, but not this project: the base interpreter
    with the venv's site-packages on PYTHONPATH, whose .pth files (the editable install) it never runs."""
    import sysconfig

    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    # a worker joins with the head's token
    env = machine.env(PYTHONPATH=sysconfig.get_paths()["purelib"], RAY_AUTH_MODE="token")
    probe = subprocess.run([str(base), "-c",
                            "import ray, torch, optuna\ntry:\n import trainable\nexcept ImportError: print('no')"],
                           env=env, cwd=machine.root, capture_output=True, text=True, timeout=120)
    # it has Ray and torch; the project it cannot import
    assert probe.stdout.strip() == "no", probe.stdout + probe.stderr
    return str(base), env


@pytest.mark.slow
@pytest.mark.heavy
def test_trials_run_on_a_worker_node_that_cannot_import_the_project(machine, tmp_path):
    machine.head("--num-cpus", "0")  # the head runs no trial: every trial runs on the worker
    address = machine.address_file.read_text().strip()
    python, env = bare_worker_env(machine)
    machine.ray_start("--address", address, "--num-cpus", "2", python=python, env=env)
    storage = tmp_path / "shared"
    # the driver as a user on the head node types it, from a folder outside the repository
    # --no-early-stop: both trials run to their end, whatever ASHA would make of two trials
    result = machine.search(["--address", "auto", "--data", "synthetic", "--samples", "2", "--no-baseline",
                             "--no-early-stop", "--space", space(tmp_path),
                             "--storage", str(storage), "--results-dir", str(tmp_path / "results"), "--name", "c"],
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"Ray cluster: {address} (--address auto)")
    assert "Attached to the Ray cluster" in result.stdout and "2 nodes, 2 CPUs" in result.stdout
    trials = pd.read_csv(tmp_path / "results" / "c" / "trials.csv")
    assert len(trials) == 2 and set(trials["status"]) == {"finished"}
    assert len(list((storage / "c" / "attempt-1").glob("*/checkpoint_*/state.pt"))) == 2
    assert "is a local path on this machine" in result.stderr  # --storage is a local path: the user is told


USER_MODULE = """
import torch
from torch import nn


class Rows(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def net(input_shape, num_classes, width=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], width), nn.ReLU(), nn.Linear(width, num_classes))


def rows():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return Rows(x[:500], y[:500]), Rows(x[500:], y[500:])
"""


@pytest.mark.slow
@pytest.mark.heavy
def test_a_users_model_and_dataset_run_on_a_worker_node_that_cannot_import_them(machine, tmp_path):
    """The user's module lives outside the repository and is not installed; the worker node has
    neither it nor the project. Its model factory and its Dataset class (streamed to each trial, so
    the trials unpickle the user's class) are shipped with the job."""
    machine.head("--num-cpus", "0")  # every trial runs on the worker
    address = machine.address_file.read_text().strip()
    python, env = bare_worker_env(machine)
    machine.ray_start("--address", address, "--num-cpus", "2", python=python, env=env)
    project = tmp_path / "project"
    project.mkdir()
    (project / "user.py").write_text(USER_MODULE)
    (project / "space.yaml").write_text("lr: {low: 0.01, high: 0.1, log: true}\nbatch_size: [64]\nepochs: 2\n"
                                        "optimizer: [nesterov]\nmomentum: 0.9\nmodel.width: [8, 32]\n")
    result = machine.search(["--address", "auto", "--model", "user.py:net", "--data", "user.py:rows",
                             "--data-memory", "1K", "--samples", "2", "--no-baseline", "--no-early-stop",
                             "--space", "space.yaml", "--storage", str(tmp_path / "shared"), "--results-dir",
                             str(tmp_path / "results"), "--name", "u"], cwd=project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 nodes, 2 CPUs" in result.stdout and "user.py" in result.stdout.split("shipped")[0]
    assert "each trial reads it through a DataLoader" in result.stderr
    table = pd.read_csv(tmp_path / "results" / "u" / "trials.csv")
    assert len(table) == 2 and set(table["status"]) == {"finished"} and table["model.width"].isin([8, 32]).all()


@pytest.mark.slow
@pytest.mark.heavy
def test_a_lost_node_costs_no_trial_and_no_epoch(machine, tmp_path):
    address = machine.head("--num-cpus", "0")
    worker_env = machine.env(RAY_AUTH_MODE="token")
    nodes = [machine.ray_start("--address", address, "--num-cpus", "1", env=worker_env) for _ in range(2)]
    epochs, storage, exp = 40, tmp_path / "shared", tmp_path / "results" / "lost"
    long_space = (f"lr: {{low: 0.005, high: 0.02}}\nbatch_size: [32]\nepochs: {epochs}\n"
                  "optimizer: [nesterov]\nmomentum: 0.9\n")
    log = open(tmp_path / "search.log", "w")
    driver = subprocess.Popen(
        [sys.executable, SEARCH, "--address", "auto", "--data", "synthetic", "--samples", "2", "--no-baseline",
         "--no-early-stop",
         "--max-failures", "3", "--space", space(tmp_path, long_space), "--storage", str(storage),
         "--results-dir", str(tmp_path / "results"), "--name", "lost"],
        env=machine.env(), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    machine.groups.append(driver.pid)
    # both trials training (one per worker node), each with a checkpoint: then the first worker node vanishes
    deadline = time.time() + 400
    while True:
        assert driver.poll() is None and time.time() < deadline, (tmp_path / "search.log").read_text()
        running = [t for t in trials(Journal(exp).read()) if not t.done and t.checkpoint] if exp.exists() else []
        if len(running) == 2:
            break
        time.sleep(0.05)
    checkpointed = {t.trial: t.checkpoint_epoch for t in trials(Journal(exp).read())}
    os.killpg(nodes[0], signal.SIGKILL)  # a spot instance gone: raylet, object store and the trial's worker
    assert driver.wait(timeout=600) == 0, (tmp_path / "search.log").read_text()
    table = pd.read_csv(exp / "trials.csv")
    assert len(table) == 2 and table["trial"].is_unique and set(table["status"]) == {"finished"}
    reported = [(r["trial"], r["epoch"]) for r in Journal(exp).read() if r["event"] == "epoch"]
    assert len(reported) == len(set(reported)) == 2 * epochs  # every epoch of both trials, none trained twice
    # Tune records each failure of a trial in its folder: exactly one trial lost its node, once ...
    failed = {path.parent.name.split("_")[2]: path.read_text() for path in storage.glob("lost/attempt-1/*/error.txt")}
    assert len(failed) == 1 and "Failure # 2" not in next(iter(failed.values())), failed
    victim = next(iter(failed))
    # ... and, its epochs being reported once each, it continued from the checkpoint it had, not from epoch 1
    assert checkpointed[victim] >= 1
