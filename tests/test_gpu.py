"""The GPU paths, on a real CUDA device: skipped (by the conftest hook) where torch sees none.

They run only where a GPU is (CI has none); README "Sharing a GPU" says where and when they last ran.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from trainable.hardware import autocast_dtype
from tuning.results.journal import Journal
from tuning.search import main as search

HPTUNE = [sys.executable, "-m", "tuning.commands.main"]  # the hptune command, by this interpreter

pytestmark = pytest.mark.gpu


@pytest.mark.slow
def test_four_trials_at_a_quarter_gpu_share_one_gpu_with_their_data_on_it(cli, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {low: 1.0e-3, high: 1.0e-2}\nbatch_size: [32]\nepochs: 3\noptimizer: [sgd]\n")
    status, _, err = cli(
        search,
        ["--data", "synthetic", "--results-dir", str(tmp_path / "results"), "--name", "gpu",
         "--num-cpus", "2", "--num-gpus", "1", "--gpus-per-trial", "0.25", "--cpus-per-trial", "0.5",
         "--samples", "4", "--no-baseline", "--no-early-stop", "--space", str(space)],
    )
    assert status == 0, err
    exp = tmp_path / "results" / "gpu"
    records = Journal(exp).read()
    starts = {r["trial"]: r["time"] for r in records if r["event"] == "trial"}
    ends = {r["trial"]: r["time"] for r in records if r["event"] == "end"}
    assert len(starts) == len(ends) == 4
    assert max(starts.values()) < min(ends.values())  # all four trained at once on the one GPU
    devices = {r["data_device"] for r in records if r["event"] == "epoch"}
    assert devices and all(d.startswith("cuda") for d in devices), devices  # every epoch had its data on the GPU


def test_precision_auto_picks_bf16_only_where_the_gpu_has_it_natively():
    # bf16 tensor cores arrived with compute capability 8.0 (Ampere); before it bf16 is emulated and slower
    native = torch.cuda.get_device_capability() >= (8, 0)
    assert autocast_dtype("auto", torch.device("cuda")) == (torch.bfloat16 if native else None)
    assert autocast_dtype("fp32", torch.device("cuda")) is None


@pytest.mark.slow
def test_bench_on_the_gpu_times_both_pipelines_there_and_names_the_gpu():
    run = subprocess.run([*HPTUNE, "bench", "--data", "synthetic", "--repeats", "1",
                          "--device", "cuda"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    major, minor = torch.cuda.get_device_capability()
    assert f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})" in run.stdout
    expected = "bf16" if (major, minor) >= (8, 0) else "fp32"
    assert f"ours (tensor-resident, auto = {expected})" in run.stdout
    assert re.search(r"speed-up of ours \(default precision\) over the tutorial: [\d.]+x", run.stdout)


@pytest.mark.slow
def test_an_array_search_trains_its_members_together_on_the_gpu(cli, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("lr: {low: 3.0e-3, high: 3.0e-2, log: true}\nbatch_size: [128]\nepochs: 3\n"
                     "optimizer: [sgd, nesterov]\nmomentum: {low: 0.5, high: 0.9}\n")
    status, _, err = cli(
        search,
        ["--data", "synthetic", "--results-dir", str(tmp_path / "results"), "--name", "gpu-arrays",
         "--num-cpus", "2", "--num-gpus", "1", "--arrays", "4", "--samples", "5", "--no-baseline",
         "--no-early-stop", "--sampler", "random", "--space", str(space)],
    )
    assert status == 0, err
    records = Journal(tmp_path / "results" / "gpu-arrays").read()
    epochs = [r for r in records if r["event"] == "epoch"]
    assert len({r["trial"] for r in epochs}) == 5 and len(epochs) == 15
    assert {r["data_device"] for r in epochs} == {"cuda"}  # the ArrayServer holds the GPU
    assert max(r["array_members"] for r in epochs) >= 2
