"""The search space: the default one, and loading a user's own from YAML.

A space maps TrainConfig field names, and the model's hyperparameters as ``model.NAME`` (the
keyword arguments of the model factory), to what the search may pick for them:

    lr:           {low: 1.0e-4, high: 0.3, log: true}     # float range (log scale)
    epochs:       {low: 5, high: 20}                       # int range (both bounds whole numbers)
    batch_size:   {type: pow2, low: 32, high: 512}         # powers of two: 32, 64, ..., 512 (ordered)
    optimizer:    [sgd, nesterov, adam, adamw]             # a list: one of these
    momentum:     0.9                                      # a plain value: fixed
    model.width:  {type: pow2, low: 64, high: 1024}        # a model hyperparameter
    model.dropout: {low: 0.0, high: 0.5}                   # (int range if both bounds are integers)

A range can depend on a listed parameter (define-by-run): with `when`, it is searched only when
that parameter takes one of the given values, and a list of such ranges gives one per case:

    momentum:     {when: {optimizer: [sgd, nesterov]}, low: 0.7, high: 0.97}
    lr:
      - {when: {optimizer: [sgd, nesterov]}, low: 3.0e-3, high: 0.1, log: true}
      - {when: {optimizer: [adam, adamw]}, low: 1.0e-4, high: 5.0e-3, log: true}

Fields the space leaves out, or does not search in a trial, keep the search's base configuration
(the tutorial's values; the model factory's own defaults for its hyperparameters).

A space can also be a Python function of an Optuna trial (define-by-run, as Optuna's own
objective functions are written) returning the values of one trial:

    def space(trial):
        return {"lr": trial.suggest_float("lr", 1e-4, 0.1, log=True),
                "model.width": trial.suggest_categorical("model.width", [64, 128, 256])}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import optuna.distributions as od

from trainable.config import TRAINING_HYPERPARAMETERS, ConfigError, TrainConfig
from trainable.fileio import read_yaml, yaml_number
from trainable.refs import describe as describe_function

SEARCHABLE = TRAINING_HYPERPARAMETERS  # and model.NAME for the model factory's keyword arguments
MODEL_PREFIX = "model."
INT_FIELDS = ("batch_size", "epochs")
SGD_FAMILY = ["nesterov", "sgd"]  # Nesterov first: the choice of the center trial (below)

# The default space, from the 129 distinct trials of earlier searches on CIFAR-10 in
# results/space-evidence/trials.csv (docs/search-space.md): every trial at 55% or more used
# cosine annealing and SGD/Nesterov with lr 0.015-0.08 at batch 64-128 and 14-20 epochs. No
# constant-lr trial passed 54.2%, no SGD-family trial under lr 5e-3 passed 50.5%, no cosine
# SGD-family trial of 11 epochs or fewer passed 50.4% or at batch 256 or 512 passed 53.3%,
# and Adam/AdamW (44 trials) never passed 54.2%, while at a trial's first ASHA rung they stand
# ahead of the SGD trials that end higher. So the schedule is fixed to cosine and the space keeps
# the SGD family. Batch 64 is left out for time: a trial-epoch at 64 costs 1.4x one at 128 on a
# 2-core CPU, and three 20-trial searches over 128-256 ended at 56.1/55.7/55.9% in 6-7 minutes,
# against 56.0/56.6/56.4% in 8-10 minutes over 64-128 (docs/search-space.md).
# A fresh search's first sampled trial is the space's center (Space.center: each range's
# midpoint, a list's first choice); Nesterov is listed first because 4 of the 5 evidence trials
# at 55% or more used it.
# tuning/spaces/families.yaml is the space with all four optimizers (each family its own learning
# rates, momentum only for SGD), for --space.
DEFAULT_SPACE: dict[str, Any] = {
    "optimizer": SGD_FAMILY,
    "lr": {"low": 5.0e-3, "high": 0.15, "log": True},
    "momentum": {"low": 0.7, "high": 0.97},
    "batch_size": {"type": "pow2", "low": 128, "high": 256},
    "epochs": {"low": 12, "high": 20},
    "weight_decay": {"low": 1.0e-6, "high": 1.0e-3, "log": True},
    "schedule": "cosine",
}
# --smoke-test: epochs are not searched; they come from the base configuration (2, the baseline too)
SMOKE_SPACE: dict[str, Any] = {k: v for k, v in DEFAULT_SPACE.items() if k != "epochs"}


class SpaceError(ValueError):
    """A search space that cannot be searched; the message names the parameter."""


@dataclass(frozen=True)
class Param:
    """One searched parameter, or one case of it (`when`: searched only if those hold)."""

    name: str
    distribution: od.BaseDistribution  # in Optuna's terms; for pow2, over the exponent
    pow2: bool = False
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @property
    def optuna_name(self) -> str:
        """The name in the Optuna study: batch sizes are searched as ordered exponents."""
        return f"{self.name}_log2" if self.pow2 else self.name

    def applies(self, values: Mapping[str, Any]) -> bool:
        return all(values.get(key) in allowed for key, allowed in self.when)

    def suggest(self, trial: optuna.Trial) -> Any:
        d, name = self.distribution, self.optuna_name
        if isinstance(d, od.CategoricalDistribution):
            return trial.suggest_categorical(name, d.choices)
        if isinstance(d, od.IntDistribution):
            return self.from_optuna(trial.suggest_int(name, d.low, d.high, log=d.log))
        return trial.suggest_float(name, d.low, d.high, log=d.log)

    def from_optuna(self, value: Any) -> Any:
        """This parameter's Optuna value as the configuration takes it (the inverse of to_optuna)."""
        return 2**value if self.pow2 else value

    def to_optuna(self, value: Any) -> Any | None:
        """`value` as this parameter's Optuna value, or None if the range cannot hold it."""
        if self.pow2:
            if not isinstance(value, int) or value <= 0 or value & (value - 1):
                return None
            value = int(math.log2(value))
        if isinstance(self.distribution, od.CategoricalDistribution):
            return value if value in self.distribution.choices else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return value if self.distribution.low <= value <= self.distribution.high else None

    def middle(self) -> Any:
        """The middle of this parameter, in Optuna's terms: a range's midpoint (geometric on a
        log scale; the lower one between two whole numbers), or a list's first choice."""
        d = self.distribution
        if isinstance(d, od.CategoricalDistribution):
            return d.choices[0]
        mid = math.sqrt(d.low * d.high) if d.log else (d.low + d.high) / 2
        if isinstance(d, od.IntDistribution):
            return max(d.low, min(d.high, d.low + math.floor((mid - d.low) / d.step) * d.step))
        return mid

    def describe(self) -> str:
        d = self.distribution
        if isinstance(d, od.CategoricalDistribution):
            text = "one of " + ", ".join(map(str, d.choices))
        elif self.pow2:
            text = f"{2**d.low} .. {2**d.high} (powers of two)"
        else:
            text = f"{d.low:g} .. {d.high:g}" + (" (log)" if d.log else "")
        for key, allowed in self.when:
            text += f" when {key} in {', '.join(map(str, allowed))}"
        return text


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]  # in sampling order: a case comes after what it depends on
    fixed: dict[str, Any] = field(default_factory=dict)  # set in every trial

    @property
    def names(self) -> list[str]:
        return [*dict.fromkeys(p.name for p in self.params), *self.fixed]

    @property
    def searched(self) -> list[str]:
        return list(dict.fromkeys(p.name for p in self.params))

    def cases(self, name: str) -> list[Param]:
        return [p for p in self.params if p.name == name]

    def _choose(self, pick: Callable[[Param], Any]) -> dict[str, Any]:
        """Define-by-run: `pick` a value for each parameter that applies, given those chosen so
        far (the fixed ones first); the fixed values are in the result too."""
        values: dict[str, Any] = dict(self.fixed)
        for p in self.params:
            if p.name not in values and p.applies(values):
                values[p.name] = pick(p)
        return values

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """The values one trial takes, asked of Optuna parameter by parameter."""
        values = self._choose(lambda p: p.suggest(trial))
        return {k: v for k, v in values.items() if k not in self.fixed}

    def center(self) -> dict[str, Any]:
        """The space's center as an Optuna trial's params (`Param.middle` of every parameter that
        applies there): the first trial a fresh search samples."""
        return self.optuna_point(self._choose(lambda p: p.from_optuna(p.middle())))[0]

    def optuna_point(
            self, config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, od.BaseDistribution], list[str]]:
        """A configuration as an Optuna trial's params and distributions, for a trial that did
        not come from the sampler (the baseline, an earlier experiment's). Parameters whose value
        the space cannot hold are left out and named in the third item, and so are fixed ones
        the configuration does not share (a constant-lr trial is not a point of a cosine space)."""
        params: dict[str, Any] = {}
        distributions: dict[str, od.BaseDistribution] = {}
        skipped: list[str] = []
        if "model_args" in config:
            config = flat(config)
        context = {**config, **self.fixed}
        for p in self.params:
            if not p.applies(context) or p.name not in config:
                continue
            value = p.to_optuna(config[p.name])
            if value is None:
                skipped.append(p.name)
                continue
            params[p.optuna_name], distributions[p.optuna_name] = value, p.distribution
        skipped += [name for name, value in self.fixed.items() if name in config and config[name] != value]
        return params, distributions, skipped

    def high(self, name: str, default: Any) -> Any:
        """The largest value `name` can take (e.g. the most epochs a trial may run)."""
        if name in self.fixed:
            return self.fixed[name]
        highs = []
        for p in self.cases(name):
            d = p.distribution
            top = max(d.choices) if isinstance(d, od.CategoricalDistribution) else d.high
            highs.append(2**top if p.pow2 else top)
        return max(highs) if highs else default

    def describe(self) -> dict[str, str]:
        """Human-readable ranges, for the console and the report."""
        out = {name: "; ".join(p.describe() for p in self.cases(name)) for name in self.searched}
        out.update({name: f"= {value}" for name, value in self.fixed.items()})
        return out

    @property
    def model_args(self) -> list[str]:
        """The model hyperparameters the space sets, without their model. prefix."""
        return [n.removeprefix(MODEL_PREFIX) for n in self.names if n.startswith(MODEL_PREFIX)]


