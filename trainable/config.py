"""TrainConfig: everything that decides how ONE configuration trains, and its YAML form.

The defaults are the tutorial's hyperparameters (SGD, lr 1e-3, batch 64, 10 epochs, seed 42, its
MLP with two hidden layers of 512), so `TrainConfig()` *is* the tutorial's run. A user's own model
and data are references (``pkg.module:factory`` or ``path/to/file.py:factory``, see
trainable/refs.py) with the model's hyperparameters in `model_args`, so a configuration's YAML
re-trains the same network on the same data anywhere the code is.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from trainable.fileio import atomic_write_text, read_yaml, yaml_number

OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
PRECISIONS = ("auto", "fp32", "bf16")
SCHEDULES = ("constant", "cosine")
# the training hyperparameters a search space may set (besides the model's, model.NAME)
TRAINING_HYPERPARAMETERS = ("lr", "batch_size", "epochs", "optimizer", "momentum", "weight_decay", "schedule")


class ConfigError(ValueError):
    """A configuration that cannot be trained; the message names the offending key."""


@dataclass
class TrainConfig:
    lr: float = 1e-3  # learning rate per step (not scaled with batch size)
    batch_size: int = 64  # images per optimizer step
    epochs: int = 10  # full passes over the training split
    optimizer: str = "sgd"  # sgd | nesterov (SGD with Nesterov momentum) | adam | adamw
    momentum: float = 0.0  # SGD/Nesterov momentum; ignored by adam/adamw
    weight_decay: float = 0.0  # L2 (sgd, nesterov, adam) or decoupled (adamw) decay
    schedule: str = "constant"  # learning rate per epoch: constant, or cosine from lr down towards 0
    seed: int = 42  # weight init and the per-epoch shuffles
    precision: str = "auto"  # auto: bf16 autocast where the hardware runs it fast, else fp32
    # the model factory: mlp (the tutorial's, trainable/models.py) or a reference MODULE:NAME or FILE.py:NAME
    model: str = "mlp"
    # keyword arguments of the model factory (its hyperparameters; the mlp's: hidden, width, depth)
    model_args: dict[str, Any] = field(default_factory=dict)
    # cifar10 | cifar100 | mnist | fashion-mnist | synthetic | path to an image folder with train/
    # and test/ | a data factory's reference; a relative path is relative to the working
    # directory and is kept as given
    data: str = "cifar10"
    data_root: str = "data"  # where torchvision's data sets are looked for and downloaded to
    # a training loop of the user's own, (config, data, report) -> None, instead of ours (trainable/own_loop.py)
    loop: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.epochs < 1:
            raise ConfigError(f"epochs: must be >= 1, got {self.epochs}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer: must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum: must be in [0, 1), got {self.momentum}")
        if self.optimizer == "nesterov" and self.momentum == 0:
            raise ConfigError("momentum: nesterov needs momentum > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule: must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision: must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not self.model:
            raise ConfigError("model: must not be empty (mlp is the tutorial's)")
        if not self.data:
            raise ConfigError("data: must not be empty")
        if self.loop is not None and not self.loop:
            raise ConfigError("loop: must be a reference MODULE:NAME or FILE.py:NAME, or left out")

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The searchable values, the model's as model.NAME: what a trial's row shows."""
        values = {k: getattr(self, k) for k in TRAINING_HYPERPARAMETERS}
        values.update({f"model.{k}": v for k, v in self.model_args.items()})
        return values

    # --- dict / YAML -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, base: TrainConfig | None = None) -> TrainConfig:
        """Build a config from `values` over `base` (the tutorial's defaults when None).

        Unknown keys and wrong types raise ConfigError naming the key.
        """
        if not isinstance(values, dict):
            raise ConfigError(f"a configuration must be a mapping of keys to values, got {type(values).__name__}")
        hints = typing.get_type_hints(cls)
        merged = (base or cls()).to_dict()
        values = dict(values)
        if "hidden" in values:  # written by versions before model_args: the tutorial MLP's widths
            hidden = values.pop("hidden")
            values["model_args"] = {**values.get("model_args", merged["model_args"]), "hidden": hidden}
        for key, value in values.items():
            if key not in hints:
                known = ", ".join(hints)
                raise ConfigError(f"{key}: unknown key (known keys: {known})")
            merged[key] = _coerce(key, value, hints[key])
        return cls(**merged)

    def with_updates(self, **values: Any) -> TrainConfig:
        return TrainConfig.from_dict(values, base=self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike[str], header: str = "") -> None:
        """Write the config as YAML (atomically); `header` lines become YAML comments."""
        comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
        atomic_write_text(path, comment + self.to_yaml())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrainConfig:
        values = read_yaml(path, ConfigError)
        if values is None:
            values = {}
        try:
            return cls.from_dict(values)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of names to values, got {value!r}")
        return {str(k): _model_value(f"{key}.{k}", v) for k, v in value.items()}
    if origin in (list, tuple):
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {item_type.__name__}, got {value!r}")
        return [_coerce(key, v, item_type) for v in value]
    if hint is float:
        value = yaml_number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise NotImplementedError(f"{key}: {hint}")


def _model_value(key: str, value: Any) -> Any:
    """A model hyperparameter: a number, a string, a bool, or a list of those (YAML-safe)."""
    value = yaml_number(value)
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return [yaml_number(v) for v in value]
    raise ConfigError(f"{key}: expected a number, a string, true/false or a list of those, got {value!r}")
