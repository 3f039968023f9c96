"""Trial arrays: every member of an ArrayTrainer ends as the same config trained alone by Trainer."""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys
from typing import Any

import pytest
import torch

from trainable import fused
from trainable.arrays import ArrayTrainer
from trainable.config import TrainConfig
from trainable.data import make_synthetic
from trainable.fit import METRICS, Trainer
from trainable.models import mlp

HPTUNE = [sys.executable, "-m", "tuning.commands.main"]  # the hptune command, by this interpreter

DATA = make_synthetic(n_train=512, n_test=256)
RTOL = 1e-4  # a CPU matches closer (SGD: the same weights bit for bit); a GPU's batched GEMMs may round otherwise
TIMING = ("epoch_seconds", "samples_per_second")  # wall times: not comparable between runs


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the box is shared, and a thread count changes GEMM rounding too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(**values: Any) -> TrainConfig:
    return TrainConfig(**{"batch_size": 64, "epochs": 3, "precision": "fp32", **values})


def array(configs: list[TrainConfig], data=DATA, **kwargs: Any) -> ArrayTrainer:
    tensors = [torch.from_numpy(a) for a in (data.train_inputs, data.train_labels, data.test_inputs, data.test_labels)]
    return ArrayTrainer(configs, *tensors, input_shape=data.input_shape, num_classes=data.num_classes, device="cpu",
                        **kwargs)


def trained(configs: list[TrainConfig]) -> ArrayTrainer:
    trainer = array(configs)
    for _ in trainer.run():
        pass
    return trainer


def separate(config: TrainConfig) -> list[dict[str, Any]]:
    return list(Trainer(config, DATA, device="cpu").run())


# bf16 keeps 8 significant bits: a product or a layer's output rounds at 2**-8 of itself. A stacked
# matmul sums in another order than the one alone, so where fp32 sums differ in their last bits a
# bf16 output can round one bf16 unit the other way, and training carries that on. Native bf16
# with AMX gave the same numbers both ways; AVX512-BF16 (AMD EPYC, family 25) differed by 2.3e-4 in
# test_loss_se after two epochs, and emulated bf16 (AVX2 only, or `.ci/slow-box avx2`) by one test
# image in 256. So in bf16 the losses may differ by 4 bf16 units (2**-6, 16x what was seen) and an
# accuracy by 2 samples; the verdicts still match. bf16 against fp32 differs 5-50x more (1e-3..6e-2).
BF16_RTOL = 2.0**-6
BF16_SAMPLES = 2


def assert_same_run(got: list[dict[str, Any]], want: list[dict[str, Any]], bf16: bool = False) -> None:
    """Same epochs, same metric names, the same numbers up to RTOL (bf16: up to its rounding, as
    above), the same verdicts."""
    assert len(got) == len(want), f"{len(got)} epochs in the array, {len(want)} alone"
    samples = {"train_accuracy": len(DATA.train_labels), "test_accuracy": len(DATA.test_labels)}
    for g, w in zip(got, want):
        assert list(g) == list(w) == list(METRICS)
        for key in METRICS:
            if key in TIMING:
                assert g[key] > 0
            elif isinstance(w[key], float) and math.isnan(w[key]):
                assert math.isnan(g[key]), (key, g["epoch"])
            elif isinstance(w[key], float) and bf16 and key in samples:
                assert g[key] == pytest.approx(w[key], abs=BF16_SAMPLES / samples[key]), (key, g["epoch"])
            elif isinstance(w[key], float):
                assert g[key] == pytest.approx(w[key], rel=BF16_RTOL if bf16 else RTOL), (key, g["epoch"])
            else:
                assert g[key] == w[key], (key, g["epoch"])