class FunctionSpace:
    """A define-by-run space written as a Python function: `fn(trial) -> {name: value}`, the names
    those of a YAML space (lr, ..., model.NAME). It has no center, and trials from elsewhere (the
    baseline, a warm start) enter its study with their results but without parameters."""

    def __init__(self, fn: Callable[[optuna.Trial], Mapping[str, Any]], reference: str | None = None) -> None:
        self.fn = fn
        self.reference = reference or describe_function(fn)
        self.params: tuple[Param, ...] = ()
        self.fixed: dict[str, Any] = {}

    names = searched = property(lambda self: [])
    model_args = property(lambda self: [])

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        from trainable.refs import call_user

        values = call_user(self.fn, "the search space", trial)
        if not isinstance(values, Mapping):
            raise SpaceError(f"the search space {self.reference} returned a {type(values).__name__}, not a dict "
                             "of parameter names to values")
        for name in values:
            if name not in SEARCHABLE and not name.startswith(MODEL_PREFIX):
                raise SpaceError(f"the search space {self.reference}: {name}: unknown parameter (searchable: "
                                 f"{', '.join(SEARCHABLE)}, model.NAME)")
        return dict(values)

    def center(self) -> dict[str, Any]:
        return {}

    def optuna_point(self, config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, od.BaseDistribution],
                                                                list[str]]:
        return {}, {}, []

    def high(self, name: str, default: Any) -> Any:
        return None  # unknown until sampled

    def describe(self) -> dict[str, str]:
        return {"(define-by-run)": self.reference}


