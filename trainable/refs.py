"""References to a user's code: ``pkg.module:name`` or ``path/to/file.py:name``.

A reference names a model factory, a data factory, a training loop or a search space on the
command line and in a configuration's YAML, so that `python -m trainable --config
best_config.yaml` finds the same function again. A file path is relative to the working
directory. A file is imported under a module name made from its path as written
(`module_name`), the same on every machine: a Ray worker that has no copy of the file imports
the copy the search shipped under that name (tuning/engine/usercode.py).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE = re.compile(rf"^{_IDENT}(\.{_IDENT})*$")
_ATTR = re.compile(rf"^{_IDENT}(\.{_IDENT})*$")
UNNAMED = "<unnamed>"  # what a configuration records for a function without a reference (a lambda)


class BadReferenceError(ValueError):
    """A reference that does not lead to a usable object; the message says which and why."""


class UserCodeError(RuntimeError):
    """The user's own function raised: the message names the function and what it said; the
    traceback (for error.log) is in `details`."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


def is_reference(text: Any) -> bool:
    """Is `text` of the form ``MODULE:NAME`` or ``FILE.py:NAME`` (and not a plain name or folder)?"""
    return isinstance(text, str) and split(text) is not None


def split(text: str) -> tuple[str, str] | None:
    """(module or file, attribute) of a reference, or None if `text` is not one."""
    target, sep, attr = text.rpartition(":")
    if not sep or not target or not _ATTR.match(attr):
        return None
    if target.endswith(".py") or _MODULE.match(target):
        return target, attr
    return None


def module_name(file: str) -> str:
    """The module name a file reference is imported under: stable for the path as written."""
    stem = re.sub(r"\W", "_", Path(file).stem) or "code"
    digest = hashlib.sha1(file.encode()).hexdigest()[:10]
    return f"hptune_user_{stem}_{digest}"


def load_file(file: str) -> ModuleType:
    """Import `file` (relative to the working directory) as module_name(file); once per process.

    Where the file is not there (a Ray worker on another node, or in a trial's own folder), the
    copy shipped under that module name is imported instead."""
    name = module_name(file)
    path = Path(file).expanduser()
    loaded = sys.modules.get(name)
    if loaded is not None and (not path.is_file() or getattr(loaded, "__hptune_stamp__", None) == _stamp(path)):
        return loaded  # imported already (from this file as it is now, or the copy shipped to this worker)
    if path.is_file():
        stamp = _stamp(path)
        path = path.resolve()
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise BadReferenceError(f"{file}: cannot be imported as Python")
        module = importlib.util.module_from_spec(spec)
        module.__hptune_file__ = file  # type: ignore[attr-defined] # the path as written, for reference_of
        module.__hptune_stamp__ = stamp  # type: ignore[attr-defined]
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException as exc:
            del sys.modules[name]
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise BadReferenceError(f"{file}: importing it raised {type(exc).__name__}: {exc}") from None
        return module
    try:
        return importlib.import_module(name)  # shipped to this worker by the search
    except ImportError:
        raise BadReferenceError(f"{file}: no such file (a path is relative to the working directory, "
                              f"{os.getcwd()})") from None


def preload(file: str, path: str) -> None:
    """Import the file a reference names as `file` from its absolute `path` (on a local Ray, where
    a trial runs in a folder of Ray's choosing and `file`, relative to the driver's, is not there)."""
    name = module_name(file)
    if not Path(path).is_file():
        return
    stamp = _stamp(path)
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__hptune_stamp__", None) == stamp:
        return  # the same file, unchanged since (a Ray worker kept for the next search imports it afresh if not)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    module.__hptune_file__ = file  # type: ignore[attr-defined]
    module.__hptune_stamp__ = stamp  # type: ignore[attr-defined]
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def _stamp(path: str | Path) -> tuple[str, int, int]:
    """Which file, and which version of it: its absolute path, size and modification time."""
    st = os.stat(path)
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


def load_module(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BadReferenceError(f"{module}: cannot be imported ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # noqa: BLE001 - the user's module raised while being imported
        raise BadReferenceError(f"{module}: importing it raised {type(exc).__name__}: {exc}") from None


def resolve(reference: str, what: str = "reference") -> Callable[..., Any]:
    """The callable `reference` names; BadReferenceError saying why not (prefixed by `what`)."""
    if reference == UNNAMED or reference.startswith("<"):
        raise BadReferenceError(f"{what} {reference}: the function had no importable name (a lambda, or a function "
                              "defined inside another or in a notebook); pass it again, or give a reference "
                              "MODULE:NAME or FILE.py:NAME")
    parts = split(reference)
    if parts is None:
        raise BadReferenceError(f"{what} {reference!r}: expected MODULE:NAME or path/to/file.py:NAME")
    target, attr = parts
    try:
        module = load_file(target) if target.endswith(".py") else load_module(target)
    except BadReferenceError as exc:
        raise BadReferenceError(f"{what} {reference}: {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BadReferenceError(f"{what} {reference}: {target} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BadReferenceError(f"{what} {reference}: {attr} is a {type(obj).__name__}, not a function or class")
    return obj


def reference_of(obj: Any) -> str | None:
    """A reference that finds `obj` again in another process, or None (a lambda, a nested
    function, a function of a notebook). A function of the script being run (`__main__`) is
    named by the script's path, relative to the working directory where it lies under it."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    if module == "__main__":
        file = getattr(sys.modules.get("__main__"), "__file__", None)
        if not file or not file.endswith(".py"):
            return None
        path = Path(file).resolve()
        try:
            file = str(path.relative_to(Path.cwd().resolve()))
        except ValueError:
            file = str(path)
        return f"{file}:{qualname}"
    if module.startswith("hptune_user_"):  # loaded from a file reference: name the file as it was written
        loaded = sys.modules.get(module)
        file = getattr(loaded, "__hptune_file__", None) or getattr(loaded, "__file__", None)
        return f"{file}:{qualname}" if file else None
    return f"{module}:{qualname}"


def describe(obj: Any) -> str:
    """How a function is named in messages: its reference, else its name."""
    return reference_of(obj) or getattr(obj, "__qualname__", None) or repr(obj)


def call_user(fn: Callable[..., Any], what: str, *args: Any, **kwargs: Any) -> Any:
    """Call the user's `fn`; anything it raises becomes UserCodeError naming it and its message."""
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code: say which function raised and what
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserCodeError(f"{what} {describe(fn)} raised {type(exc).__name__}" + (f": {message}" if message else ""),
                            traceback.format_exc()) from exc
