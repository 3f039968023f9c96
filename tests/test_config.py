"""TrainConfig: defaults, YAML round-trip, and errors that name the key."""

from __future__ import annotations

import pytest

from trainable.config import ConfigError, TrainConfig


def test_defaults_are_the_tutorials_hyperparameters():
    c = TrainConfig()
    assert ((c.lr, c.batch_size, c.epochs, c.optimizer, c.momentum, c.seed, c.model, c.model_args, c.loop)
            == (1e-3, 64, 10, "sgd", 0.0, 42, "mlp", {}, None))  # the mlp's own default widths: 512, 512


def test_yaml_round_trip(tmp_path):
    config = TrainConfig(lr=0.05, batch_size=128, epochs=7, optimizer="nesterov", momentum=0.9, weight_decay=5e-4,
                         seed=3, precision="fp32", model="my_models.py:cnn",
                         model_args={"width": 64, "dropout": 0.25, "act": "relu", "hidden": [256, 128]},
                         data="my_data.py:splits", loop="my_loop.py:train")
    path = tmp_path / "c.yaml"
    config.save(path, header="best trial: abc\nchallenge met")
    assert path.read_text().startswith("# best trial: abc\n# challenge met\n")
    assert TrainConfig.load(path) == config


def test_partial_yaml_keeps_the_other_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.1\nepochs: 3\n")
    assert TrainConfig.load(path) == TrainConfig(lr=0.1, epochs=3)


@pytest.mark.parametrize(
    "text, message",
    [
        ("learning_rate: 0.1\n", r"learning_rate: unknown key"),
        ("lr: fast\n", r"lr: expected a number, got 'fast'"),
        ("batch_size: 64.5\n", r"batch_size: expected an integer"),
        ("epochs: true\n", r"epochs: expected an integer"),
        ("model_args: 512\n", r"model_args: expected a mapping"),
        ("model_args: {width: {a: 1}}\n", r"model_args.width: expected a number, a string"),
        ("model: ''\n", r"model: must not be empty"),
        ("optimizer: rmsprop\n", r"optimizer: must be one of"),
        ("lr: -1\n", r"lr: must be > 0"),
        ("optimizer: nesterov\n", r"momentum: nesterov needs momentum > 0"),
        ("lr: [1\n", r"not valid YAML"),
        ("- 1\n- 2\n", r"must be a mapping"),
    ],
)
def test_bad_yaml_names_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        TrainConfig.load(path)
    assert str(path) in str(info.value)


def test_yaml_numbers_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nweight_decay: 5e-4\n")  # YAML 1.1 reads these as strings
    assert (TrainConfig.load(path).lr, TrainConfig.load(path).weight_decay) == (1e-3, 5e-4)


def test_data_paths_are_kept_as_given(tmp_path, monkeypatch):
    """A relative data path stays relative in the config, its YAML and the files made from it."""
    monkeypatch.chdir(tmp_path)
    c = TrainConfig(data="imgs", data_root="data")
    c.save("c.yaml")
    loaded = TrainConfig.load("c.yaml")
    assert (loaded.data, loaded.data_root) == ("imgs", "data")
    assert str(tmp_path) not in (tmp_path / "c.yaml").read_text()


def test_the_hidden_key_of_earlier_versions_is_the_mlps_widths(tmp_path):
    """best_config.yaml files written before model_args keep re-training the same network."""
    path = tmp_path / "old.yaml"
    path.write_text("lr: 0.02\nhidden:\n- 256\n- 128\n")
    config = TrainConfig.load(path)
    assert (config.model, config.model_args) == ("mlp", {"hidden": [256, 128]})
