"""The CNN of PyTorch's "Hyperparameter tuning with Ray Tune" tutorial, as a model factory.

Two convolutions and three linear layers; the tutorial searches the widths of the first two linear
layers, `l1` and `l2` (powers of two from 4 to 256), with the learning rate and the batch size. Here
they are the factory's keyword arguments, so a space names them `model.l1` and `model.l2`:

    hptune search --model examples/ray_tutorial_cnn.py:net --data data/cifar10-jpeg \\
        --space examples/ray_tutorial_cnn_space.yaml --samples 20

`examples/ray_tutorial_space.yaml` is the tutorial's own recipe for the same network (its space,
random search, ASHA, 10 samples), which `hptune compare` runs beside ours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """The tutorial's network, unchanged but for the number of classes, which comes from the data."""

    def __init__(self, l1: int = 120, l2: int = 84, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, l1)
        self.fc2 = nn.Linear(l1, l2)
        self.fc3 = nn.Linear(l2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def net(num_classes: int = 10, l1: int = 120, l2: int = 84) -> Net:
    """The model factory: the tutorial's defaults (l1 120, l2 84) unless the space says otherwise."""
    return Net(l1, l2, num_classes)
