"""Search spaces: the default, a user's YAML, and errors that name the parameter."""

from __future__ import annotations

from pathlib import Path

import optuna
import optuna.distributions as od
import pytest

from trainable.config import TrainConfig
from tuning.space import DEFAULT_SPACE, SpaceError, default_space, load_space, parse_space, trial_config

FAMILIES = Path(__file__).resolve().parent.parent / "tuning" / "spaces" / "families.yaml"


def test_default_space_searches_every_tutorial_hyperparameter():
    space = default_space()
    assert set(space.searched) == set(DEFAULT_SPACE) - {"schedule"}
    assert space.fixed == {"schedule": "cosine"}  # every trial anneals its lr (why: README)
    (batch,) = space.cases("batch_size")
    assert batch.pow2 and batch.optuna_name == "batch_size_log2" and batch.distribution == od.IntDistribution(7, 8)
    assert isinstance(space.cases("epochs")[0].distribution, od.IntDistribution)


def ask(space, sampler_seed=0, n=40):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=sampler_seed))
    samples = []
    for _ in range(n):
        trial = study.ask()
        samples.append(space.suggest(trial))
        study.tell(trial, 0.0)
    return samples


def test_default_space_keeps_the_sgd_family_where_the_evidence_put_the_best_trials():
    samples = ask(default_space())
    assert {s["optimizer"] for s in samples} == {"sgd", "nesterov"}
    for s in samples:
        assert 5e-3 <= s["lr"] <= 0.15 and 0.7 <= s["momentum"] <= 0.97
        assert s["batch_size"] in (128, 256) and 12 <= s["epochs"] <= 20
        TrainConfig.from_dict(s)  # every sample is a valid configuration


def test_the_families_space_is_define_by_run():
    """Momentum only where it does something; each optimizer family its own learning rates;
    batch sizes powers of two."""
    samples = ask(load_space(FAMILIES))
    assert {s["optimizer"] for s in samples} == {"sgd", "nesterov", "adam", "adamw"}
    for s in samples:
        sgd = s["optimizer"] in ("sgd", "nesterov")
        assert ("momentum" in s) == sgd
        assert (5e-3 <= s["lr"] <= 0.15) if sgd else (1e-4 <= s["lr"] <= 2e-3)
        assert s["batch_size"] in (64, 128, 256)
        TrainConfig.from_dict(s)


def test_the_center_of_the_default_space_is_each_ranges_middle_and_the_first_choice():
    center = default_space().center()
    assert center.pop("optimizer") == "nesterov"  # listed first: 4 of the 5 evidence trials at 55%+ used it
    assert center.pop("lr") == pytest.approx((5e-3 * 0.15) ** 0.5)  # log scale: the geometric midpoint
    assert center.pop("weight_decay") == pytest.approx((1e-6 * 1e-3) ** 0.5)
    assert center.pop("momentum") == pytest.approx((0.7 + 0.97) / 2)
    assert center.pop("batch_size_log2") == 7  # 128 and 256: the lower middle
    assert center.pop("epochs") == 16
    assert center == {}


def test_the_center_follows_the_define_by_run_cases():
    space = parse_space({"optimizer": ["adam", "sgd"],
                         "momentum": {"when": {"optimizer": "sgd"}, "low": 0.8, "high": 0.9},
                         "lr": [{"when": {"optimizer": "sgd"}, "low": 1e-2, "high": 1e-1, "log": True},
                                {"when": {"optimizer": "adam"}, "low": 1e-4, "high": 1e-2, "log": True}],
                         "epochs": {"low": 5, "high": 8}, "schedule": "cosine"})
    center = space.center()
    assert center == {"optimizer": "adam", "lr": pytest.approx(1e-3), "epochs": 6}  # no momentum for Adam
    study = optuna.create_study()
    study.enqueue_trial(center)
    assert space.suggest(study.ask()) == {"optimizer": "adam", "lr": pytest.approx(1e-3), "epochs": 6}


def test_a_configuration_outside_the_space_keeps_what_it_can():
    space = default_space()
    tutorial = TrainConfig().to_dict()  # SGD without momentum or weight decay
    params, distributions, skipped = space.optuna_point(tutorial)
    # lr 1e-3 is under the SGD family's range, batch 64 under 128, 0 outside momentum's and weight
    # decay's, 10 epochs under 12, and the space fixes the schedule to cosine where the tutorial
    # keeps lr constant
    assert sorted(skipped) == ["batch_size", "epochs", "lr", "momentum", "schedule", "weight_decay"]
    assert params == {"optimizer": "sgd"}
    assert set(distributions) == set(params)
    inside = {**tutorial, "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4, "epochs": 14, "schedule": "cosine",
              "batch_size": 256}
    params, _, skipped = space.optuna_point(inside)
    assert skipped == [] and params["lr"] == 0.02 and "schedule" not in params  # fixed: not a parameter
    assert params["batch_size_log2"] == 8


