"""A data set that is not images, given as plain tensors by a data factory, and a model whose depth
and width a search chooses.

The data: 16 numeric features per row, 4 classes, 24,000 rows (20,000 train, 4,000 test), made
from a fixed seed (nothing is downloaded): the classes are decided by a random two-layer teacher
network over 8 of the features; the other 8 are noise, and 5% of the labels are flipped, so no
model reaches 100%. Its depth matters: trained 15 epochs with AdamW (lr 3e-3, cosine, batch 256), a
linear model (`depth=0`) reaches 68% and 3 layers of 256 units 82% (`python -m trainable --model
examples/tabular.py:model --data examples/tabular.py:data --model-arg depth=3 --model-arg
width=256 --optimizer adamw --lr 0.003 --schedule cosine --batch-size 256 --epochs 15`, 2-core
Intel Xeon with AMX, 2026-12-01).

    hptune search --model examples/tabular.py:model --data examples/tabular.py:data \\
        --space examples/tabular_space.yaml --samples 20
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

FEATURES, CLASSES, INFORMATIVE = 16, 4, 8


def data(n_train: int = 20_000, n_test: int = 4_000, seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """The data factory: ((train inputs, train labels), (test inputs, test labels)), float32 and int64."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    hidden = np.tanh(x[:, :INFORMATIVE] @ rng.normal(size=(INFORMATIVE, 32)) * 1.5)
    logits = hidden @ rng.normal(size=(32, CLASSES))
    y = logits.argmax(1)
    flip = rng.random(n) < 0.05
    y[flip] = rng.integers(0, CLASSES, flip.sum())
    x, y = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def model(input_shape: Sequence[int], num_classes: int, width: int = 64, depth: int = 2,
          dropout: float = 0.0) -> nn.Sequential:
    """The model factory: `depth` hidden layers of `width` units with ReLU and dropout."""
    layers: list[nn.Module] = []
    features = int(np.prod(input_shape))
    for _ in range(depth):
        layers += [nn.Linear(features, width), nn.ReLU(), nn.Dropout(dropout)]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)
