"""hptune bench-arrays: K trials trained one after another, against one trial array.

For each K (`--k`, default 4 16 64) the same K configurations (the default search space's kind:
SGD and Nesterov, cosine schedule, learning rates and momenta spread over the space, batch 128,
seed 42 as every trial of a search has) train:

- separate: one `Trainer` after another, as a search runs trials today, each its timed epochs
  (with the fused bf16 step where the Trainer uses it);
- array: one `ArrayTrainer` holding all K (autocast in bf16, never the fused step).

Both run `--epochs` timed epochs per trial after `--warmup` untimed ones (one Trainer's for the
separate runs, the array's own for the array), and report trial-epochs per second (K x epochs /
seconds), the ratio array / separate, and the share of the GEMM floor: the K trial-epochs'
matrix multiplies alone, one model's epoch of GEMMs as `hptune bench` times it (forward,
weight and input gradients, the test pass; back to back, outputs preallocated) times K. On a GPU
one model's small GEMMs are bound by kernel launches, so there the floor is a launch-bound one
and an array can exceed it: that is what arrays are for.

    hptune bench-arrays                        # synthetic data, K = 4, 16, 64
    hptune bench-arrays --data data/cifar10-jpeg --k 4 16 --device cuda

Measured on this project's 2-core Intel Xeon (`lscpu`: "Intel(R) Xeon(R) Processor", model
207, KVM, AVX512-BF16 and AMX), torch 2.14.1, shared with other work (load ~2.5), with
`hptune bench-arrays --k 4 16 --epochs 2 --threads 1 --repeats 3` (synthetic data,
2,048 train + 512 test images, batch 128), trial-epochs per second:

| precision | K | separate | array | array / separate | share of the GEMM floor (separate / array) |
|---|---|---|---|---|---|
| bf16 (auto) | 4 | 8.9-11.3 | 4.0-5.1 | 0.36-0.58x (3 runs) | 30-65% / 14-38% |
| bf16 (auto) | 16 | 8.0-10.0 | 4.4-5.1 | 0.44-0.64x (3 runs) | 26-70% / 15-34% |
| fp32 | 4 | 4.2-4.7 | 3.5-3.8 | 0.79-0.83x (2 runs) | 69% / 54-57% |
| fp32 | 16 | 4.6-5.1 | 3.8 | 0.74-0.82x (2 runs) | 73-74% / 55-61% |

(`--distinct-seeds`, bf16: 0.45x and 0.53x.) Arrays are slower than separate trials on this
CPU: the stacked GEMMs run no faster than single ones, and the optimizer's passes over the
stacked weights (~7 where the Trainer's fused step makes one) grow with K. They stay off by
default on CPUs; they are meant for GPUs (not measured here: no GPU was available as of 2026-12-01).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence

import torch

from trainable.bench import epoch_flops, synchronize, time_floor
from trainable.config import TrainConfig
from trainable.data import Dataset
from trainable.errors import moved_to
from trainable.fit import Trainer
from trainable.hardware import autocast_dtype, precision_label


def bench_configs(k: int, batch_size: int, precision: str, epochs: int, distinct_seeds: bool) -> list[TrainConfig]:
    """K configurations spread over the default search space (SGD and Nesterov, cosine)."""
    configs = []
    for i in range(k):
        t = i / max(k - 1, 1)  # 0..1 across the members
        configs.append(TrainConfig(
            optimizer="nesterov" if i % 2 == 0 else "sgd", lr=0.01 * 5 ** t, momentum=0.8 + 0.15 * t,
            weight_decay=3e-5, schedule="cosine", batch_size=batch_size, epochs=epochs, precision=precision,
            seed=42 + i if distinct_seeds else 42,
        ))
    return configs


def time_separate(configs: Sequence[TrainConfig], data: Dataset, device: torch.device, warmup: int,
                  epochs: int) -> float:
    """Seconds of the timed epochs of the configs trained one after another."""
    if warmup:
        trainer = Trainer(configs[0], data, device=device)
        for _ in range(warmup):
            trainer.run_epoch()
        del trainer
    seconds = 0.0
    for config in configs:
        trainer = Trainer(config, data, device=device)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(epochs):
            trainer.run_epoch()  # ends in .item(): the device has finished
        seconds += time.perf_counter() - start
        del trainer
    return seconds


def time_array(configs: Sequence[TrainConfig], data: Dataset, device: torch.device, warmup: int,
               epochs: int) -> float:
    """Seconds of the timed epochs of the configs trained as one array."""
    from trainable.arrays import ArrayTrainer

    tensors = [torch.from_numpy(a) for a in (data.train_inputs, data.train_labels, data.test_inputs,
                                             data.test_labels)]
    trainer = ArrayTrainer(configs, *tensors, input_shape=data.input_shape, num_classes=data.num_classes,
                           device=device)
    for _ in range(warmup):
        trainer.run_epoch()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(epochs):
        trainer.run_epoch()
    return time.perf_counter() - start


def floor_seconds(data: Dataset, batch_size: int, dtype: torch.dtype, device: torch.device,
                  repeats: int = 5) -> float:
    """One model's epoch of GEMMs alone (hptune bench's floor): the fastest of `repeats` after
    a warm-up, as a floor is what the machine can do (on a shared box the median wanders 2x)."""
    run = time_floor(data, batch_size, dtype, device=device)
    run()
    return min(run() for _ in range(repeats))


def compare(data: Dataset, device: torch.device, ks: Sequence[int], batch_size: int = 128, epochs: int = 1,
            warmup: int = 1, repeats: int = 1, precision: str = "auto", distinct_seeds: bool = False) -> None:
    """Print, for each K, trial-epochs per second of K trials one after another and as one array,
    each against one model's GEMM floor."""
    dtype = autocast_dtype(precision, device) or torch.float32
    label = precision_label(dtype)
    seeds = "seeds 42, 43, ... (one data order each)" if distinct_seeds else "seed 42 (one data order)"
    print(f"batch {batch_size}, {label} ({precision}), {epochs} timed epoch(s) per trial after "
          f"{warmup} warm-up, members at {seeds}, median of {repeats}:")
    floor = floor_seconds(data, batch_size, dtype, device)
    for k in ks:
        configs = bench_configs(k, batch_size, precision, warmup + epochs, distinct_seeds)
        times: dict[str, list[float]] = {"separate": [], "array": []}
        for _ in range(repeats):  # interleaved, so drift on a shared machine hits both alike
            times["separate"].append(time_separate(configs, data, device, warmup, epochs))
            times["array"].append(time_array(configs, data, device, warmup, epochs))
        trial_epochs = k * epochs
        rates = {}
        for name, runs in times.items():
            seconds = statistics.median(runs)
            rates[name] = trial_epochs / seconds
            share = 100 * floor * trial_epochs / seconds
            print(f"  {name:<8} K={k:>3}  {rates[name]:8.3f} trial-epochs/s  {seconds:8.2f} s  "
                  f"{share:4.0f}% of the GEMM floor")
        print(f"array / separate, K={k:>3}: {rates['array'] / rates['separate']:.2f}x")
    flops = epoch_flops(data, batch_size=batch_size)
    print(f"GEMM floor: {floor:.3f} s per trial-epoch ({label} GEMMs of one model's epoch back to back, "
          f"{flops / floor / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":  # the command is `hptune bench-arrays`, in tuning/commands/
    sys.exit(moved_to("python -m trainable.arrays_bench", "hptune bench-arrays"))