FAMILIES = {  # per optimizer: a constant and a cosine schedule, with and without decay, two seeds
    "sgd": [{"optimizer": "sgd", "lr": 0.05, "weight_decay": 1e-3},
            {"optimizer": "sgd", "lr": 0.03, "momentum": 0.9, "schedule": "cosine", "seed": 7}],
    "nesterov": [{"optimizer": "nesterov", "lr": 0.02, "momentum": 0.9, "schedule": "cosine"},
                 {"optimizer": "nesterov", "lr": 0.01, "momentum": 0.8, "weight_decay": 1e-3, "seed": 7}],
    "adam": [{"optimizer": "adam", "lr": 5e-4, "weight_decay": 1e-3},
             {"optimizer": "adam", "lr": 3e-4, "schedule": "cosine", "seed": 7}],
    "adamw": [{"optimizer": "adamw", "lr": 3e-4, "weight_decay": 0.05, "schedule": "cosine"},
              {"optimizer": "adamw", "lr": 2e-4, "weight_decay": 0.01, "seed": 7}],
}


@pytest.mark.parametrize("optimizer", FAMILIES)
def test_each_optimizer_and_schedule_matches_separate_runs(optimizer):
    configs = [config(**values) for values in FAMILIES[optimizer]]
    trainer = trained(configs)
    assert trainer.finished and trainer.members == [0, 1]  # the last epoch's members stay until the next epoch
    for i, c in enumerate(configs):
        assert_same_run(trainer.history(i), separate(c))


def test_mixed_families_and_a_shared_data_order_match_separate_runs():
    # all seed 42: the members share one permutation per epoch (each batch gathered once); the SGD
    # slice mixes plain, momentum-free and Nesterov members, the Adam slice L2 and decoupled decay
    configs = [config(optimizer="adamw", lr=3e-4, weight_decay=0.02), config(optimizer="sgd", lr=0.05),
               config(optimizer="nesterov", lr=0.02, momentum=0.9, weight_decay=1e-3, schedule="cosine"),
               config(optimizer="adam", lr=3e-4, weight_decay=1e-3, schedule="cosine"),
               config(optimizer="sgd", lr=0.02, momentum=0.5)]
    trainer = trained(configs)
    for i, c in enumerate(configs):
        assert_same_run(trainer.history(i), separate(c))


def test_members_of_different_lengths_leave_after_their_last_epoch():
    configs = [config(optimizer="nesterov", lr=0.02, momentum=0.9, epochs=e, schedule="cosine", seed=s)
               for e, s in ((2, 1), (4, 2), (3, 3))]
    trainer = array(configs)
    ran = [sorted(trainer.run_epoch()) for _ in range(4)]
    assert ran == [[0, 1, 2], [0, 1, 2], [1, 2], [1]]
    assert trainer.finished and trainer.run_epoch() == {} and trainer.members == []
    for i, c in enumerate(configs):
        assert_same_run(trainer.history(i), separate(c))


@pytest.mark.parametrize("batch_size", [8, 64], ids=["mid-epoch check", "end of epoch"])
def test_a_diverging_member_ends_diverged_and_the_others_match(batch_size):
    # batch 8: 64 steps an epoch, so the divergence check at step 50 takes the member out mid-epoch
    configs = [config(optimizer="sgd", lr=0.01, momentum=0.9, batch_size=batch_size, epochs=2),
               config(optimizer="sgd", lr=1e5, momentum=0.9, batch_size=batch_size, epochs=2, seed=5),
               config(optimizer="adam", lr=3e-4, batch_size=batch_size, epochs=2, seed=6)]
    trainer = array(configs)
    first = trainer.run_epoch()
    assert first[1]["diverged"] and math.isnan(first[1]["train_loss"]) and trainer.members == [0, 2]
    with pytest.raises(ValueError, match="no longer in the array"):
        trainer.member_state_dict(1)
    trainer.run_epoch()
    alone = separate(configs[1])
    assert len(alone) == 1 and alone[0]["diverged"]
    assert_same_run(trainer.history(1), alone)  # the same train accuracy up to the check, the same verdicts
    for i in (0, 2):
        assert_same_run(trainer.history(i), separate(configs[i]))