AnySpace = Space | FunctionSpace


def parse_space(spec: Any, source: str = "space") -> Space:
    if not isinstance(spec, dict) or not spec:
        raise SpaceError(f"{source}: expected a mapping of parameter names to ranges, got {type(spec).__name__}")
    params: list[Param] = []
    fixed: dict[str, Any] = {}
    for name, value in spec.items():
        if not searchable(name):
            raise SpaceError(f"{source}: {name}: unknown parameter (searchable: {', '.join(SEARCHABLE)}, "
                             "and model.NAME for the model factory's keyword arguments)")
        where = f"{source}: {name}"
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            cases = [_range(where, name, v) for v in value]
            if not all(case.when for case in cases):
                raise SpaceError(f"{where}: a list of ranges needs a `when` in each")
            params += cases
        elif isinstance(value, list):
            params.append(Param(name, _categorical(where, name, value)))
        elif isinstance(value, dict):
            params.append(_range(where, name, value))
        else:
            fixed[name] = _check_value(where, name, value)
    ordered = sorted(params, key=lambda p: bool(p.when))  # what a case depends on comes first
    space = Space(tuple(ordered), fixed)
    _check_conditions(space, source)
    _check_consistent(space, source)
    return space


def smoke(space: AnySpace) -> AnySpace:
    """--smoke-test: the space without epochs, which come from the base configuration (2)."""
    if isinstance(space, FunctionSpace):
        return space
    return Space(tuple(p for p in space.params if p.name != "epochs"),
                 {k: v for k, v in space.fixed.items() if k != "epochs"})