def test_smoke_space_leaves_epochs_to_the_base_configuration():
    space = default_space(smoke_test=True)
    assert "epochs" not in space.names and set(space.searched) == set(DEFAULT_SPACE) - {"epochs", "schedule"}


def test_user_space_from_yaml(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("lr: {low: 1e-4, high: 0.1, log: true}\nbatch_size: {type: pow2, low: 100, high: 600}\n"
                    "epochs: {low: 3, high: 9}\noptimizer: [adam, adamw]\nmomentum: 0.8\n")
    space = load_space(path)
    # "1e-4" is a string to YAML 1.1
    assert space.cases("lr")[0].distribution == od.FloatDistribution(1e-4, 0.1, log=True)
    assert space.cases("batch_size")[0].describe() == "128 .. 512 (powers of two)"
    assert space.cases("epochs")[0].distribution == od.IntDistribution(3, 9)
    assert space.fixed == {"momentum": 0.8}
    config = trial_config(TrainConfig(), space, {"lr": 0.01, "batch_size": 256, "epochs": 4, "optimizer": "adam"})
    assert ((config.lr, config.batch_size, config.epochs, config.optimizer, config.momentum)
            == (0.01, 256, 4, "adam", 0.8))


def test_conditional_ranges_from_yaml(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("optimizer: [sgd, adam]\n"
                    "lr:\n  - {when: {optimizer: sgd}, low: 0.01, high: 0.1, log: true}\n"
                    "  - {when: {optimizer: adam}, low: 1e-4, high: 1e-3, log: true}\n"
                    "momentum: {when: {optimizer: [sgd]}, low: 0.8, high: 0.9}\n")
    for s in ask(load_space(path), n=20):
        assert ((0.01 <= s["lr"] <= 0.1 and 0.8 <= s["momentum"] <= 0.9) if s["optimizer"] == "sgd"
                else (s["lr"] <= 1e-3 and "momentum" not in s))


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"dropout": [0.1]}, "dropout: unknown parameter"),
        ({"lr": {"low": 0.1, "high": 0.01}}, "lr: low (0.1) is greater than high (0.01)"),
        ({"lr": {"low": 0, "high": 0.1, "log": True}}, "lr: a log-scale range needs low > 0"),
        ({"lr": {"low": -1, "high": 0.1}}, "lr: must be > 0"),
        ({"lr": {"low": 0.1}}, "lr: a range needs low and high"),
        ({"lr": {"low": 0.1, "high": 1, "scale": "log"}}, "lr: unknown key(s) scale"),
        ({"epochs": {"low": 1.5, "high": 3}}, "epochs: bounds must be whole numbers"),
        ({"batch_size": {"type": "pow2", "low": 33, "high": 60}}, "batch_size: no power of two between 33 and 60"),
        ({"optimizer": ["sgd", "rmsprop"]}, "optimizer: must be one of"),
        ({"optimizer": []}, "optimizer: an empty list of choices"),
        ({"optimizer": ["nesterov"], "momentum": [0.0, 0.9]}, "nesterov needs momentum > 0"),
        ({"momentum": {"low": 0.5, "high": 1.5}}, "momentum: must be in [0, 1)"),
        ([1, 2], "expected a mapping"),
        ({"momentum": {"when": {"optimizer": ["sgd"]}, "low": 0.5, "high": 0.9}},
         "when optimizer: optimizer must be a list"),
        ({"optimizer": ["sgd", "adam"], "lr": [{"low": 0.1, "high": 0.2}]}, "lr: a list of ranges needs a `when`"),
        ({"optimizer": ["sgd", "adam"], "lr": [{"when": {"optimizer": "sgd"}, "low": 0.1, "high": 0.2},
                                               {"when": {"optimizer": ["sgd", "adam"]}, "low": 0.1, "high": 0.2}]},
         "lr: two cases apply when optimizer is sgd"),
        ({"optimizer": ["sgd"], "lr": {"when": {"optimizer": ["rmsprop"]}, "low": 0.1, "high": 0.2}},
         "lr: when optimizer: must be one of"),
    ],
)
def test_bad_spaces_name_the_parameter(spec, message):
    with pytest.raises(SpaceError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_space(spec)


def test_space_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: {low: 1\n")
    with pytest.raises(SpaceError, match=rf"{path}: not valid YAML"):
        load_space(path)
