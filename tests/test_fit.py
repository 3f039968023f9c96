"""Training one configuration: learning, shuffling, reproducibility, divergence, resume, precision."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from trainable.config import TrainConfig
from trainable.data import make_synthetic
from trainable.fit import METRICS, Trainer, fit
from trainable.hardware import NATIVE_BF16_ENV, autocast_dtype, fast_bf16
from trainable.loops import train_epoch
from trainable.models import mlp as build_model

TIMING = ("epoch_seconds", "samples_per_second")


@pytest.fixture(scope="module")
def data():
    return make_synthetic(seed=0)


def without_timing(history):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in history]


def test_model_is_the_tutorials_mlp():
    model = build_model((3, 32, 32), 10)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(512, 3072), (512,), (512, 512), (512,), (10, 512), (10,)]
    assert build_model((1, 8, 8), 4, hidden=[16])(torch.zeros(2, 1, 8, 8)).shape == (2, 4)


def test_loss_falls_and_every_metric_is_reported(data):
    history = list(fit(TrainConfig(optimizer="adam", lr=1e-3, epochs=6, data="synthetic"), data))
    assert [m["epoch"] for m in history] == [1, 2, 3, 4, 5, 6]
    assert all(tuple(m) == METRICS for m in history)
    losses = [m["train_loss"] for m in history]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.8 * losses[0]
    assert history[-1]["test_accuracy"] > 0.5  # chance is 0.1
    assert all(m["samples_per_second"] > 0 and m["epoch_seconds"] > 0 for m in history)


def test_shuffling_differs_between_epochs_but_is_seeded(data):
    def visit_order(seed: int, epoch_generator_seed: int) -> list[int]:
        # one sample per batch: the order in which labels are visited is the shuffle
        torch.manual_seed(0)
        model = build_model((3, 32, 32), 10, [4])
        seen: list[int] = []
        model.register_forward_pre_hook(lambda _m, args: seen.append(int(args[0].sum().item())))
        images = torch.arange(8, dtype=torch.uint8).repeat_interleave(3 * 32 * 32).reshape(8, 3, 32, 32)
        train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.0), images, torch.zeros(8, dtype=torch.int64),
                    batch_size=1, generator=torch.Generator().manual_seed(epoch_generator_seed))
        return seen

    from trainable.fit import epoch_seed

    e1, e2 = visit_order(42, epoch_seed(42, 1)), visit_order(42, epoch_seed(42, 2))
    assert sorted(e1) == sorted(e2) and e1 != e2  # every sample once, in a new order
    assert visit_order(42, epoch_seed(42, 1)) == e1  # same seed and epoch: same order
    assert visit_order(7, epoch_seed(7, 1)) != e1


def test_same_config_gives_identical_metrics(data):
    config = TrainConfig(optimizer="nesterov", momentum=0.9, lr=0.01, epochs=3, data="synthetic")
    assert without_timing(fit(config, data)) == without_timing(fit(config, data))
    other_seed = without_timing(fit(config.with_updates(seed=1), data))
    assert other_seed != without_timing(fit(config, data))


def test_diverging_lr_ends_the_run_as_diverged(data):
    history = list(fit(TrainConfig(lr=1e4, momentum=0.9, epochs=5, data="synthetic"), data))
    assert history[-1]["diverged"] is True
    assert len(history) < 5  # stopped, not run on with NaN weights
    assert history[-1]["challenge_met"] is False


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16 on a CPU: the fused step's bf16 weights too
def test_resume_from_state_continues_exactly(data, precision):
    config = TrainConfig(optimizer="adamw", lr=2e-3, weight_decay=0.01, epochs=4, data="synthetic", precision=precision)
    straight = without_timing(fit(config, data))
    first = Trainer(config, data)
    for _ in range(2):
        first.run_epoch()
    state = first.state_dict()
    resumed = Trainer(config.with_updates(seed=config.seed), data)
    resumed.load_state_dict(state)
    rest = list(resumed.run())
    assert [m["epoch"] for m in rest] == [3, 4]
    assert without_timing(resumed.history) == straight


def test_precision_choice():
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    assert autocast_dtype("auto", torch.device("mps")) is None


@pytest.mark.parametrize("told", ["0", "1"])
def test_auto_precision_follows_what_the_cpu_is_said_to_have(monkeypatch, told):
    # .ci/slow-box avx2 runs the suite as a CPU without native bf16 by saying so: auto is then fp32
    monkeypatch.setenv(NATIVE_BF16_ENV, told)
    cpu = torch.device("cpu")
    assert fast_bf16(cpu) is (told == "1")
    assert autocast_dtype("auto", cpu) is (torch.bfloat16 if told == "1" else None)
    assert autocast_dtype("bf16", cpu) is torch.bfloat16  # asked for by name: bf16 on any CPU


def test_bf16_follows_the_fp32_loss_curve(data):
    config = TrainConfig(optimizer="nesterov", momentum=0.9, lr=0.01, epochs=6, data="synthetic")
    fp32 = list(fit(config.with_updates(precision="fp32"), data))
    bf16 = list(fit(config.with_updates(precision="bf16"), data))
    assert fp32[-1]["train_loss"] < 0.7 * fp32[0]["train_loss"]  # a curve that goes somewhere
    for a, b in zip(fp32, bf16):
        assert abs(a["train_loss"] - b["train_loss"]) < 0.08 * a["train_loss"]
    assert abs(fp32[-1]["test_accuracy"] - bf16[-1]["test_accuracy"]) < 0.05


# --- every machine: denormals, stalls, bf16 only where native -------------------------------


FLUSH_CHECK = """
import torch
from trainable.config import TrainConfig
from trainable.data import make_synthetic
from trainable.fit import Trainer
tiny = torch.full((1 << 20,), 1e-39)  # large enough to be split across torch's threads
before = bool(((tiny * 0.5) > 0).all())
Trainer(TrainConfig(data="synthetic", epochs=1), make_synthetic(seed=0), device="cpu").run_epoch()
print(before, bool(((tiny * 0.5) == 0).all()), torch.finfo(torch.float32).tiny * 0.5 * 2 > 0)
"""


def test_training_on_the_cpu_flushes_subnormal_floats():
    """A subnormal float (below 1.2e-38) halved is 0 once a Trainer runs on the CPU, on every
    thread: x86 CPUs handle subnormals in microcode, which made epochs 10x slower on a Xeon.
    A fresh process, as a user's `python -m trainable` is (the flag is per thread)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FLUSH_CHECK], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True"]  # subnormal before; flushed after; normal floats untouched


