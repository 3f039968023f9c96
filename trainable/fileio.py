"""Small file helpers shared by everything that writes files users read, and what a failed write
(a full disk, a quota, a read-only or failing disk) is called wherever it surfaces; strict JSON of metrics."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

# What a disk says when it cannot take a write: full, over quota, a file too large, read-only, failing.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}
# ... and how those read in text (an error a library wrapped, a traceback from a Ray worker)
DISK_TEXTS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
              "Read-only file system": errno.EROFS, "database or disk is full": errno.ENOSPC,
              "disk I/O error": errno.EIO}


class WriteError(OSError):
    """Writing `filename` failed; errno and strerror as the OS gave them (filename None if unknown)."""


@contextlib.contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """An OSError in the block becomes a WriteError naming `path` (the OS often names no file:
    a write that fails for want of space names none)."""
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        raise WriteError(exc.errno, exc.strerror or str(exc), str(path)) from exc


def write_error(exc: BaseException | None) -> WriteError | None:
    """The failed write behind `exc`, if that is what it is: a WriteError of ours, or, wrapped by
    a library (SQLAlchemy, Optuna, Ray, pyarrow) anywhere in its chain of causes, an OSError with
    one of DISK_ERRNOS or SQLite's "database or disk is full"."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, WriteError):
            return exc
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            return WriteError(exc.errno, exc.strerror or str(exc), exc.filename)
        if isinstance(exc, (OSError, sqlite3.Error)) or type(exc).__module__.startswith(
                ("sqlalchemy", "optuna", "ray", "pyarrow")):
            found = disk_error_in(str(exc))
            if found is not None:
                return found
        exc = exc.__cause__ or exc.__context__
    return None


def disk_error_in(text: str, filename: str | None = None) -> WriteError | None:
    """A disk's refusal (DISK_TEXTS) named in `text`, e.g. the traceback of a trial that could not
    save its checkpoint; None if there is none."""
    for words, number in DISK_TEXTS.items():
        if words in text:
            return WriteError(number, os.strerror(number), filename)
    return None


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers never see half a file."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """As atomic_write_text; a failure is a WriteError naming `path`, and leaves no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with writing(path):
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # a half-written copy takes the space a full disk lacks
                tmp.unlink()
            raise


def read_yaml(path: str | os.PathLike[str], error: type[Exception]) -> Any:
    """The YAML document in `path` (yaml.safe_load); `error` naming the file if it cannot be read."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise error(f"{path}: not valid YAML ({problem}{where})") from None


def yaml_number(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads 1e-3, with no dot, as the string "1e-3": make it the number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    """Strict-JSON copy of a metrics dict: NaN and infinities become null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