def test_a_member_removed_mid_run_leaves_the_others_unchanged():
    configs = [config(optimizer="nesterov", lr=0.02, momentum=0.9, seed=1),
               config(optimizer="adam", lr=3e-4, seed=2), config(optimizer="adamw", lr=3e-4, weight_decay=0.01, seed=3),
               config(optimizer="sgd", lr=0.05, seed=4)]
    trainer = array(configs)
    trainer.run_epoch()
    trainer.remove(2)  # ASHA stops it
    trainer.remove(0)
    assert trainer.members == [3, 1]  # the stack keeps the SGD family first
    with pytest.raises(ValueError, match="member 2: no longer in the array"):
        trainer.remove(2)
    while not trainer.finished:
        assert sorted(trainer.run_epoch()) == [1, 3]
    assert len(trainer.history(0)) == len(trainer.history(2)) == 1
    for i in (1, 3):
        assert_same_run(trainer.history(i), separate(configs[i]))


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_a_member_checkpoint_resumes_in_a_plain_trainer():
    configs = [config(optimizer="nesterov", lr=0.02, momentum=0.9, weight_decay=1e-3, schedule="cosine"),
               config(optimizer="adamw", lr=3e-4, weight_decay=0.05, seed=3), config(optimizer="sgd", lr=0.05, seed=4)]
    trainer = array(configs)
    trainer.run_epoch()
    trainer.run_epoch()
    for i, c in enumerate(configs):
        state = trainer.member_state_dict(i)
        reference = Trainer(c, DATA, device="cpu")  # the same config trained alone, 2 epochs
        reference.run_epoch()
        reference.run_epoch()
        want = reference.state_dict()
        assert list(state["model"]) == list(want["model"])
        assert state["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
        assert {k: sorted(v) for k, v in state["optimizer"]["state"].items()} == \
               {k: sorted(v) for k, v in want["optimizer"]["state"].items()}  # SGD without momentum: no state
        for key, tensor in want["model"].items():
            # SGD: the same bits. Adam divides by the root of a gradient's running square, so where a
            # gradient is tiny a last-bit difference between the stacked and the separate sum moves
            # that weight by a fraction of a step (lr 3e-4): 2.7e-7 in one of 1.6M weights after 16
            # steps on an AMD EPYC (AVX512-BF16). Any other member (its own seed) differs everywhere.
            torch.testing.assert_close(state["model"][key], tensor, rtol=1e-5, atol=1e-6)
        resumed = Trainer(c, DATA, device="cpu")
        resumed.load_state_dict(roundtrip(state))
        resumed.run_epoch()  # epoch 3, after a kill
        assert_same_run(resumed.history, [*want["history"], reference.run_epoch()])


def test_a_trainer_checkpoint_starts_a_member():
    configs = [config(optimizer="adam", lr=3e-4, weight_decay=1e-3, schedule="cosine", seed=5),
               config(optimizer="nesterov", lr=0.02, momentum=0.9, seed=6)]
    alone = Trainer(configs[0], DATA, device="cpu")
    alone.run_epoch()
    trainer = array(configs)
    trainer.load_member_state(0, roundtrip(alone.state_dict()))
    ran = [sorted(trainer.run_epoch()) for _ in range(3)]
    assert ran == [[0, 1], [0, 1], [1]]  # member 0 resumed at epoch 2 of 3
    for i, c in enumerate(configs):
        assert_same_run(trainer.history(i), separate(c))
    with pytest.raises(ValueError, match="optimizer is 'nesterov'"):
        trainer.load_member_state(1, alone.state_dict())


def test_a_model_the_batched_matmuls_do_not_know_trains_under_vmap():
    # the tutorial's MLP wrapped in a Sequential: the same weights from the same seed, but not the
    # plain Flatten/Linear/ReLU stack the batched matmuls handle, so the forward pass runs under vmap
    def build(c: TrainConfig) -> torch.nn.Module:
        return torch.nn.Sequential(mlp(DATA.input_shape, DATA.num_classes, **c.model_args))

    configs = [config(optimizer="nesterov", lr=0.02, momentum=0.9, schedule="cosine", epochs=2),
               config(optimizer="adam", lr=3e-4, weight_decay=1e-3, epochs=2, seed=7)]
    trainer = array(configs, build=build)
    for _ in trainer.run():
        pass
    assert next(iter(trainer.member_state_dict(0)["model"])) == "0.1.weight"
    for i, c in enumerate(configs):
        assert_same_run(trainer.history(i), separate(c))


def test_bf16_members_match_their_autocast_runs(monkeypatch):
    # The array does not use the fused bf16 step: its reference is the Trainer with autocast and
    # torch's step ($HPTUNE_FUSED_BF16=0, which also skips the step's build, 25 s and more; the
    # module's memo of it is restored after). The same bf16 GEMMs on the same bf16 weights.
    monkeypatch.setenv(fused.FUSED_ENV, "0")
    monkeypatch.setattr(fused, "_kernels", None)
    monkeypatch.setattr(fused, "_why_not", None)
    configs = [config(optimizer="nesterov", lr=0.02, momentum=0.9, precision="bf16", schedule="cosine"),
               config(optimizer="adamw", lr=3e-4, weight_decay=0.01, precision="bf16", seed=3)]
    trainer = trained(configs)
    assert trainer.precision == "bf16"
    for i, c in enumerate(configs):
        alone = Trainer(c, DATA, device="cpu")
        assert alone.fused is None and alone.precision == "bf16"
        assert_same_run(trainer.history(i), list(alone.run()), bf16=True)


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match=r"batch_size: .*configs\[1\] has 128"):
        array([config(), config(batch_size=128)])
    with pytest.raises(ValueError, match=r"precision: .*configs\[1\] \('bf16'\)"):
        array([config(), config(precision="bf16")])
    with pytest.raises(ValueError, match=r"model_args: configs\[1\]"):
        array([config(), config(model_args={"hidden": [64]})])
    with pytest.raises(ValueError, match="configs: an array needs at least one"):
        array([])
    small = make_synthetic(n_train=16, n_test=8, shape=(1, 8, 8))
    tensors = [torch.from_numpy(a) for a in (small.train_inputs, small.train_labels, small.test_inputs,
                                             small.test_labels)]
    with pytest.raises(ValueError, match=r"train_x: images of shape \(1, 8, 8\), input_shape is \(3, 32, 32\)"):
        ArrayTrainer([config()], *tensors, input_shape=(3, 32, 32), num_classes=10, device="cpu")
    with pytest.raises(ValueError, match="test_y: expected a 1-d int64"):
        ArrayTrainer([config()], *tensors[:3], tensors[3].int(), input_shape=(1, 8, 8), num_classes=10, device="cpu")
    with pytest.raises(ValueError, match=r"train_y: labels 0\.\.9 outside 0\.\.4"):
        ArrayTrainer([config()], *tensors, input_shape=(1, 8, 8), num_classes=5, device="cpu")
    with pytest.raises(ValueError, match="member: no member 7"):
        array([config()]).remove(7)


