"""A user's own model and data: factories named on the command line or passed from Python, model
hyperparameters in the space, the own-loop hook, and every bad input as one line and exit 2.

The user's code lives in a temporary folder outside the repository, as a user's would."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from tests.drivers import running, signal_and_wait, wait_until_mid_search
from trainable.config import TrainConfig
from trainable.data import DataError, StreamedData, from_splits
from trainable.refs import module_name, reference_of, split
from tuning.engine.hooks import HOLD_ENV
from tuning.results.journal import Journal, trials
from tuning.search import main as search

REPO = Path(__file__).resolve().parent.parent
SEARCH = str(REPO / "tuning" / "search.py")

# A user's module: a model factory with its own hyperparameters, a data factory of plain tensors
# (a small tabular set: 8 features, 4 classes), and the bad cases the driver must name.
USER = '''
import torch
from torch import nn


def net(input_shape, num_classes, width=32, depth=1):
    layers, features = [nn.Flatten()], 1
    for size in input_shape:
        features *= size
    for _ in range(depth):
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    return nn.Sequential(*layers, nn.Linear(features, num_classes))


def splits(n=1200):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long() + 2 * (x[:, 2] > 0).long()
    return (x[: n - 200], y[: n - 200]), (x[n - 200 :], y[n - 200 :])


def raises(width=1):
    raise ValueError("width must be even")


def not_a_module():
    return [1, 2, 3]


def three_outputs(input_shape, num_classes):
    return nn.Linear(8, 3)


def broken_data():
    raise OSError("the bucket is not mounted")


def text_data():
    return "train.csv"


def short_labels():
    (x, y), test = splits()
    return (x, y[:-1]), test


def float_labels():
    (x, y), (tx, ty) = splits()
    return (x, y.float()), (tx, ty.float())


def empty_test():
    (x, y), (tx, ty) = splits()
    return (x, y), (tx[:0], ty[:0])


def out_of_range():
    (x, y), (tx, ty) = splits()
    return {"train": (x, y), "test": (tx, ty + 10), "classes": ["a", "b", "c", "d"]}


class Rows(torch.utils.data.Dataset):
    """A map-style Dataset, as a user reading rows from disk would write one."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def datasets():
    (x, y), (tx, ty) = splits()
    return Rows(x, y), Rows(tx, ty)


def space(trial):
    """A define-by-run space as Optuna's own objectives are written."""
    optimizer = trial.suggest_categorical("optimizer", ["adamw", "nesterov"])
    values = {"optimizer": optimizer, "lr": trial.suggest_float("lr", 1e-3, 0.1, log=True), "epochs": 2,
              "batch_size": 128, "model.width": trial.suggest_categorical("model.width", [8, 16])}
    if optimizer == "nesterov":
        values["momentum"] = trial.suggest_float("momentum", 0.8, 0.95)
    return values


def own_loop(config, data, report):
    """A user's own training loop: full-batch SGD on the tensors, no DataLoader."""
    torch.manual_seed(config["seed"])
    model = net((8,), data.num_classes, **config["model_args"])
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"])
    x, y = torch.from_numpy(data.train_inputs), torch.from_numpy(data.train_labels)
    tx, ty = torch.from_numpy(data.test_inputs), torch.from_numpy(data.test_labels)
    state = report.state
    if state is not None:
        model.load_state_dict(state["model"])
    for epoch in range(report.epoch, config["epochs"]):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            test = nn.functional.cross_entropy(model(tx), ty)
            accuracy = (model(tx).argmax(1) == ty).float().mean()
        report(train_loss=loss.item(), test_loss=test.item(), test_accuracy=accuracy.item(), lr_now=config["lr"],
               state={"model": model.state_dict()})