PAGE_FAULTS = """
import resource, sys, torch
import trainable.fit
from trainable.config import TrainConfig
from trainable.data import make_synthetic
from trainable.loops import train_epoch
torch.set_num_threads(2)
# a CIFAR-sized test split: building it leaves the heap as a real data set does
data = make_synthetic(seed=0, n_train=6400, n_test=10000)
trainer = trainable.fit.Trainer(TrainConfig(data="synthetic", batch_size=64, precision=sys.argv[1]), data, device="cpu")
for epoch in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    train_epoch(trainer.model, trainer.optimizer, trainer.train_inputs, trainer.train_labels, batch_size=64,
                generator=torch.Generator().manual_seed(epoch), autocast_dtype=trainer.amp_dtype, fused=trainer.fused)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 100)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_steps_reuse_memory_instead_of_faulting_in_new_pages(precision):
    """Each step frees and reallocates the weight gradients and activations. glibc handed such
    blocks back to the kernel and faulted fresh pages in on the next step: thousands of page
    faults a step, which made CIFAR-10's first epoch (and sometimes later ones) 2x slower.
    Counted, not timed, in fresh processes: the Trainer without its malloc setting, then with."""
    import subprocess

    def faults_per_step(keep: str) -> list[float]:
        run = [sys.executable, "-c", PAGE_FAULTS, precision]
        env = {**os.environ, "HPTUNE_KEEP_FREED_MEMORY": keep}  # "0": the same Trainer, malloc as it was
        out = subprocess.run(run, capture_output=True, text=True, check=True, env=env).stdout
        return [float(v) for v in out.split()]

    control, ours = faults_per_step("0"), faults_per_step("1")
    # measured over 5 runs each on the AMD box: control 660-3100 a step over the two epochs, ours
    # 55-105, nearly all of it in epoch 1 (first touch of the activations). On the Intel box the
    # control faulted [207, 2.6] under load and [262, 45] beside a CPU-burning neighbour, ours
    # [89, 0.0]: glibc's threshold adapts to what the process did before, so the problem does not
    # always show. What must hold everywhere is ours; the ratio is asserted where the problem shows
    # in the second epoch, the steady state, where first touches are over.
    assert ours[1] < 50 and sum(ours) < 200, (control, ours)  # steps reuse memory
    if control[1] > 100:  # the problem, reproduced: ours avoids it
        assert 4 * ours[1] < control[1], (control, ours)


def test_a_stalled_epoch_is_named_with_its_slowdown():
    from trainable.fit import slow_epoch_text, slow_epochs

    history = [{"epoch": 1, "epoch_seconds": 17.0}, {"epoch": 2, "epoch_seconds": 19.0},
               {"epoch": 3, "epoch_seconds": 176.0}, {"epoch": 4, "epoch_seconds": 234.0}]
    assert [e for e, _, _ in slow_epochs(history)] == [3, 4]
    assert slow_epoch_text(history) == "slow epoch: 4 at 234 s, 14× epoch 1 (+1 more)"
    assert slow_epoch_text(history[:3]) == "slow epoch: 3 at 176 s, 10× epoch 1"
    assert slow_epochs(history[:2]) == [] and slow_epoch_text(history[:2]) == ""
    # no epoch 1 seen
    assert slow_epochs([{"epoch": 3, "epoch_seconds": 1.0}, {"epoch": 4, "epoch_seconds": 9.0}]) == []


@pytest.mark.parametrize(("capability", "native"),
                         [((7, 0), False), ((7, 5), False), ((8, 0), True), ((8, 6), True), ((9, 0), True)])
def test_cuda_bf16_only_where_native(capability, native):
    """V100 (7.0) and T4 (7.5) emulate bf16 although torch.cuda.is_bf16_supported() says yes."""
    from trainable.hardware import cuda_bf16_native

    assert cuda_bf16_native(capability) is native
