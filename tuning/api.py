"""The Python API: `hptune.search(model=..., data=..., space=..., samples=...)`.

The same search as the command line (tuning/driver.py), for notebooks and scripts:

    import hptune
    from torch import nn

    def model(input_shape, num_classes, width=64):
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(width), nn.ReLU(), nn.Linear(width, num_classes))

    experiment = hptune.search(model=model, data=my_splits, samples=12,
                               space={"lr": {"low": 1e-3, "high": 0.1, "log": True}, "model.width": [32, 64, 128]})
    print(experiment.best_config, experiment.trials_dataframe())

Bad input raises an exception (UsageError, ConfigError, SpaceError, DataError, UserCodeError, ...)
whose message is the one line the command prints, before anything is written; a search that
fails or is interrupted raises SearchError (Ctrl-C: KeyboardInterrupt; SIGTERM: SystemExit(143),
as an unhandled SIGTERM would end the program) after saving what finished, and the same call with
the same `name` resumes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from trainable.config import TrainConfig
from trainable.errors import INTERRUPTED_STATUS, TERMINATED_STATUS, UsageError
from trainable.refs import UNNAMED, is_reference, reference_of
from tuning import driver
from tuning.results.experiment import Experiment
from tuning.settings import DEFAULT_SAMPLES, SMOKE_SAMPLES, SearchSettings, parse_size
from tuning.space import smoke, space_of

PROG = "hptune.search"


class SearchError(RuntimeError):
    """The search ran but did not finish (its message was printed); `experiment` holds what it kept."""

    def __init__(self, message: str, experiment: Experiment | None) -> None:
        super().__init__(message)
        self.experiment = experiment


def search(
    model: Callable[..., Any] | str | None = None,
    data: Any = None,
    space: Mapping[str, Any] | Callable[..., Any] | str | Path | None = None,
    *,
    samples: int | None = None,
    config: TrainConfig | Mapping[str, Any] | str | Path | None = None,
    loop: Callable[..., Any] | str | None = None,
    **options: Any,
) -> Experiment:
    """Search hyperparameters; returns the finished Experiment (its folder under results/).

    model    a factory returning an nn.Module, called with the trial's model hyperparameters
             (`model.NAME` in the space) and, if it takes them, `input_shape` and `num_classes`;
             or a reference "pkg.module:name" / "file.py:name"; None: the tutorial's MLP
    data     a factory of no arguments returning the splits, or the splits themselves:
             (train, test) with each (inputs, labels) tensors/arrays or a map-style Dataset, or
             (train_inputs, train_labels, test_inputs, test_labels); or what --data takes (a
             torchvision name, an image folder, a reference); None: CIFAR-10
    space    a dict in the YAML form, a YAML path, or a function of an Optuna trial returning the
             trial's values; None: the default space (made for the tutorial's MLP)
    samples  trials in all, the baseline included (default 20; 3 with smoke_test=True)
    config   the base configuration (a TrainConfig, a dict of its fields, or a YAML path)
    loop     your own training loop, (config, data, report) -> None, instead of ours
    options  any field of SearchSettings: name, results_dir, sampler, seed, objective,
             early_stop, stopping ("noise", "asha", "syne-asha"), until_converged, baseline, center,
             max_concurrent, num_cpus, address, confirm_seeds, tensorboard, quiet, ...;
             mlflow=True (or a tracking URI) logs the search and its trials to MLflow,
             wandb="PROJECT" to Weights & Biases
    """
    settings = _settings(samples, options)
    base = _base(config)
    inputs = driver.Inputs(space=space_of(space), base=base)
    if settings.smoke_test:  # as --smoke-test: synthetic data unless given, 2 epochs, the space without epochs
        inputs.space = smoke(inputs.space)
        inputs.base = inputs.base.with_updates(epochs=2, **({} if data is not None else {"data": "synthetic"}))
    if isinstance(model, str):
        inputs.base = inputs.base.with_updates(model=model)
    elif model is not None:
        inputs.model = model
    if isinstance(loop, str):
        inputs.base = inputs.base.with_updates(loop=loop)
    elif loop is not None:
        inputs.loop = loop
    if isinstance(data, (str, Path)):
        inputs.base = inputs.base.with_updates(data=str(data))
    elif data is not None:
        reference = reference_of(data) if callable(data) and not hasattr(data, "__getitem__") else None
        inputs.base = inputs.base.with_updates(data=reference or UNNAMED)
        inputs.data = data
    settings = settings.named()
    inputs.command = f"{PROG}(..., name={settings.name!r}) with the same arguments"
    try:
        outcome = driver.run(settings, inputs, prog=PROG)
    except driver.InputError as exc:
        raise UsageError(str(exc)) from None
    if outcome.status == INTERRUPTED_STATUS:
        raise KeyboardInterrupt
    if outcome.status == TERMINATED_STATUS:
        raise SystemExit(TERMINATED_STATUS)
    if outcome.status != 0 or outcome.experiment is None:
        raise SearchError(f"the search did not finish (exit status {outcome.status}); what finished is kept in "
                           f"{Path(settings.results_dir) / settings.name}", outcome.experiment)
    return Experiment.load(outcome.experiment.folder)


def _settings(samples: int | None, options: dict[str, Any]) -> SearchSettings:
    known = {f.name for f in dataclasses.fields(SearchSettings)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UsageError(f"search() got an unknown option {unknown[0]!r} (options: {', '.join(sorted(known))})")
    if "grace" in options and isinstance(options["grace"], (str, int, float)):
        from tuning.settings import Grace

        options["grace"] = Grace.parse(options["grace"])
    if isinstance(options.get("data_memory"), str):
        options["data_memory"] = parse_size(options["data_memory"])
    if isinstance(options.get("mlflow"), bool):  # mlflow=True: the default store
        options["mlflow"] = "" if options["mlflow"] else None
    if samples is None:
        samples = SMOKE_SAMPLES if options.get("smoke_test") else DEFAULT_SAMPLES
    return SearchSettings(samples=samples, **options)


def _base(config: TrainConfig | Mapping[str, Any] | str | Path | None) -> TrainConfig:
    if config is None:
        return TrainConfig()
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, Mapping):
        return TrainConfig.from_dict(dict(config))
    if isinstance(config, (str, Path)) and not is_reference(str(config)):
        return TrainConfig.load(config)
    raise UsageError(f"config: expected a TrainConfig, a dict or a YAML path, got {type(config).__name__}")