def searchable(name: Any) -> bool:
    return isinstance(name, str) and (name in SEARCHABLE or (
        name.startswith(MODEL_PREFIX) and name[len(MODEL_PREFIX):].isidentifier()))


def load_space(path: str | Path) -> AnySpace:
    """A space from a YAML file, or from a function (``FILE.py:NAME`` or ``MODULE:NAME``)."""
    from trainable.refs import BadReferenceError, is_reference, resolve

    if is_reference(str(path)) and not str(path).endswith((".yaml", ".yml")):
        try:
            return FunctionSpace(resolve(str(path), "space"), str(path))
        except BadReferenceError as exc:
            raise SpaceError(str(exc)) from None
    return parse_space(read_yaml(path, SpaceError), str(path))


def space_of(spec: Any) -> AnySpace:
    """A space from what the Python API takes: a dict in the YAML form, a path or reference, a
    function of an Optuna trial, a Space; None: the default space."""
    if spec is None:
        return default_space()
    if isinstance(spec, (Space, FunctionSpace)):
        return spec
    if isinstance(spec, dict):
        return parse_space(spec, "space")
    if isinstance(spec, (str, Path)):
        return load_space(spec)
    if callable(spec):
        return FunctionSpace(spec)
    raise SpaceError(f"space: expected a dict, a YAML path or a function of an Optuna trial, got {type(spec).__name__}")


def default_space(smoke_test: bool = False) -> Space:
    return parse_space(SMOKE_SPACE if smoke_test else DEFAULT_SPACE, "default space")


def _number(where: str, key: str, value: Any) -> float | int:
    value = yaml_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpaceError(f"{where}: {key} must be a number, got {value!r}")
    return value


def _range(where: str, name: str, spec: dict[str, Any]) -> Param:
    unknown = set(spec) - {"low", "high", "log", "type", "when"}
    if unknown:
        raise SpaceError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (use low, high, log, type, when)")
    when = _when(where, spec.get("when"))
    if "low" not in spec or "high" not in spec:
        raise SpaceError(f"{where}: a range needs low and high")
    low, high = _number(where, "low", spec["low"]), _number(where, "high", spec["high"])
    model = name.startswith(MODEL_PREFIX)
    whole = isinstance(low, int) and isinstance(high, int) and not isinstance(spec["low"], float)
    kind = spec.get("type") or ("int" if name in INT_FIELDS or (model and whole) else "float")
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
        if name not in INT_FIELDS and not model:
            raise SpaceError(f"{where}: {name} is not a whole-number parameter; drop type: {kind}")
        if low != int(low) or high != int(high):
            raise SpaceError(f"{where}: bounds must be whole numbers, got {low} and {high}")
        low, high = int(low), int(high)
        if kind == "pow2":
            first, last = math.ceil(math.log2(low)), math.floor(math.log2(high))
            if first > last:
                raise SpaceError(f"{where}: no power of two between {low} and {high}")
            _check_value(where, name, 2**first)
            return Param(name, od.IntDistribution(first, last), pow2=True, when=when)
        _check_value(where, name, low)
        return Param(name, od.IntDistribution(low, high, log=log), when=when)
    _check_value(where, name, float(low))
    _check_value(where, name, float(high))
    return Param(name, od.FloatDistribution(float(low), float(high), log=log), when=when)


def _when(where: str, spec: Any) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if spec is None:
        return ()
    if not isinstance(spec, dict) or not spec:
        raise SpaceError(f"{where}: when must map a parameter to the values it applies for, e.g. {{optimizer: [sgd]}}")
    out = []
    for key, allowed in spec.items():
        allowed = allowed if isinstance(allowed, list) else [allowed]
        out.append((key, tuple(_check_value(f"{where}: when {key}", key, v) for v in allowed)))
    return tuple(out)


def _categorical(where: str, name: str, choices: list[Any]) -> od.CategoricalDistribution:
    if not choices:
        raise SpaceError(f"{where}: an empty list of choices")
    checked = [_check_value(where, name, choice) for choice in choices]
    return od.CategoricalDistribution(list(dict.fromkeys(checked)))


