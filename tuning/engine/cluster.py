"""Ray itself: a private local Ray or a cluster joined by address, the code shipped to its nodes,
and the resources each trial gets. Takes SearchSettings, never the command line.

Without an address the search starts a private local Ray on loopback, whatever a stale /tmp/ray
or a running `ray start` says; with one it joins that cluster, after a short TCP probe that tells
a dead address in seconds instead of the minutes ray.init would retry it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

import ray

from trainable.cli import UsageError
from tuning.engine.usercode import UserCode
from tuning.interrupts import handlers_kept, sigint_handler
from tuning.settings import SearchSettings

PROBE_SECONDS = 3.0  # a head node that does not accept a TCP connection in this time is not there


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
        try:
            with handlers_kept():  # Ray's SIGTERM handlers would end the driver without saving the search
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
        if code and code.py_modules:
            kwargs["runtime_env"] = {"py_modules": code.py_modules, "excludes": ["__pycache__"]}
        with daemons_ignoring_ctrl_c(), handlers_kept():
            ray.init(address="local", num_cpus=settings.num_cpus, num_gpus=settings.num_gpus, **kwargs)
    return True


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


