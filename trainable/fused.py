"""bf16 training on a CPU with the optimizer step fused with its casts (`bf16_update.cpp`).

Under autocast, each training step casts every fp32 weight to bf16, casts every bf16 weight
gradient back to fp32, and then the optimizer passes over the fp32 weights. At the tutorial's
batch of 64 those passes over memory cost about a third as much as the matrix multiplies. Here the
forward pass runs on bf16 copies of the weights that live between steps, and one compiled loop
reads each bf16 gradient, updates the fp32 weight and its optimizer state (SGD, Nesterov, Adam,
AdamW, with the formulas of torch's fused CPU kernels, the state kept in the optimizer in torch's
own format) and writes the new bf16 copy. The forward and backward passes compute exactly what
they compute under autocast.

The extension is built on first use by `torch.utils.cpp_extension` (about 25 s, once per machine
and torch version; torch caches it under ~/.cache/torch_extensions) and needs a C++ compiler.
Without one, or with HPTUNE_FUSED_BF16=0, training uses autocast and torch's fused optimizers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

FUSED_ENV = "HPTUNE_FUSED_BF16"  # "0": autocast and torch's optimizers instead
SOURCE = Path(__file__).with_name("bf16_update.cpp")
# Compiler flags per torch CPU capability: the at::vec types pick their instructions from these.
_CAPABILITY_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512",
               "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2", "-mavx2", "-mfma", "-mf16c"],
}

_kernels: ModuleType | None = None
_why_not: str | None = None


def enabled() -> bool:
    return os.environ.get(FUSED_ENV, "1") != "0"


def kernels() -> ModuleType | None:
    """The compiled extension, built once per machine on first use; None where it cannot be
    built or is turned off (why: `unavailable_reason()`)."""
    global _kernels, _why_not
    if _kernels is not None or _why_not is not None:
        return _kernels
    if not enabled():
        _why_not = f"turned off ({FUSED_ENV}=0)"
        return None
    try:
        _kernels = _build()
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, an unwritable cache: fall back, say why
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        _why_not = (lines[0] if lines else type(exc).__name__)[:200]
    return _kernels


def unavailable_reason() -> str | None:
    return _why_not


def _build() -> ModuleType:
    compiler = os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension compiles with
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler}) found")
    if shutil.which("ninja") is None:
        try:  # the ninja wheel (a dependency) puts its binary next to the package, not always on PATH
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    capability = torch.backends.cpu.get_cpu_capability()
    flags = _CAPABILITY_FLAGS.get(capability, [])
    version = re.sub(r"\W", "_", torch.__version__)
    # one build per checkout: two checkouts (or venvs) sharing torch's cache would otherwise
    # rebuild it in turn, each load finding the other's source path in the build files
    where = hashlib.sha1(str(SOURCE.resolve()).encode()).hexdigest()[:8]
    name = f"hptune_bf16_update_{capability.lower()}_torch{version}_{where}"
    # torch logs "No CUDA runtime is found" (we build for the CPU only) and compiler advice; a
    # failure comes back as the exception instead
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.utils.cpp_extension import load
            return load(name, [str(SOURCE)], extra_cflags=["-O3", *flags], verbose=False)
    finally:
        logger.setLevel(level)


class FusedBf16:
    """Trains `model` from bf16 copies of its fp32 weights; `step()` is `optimizer`'s step, fused
    with the casts. The model's own parameters stay the fp32 masters (evaluation, checkpoints and
    the optimizer's state dict see them as usual)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ext: ModuleType) -> None:
        if len(optimizer.param_groups) != 1:
            raise ValueError("FusedBf16 supports one parameter group")
        group = optimizer.param_groups[0]
        self.adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
        if not self.adam and not isinstance(optimizer, torch.optim.SGD):
            raise ValueError(f"FusedBf16 does SGD and Adam(W), not {type(optimizer).__name__}")
        if group["maximize"] or group.get("amsgrad") or group.get("dampening"):
            raise ValueError("FusedBf16 does not do maximize, amsgrad or dampening")
        self.model, self.optimizer, self.ext = model, optimizer, ext
        named = list(model.named_parameters())
        self.names = [name for name, _ in named]
        self.weights = [p for _, p in named]
        self.copies = [p.detach().to(torch.bfloat16).requires_grad_() for p in self.weights]

    def sync(self) -> None:
        """Copy the fp32 weights into the bf16 ones (after loading a checkpoint, say)."""
        with torch.no_grad():
            for copy, weight in zip(self.copies, self.weights):
                copy.copy_(weight)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, mean cross-entropy) of a batch, as under bf16 autocast: bf16 layers, fp32 loss."""
        logits = torch.func.functional_call(self.model, dict(zip(self.names, self.copies)), (x,))
        return logits, F.cross_entropy(logits.float(), y)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        for copy in self.copies:
            copy.grad = None
        loss.backward()
        with torch.no_grad():
            self._step()

    def _step(self) -> None:
        group = self.optimizer.param_groups[0]
        weights = [w.detach() for w in self.weights]
        copies = [c.detach() for c in self.copies]
        grads = [c.grad.contiguous() for c in self.copies]
        if not self.adam:
            momentum = group["momentum"]
            state = [self.optimizer.state[w] for w in self.weights] if momentum else []  # as torch's SGD
            first = bool(momentum) and "momentum_buffer" not in state[0]
            if first:
                for s, w in zip(state, weights):
                    s["momentum_buffer"] = torch.zeros_like(w, memory_format=torch.contiguous_format)
            buffers = [s["momentum_buffer"] for s in state] if momentum else []
            self.ext.sgd(weights, copies, grads, buffers, float(group["lr"]), momentum, group["weight_decay"],
                         group["nesterov"], first)
            return
        state = [self.optimizer.state[w] for w in self.weights]
        if "step" not in state[0]:
            for s, w in zip(state, weights):  # torch's own layout, so its state_dict loads either way
                s["step"] = torch.zeros((), dtype=torch.float32)
                s["exp_avg"] = torch.zeros_like(w, memory_format=torch.contiguous_format)
                s["exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.contiguous_format)
        steps = [s["step"] for s in state]
        torch._foreach_add_(steps, 1)
        beta1, beta2 = group["betas"]
        decoupled = bool(group.get("decoupled_weight_decay")) or isinstance(self.optimizer, torch.optim.AdamW)
        self.ext.adam(weights, copies, grads, [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state],
                      float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"], decoupled,
                      float(steps[0]))


# Layers whose parameters the fused path handles: their forward takes bf16 weights with bf16
# inputs exactly as autocast would run them. A layer with parameters of another kind (a norm layer
# with fp32 running statistics, an embedding, a custom parameter) trains under autocast instead.
FUSED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def unsupported_layer(model: nn.Module) -> str | None:
    """The first layer with parameters the fused path does not handle, e.g. 'BatchNorm2d', or None."""
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)) and not isinstance(module, FUSED_LAYERS):
            return type(module).__name__
        if len(list(module.buffers(recurse=False))) and not isinstance(module, FUSED_LAYERS):
            return type(module).__name__
    return None


def fused_bf16(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
               dtype: torch.dtype | None) -> tuple[FusedBf16 | None, str | None]:
    """(the fused path, None) where it applies (bf16 on a CPU, the kernels built, layers it
    handles); else (None, why not), the reason None where bf16 on a CPU is not asked for."""
    if dtype is not torch.bfloat16 or device.type != "cpu":
        return None, None
    layer = unsupported_layer(model)
    if layer is not None:
        return None, f"the model has {layer} layers, which it does not handle (autocast instead)"
    ext = kernels()
    if ext is None:
        return None, unavailable_reason()
    return FusedBf16(model, optimizer, ext), None
