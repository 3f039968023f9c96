"""hptune: hyperparameter search for PyTorch models, from Python.

    import hptune

    experiment = hptune.search(model=my_factory, data=my_data, space={...}, samples=20)
    experiment.best_config, experiment.trials_dataframe()
    hptune.Experiment.open("results/<name>")          # any experiment folder, finished or not

The same search as the `hptune search` command (tuning/driver.py); `hptune.SearchSettings` lists
every option. Importing this module does not import Ray or torch; a search does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainable.config import TrainConfig
    from tuning.api import SearchError, search
    from tuning.results.experiment import Experiment
    from tuning.settings import SearchSettings

__all__ = ["Experiment", "SearchError", "SearchSettings", "TrainConfig", "search"]

_WHERE = {
    "search": "tuning.api",
    "SearchError": "tuning.api",
    "Experiment": "tuning.results.experiment",
    "SearchSettings": "tuning.settings",
    "TrainConfig": "trainable.config",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("hptune")
        except PackageNotFoundError:
            return "unknown (not installed)"
    raise AttributeError(f"module 'hptune' has no attribute {name!r}")
