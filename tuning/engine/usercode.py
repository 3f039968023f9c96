"""The user's own code, taken to the trials wherever they run.

A trial resolves the references in its configuration (`TrainConfig.model`, `.loop`, and the data
factory's classes for a streamed data set) itself, so the code must be importable where it runs:

- ``path/to/file.py:name``: that one file is shipped to every node as a module of its own
  (`trainable.refs.module_name`, the same name the driver imports it under), so a node without a
  copy, or a trial running in a folder of Ray's choosing, imports the shipped one. Code in
  several files: make it a package and use ``package.module:name``.
- ``package.module:name``: its top-level package is shipped, unless it is installed (in
  site-packages), where every node is expected to have it like torch.
- a function passed to the Python API with no importable name (a lambda, a nested function, a
  notebook's): handed to the trials as an object, on a local Ray only (a cluster's trials must be
  able to re-import what they run, after a restart on another node too).

On a local Ray nothing is shipped (Ray's runtime environments would set up each worker first):
the trials import the same files from their absolute paths (`UserCode.install`).
"""

from __future__ import annotations

import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainable.config import TrainConfig
from trainable.refs import module_name, split

OWN_PACKAGES = ("trainable", "tuning")  # shipped by the cluster's runtime_env already


@dataclass
class UserCode:
    model: Callable[..., Any] | None = None  # a model factory without an importable name (local only)
    loop: Callable[..., Any] | None = None  # a training loop without an importable name (local only)
    py_modules: list[str] = field(default_factory=list)  # files and folders every node gets
    names: list[str] = field(default_factory=list)  # what they are, as the user named them (for messages)
    staging: Path | None = None  # where shipped single files were copied under their module names
    # On a local Ray nothing is shipped: the trials import the same files from where they are
    # (a package the driver imports, its workers import too: Ray gives them the driver's paths).
    files: dict[str, str] = field(default_factory=dict)  # a reference's file, as written -> its absolute path

    def install(self) -> None:
        """In a trial's process on a local Ray: import the user's files from their absolute paths."""
        from trainable.refs import preload

        for file, path in self.files.items():
            preload(file, path)

    def cleanup(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None


def installed(path: Path) -> bool:
    """Does `path` lie in an installed location (site-packages, the standard library)?"""
    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib")}
    return any(part in ("site-packages", "dist-packages") for part in path.parts) or any(
        str(path).startswith(root) for root in roots)


def prepare(config: TrainConfig, *, model: Callable[..., Any] | None = None,
            loop: Callable[..., Any] | None = None, ship: bool = True) -> UserCode:
    """What the trials of `config` need: the files and packages its references name (imported
    already by the driver's checks), shipped to every node (`ship`, a cluster) or, on a local Ray,
    imported by the trials from where they are."""
    code = UserCode(model=model, loop=loop)
    references = [r for r in (config.model, config.loop, config.data) if r and split(r) is not None]
    for reference in dict.fromkeys(references):
        target, _ = split(reference)  # type: ignore[misc]
        if target.endswith(".py"):
            source = Path(target).expanduser()
            if not source.is_file():
                continue  # not ours to ship (a name the checks reported already)
            if not ship:
                code.files[target] = str(source.resolve())
                # what the data carries from this file (a Dataset class, for one streamed to the
                # trials) is pickled with its code, since a worker unpickles the data before the
                # trial can import the file
                module = sys.modules.get(module_name(target))
                if module is not None:
                    import ray.cloudpickle

                    ray.cloudpickle.register_pickle_by_value(module)
                continue
            if code.staging is None:
                code.staging = Path(tempfile.mkdtemp(prefix="hptune-code-"))
            copy = code.staging / f"{module_name(target)}.py"
            shutil.copyfile(source, copy)
            code.py_modules.append(str(copy))
            code.names.append(target)
            continue
        top = target.split(".")[0]
        module = sys.modules.get(top)
        if top in OWN_PACKAGES or module is None:
            continue
        paths = list(getattr(module, "__path__", None) or [])
        location = Path(paths[0]) if paths else Path(getattr(module, "__file__", "") or "")
        if not str(location) or installed(location.resolve()):
            continue
        if not ship:
            continue
        code.py_modules.append(str(location))
        code.names.append(top)
    return code
