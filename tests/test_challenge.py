"""The challenge verdict on hand-written histories, and the objective's ordering."""

from __future__ import annotations

import math

import pytest

from trainable.challenge import challenge_score, objective_value, verdict


def history(train, test):
    return [{"epoch": i + 1, "train_loss": a, "test_loss": b} for i, (a, b) in enumerate(zip(train, test))]


def test_met_when_below_and_falling():
    v = verdict(history([2.0, 1.8, 1.6, 1.4, 1.2], [1.9, 1.85, 1.7, 1.6, 1.55]))
    assert v == {"train_below_test": True, "still_decreasing": True, "challenge_met": True, "crossing_epoch": 2}


def test_below_but_flat_is_not_met():
    v = verdict(history([1.5, 1.2, 1.1, 1.1, 1.1], [1.6, 1.5, 1.5, 1.5, 1.5]))
    assert v["train_below_test"] and not v["still_decreasing"] and not v["challenge_met"]
    assert v["crossing_epoch"] == 1


def test_falling_but_above_is_not_met():
    # the tutorial's situation: train loss falling, yet above the test loss
    v = verdict(history([2.28, 2.25, 2.20, 2.14, 2.09], [2.27, 2.23, 2.17, 2.11, 2.07]))
    assert not v["train_below_test"] and v["still_decreasing"] and not v["challenge_met"]
    assert v["crossing_epoch"] is None


def test_crossing_then_recrossing_counts_from_the_last_crossing():
    v = verdict(history([2.0, 1.7, 1.75, 1.5, 1.4, 1.3], [1.9, 1.8, 1.7, 1.6, 1.5, 1.45]))
    # below at 2, above at 3, below again from 4 on
    assert v["crossing_epoch"] == 4 and v["challenge_met"]


def test_window_needs_enough_epochs():
    assert not verdict(history([1.0, 0.9, 0.8], [2.0, 2.0, 2.0]), window=3)["still_decreasing"]
    assert verdict(history([1.0, 0.9, 0.8, 0.7], [2.0, 2.0, 2.0, 2.0]), window=3)["still_decreasing"]
    assert verdict(history([1.0, 0.9], [2.0, 2.0]), window=1)["challenge_met"]
    with pytest.raises(ValueError):
        verdict(history([1.0], [2.0]), window=0)


def test_diverged_history_is_not_met():
    v = verdict(history([2.0, 1.5, math.nan], [1.9, 1.6, math.nan]))
    assert v == {"train_below_test": False, "still_decreasing": False, "challenge_met": False, "crossing_epoch": None}


def test_objective_ranks_meeting_the_challenge_first_then_accuracy():
    met_low = {"test_accuracy": 0.40, "challenge_met": True, "diverged": False, "test_loss": 1.6}
    met_high = {"test_accuracy": 0.55, "challenge_met": True, "diverged": False, "test_loss": 1.3}
    unmet_high = {"test_accuracy": 0.60, "challenge_met": False, "diverged": False, "test_loss": 1.2}
    diverged = {"test_accuracy": 0.10, "challenge_met": False, "diverged": True, "test_loss": math.nan}
    ranked = sorted([unmet_high, diverged, met_low, met_high], key=challenge_score, reverse=True)
    assert ranked == [met_high, met_low, unmet_high, diverged]
    assert objective_value(unmet_high, "test_accuracy") > objective_value(met_high, "test_accuracy")
    assert objective_value(unmet_high, "test_loss") < objective_value(met_low, "test_loss")
    # diverged: the worst value, and always finite (Optuna leaves NaN trials RUNNING forever)
    assert objective_value(diverged, "challenge") == -1.0
    assert objective_value(diverged, "test_loss") == 1e9
    assert objective_value(diverged, "test_accuracy") == -1.0