def _check_value(where: str, name: str, value: Any) -> Any:
    """The value as TrainConfig takes it for this field, or SpaceError saying why not."""
    if name.startswith(MODEL_PREFIX) and searchable(name):
        value = yaml_number(value)
        if not isinstance(value, (bool, int, float, str)):
            raise SpaceError(f"{where}: a model hyperparameter's value must be a number, a string or true/false, "
                             f"got {value!r}")
        return value
    if name not in SEARCHABLE:
        raise SpaceError(f"{where}: unknown parameter (searchable: {', '.join(SEARCHABLE)}, model.NAME)")
    if isinstance(value, str) and name not in ("optimizer", "schedule"):
        value = _number(where, "value", value)
    try:
        config = TrainConfig.from_dict({name: value, **({"momentum": 0.9} if name == "optimizer" else {})})
    except ConfigError as exc:
        raise SpaceError(f"{where}: {str(exc).split(': ', 1)[-1]}") from None
    return getattr(config, name)


def _check_conditions(space: Space, source: str) -> None:
    """A `when` names a parameter that is listed or fixed (not itself conditional), and the
    cases of one parameter never both apply."""
    listed = {p.name for p in space.params if not p.when and isinstance(p.distribution, od.CategoricalDistribution)}
    for p in space.params:
        for key, _ in p.when:
            if key not in listed and key not in space.fixed:
                raise SpaceError(f"{source}: {p.name}: when {key}: "
                                 f"{key} must be a list of choices or a fixed value in this space")
    for name in space.searched:
        cases = space.cases(name)
        if len(cases) < 2:
            continue
        keys = {key for case in cases for key, _ in case.when}
        if len(keys) != 1 or any(len(case.when) != 1 for case in cases):
            raise SpaceError(f"{source}: {name}: its cases must each depend on the same one parameter")
        seen: set[Any] = set()
        for case in cases:
            overlap = seen & set(case.when[0][1])
            if overlap:
                raise SpaceError(f"{source}: {name}: two cases apply when {case.when[0][0]} is "
                                 f"{sorted(map(str, overlap))[0]}")
            seen |= set(case.when[0][1])


def _check_consistent(space: Space, source: str) -> None:
    """Nesterov needs momentum > 0: a space that can give it 0 is refused up front."""
    nesterov = {"optimizer": "nesterov", **{k: v for k, v in space.fixed.items() if k != "optimizer"}}
    can_nesterov = space.fixed.get("optimizer") == "nesterov" or any(
        isinstance(p.distribution, od.CategoricalDistribution) and "nesterov" in p.distribution.choices
        for p in space.cases("optimizer")
    )
    if not can_nesterov:
        return
    momentum = [p for p in space.cases("momentum") if p.applies(nesterov)]
    if momentum:  # a continuous range hits exactly 0 with probability 0; a listed 0 does not
        zero = any(isinstance(p.distribution, od.CategoricalDistribution) and 0 in p.distribution.choices
                   for p in momentum)
    else:
        zero = space.fixed.get("momentum", TrainConfig().momentum) == 0
    if zero:
        raise SpaceError(f"{source}: momentum: nesterov needs momentum > 0, and this space can give it 0")


def trial_config(base: TrainConfig, space: AnySpace, sampled: dict[str, Any]) -> TrainConfig:
    """The full configuration of one trial: the base, then the space's fixed values, then the sample."""
    chosen = sampled if isinstance(space, FunctionSpace) else {k: sampled[k] for k in space.searched if k in sampled}
    return TrainConfig.from_dict(apply_params(base.to_dict(), {**space.fixed, **chosen}))


def apply_params(config: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A configuration dict with a trial's parameters set: model.NAME into model_args."""
    out = {**config, "model_args": dict(config.get("model_args") or {})}
    for key, value in params.items():
        if key.startswith(MODEL_PREFIX):
            out["model_args"][key[len(MODEL_PREFIX):]] = value
        else:
            out[key] = value
    return out


def flat(config: Mapping[str, Any]) -> dict[str, Any]:
    """A configuration dict with its model hyperparameters as model.NAME keys, as spaces name them."""
    out = {k: v for k, v in config.items() if k != "model_args"}
    out.update({f"{MODEL_PREFIX}{k}": v for k, v in (config.get("model_args") or {}).items()})
    return out
