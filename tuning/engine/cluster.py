"""Ray itself: a private local Ray or a cluster joined by address, the code shipped to its nodes,
and the resources each trial gets. Takes SearchSettings, never the command line.

Without an address the search starts a private local Ray on loopback, whatever a stale /tmp/ray
or a running `ray start` says; with one it joins that cluster, after a short TCP probe that tells
a dead address in seconds instead of the minutes ray.init would retry it, and a handshake with
its GCS in a subprocess with a deadline (`check_join`): ray.init retries a handshake that does not
complete for over ten minutes, printing nothing (a cluster listening on loopback only, which Ray
dials at this machine's own address; something else at that port) and one refused for want of
the cluster's token for 20 s, printing a warning a second.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from trainable.errors import UsageError
from tuning.engine.usercode import UserCode
from tuning.interrupts import handlers_kept, sigint_handler
from tuning.settings import SearchSettings

PROBE_SECONDS = 3.0  # a head node that does not accept a TCP connection in this time is not there
# The handshake with a cluster's GCS, Ray's import included (a few seconds on a slow machine; the
# handshake itself well under one on a healthy cluster); $HPTUNE_JOIN_SECONDS for a slow link.
JOIN_SECONDS = 20.0
# ray.init after a good handshake: uploads the code shipped to the nodes, then connects this driver
INIT_SECONDS = 180.0
# A private local Ray's GCS never comes back once it died (killed for memory, a signal to the whole
# job): Ray's processes and this driver end this long after losing it, instead of Ray's 60 s, and the
# command's watching process then says so and saves the search. A job-wide SIGTERM is saved in a few
# seconds, well within it. $RAY_gcs_rpc_server_reconnect_timeout_s, if set, is Ray's own and wins.
GCS_LOST_ENV, GCS_LOST_SECONDS = "RAY_gcs_rpc_server_reconnect_timeout_s", 15


def ray_address_file() -> Path:
    """Where `ray start --head` records its address: Ray's temp dir ($RAY_TMPDIR, else $TMPDIR, else /tmp) + ray/."""
    root = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(root) / "ray" / "ray_current_cluster"


def cluster_address(flag: str) -> str:
    """--address as HOST:PORT of a head node that answers; UsageError (one line) if there is none.

    `auto` reads what Ray itself reads: $RAY_ADDRESS, else the address file of the last `ray start`.
    A short TCP connect to the head's GCS port tells a dead cluster in seconds, instead of the
    minutes of retries ray.init would spend on it. No Ray is imported for this.
    """
    address, source = flag, ""
    if flag == "auto":
        if os.environ.get("RAY_ADDRESS") not in (None, "", "auto"):
            address, source = os.environ["RAY_ADDRESS"], " (from $RAY_ADDRESS)"
        else:
            path = ray_address_file()
            try:
                address, source = path.read_text().strip(), f" (from {path})"
            except OSError:
                raise UsageError(f"--address auto: no Ray cluster was started on this machine ({path} does not exist); "
                                 "start one with `ray start --head`, or give --address HOST:PORT") from None
    if "://" in address:
        raise UsageError(f"--address {flag}: {address}{source} is a Ray Client address; give the head node's HOST:PORT")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--address {flag}: expected auto or HOST:PORT, got {address!r}{source}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise UsageError(f"--address {flag}: no Ray cluster answers at {address}{source} ({reason}); "
                         "start it with `ray start --head` or correct the address") from None
    return address


# Run by check_join in a subprocess of its own, which can be killed at a deadline: what ray.init
# does first when it joins a cluster, one step per line on stdout.
JOIN_PROBE = r"""
import json, sys
from ray._private.services import canonicalize_bootstrap_address
address = canonicalize_bootstrap_address(sys.argv[1])
print("dials", address, flush=True)
from ray._raylet import GcsClient
client = GcsClient(address=address)
print("connected", client.cluster_id, flush=True)
from ray._common.usage.usage_lib import get_cluster_metadata
from ray._private.utils import check_version_info
try:
    check_version_info(get_cluster_metadata(client) or {}, "this machine")
except RuntimeError as exc:
    print("mismatch", json.dumps(str(exc)), flush=True)
    sys.exit(3)
print("ok", flush=True)
"""
AUTH_REFUSED = ("Unauthenticated", "InvalidAuthToken")  # how the GCS refuses a missing or wrong token


def join_seconds() -> float:
    try:
        return float(os.environ.get("HPTUNE_JOIN_SECONDS", JOIN_SECONDS))
    except ValueError:
        return JOIN_SECONDS


def token_auth() -> bool:
    """Whether this driver joins with a token: RAY_AUTH_MODE if set, else if it has one (as start_ray does)."""
    mode = os.environ.get("RAY_AUTH_MODE")
    return mode.lower() == "token" if mode is not None else auth_token_available()


