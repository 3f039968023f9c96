"""Search spaces: the default, a user's YAML, and errors that name the parameter."""

from __future__ import annotations

import optuna.distributions as od
import pytest

from trainable.config import TrainConfig
from tuning.space import DEFAULT_SPACE, SpaceError, default_space, load_space, parse_space, trial_config


def test_default_space_searches_every_tutorial_hyperparameter():
    space = default_space()
    assert set(space.distributions) == set(DEFAULT_SPACE)
    assert space.distributions["lr"].log
    assert space.distributions["batch_size"].choices == (64, 128, 256, 512)  # powers of two
    assert isinstance(space.distributions["epochs"], od.IntDistribution)


def test_smoke_space_leaves_epochs_to_the_base_configuration():
    space = default_space(smoke_test=True)
    assert "epochs" not in space.names and set(space.distributions) == set(DEFAULT_SPACE) - {"epochs"}


def test_user_space_from_yaml(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("lr: {low: 1e-4, high: 0.1, log: true}\nbatch_size: {type: pow2, low: 100, high: 600}\nepochs: {low: 3, high: 9}\noptimizer: [adam, adamw]\nmomentum: 0.8\n")
    space = load_space(path)
    assert space.distributions["lr"] == od.FloatDistribution(1e-4, 0.1, log=True)  # "1e-4" is a string to YAML 1.1
    assert space.distributions["batch_size"].choices == (128, 256, 512)
    assert space.distributions["epochs"] == od.IntDistribution(3, 9)
    assert space.fixed == {"momentum": 0.8}
    config = trial_config(TrainConfig(), space, {"lr": 0.01, "batch_size": 256, "epochs": 4, "optimizer": "adam"})
    assert (config.lr, config.batch_size, config.epochs, config.optimizer, config.momentum) == (0.01, 256, 4, "adam", 0.8)


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
