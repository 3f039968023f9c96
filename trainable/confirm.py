"""Re-train one configuration with new seeds: is its result real or a lucky seed?"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainable.challenge import DEFAULT_WINDOW
from trainable.config import TrainConfig
from trainable.data import Data
from trainable.fileio import atomic_write_text
from trainable.fit import fit

CONFIRM_FILE = "confirm.csv"  # written beside the configuration it confirms
COLUMNS = ("seed", "epochs_run", "train_loss", "test_loss", "test_accuracy", "train_below_test", "still_decreasing",
           "challenge_met", "crossing_epoch", "diverged")
SUMMARIZED = ("train_loss", "test_loss", "test_accuracy", "challenge_met")


def new_seeds(config: TrainConfig, n: int) -> list[int]:
    return [config.seed + i for i in range(1, n + 1)]


def confirm(
    config: TrainConfig,
    data: Data,
    n: int,
    *,
    challenge_window: int = DEFAULT_WINDOW,
    device: torch.device | str | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    model_factory: Callable[..., Any] | None = None,
) -> list[dict[str, Any]]:
    """Train `config` with `n` seeds it was not searched with; the final metrics of each run."""
    rows = []
    for seed in new_seeds(config, n):
        history = list(fit(config.with_updates(seed=seed), data, device=device, challenge_window=challenge_window,
                           model_factory=model_factory))
        last = history[-1]
        row = {"seed": seed, "epochs_run": len(history), **{k: last[k] for k in COLUMNS[2:]}}
        rows.append(row)
        if on_run is not None:
            on_run(row)
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation over the runs (challenge_met as a fraction of runs)."""
    out = {}
    for key in SUMMARIZED:
        values = [float(r[key]) for r in rows if r[key] is not None and math.isfinite(float(r[key]))]
        if values:
            out[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    return out


def describe(rows: list[dict[str, Any]]) -> str:
    s = summarize(rows)
    met = sum(bool(r["challenge_met"]) for r in rows)
    parts = [f"{len(rows)} new seeds"]
    if "test_accuracy" in s:
        mean, std = s["test_accuracy"]
        parts.append(f"test_accuracy {100 * mean:.1f} ± {100 * std:.1f}%")
    for key in ("train_loss", "test_loss"):
        if key in s:
            parts.append(f"{key} {s[key][0]:.4f} ± {s[key][1]:.4f}")
    rate = s.get("challenge_met", (0.0, 0.0))
    parts.append(f"challenge met in {met} of {len(rows)} (rate {rate[0]:.2f} ± {rate[1]:.2f})")
    return "; ".join(parts)


def lucky_seed_check(rows: list[dict[str, Any]], searched_accuracy: float) -> str:
    """How the search's own run compares with the new seeds: a winner by a lucky seed shows here."""
    s = summarize(rows)
    if "test_accuracy" not in s:
        return ""
    mean, std = s["test_accuracy"]
    gap = searched_accuracy - mean
    lucky = gap > 2 * std + 0.005  # more than two spreads (and half a point) above the new seeds
    verdict = "a lucky seed: the new seeds do clearly worse" if lucky else "not a lucky seed: the new seeds reach it"
    points = round(100 * gap, 1) + 0.0  # + 0.0: a gap that rounds to zero prints +0.0, not -0.0
    return (f"the search's own run reached {100 * searched_accuracy:.1f}%, {points:+.1f} points from the new seeds' "
            f"mean: {verdict}")


def write_confirm(path: str | Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def read_confirm(path: str | Path) -> list[dict[str, Any]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        for key, value in row.items():
            if value in ("True", "False"):
                row[key] = value == "True"
            elif value == "":
                row[key] = None
            elif key in ("seed", "epochs_run", "crossing_epoch"):
                row[key] = int(value)
            else:
                row[key] = float(value)
    return rows