def test_float_inputs_are_used_as_they_are():
    float_data = [torch.from_numpy(a).float() / 255 if a.dtype.name == "uint8" else torch.from_numpy(a)
                  for a in (DATA.train_inputs, DATA.train_labels, DATA.test_inputs, DATA.test_labels)]
    c = config(optimizer="sgd", lr=0.05, momentum=0.9, epochs=1)
    trainer = ArrayTrainer([c], *float_data, input_shape=DATA.input_shape, num_classes=DATA.num_classes, device="cpu")
    trainer.run_epoch()
    assert_same_run(trainer.history(0), separate(c))


def test_the_bench_prints_separate_and_array_rows_and_their_ratio():
    # fp32: the fused bf16 step's first build (25 s and more) is not what this checks; timings are not asserted
    run = subprocess.run([*HPTUNE, "bench-arrays", "--data", "synthetic", "--k", "2",
                          "--epochs", "1", "--warmup", "0", "--threads", "1", "--precision", "fp32"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    rows = dict(re.findall(r"^  (separate|array) +K= *2 +([\d.]+) trial-epochs/s", out, flags=re.M))
    assert set(rows) == {"separate", "array"}, out
    ratio = float(re.search(r"^array / separate, K= *2: ([\d.]+)x", out, flags=re.M).group(1))
    assert ratio == pytest.approx(float(rows["array"]) / float(rows["separate"]), rel=0.05, abs=0.01)
    assert re.search(r"^GEMM floor: [\d.]+ s per trial-epoch \(fp32 GEMMs", out, flags=re.M)
    assert re.search(r"% of the GEMM floor$", out, flags=re.M)


def test_the_bench_refuses_bad_input_in_one_line():
    run = subprocess.run([*HPTUNE, "bench-arrays", "--k", "0"], capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
