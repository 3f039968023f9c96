"""hptune bench as a user runs it: the ratio against the tutorial and the floor's share."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

HPTUNE = [sys.executable, "-m", "tuning.commands.main"]  # the hptune command, by this interpreter


def test_bench_prints_the_ratio_and_the_share_of_the_machines_floor():
    # Timings are not asserted (machines differ); what is printed, and that it adds up, is.
    run = subprocess.run([*HPTUNE, "bench", "--data", "synthetic", "--repeats", "1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    rows = dict(re.findall(r"^  (.+?)\s+([\d.]+) s ", out, flags=re.M))
    tutorial = float(rows["tutorial (DataLoader + ToTensor, fp32)"])
    ours = float(next(v for k, v in rows.items() if k.startswith("ours (tensor-resident, auto")))
    ratio = float(re.search(r"speed-up of ours \(default precision\) over the tutorial: ([\d.]+)x", out).group(1))
    assert consistent(ratio, tutorial, ours)
    assert "floor fp32 (the epoch's GEMMs alone)" in rows
    share = re.search(r"share of this machine's floor: ours (\w+) (\d+)% of the \1 floor; ours fp32 (\d+)%", out)
    assert share and 0 < int(share.group(2)) and 0 < int(share.group(3))
    assert re.search(r"\((native bf16|no native bf16)\), \d+ threads", out)


def test_bench_times_a_users_model_against_its_usual_dataloader_pipeline():
    repo = __import__("pathlib").Path(__file__).resolve().parent.parent
    run = subprocess.run([*HPTUNE, "bench", "--model", "examples/tabular.py:model",
                          "--data", "examples/tabular.py:data", "--model-arg", "depth=1", "--batch-size", "512",
                          "--repeats", "1"], capture_output=True, text=True, timeout=600, cwd=repo)
    assert run.returncode == 0, run.stderr
    rows = dict(re.findall(r"^  (.+?)\s+([\d.]+) s ", run.stdout, flags=re.M))
    usual = float(rows["usual (DataLoader, fp32)"])
    ours = float(next(v for k, v in rows.items() if k.startswith("ours (tensor-resident, auto")))
    ratio = float(re.search(r"speed-up of ours \(default precision\) over the usual: ([\d.]+)x", run.stdout).group(1))
    assert consistent(ratio, usual, ours)
    assert "floor" not in run.stdout  # the floor counts the tutorial MLP's GEMMs only


def test_bench_refuses_bad_input_in_one_line():
    run = subprocess.run([*HPTUNE, "bench", "--data", "synthetic", "--repeats", "0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_bench_on_a_device_this_machine_lacks_is_one_line_and_exit_2():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: tests/test_gpu.py runs the bench there")
    run = subprocess.run([*HPTUNE, "bench", "--data", "synthetic", "--device", "cuda"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip() == ("hptune bench: error: --device cuda: "
                                  "CUDA is not available on this machine")


def test_first_epochs_compares_fresh_processes_with_and_without_the_malloc_setting():
    run = subprocess.run([*HPTUNE, "bench", "--data", "synthetic", "--repeats", "1",
                          "--first-epochs"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    rows = re.findall(r"^  (.+?)\s+epoch 1\s+([\d.]+) s\s+epoch 2\s+([\d.]+) s$", run.stdout, flags=re.M)
    assert [name for name, _, _ in rows] == ["malloc as glibc has it (HPTUNE_KEEP_FREED_MEMORY=0)",
                                            "ours (freed memory kept)"]
    (_, base1, base2), (_, ours1, ours2) = rows
    ratio = re.search(r"speed-up of keeping freed memory: epoch 1 ([\d.]+)x, epoch 2 ([\d.]+)x", run.stdout)
    for printed, base, ours in ((ratio.group(1), base1, ours1), (ratio.group(2), base2, ours2)):
        assert consistent(float(printed), float(base), float(ours))


def consistent(ratio: float, base: float, ours: float, digits: float = 0.005) -> bool:
    """`ratio` (printed to 2 decimals) is base/ours for some values that round to the printed ones."""
    low, high = (base - digits) / (ours + digits), (base + digits) / max(ours - digits, 1e-9)
    return low - 0.005 <= ratio <= high + 0.005
