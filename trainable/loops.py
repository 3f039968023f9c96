"""One training epoch and one evaluation, as plain functions over tensor-resident data.

Images stay uint8 wherever they live (on the GPU, the whole set is moved there once); a batch is
gathered by index and scaled to [0, 1] on the device, which is what the tutorial's `ToTensor`
does per image on the CPU. Float inputs are used as they are, other integers (token ids) too.
The `_streamed` twins read a map-style Dataset too large to hold through a DataLoader instead.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from trainable.fused import FusedBf16

# How often the training loop looks at the running loss to stop a diverged run early; each look
# is a device sync, so not every step.
DIVERGENCE_CHECK_STEPS = 50


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_unit(inputs: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """uint8 -> [0, 1], like ToTensor; floats -> the compute dtype; other integers unchanged.

    Under bf16 autocast the first layer would cast its fp32 input to bf16 anyway, so the batch is
    made bf16 directly (0..255 are exact in bf16)."""
    if inputs.dtype == torch.uint8:
        return inputs.to(dtype or torch.float32).div_(255)
    if inputs.is_floating_point():
        return inputs.to(dtype or torch.float32)
    return inputs


def _batch(images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor,
           dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    return to_unit(images.index_select(0, idx), dtype), labels.index_select(0, idx)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
          autocast_dtype: torch.dtype | None, fused: FusedBf16 | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch; (logits, loss), detached from the graph by the caller."""
    if fused is not None:
        logits, loss = fused.loss(x, y)
        fused.backward_and_step(loss)
        return logits, loss
    with autocast(x.device, autocast_dtype):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits, loss


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int,
    generator: torch.Generator,
    autocast_dtype: torch.dtype | None = None,
    fused: FusedBf16 | None = None,
) -> tuple[float, float]:
    """One pass over (images, labels) in an order drawn from `generator`.

    With `fused` (bf16 on a CPU), the steps run on its bf16 weight copies and its fused update
    instead of autocast and `optimizer.step()`; the result is the same up to rounding.

    Returns (mean loss over all samples, accuracy). The loss is NaN if training diverged; the
    epoch then stops at the next check instead of running on with NaN weights.
    """
    device = images.device
    n = labels.shape[0]
    order = torch.randperm(n, generator=generator).to(device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    model.train()
    if fused is not None:
        fused.sync()  # the fp32 weights may have changed since the last epoch (a checkpoint loaded)
    for step, start in enumerate(range(0, n, batch_size), start=1):
        x, y = _batch(images, labels, order[start : start + batch_size], autocast_dtype)
        logits, loss = _step(model, optimizer, x, y, autocast_dtype, fused)
        loss_sum += loss.detach().float() * y.shape[0]
        correct += (logits.detach().argmax(1) == y).sum()
        if step % DIVERGENCE_CHECK_STEPS == 0 and not math.isfinite(loss_sum.item()):
            return math.nan, correct.item() / n
    return loss_sum.item() / n, correct.item() / n


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 1024,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[float, float, float]:
    """Mean loss, accuracy and the standard error of the mean loss over (images, labels).

    The standard error (per-image loss standard deviation / sqrt(N)) is how far the mean loss
    of N images moves by chance: the challenge's verdict asks for a gap larger than that.
    """
    device = images.device
    n = labels.shape[0]
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    square_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    model.eval()
    for start in range(0, n, batch_size):
        x = to_unit(images[start : start + batch_size], autocast_dtype)
        y = labels[start : start + batch_size]
        with autocast(device, autocast_dtype):
            logits = model(x)
        losses = F.cross_entropy(logits.float(), y, reduction="none").double()
        loss_sum += losses.sum()
        square_sum += losses.square().sum()
        correct += (logits.argmax(1) == y).sum()
    mean = loss_sum.item() / n
    variance = max(square_sum.item() / n - mean * mean, 0.0) * n / max(n - 1, 1)
    return mean, correct.item() / n, math.sqrt(variance / n)


def _loader(dataset: Any, batch_size: int, generator: torch.Generator | None) -> DataLoader:
    """Batches of a map-style Dataset in an order drawn from `generator` (None: in order)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=generator is not None, generator=generator,
                      num_workers=0)


def train_epoch_streamed(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Any,
    device: torch.device,
    *,
    batch_size: int,
    generator: torch.Generator,
    autocast_dtype: torch.dtype | None = None,
    fused: FusedBf16 | None = None,
) -> tuple[float, float]:
    """train_epoch over a map-style Dataset read through a DataLoader (the data set too large to hold)."""
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    n = 0
    model.train()
    if fused is not None:
        fused.sync()
    for step, (inputs, labels) in enumerate(_loader(dataset, batch_size, generator), start=1):
        x = to_unit(inputs.to(device, non_blocking=True), autocast_dtype)
        y = labels.to(device, non_blocking=True).long()
        logits, loss = _step(model, optimizer, x, y, autocast_dtype, fused)
        loss_sum += loss.detach().float() * y.shape[0]
        correct += (logits.detach().argmax(1) == y).sum()
        n += y.shape[0]
        if step % DIVERGENCE_CHECK_STEPS == 0 and not math.isfinite(loss_sum.item()):
            return math.nan, correct.item() / max(n, 1)
    return loss_sum.item() / max(n, 1), correct.item() / max(n, 1)


@torch.no_grad()
def evaluate_streamed(model: nn.Module, dataset: Any, device: torch.device, *, batch_size: int = 1024,
                      autocast_dtype: torch.dtype | None = None) -> tuple[float, float, float]:
    """evaluate over a map-style Dataset read through a DataLoader."""
    loss_sum = square_sum = 0.0
    correct = n = 0
    model.eval()
    for inputs, labels in _loader(dataset, batch_size, None):
        x = to_unit(inputs.to(device), autocast_dtype)
        y = labels.to(device).long()
        with autocast(device, autocast_dtype):
            logits = model(x)
        losses = F.cross_entropy(logits.float(), y, reduction="none").double()
        loss_sum += losses.sum().item()
        square_sum += losses.square().sum().item()
        correct += int((logits.argmax(1) == y).sum().item())
        n += len(y)
    mean = loss_sum / n
    variance = max(square_sum / n - mean * mean, 0.0) * n / max(n - 1, 1)
    return mean, correct / n, math.sqrt(variance / n)