def check_join(address: str, flag: str, seconds: float | None = None) -> None:
    """Ray's handshake with the cluster at `address` (HOST:PORT), as ray.init does it, in a
    subprocess killed after `seconds`; UsageError (one line) naming the likely cause if it fails:
    a cluster Ray dials at another address than the one given (loopback), token authentication
    on one side only or a different token, other versions of Ray or Python, or no GCS at that port."""
    seconds = join_seconds() if seconds is None else seconds
    token = token_auth()
    env = {**os.environ, **({"RAY_AUTH_MODE": "token"} if token else {})}
    proc = subprocess.Popen([sys.executable, "-c", JOIN_PROBE, address], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=_collect, args=(stream, lines), daemon=True)
               for stream, lines in ((proc.stdout, out), (proc.stderr, err))]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + seconds
    refused = unreachable = False
    dialled = None
    while proc.poll() is None and time.monotonic() < deadline:
        if any(word in line for line in list(err) for word in AUTH_REFUSED):
            refused = True  # it would retry for 20 s more, printing the same
            break
        if dialled is None and any(line.startswith("dials ") for line in list(out)):
            dialled = next(line.split(" ", 1)[1].strip() for line in out if line.startswith("dials "))
            if dialled != address and not _answers(dialled):
                unreachable = True  # it would retry for minutes
                break
        time.sleep(0.05)
    timed_out = proc.poll() is None and not refused
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for reader in readers:
        reader.join(timeout=5)
    if proc.returncode == 0 and not refused:
        return
    given = f"--address {flag}" + (f" ({address})" if flag != address else "")
    dialled = dialled or address
    mismatch = next((json.loads(line.split(" ", 1)[1]) for line in out if line.startswith("mismatch ")), None)
    if refused or any(word in line for line in err for word in AUTH_REFUSED):
        if token:
            why = ("it uses token authentication and refused this machine's token (~/.ray/auth_token, or "
                   "RAY_AUTH_TOKEN): it is not the head node's; copy the head node's ~/.ray/auth_token here")
        else:
            why = ("the cluster uses token authentication and this machine has no token: copy the head node's "
                   "~/.ray/auth_token to ~/.ray/auth_token here (or set RAY_AUTH_TOKEN)")
    elif mismatch is not None:
        why = f"other versions of Ray or Python than this machine's: {' '.join(mismatch.split())}"
    elif (unreachable or timed_out) and dialled != address:
        host = dialled.rsplit(":", 1)[0]
        why = (f"Ray dials {address} at this machine's own address, {dialled}, where nothing answers: the cluster "
               f"listens on loopback only; start its head on {host} (ray start --head --node-ip-address {host})")
    elif timed_out:
        why = (f"no Ray handshake within {seconds:g} s: something answers at {dialled}, but not a Ray head node's GCS "
               "(the dashboard is port 8265 and Ray Client 10001; the GCS port is 6379 unless `ray start --port` "
               "said otherwise), or a Ray of another version; $HPTUNE_JOIN_SECONDS allows a slow link more time")
    else:
        last = next((line.strip() for line in reversed(err) if line.strip()), f"exit status {proc.returncode}")
        why = f"Ray's handshake failed: {last}"
    raise UsageError(f"{given}: cannot join the Ray cluster: {why}")


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS).close()
    except (OSError, ValueError):
        return False
    return True