'''

SPACE = """
lr: {low: 0.01, high: 0.2, log: true}
batch_size: [64]
epochs: 3
optimizer: [nesterov]
momentum: 0.9
model.width: {type: pow2, low: 8, high: 64}
model.depth: {low: 1, high: 2}
"""


@pytest.fixture
def user(tmp_path, monkeypatch):
    """A working directory outside the repository holding the user's module and space."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "user.py").write_text(USER)
    (folder / "space.yaml").write_text(SPACE)
    monkeypatch.chdir(folder)
    return folder


def argv(name: str, *extra: str) -> list[str]:
    return ["--model", "user.py:net", "--data", "user.py:splits", "--space", "space.yaml", "--results-dir", "results",
            "--name", name, "--num-cpus", "2", "--no-early-stop", *extra]


# --- references ------------------------------------------------------------------------------


def test_references_are_told_from_names_and_folders():
    assert split("user.py:net") == ("user.py", "net")
    assert split("/abs/path/models.py:Net") == ("/abs/path/models.py", "Net")
    assert split("pkg.models:build.inner") == ("pkg.models", "build.inner")
    assert split("cifar10") is None and split("data/cifar10-jpeg") is None and split("mlp") is None
    # the module a file is imported under depends on the path as written, on every machine alike
    assert module_name("user.py") == module_name("user.py") != module_name("other/user.py")
    assert reference_of(lambda: 0) is None and reference_of(TrainConfig) == "trainable.config:TrainConfig"


# --- the data a factory returns --------------------------------------------------------------


def test_every_accepted_form_of_splits_gives_the_same_data_set():
    import torch

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (50,), generator=g)
    forms = [((x[:40], y[:40]), (x[40:], y[40:])), (x[:40], y[:40], x[40:], y[40:]),
             {"train": (x[:40].numpy(), y[:40].numpy()), "test": (x[40:], y[40:])}]
    sets = [from_splits(f, "t") for f in forms]
    for data in sets:
        assert data.train_inputs.dtype.name == "float32"  # float64 is stored as float32
        assert (data.input_shape, data.num_classes, len(data.train_labels)) == ((3,), 3, 40)
        assert (data.train_inputs == sets[0].train_inputs).all() and (data.test_labels == sets[0].test_labels).all()


def test_a_map_style_dataset_is_loaded_once_or_streamed_above_the_memory_limit():
    import torch

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 30

        def __getitem__(self, i: int):
            return torch.full((2, 4), float(i)), i % 3

    loaded = from_splits((Rows(), Rows()), "rows")
    assert loaded.train_inputs.shape == (30, 2, 4) and loaded.train_inputs[7, 0, 0] == 7 and loaded.num_classes == 3
    streamed = from_splits((Rows(), Rows()), "rows", memory_limit=100)
    assert isinstance(streamed, StreamedData) and streamed.nbytes > 100 and streamed.num_classes == 3


@pytest.mark.parametrize("result, message", [
    ("train.csv", "returned a str; expected (train, test)"),
    (((list(range(4)), [0, 1, 0]), ([0.0], [1])), "the train split has 4 inputs but 3 labels"),
    ((([[0.0]] * 4, [0.5, 1.0, 0.0, 1.0]), ([[0.0]], [1])), "labels are float64; expected whole numbers"),
    ((([[0.0]] * 4, [[0, 1]] * 4), ([[0.0]], [1])), "expected one class index per example"),
    ((([[0.0]] * 4, [0, 1, 0, 1]), ([], [])), "the test split is empty"),
    ((([[0.0]] * 4, [0, 1, 0, -1]), ([[0.0]], [1])), "class indices start at 0"),
    ((([[0.0]] * 4, [0, 0, 0, 0]), ([[0.0]], [0])), "a classifier needs at least two classes"),
])
def test_data_of_the_wrong_types_or_shapes_is_named(result, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_splits(result, "t", what="the data factory t")


# --- bad input: one line, exit 2, nothing written ---------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--model", "no_such_module:f"], "model no_such_module:f: no_such_module: cannot be imported "
                                      "(ModuleNotFoundError: No module named 'no_such_module')"),
    (["--model", "missing.py:f"], "model missing.py:f: missing.py: no such file"),
    (["--model", "user.py:nope"], "model user.py:nope: user.py has no attribute 'nope'"),
    (["--model", "user.py:raises"], "the model factory user.py:raises raised ValueError: width must be even"),
    (["--model", "user.py:not_a_module"], "returned a list, not a torch.nn.Module"),
    (["--model", "user.py:three_outputs"], "gives (2, 3) for a batch of 2; expected (2, 4): one score per class"),
    (["--data", "user.py:broken_data"], "the data factory user.py:broken_data raised OSError: the bucket is not "
                                        "mounted"),
    (["--data", "user.py:text_data"], "the data factory user.py:text_data returned a str"),
    (["--data", "user.py:short_labels"], "the train split has 1000 inputs but 999 labels"),
    (["--data", "user.py:float_labels"], "the train labels are float32; expected whole numbers"),
    (["--data", "user.py:empty_test"], "the test split is empty"),
    (["--data", "user.py:out_of_range"], "a label is 13, out of range for 4 classes (0 .. 3)"),
    (["--space", "@height"], "the space sets model.height, which the model factory user.py:net does not accept "
                             "(it takes: depth, width)"),
    (["--model-arg", "colour=red"], "the configuration sets model.colour, which the model factory user.py:net "
                                    "does not accept"),
    (["--loop", "user.py:no_loop"], "loop user.py:no_loop: user.py has no attribute 'no_loop'"),
])
def test_bad_user_code_is_one_line_exit_2_and_writes_nothing(cli, user, extra, message):
    (user / "height.yaml").write_text("model.height: [1, 2]\n")
    base = {"--model": "user.py:net", "--data": "user.py:splits"}
    flags = dict(zip(extra[::2], extra[1::2]))
    chosen = [x for k, v in {**base, **flags}.items() for x in (k, "height.yaml" if v == "@height" else v)]
    status, out, err = cli(search, [*chosen, "--results-dir", "results", "--name", "x", "--num-cpus", "1"])
    assert status == 2, (out, err)
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (user / "results" / "x").exists()


def test_a_lambda_cannot_be_shipped_to_a_cluster(user):
    import hptune
    from trainable.errors import UsageError

    with pytest.raises(UsageError, match="cannot be shipped to a cluster: it has no importable name"):
        hptune.search(model=lambda input_shape, num_classes: None, data="synthetic", address="127.0.0.1:1",
                      samples=1, results_dir=str(user / "results"))


def test_a_bad_factory_leaves_an_interrupted_experiment_as_it_was_with_the_traceback_in_error_log(cli, user):
    folder = user / "results" / "kept"
    folder.mkdir(parents=True)
    (folder / "experiment.json").write_text(json.dumps({"name": "kept", "status": "interrupted", "samples": 2}))
    (folder / "journal.jsonl").write_text("")
    status, _, err = cli(search, ["--model", "user.py:raises", "--data", "user.py:splits", "--results-dir",
                                  "results", "--name", "kept", "--num-cpus", "1"])
    assert status == 2 and "raised ValueError: width must be even" in err and len(err.strip().splitlines()) == 1
    assert json.loads((folder / "experiment.json").read_text())["status"] == "interrupted"
    assert "ValueError: width must be even" in (folder / "error.log").read_text()  # the traceback, for the user


# --- end to end ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("shared_ray")
def test_a_user_model_and_data_search_survives_sigkill_and_its_winner_retrains_without_ray(user, cli, tmp_path):
    samples = 5
    markers = tmp_path / "markers"
    markers.mkdir()
    exp = user / "results" / "own"
    log = tmp_path / "first.log"
    # two trials run to their end; the others wait after epoch 2 (checkpointed): mid-search on any machine
    with running(log, [SEARCH, *argv("own", "--samples", str(samples))], env={HOLD_ENV: f"2:2:{markers}"}) as proc:
        wait_until_mid_search(exp, proc)
        signal_and_wait(proc, signal.SIGKILL, log)
    done_before = {t.trial: [m["test_loss"] for m in t.epochs] for t in trials(Journal(exp).read()) if t.done}
    status, out, err = cli(search, argv("own", "--samples", str(samples)))
    assert status == 0, err
    assert "Resuming own:" in out
    table = pd.read_csv(exp / "trials.csv")
    assert len(table) == samples and table["trial"].is_unique and set(table["status"]) == {"finished"}
    assert {"model.width", "model.depth"} <= set(table.columns)
    assert table[~table["baseline"]]["model.width"].isin([8, 16, 32, 64]).all()
    by_id = {t.trial: t for t in trials(Journal(exp).read())}
    for trial_id, losses in done_before.items():  # finished trials were kept, not run again
        assert [m["test_loss"] for m in by_id[trial_id].epochs] == losses
    # the baseline is the user's own base configuration: the factory's default widths
    baseline = table[table["baseline"]].iloc[0]
    assert pd.isna(baseline["model.width"]) and baseline["epochs"] == 10
    # best_config.yaml names the model and data, and re-trains the winner with no Ray
    best = TrainConfig.load(exp / "best_config.yaml")
    assert (best.model, best.data) == ("user.py:net", "user.py:splits") and "width" in best.model_args
    winner = table[table["rank"] == 1].iloc[0]
    run = subprocess.run([sys.executable, "-m", "trainable", "--config", "results/own/best_config.yaml", "--json",
                          "--threads", "1"], cwd=user, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    last = json.loads(run.stdout.splitlines()[-1])
    assert last["epoch"] == winner["epochs_run"]
    assert last["test_accuracy"] == pytest.approx(winner["test_accuracy"], abs=0.02)
    # optuna's trials carry the experiment's numbers, so the dashboard and trials.csv match
    study = optuna.load_study(study_name="own", storage=f"sqlite:///{exp / 'optuna.db'}")
    numbers = sorted(t.user_attrs.get("number") for t in study.trials if t.user_attrs.get("number"))
    assert set(numbers) <= set(table["number"]) and len(numbers) >= samples - 1


@pytest.mark.slow
def test_the_own_loop_hook_reports_epochs_that_asha_judges(cli, user, shared_ray):
    # One trial at a time, in a fixed order: the baseline (lr 1e-3, full-batch: 10 epochs near chance), the
    # space's center (lr 0.3: learns in its first epochs), then the random sampler's: a trial with lr 1e-4 is far
    # below the rung's median after epoch 1 on any machine and is stopped there.
    (user / "loop.yaml").write_text("lr: [0.3, 1.0e-4, 2.0e-4]\noptimizer: sgd\nmomentum: 0.9\nepochs: 4\n"
                                    "model.width: [32]\n")
    status, out, err = cli(search, ["--loop", "user.py:own_loop", "--data", "user.py:splits", "--space", "loop.yaml",
                                    "--results-dir", "results", "--name", "loop", "--num-cpus", "2", "--samples", "5",
                                    "--sampler", "random", "--stopping", "asha", "--grace-period", "1",
                                    "--reduction-factor", "2", "--max-concurrent", "1"])
    assert status == 0, err
    exp = user / "results" / "loop"
    table = pd.read_csv(exp / "trials.csv")
    assert len(table) == 5 and (table["status"] == "early-stopped").sum() >= 1, table[["number", "lr", "status"]]
    assert set(table[table["status"] == "early-stopped"]["lr"]) <= {1e-4, 2e-4}
    epochs = pd.read_csv(exp / "epochs.csv")
    assert "lr_now" in epochs.columns  # a number the loop reported beside the required ones is kept
    best = table[table["rank"] == 1].iloc[0]
    assert best["lr"] == 0.3 and best["challenge_met"] in (True, False)
    assert TrainConfig.load(exp / "best_config.yaml").loop == "user.py:own_loop"
    run = subprocess.run([sys.executable, "-m", "trainable", "--config", "results/loop/best_config.yaml"], cwd=user,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.count("Epoch ") == 4, run.stdout + run.stderr


@pytest.mark.slow
def test_a_dataset_too_large_for_memory_is_streamed_to_each_trial(cli, user, shared_ray):
    status, out, err = cli(search, ["--model", "user.py:net", "--data", "user.py:datasets", "--data-memory", "10K",
                                    "--results-dir", "results", "--name", "big", "--num-cpus", "2", "--samples", "2",
                                    "--no-baseline", "--space", "space.yaml", "--no-early-stop"])
    assert status == 0, err
    notes = [line for line in err.splitlines() if "DataLoader" in line]
    assert len(notes) == 1 and "raise --data-memory to" in notes[0], err
    epochs = pd.read_csv(user / "results" / "big" / "epochs.csv")
    assert len(epochs) == 2 * 3
    journal = [r for r in Journal(user / "results" / "big").read() if r["event"] == "epoch"]
    assert {r["data_device"] for r in journal} == {"streamed"}


@pytest.mark.slow
def test_the_mlps_widths_are_model_hyperparameters_a_space_can_search(cli, tmp_path, shared_ray):
    space = tmp_path / "widths.yaml"
    space.write_text("lr: [0.02]\nbatch_size: [256]\nepochs: 1\noptimizer: [nesterov]\nmomentum: 0.9\n"
                     "model.width: {type: pow2, low: 16, high: 128}\nmodel.depth: [1, 3]\n")
    status, out, err = cli(search, ["--data", "synthetic", "--space", str(space), "--results-dir",
                                    str(tmp_path / "results"), "--name", "w", "--num-cpus", "2", "--samples", "3",
                                    "--no-baseline", "--no-early-stop"])
    assert status == 0, err
    table = pd.read_csv(tmp_path / "results" / "w" / "trials.csv")
    assert table["model.width"].isin([16, 32, 64, 128]).all() and table["model.depth"].isin([1, 3]).all()
    best = TrainConfig.load(tmp_path / "results" / "w" / "best_config.yaml")
    assert best.model == "mlp" and set(best.model_args) == {"width", "depth"}


@pytest.mark.slow
def test_a_define_by_run_space_function_and_the_python_apis_smoke_test(cli, user, shared_ray):
    status, out, err = cli(search, ["--model", "user.py:net", "--data", "user.py:splits", "--space", "user.py:space",
                                    "--results-dir", "results", "--name", "fn", "--num-cpus", "2", "--samples", "4",
                                    "--no-early-stop"])
    assert status == 0, err
    table = pd.read_csv(user / "results" / "fn" / "trials.csv")
    sampled = table[~table["baseline"]]
    assert len(table) == 4 and (sampled["epochs"] == 2).all() and sampled["model.width"].isin([8, 16]).all()
    assert (sampled[sampled["optimizer"] == "adamw"]["momentum"] == 0).all()  # momentum only where nesterov asks
    study = optuna.load_study(study_name="fn", storage=f"sqlite:///{user / 'results' / 'fn' / 'optuna.db'}")
    assert {"optimizer", "lr", "model.width"} <= {k for t in study.trials for k in t.params}
    # the Python API's smoke test: synthetic data, 3 trials of 2 epochs, as --smoke-test
    import hptune

    experiment = hptune.search(model="user.py:net", smoke_test=True, results_dir="results", name="smoke",
                               num_cpus=2, data_memory="1G")
    assert len(experiment.trials) == 3 and {t.config["epochs"] for t in experiment.trials} == {2}
    assert experiment.base_config.data == "synthetic"


def test_data_passed_as_objects_cannot_be_loaded_again_and_says_so(tmp_path, capsys):
    from trainable.__main__ import main as train

    config = tmp_path / "best.yaml"
    TrainConfig(data="<unnamed>").save(config)
    assert train(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "handed to hptune.search as objects" in err and len(err.strip().splitlines()) == 1


def test_an_own_loop_without_a_model_factory_takes_any_model_hyperparameters(cli, user):
    # the loop builds its own model from config["model_args"]: nothing to check them against
    (user / "l1.yaml").write_text("model.l1: [4, 8]\nepochs: 1\n")
    status, _, err = cli(search, ["--loop", "user.py:own_loop", "--data", "user.py:splits", "--space", "l1.yaml",
                                  "--results-dir", "results", "--name", "l1", "--samples", "1", "--no-baseline",
                                  "--address", "127.0.0.1:1"])
    assert status == 2 and "no Ray cluster answers" in err  # past the model checks, stopped at the address
