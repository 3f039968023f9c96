"""The search space: the default one, and loading a user's own from YAML.

A space maps TrainConfig field names to what the search may pick for them:

    lr:           {low: 1.0e-4, high: 0.3, log: true}     # float range (log scale)
    epochs:       {low: 5, high: 20}                       # int range (both bounds whole numbers)
    batch_size:   {type: pow2, low: 32, high: 512}         # powers of two: 32, 64, ..., 512
    optimizer:    [sgd, nesterov, adam, adamw]             # a list: one of these
    momentum:     0.9                                      # a plain value: fixed

Fields the space leaves out keep the search's base configuration (the tutorial's values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna.distributions as od

from trainable.config import OPTIMIZERS, ConfigError, TrainConfig
from trainable.fileio import read_yaml

SEARCHABLE = ("lr", "batch_size", "epochs", "optimizer", "momentum", "weight_decay", "schedule")
INT_FIELDS = ("batch_size", "epochs")

# The default space, tuned so that a 20-sample search on a 2-core CPU meets the tutorial's
# challenge on CIFAR-10 within minutes (see README, "The challenge").
DEFAULT_SPACE: dict[str, Any] = {
    "lr": {"low": 3.0e-4, "high": 0.2, "log": True},
    "batch_size": {"type": "pow2", "low": 64, "high": 512},
    "epochs": {"low": 6, "high": 20},
    "optimizer": list(OPTIMIZERS),
    "momentum": {"low": 0.5, "high": 0.99},
    "weight_decay": {"low": 1.0e-6, "high": 1.0e-3, "log": True},
    "schedule": ["constant", "cosine"],
}
# --smoke-test: epochs are not searched; they come from the base configuration (2, the baseline too)
SMOKE_SPACE: dict[str, Any] = {k: v for k, v in DEFAULT_SPACE.items() if k != "epochs"}


class SpaceError(ValueError):
    """A search space that cannot be searched; the message names the parameter."""


@dataclass(frozen=True)
class Space:
    distributions: dict[str, od.BaseDistribution]  # what Optuna samples
    fixed: dict[str, Any]  # set in every trial

    @property
    def names(self) -> list[str]:
        return [*self.distributions, *self.fixed]

    def describe(self) -> dict[str, str]:
        """Human-readable ranges, for the console and the report."""
        out = {}
        for name, d in self.distributions.items():
            if isinstance(d, od.CategoricalDistribution):
                out[name] = "one of " + ", ".join(map(str, d.choices))
            else:
                out[name] = f"{d.low:g} .. {d.high:g}" + (" (log)" if d.log else "")
        out.update({name: f"= {value}" for name, value in self.fixed.items()})
        return out


def parse_space(spec: Any, source: str = "space") -> Space:
    if not isinstance(spec, dict) or not spec:
        raise SpaceError(f"{source}: expected a mapping of parameter names to ranges, got {type(spec).__name__}")
    distributions: dict[str, od.BaseDistribution] = {}
    fixed: dict[str, Any] = {}
    for name, value in spec.items():
        if name not in SEARCHABLE:
            raise SpaceError(f"{source}: {name}: unknown parameter (searchable: {', '.join(SEARCHABLE)})")
        where = f"{source}: {name}"
        if isinstance(value, list):
            distributions[name] = _categorical(where, name, value)
        elif isinstance(value, dict):
            distributions[name] = _range(where, name, value)
        else:
            fixed[name] = _check_value(where, name, value)
    space = Space(distributions, fixed)
    _check_consistent(space, source)
    return space


def load_space(path: str | Path) -> Space:
    return parse_space(read_yaml(path, SpaceError), str(path))


def default_space(smoke_test: bool = False) -> Space:
    return parse_space(SMOKE_SPACE if smoke_test else DEFAULT_SPACE, "default space")


def _number(where: str, key: str, value: Any) -> float | int:
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpaceError(f"{where}: {key} must be a number, got {value!r}")
    return value


def _range(where: str, name: str, spec: dict[str, Any]) -> od.BaseDistribution:
    unknown = set(spec) - {"low", "high", "log", "type"}
    if unknown:
        raise SpaceError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (use low, high, log, type)")
    if "low" not in spec or "high" not in spec:
        raise SpaceError(f"{where}: a range needs low and high")
    low, high = _number(where, "low", spec["low"]), _number(where, "high", spec["high"])
    kind = spec.get("type") or ("int" if name in INT_FIELDS else "float")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{where}: log must be true or false, got {log!r}")
    if kind not in ("float", "int", "pow2"):
        raise SpaceError(f"{where}: type must be float, int or pow2, got {kind!r}")
    if low > high:
        raise SpaceError(f"{where}: low ({low}) is greater than high ({high})")
    if (log or kind == "pow2") and low <= 0:
        raise SpaceError(f"{where}: a log-scale range needs low > 0, got {low}")
    if name in INT_FIELDS or kind in ("int", "pow2"):
        if name not in INT_FIELDS:
            raise SpaceError(f"{where}: {name} is not a whole-number parameter; drop type: {kind}")
        if low != int(low) or high != int(high):
            raise SpaceError(f"{where}: bounds must be whole numbers, got {low} and {high}")
        low, high = int(low), int(high)
        if kind == "pow2":
            powers = [2**k for k in range(math.ceil(math.log2(low)), math.floor(math.log2(high)) + 1)]
            if not powers:
                raise SpaceError(f"{where}: no power of two between {low} and {high}")
            return od.CategoricalDistribution(powers)
        _check_value(where, name, low)
        return od.IntDistribution(low, high, log=log)
    _check_value(where, name, float(low))
    _check_value(where, name, float(high))
    return od.FloatDistribution(float(low), float(high), log=log)


def _categorical(where: str, name: str, choices: list[Any]) -> od.CategoricalDistribution:
    if not choices:
        raise SpaceError(f"{where}: an empty list of choices")
    checked = [_check_value(where, name, choice) for choice in choices]
    return od.CategoricalDistribution(list(dict.fromkeys(checked)))


def _check_value(where: str, name: str, value: Any) -> Any:
    """The value as TrainConfig takes it for this field, or SpaceError saying why not."""
    if isinstance(value, str) and name not in ("optimizer", "schedule"):
        value = _number(where, "value", value)
    try:
        config = TrainConfig.from_dict({name: value, **({"momentum": 0.9} if name == "optimizer" else {})})
    except ConfigError as exc:
        raise SpaceError(f"{where}: {str(exc).split(': ', 1)[-1]}") from None
    return getattr(config, name)


def _check_consistent(space: Space, source: str) -> None:
    optimizers = space.fixed.get("optimizer")
    dist = space.distributions.get("optimizer")
    can_nesterov = optimizers == "nesterov" or (isinstance(dist, od.CategoricalDistribution) and "nesterov" in dist.choices)
    # A continuous momentum range hits exactly 0 with probability 0; a fixed or listed 0 does not.
    momentum = space.distributions.get("momentum")
    if isinstance(momentum, od.CategoricalDistribution):
        zero = 0 in momentum.choices
    elif momentum is not None:
        zero = False
    else:
        zero = space.fixed.get("momentum", TrainConfig().momentum) == 0
    if can_nesterov and zero:
        raise SpaceError(f"{source}: momentum: nesterov needs momentum > 0, and this space can give it 0")


def trial_config(base: TrainConfig, space: Space, sampled: dict[str, Any]) -> TrainConfig:
    """The full configuration of one trial: the base, then the space's fixed values, then the sample."""
    return base.with_updates(**space.fixed, **{k: sampled[k] for k in space.distributions if k in sampled})
