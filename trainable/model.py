"""The tutorial's model: Flatten -> Linear -> ReLU -> Linear -> ReLU -> Linear."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn


def build_model(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (512, 512)) -> nn.Sequential:
    """An MLP over flattened images; `hidden` gives the widths (the tutorial's is 512, 512)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)  # 3 * 32 * 32 = 3072 for CIFAR-10
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
