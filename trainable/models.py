"""Models: the tutorial's MLP, and a user's own model factory.

A model factory is any callable that returns an `nn.Module`. It receives the configuration's
model hyperparameters (`TrainConfig.model_args`, which a search space may search as `model.NAME`)
as keyword arguments, and, if it accepts them, `input_shape` (one example's shape, e.g.
(3, 32, 32)) and `num_classes`. `TrainConfig.model` names it: ``mlp`` (the tutorial's, the
default), ``pkg.module:factory`` or ``path/to/file.py:factory``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from trainable.refs import call_user, describe, resolve

DEFAULT_MODEL = "mlp"
DATA_ARGS = ("input_shape", "num_classes")  # what a factory may take from the data


class ModelError(ValueError):
    """A model that cannot be built or does not fit the data; the message says which and why."""


def mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (512, 512), width: int | None = None,
        depth: int | None = None) -> nn.Sequential:
    """The tutorial's MLP over flattened inputs: Flatten -> (Linear -> ReLU) per hidden layer -> Linear.

    `hidden` gives every layer's width (the tutorial's: 512, 512); `width` and `depth` are the
    same as one number each, for a search space (`model.width: {low: 64, high: 1024, type: pow2}`):
    `depth` layers of `width` (either one alone keeps the other from `hidden`)."""
    if width is not None or depth is not None:
        hidden = [width if width is not None else (hidden[0] if hidden else 512)] * (
            depth if depth is not None else len(hidden))
    if any(int(h) < 1 for h in hidden):
        raise ModelError(f"mlp: every hidden width must be >= 1, got {list(hidden)}")
    layers: list[nn.Module] = [nn.Flatten()]
    features = math.prod(input_shape)  # 3 * 32 * 32 = 3072 for CIFAR-10
    for h in hidden:
        layers += [nn.Linear(features, int(h)), nn.ReLU()]
        features = int(h)
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


def factory_of(reference: str) -> Callable[..., Any]:
    """The factory `TrainConfig.model` names: the tutorial's MLP for ``mlp``."""
    if reference == DEFAULT_MODEL:
        return mlp
    return resolve(reference, "model")


def parameters_of(factory: Callable[..., Any]) -> tuple[set[str], bool]:
    """(keyword arguments the factory names, whether it takes any **kwargs); a class: its __init__."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: assume it takes anything
        return set(), True
    names = {name for name, p in signature.parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())


def check_model_args(factory: Callable[..., Any], names: Sequence[str], where: str = "the space") -> None:
    """ModelError if the factory does not accept a model hyperparameter that `where` sets."""
    accepted, anything = parameters_of(factory)
    unknown = [n for n in names if n not in accepted and not anything]
    if unknown:
        takes = ", ".join(sorted(accepted - set(DATA_ARGS))) or "no model hyperparameters"
        raise ModelError(f"{where} sets model.{unknown[0]}, which the model factory {describe(factory)} does not "
                         f"accept (it takes: {takes})")
    reserved = [n for n in names if n in DATA_ARGS]
    if reserved:
        raise ModelError(f"{where} sets model.{reserved[0]}, which comes from the data, not from the configuration")


def build_model(factory: Callable[..., Any], model_args: dict[str, Any], input_shape: Sequence[int],
                num_classes: int) -> nn.Module:
    """Call `factory(**model_args, [input_shape=...], [num_classes=...])`; it must return an nn.Module."""
    accepted, anything = parameters_of(factory)
    kwargs = dict(model_args)
    for name, value in (("input_shape", tuple(input_shape)), ("num_classes", num_classes)):
        if name in accepted or anything:
            kwargs[name] = value
    model = call_user(factory, "the model factory", **kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(f"the model factory {describe(factory)} returned a {type(model).__name__}, not a "
                         "torch.nn.Module")
    return model
