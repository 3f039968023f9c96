"""Small file helpers shared by everything that writes files users read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers never see half a file."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