def _collect(stream: Any, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


@contextlib.contextmanager
def deadline(seconds: float, message: str) -> Iterator[None]:
    """UsageError(message) in the main thread if the block takes more than `seconds`: raised at the
    next line of Python it runs (ray.init retries in Python, between calls into C++ that each
    return within a minute). Main thread only; elsewhere the block runs unbounded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    done = threading.Event()

    def expired(signum: int, frame: object) -> None:
        if not done.is_set():
            raise UsageError(message)

    def watch() -> None:
        if not done.wait(seconds):
            _thread.interrupt_main(signal.SIGALRM)  # runs `expired` in the main thread; no signal is sent

    previous = signal.signal(signal.SIGALRM, expired)
    watcher = threading.Thread(target=watch, name="join-deadline", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)


def storage_warning(settings: SearchSettings) -> str | None:
    """With a cluster, checkpoints in a folder of the driver's disk are lost to trials restarted elsewhere."""
    if not settings.address or (settings.storage and "://" in settings.storage):
        return None
    if settings.storage:
        where = f"--storage {settings.storage} is a local path"
    else:
        where = "without --storage, checkpoints go to results/<name>/ray"
    return (f"warning: {where} on this machine: a trial restarted on another node cannot read its checkpoint there "
            "unless every node mounts it at the same path; use a shared folder or an s3:// / gs:// URI")


def quiet_ray(verbose: bool) -> None:
    """Our own one line per trial instead of Ray's tables; Ctrl-C reaches us, not Tune."""
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # the journal is the record
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        # a trial's error is in the journal and trials.csv; once a search stopped early, Ray would also
        # print the traceback of every failed trial result nobody fetched
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        for name in ("ray", "ray.tune", "ray.train", "ray.data"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def auth_token_available() -> bool:
    """A Ray token where Ray looks for one: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return os.path.isfile(path)


def enable_token_auth() -> None:
    """RAY_AUTH_MODE=token for this process, as ray.init does for `auto` (Ray read its config at import)."""
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:  # another Ray version: the environment variable alone, read by a fresh config
        os.environ["RAY_AUTH_MODE"] = "token"
    else:
        _enable_token_auth()


def code_runtime_env(code: UserCode | None = None) -> dict[str, Any]:
    """The packages a trial imports, uploaded by Ray to every node (which needs Ray, torch and the
    dependencies, but not this repository or the user's code); results/ and data/ stay behind,
    being outside them."""
    import trainable
    import tuning

    modules = [str(Path(m.__file__).parent) for m in (trainable, tuning)]
    return {"py_modules": [*modules, *(code.py_modules if code else [])], "excludes": ["__pycache__"]}


def start_ray(settings: SearchSettings, address: str | None = None, code: UserCode | None = None) -> bool:
    """Start a private local Ray, or attach to the cluster at `address`; True if this call started
    or joined it (and should shut it down). The user's code (`code`) is shipped to the trials either way."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": settings.verbose,
        "logging_level": logging.INFO if settings.verbose else logging.ERROR,
    }
    if address:
        # Ray turns token authentication on by itself only for a cluster it finds; for HOST:PORT too,
        # use the token the head's `ray start` wrote (a client with a token also joins a cluster without).
        if "RAY_AUTH_MODE" not in os.environ and auth_token_available():
            enable_token_auth()
        limit = f"could not join the Ray cluster at {address}: ray.init did not return within {INIT_SECONDS:g} s " \
                "(--verbose shows Ray's own messages)"
        try:
            # Ray's SIGTERM handlers would end the driver without saving the search
            with deadline(INIT_SECONDS, limit), handlers_kept():
                ray.init(address=address, runtime_env=code_runtime_env(code), **kwargs)
        except (ConnectionError, RuntimeError) as exc:  # AuthenticationError is a RuntimeError
            hint = ("if it uses token authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or copy the head's "
                    "~/.ray/auth_token to this machine)")
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UsageError(f"could not join the Ray cluster at {address}: {first}; {hint}") from None
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cluster = ray.cluster_resources()
        shipped = "trainable/, tuning/" + "".join(f", {name}" for name in (code.names if code else []))
        print(f"Attached to the Ray cluster at {address}: {len(nodes)} nodes, {cluster.get('CPU', 0):g} CPUs, "
              f"{cluster.get('GPU', 0):g} GPUs; {shipped} are shipped to them", flush=True)
    else:
        # "local": always a private Ray, never a cluster found in /tmp/ray or $RAY_ADDRESS
        with daemons_ignoring_ctrl_c(), handlers_kept(), environment_default(GCS_LOST_ENV, str(GCS_LOST_SECONDS)):
            ray.init(address="local", num_cpus=settings.num_cpus, num_gpus=settings.num_gpus, **kwargs)
    return True


@contextlib.contextmanager
def environment_default(name: str, value: str) -> Iterator[None]:
    """$name = value while Ray starts its daemons, which inherit it, unless the user set it; this
    process's environment as it was afterwards (a Python API caller's own later ray.init included)."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def daemons_ignoring_ctrl_c() -> contextlib.AbstractContextManager[None]:
    """Start Ray's local daemons with SIGINT ignored (children inherit an ignored signal).

    They run in the driver's process group, so Ctrl-C in a terminal reaches the GCS server and the
    raylet as well as the driver; when they died of it first, the driver's clean-up talked to a
    dead GCS and could hang for minutes instead of saving the experiment and printing how to
    resume. The driver keeps its own Ctrl-C handling and stops the daemons itself (`stop_ray`)."""
    return sigint_handler(signal.SIG_IGN)


def stop_ray() -> None:
    ray.shutdown()


def resources(settings: SearchSettings) -> dict[str, float]:
    """Per-trial resources, checked against what the cluster has."""
    cluster = ray.cluster_resources()
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    gpus_per_trial = settings.gpus_per_trial if settings.gpus_per_trial is not None else (0.25 if gpus > 0 else 0.0)
    if settings.cpus_per_trial > cpus:
        raise UsageError(f"--cpus-per-trial {settings.cpus_per_trial:g}: the cluster has only {cpus:g} CPUs")
    if gpus_per_trial > gpus:
        raise UsageError(f"--gpus-per-trial {gpus_per_trial:g}: the cluster has {gpus:g} GPUs, "
                         "so no trial could ever start")
    return {"cpu": settings.cpus_per_trial, "gpu": gpus_per_trial, "cluster_cpus": cpus, "cluster_gpus": gpus}


