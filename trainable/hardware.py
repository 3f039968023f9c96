"""The machine a configuration trains on: device, precision, and the CPU settings that keep an
epoch near the machine's floor (subnormal floats flushed, freed memory kept). One place for the
precision rule and its label, and for the note that says when the fused bf16 step is not used."""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Callable

import torch

from trainable import fused


def select_device(requested: str = "auto") -> torch.device:
    """cuda -> mps -> cpu, as in the tutorial; or the device named."""
    if requested != "auto":
        device = torch.device(requested)  # RuntimeError for a name torch does not know
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"--device {requested}: CUDA is not available on this machine")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise RuntimeError(f"--device {requested}: MPS is not available on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cuda_bf16_native(capability: tuple[int, int]) -> bool:
    """bf16 tensor cores exist from compute capability 8.0 (Ampere) on. Older GPUs (V100 7.0,
    T4 7.5) emulate bf16, although `torch.cuda.is_bf16_supported()` says yes there too."""
    return tuple(capability) >= (8, 0)


NATIVE_BF16_ENV = "HPTUNE_NATIVE_BF16"  # "0" or "1": what the CPU is taken to have (.ci/slow-box avx2 sets 0)


def fast_bf16(device: torch.device) -> bool:
    """Does this device run bf16 matrix multiplies faster than fp32?

    On a CPU, $HPTUNE_NATIVE_BF16 (0 or 1) overrides what the CPU says, so that a box with native
    bf16 can run as one without it would (the tests' `.ci/slow-box avx2`, beside
    ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA, which do the same for torch and oneDNN)."""
    if device.type == "cuda":
        return cuda_bf16_native(torch.cuda.get_device_capability(device))
    if device.type == "cpu":
        told = os.environ.get(NATIVE_BF16_ENV)
        if told in ("0", "1"):
            return told == "1"
        # AVX512-BF16 or AMX: native bf16 dot products. Elsewhere bf16 is emulated and slower.
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it."""
    return _cpuinfo().get("model name") or platform.processor() or "unknown CPU"


def machine() -> str:
    """This machine as a figure should name it: the CPU, its family and model, the cores this
    process may use, the vector instructions torch uses, native bf16 or not; and the GPU, if CUDA
    sees one."""
    info = _cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    known = "cpu family" in info and "model" in info
    family = f" (family {info['cpu family']}, model {info['model']})" if known else ""
    isa = {"AVX512": "AVX-512", "AVX2": "AVX2"}.get(torch.backends.cpu.get_cpu_capability(), "no AVX2")  # torch's
    bf16 = "native bf16" if fast_bf16(torch.device("cpu")) else "no native bf16"
    text = f"{cpu_name()}{family}, {cores} cores, {isa}, {bf16}"
    if torch.cuda.is_available():
        text += f"; {torch.cuda.get_device_name(0)}"
    return text


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means plain fp32."""
    if precision == "bf16" or (precision == "auto" and fast_bf16(device)):
        return torch.bfloat16
    return None


def flush_denormals(device: torch.device) -> None:
    """Treat subnormal floats as zero on the CPU (FTZ/DAZ), on every thread torch computes on.

    Weights and Adam's second moments drift into the subnormal range (below 1.2e-38) during
    training; x86 CPUs handle such numbers in microcode, and an epoch slowed from 15 s to 176 s
    on an Intel Xeon when 13% of the weights had become subnormal. Flushing them changes nothing
    a float32 training run can notice. The flag lives in each thread's MXCSR register:
    `torch.set_flush_denormal` sets the calling thread's, and threads created later inherit it,
    but torch's OpenMP threads may already exist, so each of them sets it too.
    """
    if device.type != "cpu":
        return
    torch.set_flush_denormal(True)
    _on_every_omp_thread(lambda: torch.set_flush_denormal(True))


KEEP_FREED_MEMORY_ENV = "HPTUNE_KEEP_FREED_MEMORY"  # "0": leave malloc as it is (for the bench's baseline)
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks for reuse instead of handing them back to the kernel.

    Every training step frees and reallocates the same few megabytes (the weight gradients, the
    bf16 copies of the weights, activations). glibc serves blocks that large with a fresh `mmap`
    and unmaps them on free until its adaptive threshold catches up, which with CIFAR-10 loaded
    took a whole epoch: about 3,000 page faults a step at batch 64 in bf16 (450 in fp32), and a
    first epoch 1.8x slower (`hptune bench --first-epochs`). With the thresholds
    raised, freed memory stays in the process and the next step reuses it. Process-wide; returns
    False where it cannot be set (not glibc), or when $HPTUNE_KEEP_FREED_MEMORY is 0. Numerics are
    untouched.
    """
    if not sys.platform.startswith("linux") or os.environ.get(KEEP_FREED_MEMORY_ENV) == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # not glibc (musl has no mallopt)
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # 32 MiB: the largest threshold glibc itself would reach; trimming only above 1 GiB free
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def _on_every_omp_thread(action: Callable[[], object]) -> None:
    """Run `action` once on each thread of torch's OpenMP team (libgomp), if torch uses one."""
    threads = torch.get_num_threads()
    if threads < 2:
        return
    try:
        with open("/proc/self/maps") as maps:
            path = next((line.split()[-1] for line in maps if "libgomp" in line), None)
    except OSError:
        return  # not Linux: no libgomp to reach this way; the calling thread has the flag
    if path is None:
        return
    callback_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    callback = callback_type(lambda _: action())
    parallel = ctypes.CDLL(path).GOMP_parallel  # what `#pragma omp parallel num_threads(n)` calls
    parallel.argtypes = [callback_type, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None
    parallel(callback, None, threads, 0)


def precision_label(dtype: torch.dtype | None) -> str:
    """bf16 or fp32: how a run that autocasts to `dtype` (None: plain fp32) is named everywhere."""
    return "bf16" if dtype is torch.bfloat16 else "fp32"


def precision_of(precision: str, device: torch.device | str = "cpu") -> str:
    """What `precision` (auto, fp32, bf16) means on `device`: bf16 or fp32."""
    return precision_label(autocast_dtype(precision, torch.device(device)))


def fused_note(reason: str | None = None) -> str:
    """The one sentence saying that bf16 training on the CPU does not use the fused step, and why
    (by default: why the kernels could not be built)."""
    why = reason or fused.unavailable_reason() or "not available"
    return f"fused step not used: {why}"


