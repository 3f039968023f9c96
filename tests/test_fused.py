"""bf16 training on a CPU with the fused optimizer step (trainable/bf16_update.cpp): the same
updates as torch's optimizers, the same training as autocast, a fallback where it cannot be built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from trainable import fused
from trainable.config import TrainConfig
from trainable.data import make_synthetic
from trainable.fit import Trainer

SEARCH = Path(__file__).resolve().parent.parent / "tuning" / "search.py"
COMPILER = shutil.which(os.environ.get("CXX", "c++"))


@pytest.fixture(scope="module")
def kernels():
    ext = fused.kernels()
    if ext is None:
        if COMPILER:  # a compiler is here, so a failed build is a bug, not a missing tool
            pytest.fail(f"the fused step did not build: {fused.unavailable_reason()}")
        pytest.skip(f"no C++ compiler: {fused.unavailable_reason()}")
    return ext


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, fused=True),
    "sgd momentum + decay": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2, fused=True),
    "nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.8, nesterov=True, weight_decay=1e-3, fused=True),
    "adam + L2": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2, fused=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-1, fused=True),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fused_step_updates_weights_and_state_as_torchs_optimizer_does(kernels, name):
    """Same bf16 gradients, six steps: torch's fused optimizer on fp32 copies of them against ours.
    Odd sizes (37, 19) exercise the loop's vector and scalar tails."""
    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(37, 19), nn.ReLU(), nn.Linear(19, 5))

    reference, ours = model(), model()
    torch_opt, our_opt = OPTIMIZERS[name](reference.parameters()), OPTIMIZERS[name](ours.parameters())
    step = fused.FusedBf16(ours, our_opt, kernels)
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=generator).bfloat16() for p in reference.parameters()]
        for p, g in zip(reference.parameters(), grads):
            p.grad = g.float()
        torch_opt.step()
        for copy, g in zip(step.copies, grads):
            copy.grad = g.clone()
        with torch.no_grad():
            step._step()
    for a, b in zip(reference.parameters(), ours.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()
    # the bf16 copies the next forward pass reads are exactly the new weights, rounded
    assert all(torch.equal(c.detach(), w.detach().bfloat16()) for c, w in zip(step.copies, ours.parameters()))
    theirs, mine = torch_opt.state_dict()["state"], our_opt.state_dict()["state"]
    assert theirs.keys() == mine.keys() and all(theirs[k].keys() == mine[k].keys() for k in theirs)
    for k in theirs:
        for key in theirs[k]:
            assert torch.allclose(theirs[k][key].float(), mine[k][key].float(), rtol=1e-5, atol=1e-6), (k, key)
    # the weights moved: a step that did nothing would pass the comparisons above too
    start = model()
    assert all(not torch.equal(a, b) for a, b in zip(start.parameters(), ours.parameters()))


@pytest.fixture(scope="module")
def data():
    return make_synthetic(seed=0)


@pytest.mark.parametrize("optimizer", [dict(optimizer="nesterov", momentum=0.9, lr=0.02, weight_decay=1e-4),
                                       dict(optimizer="adam", lr=3e-4, weight_decay=1e-4)])
def test_bf16_training_on_a_cpu_uses_the_fused_step_and_learns_as_autocast_does(kernels, data, optimizer):
    config = TrainConfig(data="synthetic", epochs=3, precision="bf16", **optimizer)
    ours = Trainer(config, data, device="cpu")
    autocast = Trainer(config, data, device="cpu")
    autocast.fused = None  # autocast and torch's optimizer step, as before the fused step
    assert ours.fused is not None
    for a, b in zip(ours.run(), autocast.run()):
        # the forward and backward passes are the same; the update differs only in rounding
        assert abs(a["train_loss"] - b["train_loss"]) < 0.02 * b["train_loss"], (a, b)  # measured: < 0.5%
        assert abs(a["test_accuracy"] - b["test_accuracy"]) < 0.02, (a, b)
    assert ours.history[-1]["train_loss"] < 0.7 * ours.history[0]["train_loss"]  # it learned


def trainable_header(env: dict[str, str]) -> subprocess.CompletedProcess:
    run = [sys.executable, "-m", "trainable", "--data", "synthetic", "--epochs", "1", "--precision", "bf16"]
    return subprocess.run(run, capture_output=True, text=True, env={**os.environ, **env}, timeout=600)


@pytest.mark.slow
def test_the_fused_step_can_be_turned_off_and_falls_back_without_a_compiler(kernels, tmp_path):
    on = trainable_header({})
    assert on.returncode == 0 and "(bf16, fused step)" in on.stdout.splitlines()[0], on.stdout + on.stderr
    off = trainable_header({fused.FUSED_ENV: "0"})
    assert off.returncode == 0, off.stdout + off.stderr
    assert f"(bf16; fused step not used: turned off ({fused.FUSED_ENV}=0))" in off.stdout.splitlines()[0]
    # a machine without a C++ compiler: nothing cached, the compiler missing; training goes on
    missing = trainable_header({"CXX": str(tmp_path / "no-such-c++"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert missing.returncode == 0, missing.stdout + missing.stderr
    header = missing.stdout.splitlines()[0]
    assert "(bf16; fused step not used: no C++ compiler" in header and "test_accuracy" in missing.stdout
    assert "Traceback" not in missing.stderr


@pytest.mark.slow
def test_ray_trials_train_with_the_fused_step_in_their_own_processes(kernels, tmp_path, no_shared_ray):
    """The extension built in the driver loads in a fresh Ray worker, which trains bf16 with it."""
    import ray
    from ray import tune

    def trial(config):
        trainer = Trainer(TrainConfig(data="synthetic", epochs=1, precision="bf16"), make_synthetic(seed=0),
                          device="cpu")
        tune.report({"fused": trainer.fused is not None, "loss": trainer.run_epoch()["train_loss"]})

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        result = tune.Tuner(trial, run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0)).fit()[0]
    finally:
        ray.shutdown()
    assert result.error is None and result.metrics["fused"] is True and result.metrics["loss"] > 0


@pytest.mark.slow
@pytest.mark.heavy  # a whole search in a process of its own; the trainer's fallback is in the default run
def test_a_search_without_a_compiler_says_so_once_and_trains_with_autocast(tmp_path):
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    run = subprocess.run([sys.executable, str(SEARCH), "--smoke-test", "--precision", "bf16", "--num-cpus", "2",
                          "--results-dir", str(tmp_path / "results"), "--name", "nocc"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    notes = [line for line in run.stderr.splitlines() if "fused step not used" in line]
    assert notes == ["python tuning/search.py: note: trials train bf16 with autocast; fused step not used: "
                     f"no C++ compiler ({tmp_path / 'no-such-c++'}) found"], run.stderr
    assert "Traceback" not in run.stderr
    assert (tmp_path / "results" / "nocc" / "best_config.yaml").exists()
