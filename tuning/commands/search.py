"""hptune search (also `python tuning/search.py`): search hyperparameters with Optuna on Ray Tune.

The data set is loaded once, in the driver, and reaches every trial through Ray's object store.
Optuna (TPE by default, its study in results/<name>/optuna.db) proposes learning rate, batch size,
epochs, optimizer, momentum, weight decay and the model's own hyperparameters; a trial stops once
it can no longer beat the best by more than the noise (tuning/noise.py); the base configuration
(the tutorial's, unless --config says otherwise) runs first as the baseline. Every result is
journalled in results/<name>/ as it arrives, so an interrupted search resumes with the same
command, and the CSV files, best_config.yaml and the report are rebuilt from those files alone.

This module only reads the command line: the search itself is tuning/driver.py, with typed
SearchSettings.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from trainable import challenge
from trainable.config import PRECISIONS, TrainConfig
from tuning import driver
from tuning.commands.common import (
    OneLineParser,
    add_data_args,
    add_model_args,
    add_tracker_args,
    command_line,
    data_overrides,
    fail,
    non_negative_int,
    positive_int,
)
from tuning.noise import MIN_TRIALS, WINDOW
from tuning.objective import DEFAULT_OBJECTIVE, OBJECTIVES
from tuning.settings import (
    DEFAULT_SAMPLES,
    SAMPLERS,
    SMOKE_SAMPLES,
    STOPPING,
    Grace,
    SearchSettings,
    parse_size,
)
from tuning.space import default_space, load_space, smoke

PROG = "hptune search"
EXAMPLES = """examples:
  hptune search --samples 20                                   the tutorial's MLP on CIFAR-10, default space
  hptune search --samples 20 --data data/cifar10-jpeg          CIFAR-10 from an image folder
  hptune search --model my_models.py:cnn --data my_data.py:splits --space space.yaml
  hptune search --smoke-test                                   3 tiny trials on synthetic data
  hptune search --samples 40 --until-converged                 stop once the best is settled within its noise
  hptune search --samples 20 --name big                        the same command resumes an interrupted search"""


def grace_period(text: str) -> Grace:
    """argparse type of --grace-period: "25%" (of each trial's schedule) or "3" (epochs)."""
    try:
        return Grace.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description="Search hyperparameters with Optuna on Ray Tune: the tutorial's MLP, "
                      "or your own model and data.", epilog=EXAMPLES,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_argument_group("search")
    s.add_argument("--samples", type=positive_int, metavar="N",
                   help=f"trials in all, the baseline included (default {DEFAULT_SAMPLES}; {SMOKE_SAMPLES} with "
                        "--smoke-test)")
    s.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="Optuna sampler (default tpe)")
    s.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the sampler (default 0); training seeds come from the configuration")
    s.add_argument("--space", metavar="YAML|REF",
                   help="search space replacing the default: a YAML file, or a function of an Optuna trial "
                        "(FILE.py:NAME or MODULE:NAME)")
    s.add_argument("--config", metavar="YAML",
                   help="base configuration for everything the space does not search; also the baseline "
                        "(default: the tutorial's)")
    s.add_argument("--objective", choices=list(OBJECTIVES), default=DEFAULT_OBJECTIVE,
                   help="what the stopping rule and Optuna steer by (default test_accuracy); the challenge is a "
                        "constraint, and the winner is the best trial that meets it")
    s.add_argument("--challenge-window", type=positive_int, default=challenge.DEFAULT_WINDOW, metavar="K",
                   help="the train loss must fall in each of the last K epochs (default 3)")
    s.add_argument("--warm-start", metavar="FOLDER",
                   help="give the new study the finished trials of an earlier experiment folder (results/<name>), "
                        "so the sampler starts from what that search learned; trials outside this space are skipped")
    s.add_argument("--no-baseline", action="store_true",
                   help="do not run the base configuration (the tutorial's by default) as the first trial")
    s.add_argument("--no-center", action="store_true",
                   help="let the sampler choose the first sampled trial too (default: it is the center of the "
                        "space: each range's midpoint, geometric on a log scale, and each list's first choice)")
    s.add_argument("--stopping", choices=STOPPING, default="noise",
                   help="who stops a trial early: noise (default: a trial goes on only while it may still beat the "
                        "best finished trial by more than the noise of its test accuracy; docs/search.md), asha "
                        "(Ray Tune's ASHA), syne-asha (Syne Tune's ASHA, pip install -e \".[compare]\")")
    s.add_argument("--until-converged", action="store_true",
                   help="stop starting trials once the best can no longer improve by more than its noise (the last "
                        f"{WINDOW} trials to end left it within its noise, at least {MIN_TRIALS} ended); "
                        "--samples is then the most it runs")
    s.add_argument("--no-early-stop", action="store_true",
                   help="no stopping rule: every trial runs all its epochs")
    s.add_argument("--grace-period", type=grace_period, metavar="P%|N",
                   help="the first point a trial is judged at: P%% of each trial's own schedule (default 10%% for the "
                        "noise rule, 25%% for ASHA; ASHA's "
                        "later rungs at P%% times the reduction factor, so trials are compared at the same point of "
                        "their schedules, before or after annealing alike), or N epochs (as in Ray Tune's examples)")
    s.add_argument("--reduction-factor", type=float, default=3.0, metavar="F",
                   help="ASHA: keep the best 1/F at each rung (default 3)")
    s.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="stop the search after this long: running trials stop too and are kept as interrupted; "
                        "the same command continues them")
    s.add_argument("--smoke-test", action="store_true",
                   help="synthetic data, 3 samples, 2 epochs: a fast end-to-end check")
    m = p.add_argument_group("your own model and data")
    add_model_args(m, "model factory: mlp (the tutorial's, default), MODULE:NAME or path/to/file.py:NAME; it gets "
                      "the model hyperparameters (model.NAME in the space) and input_shape, num_classes",
                   "a model hyperparameter for every trial, unless the space searches it (repeatable)")
    m.add_argument("--loop", metavar="REF",
                   help="your own training loop (config, data, report) instead of ours: MODULE:NAME or FILE.py:NAME")
    r = p.add_argument_group("resources")
    r.add_argument("--cpus-per-trial", type=float, default=1.0, metavar="N",
                   help="CPUs per trial; torch threads follow (default 1)")
    r.add_argument("--gpus-per-trial", type=float, metavar="FRACTION",
                   help="GPU fraction per trial, at most 1: a trial trains on one device "
                   "(default 0.25 when the cluster has a GPU, so four trials share one; else 0)")
    r.add_argument("--max-concurrent", type=positive_int, metavar="N",
                   help="at most this many trials at once (default: as resources allow)")
    r.add_argument("--arrays", type=non_negative_int, default=0, metavar="K",
                   help="train K trials at a time as one stacked model on one device (each still a trial of its "
                        "own); off by default: measured slower than separate trials on CPUs, not yet measured on GPUs")
    r.add_argument("--max-failures", type=non_negative_int, default=2, metavar="N",
                   help="retries of a trial that raises, from its last checkpoint (default 2)")
    r.add_argument("--num-cpus", type=positive_int, metavar="N",
                   help="local cluster only: CPUs Ray may use (default: all it detects)")
    r.add_argument("--num-gpus", type=non_negative_int, metavar="N",
                   help="local cluster only: GPUs Ray may use (default: all it detects)")
    r.add_argument("--address", metavar="auto|HOST:PORT",
                   help="without it: a private local Ray, whatever else runs on this machine ($RAY_ADDRESS is "
                        "ignored). auto: attach to the cluster $RAY_ADDRESS names, else the one `ray start` last "
                        "started here; HOST:PORT: attach to that head node")
    r.add_argument("--storage", metavar="PATH|URI",
                   help="where Ray keeps trial checkpoints (a path or URI every node can reach; default "
                        "results/<name>/ray)")
    d = p.add_argument_group("data")
    add_data_args(d)
    d.add_argument("--precision", choices=PRECISIONS, help="auto (default), fp32 or bf16")
    d.add_argument("--data-memory", type=size, metavar="SIZE", default="8G",
                   help="a map-style Dataset larger than this (as tensors) is read through a DataLoader in each trial "
                        "instead of loaded once (default 8G)")
    o = p.add_argument_group("output")
    o.add_argument("--results-dir", default="results", metavar="FOLDER",
                   help="where experiment folders go (default results/)")
    o.add_argument("--name",
                   help="experiment name (default: search-<date>-<time>); the same name resumes an interrupted search")
    o.add_argument("--restart", action="store_true",
                   help="start the named experiment anew; the old folder is kept as <name>.replaced-<time>")
    o.add_argument("--top", type=positive_int, default=5, metavar="K",
                   help="trials drawn in the report's learning curves (default 5)")
    o.add_argument("--confirm-seeds", type=non_negative_int, default=0, metavar="N",
                   help="re-train the best configuration with N new seeds and report mean and spread (default 0)")
    o.add_argument("--tensorboard", action="store_true",
                   help="also write each trial's metrics and hyperparameters to results/<name>/tensorboard/")
    add_tracker_args(o, "also log")
    o.add_argument("--quiet", action="store_true", help="print only the summary: no line per trial, no live line")
    o.add_argument("--verbose", action="store_true", help="Ray's own progress tables and logs as well")
    return p


def settings_from_args(args: argparse.Namespace) -> SearchSettings:
    return SearchSettings(
        samples=args.samples or (SMOKE_SAMPLES if args.smoke_test else DEFAULT_SAMPLES),
        sampler=args.sampler,
        seed=args.seed,
        objective=args.objective,
        challenge_window=args.challenge_window,
        warm_start=args.warm_start,
        baseline=not args.no_baseline,
        center=not args.no_center,
        early_stop=not args.no_early_stop,
        stopping=args.stopping,
        until_converged=args.until_converged,
        grace=(args.grace_period if isinstance(args.grace_period, Grace) or args.grace_period is None
               else Grace.parse(args.grace_period)),
        reduction_factor=args.reduction_factor,
        time_budget=args.time_budget,
        smoke_test=args.smoke_test,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        max_concurrent=args.max_concurrent,
        arrays=args.arrays,
        max_failures=args.max_failures,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        address=args.address,
        storage=args.storage,
        data_memory=args.data_memory if isinstance(args.data_memory, int) else parse_size(args.data_memory),
        results_dir=args.results_dir,
        name=args.name,
        restart=args.restart,
        top=args.top,
        confirm_seeds=args.confirm_seeds,
        tensorboard=args.tensorboard,
        mlflow=args.mlflow,
        wandb=args.wandb,
        quiet=args.quiet,
        verbose=args.verbose,
        cache_dir=args.cache_dir,
    )


def base_from_args(args: argparse.Namespace) -> TrainConfig:
    """The base configuration: --config (or the tutorial's), then the data, model and precision flags."""
    overrides: dict[str, Any] = {**data_overrides(args)}
    if args.precision:
        overrides["precision"] = args.precision
    if args.model:
        overrides["model"] = args.model
    if args.loop:
        overrides["loop"] = args.loop
    return base_config(args.config, overrides, args.model_arg, smoke_test=args.smoke_test)


def base_config(config: str | None = None, overrides: dict[str, Any] | None = None,
                model_args: Sequence[tuple[str, Any]] = (), smoke_test: bool = False) -> TrainConfig:
    """`config` (a YAML path; None: the tutorial's) with `overrides` (TrainConfig fields) and
    `model_args` on top; a smoke test's data is synthetic unless given, and it trains 2 epochs.
    Data paths are kept as the user gave them (relative to the working directory), so the
    experiment folder holds no absolute path; trials get the data through Ray's object store."""
    base = TrainConfig.load(config) if config else TrainConfig()
    overrides = dict(overrides or {})
    if model_args:
        overrides["model_args"] = {**base.model_args, **dict(model_args)}
    if smoke_test:
        overrides.setdefault("data", "synthetic")
        overrides["epochs"] = 2  # the baseline too
    return base.with_updates(**overrides)


def resume_command(prog: str, argv: Sequence[str], name: str | None) -> str:
    """The command that continues this experiment: the user's, with --name, without --restart."""
    argv = [a for a in argv if a != "--restart"]
    return command_line(prog, argv if "--name" in argv or name is None else [*argv, "--name", name])


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    try:
        settings = settings_from_args(args)
    except driver.INPUT_ERRORS as exc:
        return fail(prog, str(exc))
    return search(settings, lambda: base_from_args(args), args.space,
                  lambda name: resume_command(prog, argv, name), prog=prog)


def search(settings: SearchSettings, base: Callable[[], TrainConfig], space: str | None,
           command: Callable[[str], str], prog: str = PROG) -> int:
    """A search from typed settings, the one way every command starts one: the settings named, the
    space (`space`, a YAML file or a reference; None: the default), the base configuration, and the
    driver's exit status. `base` is called after the space is read, `command` with the search's
    name (what continues it, for messages). Bad input is one line on stderr and exit status 2."""
    try:
        settings = settings.named()
        loaded = load_space(space) if space else default_space(settings.smoke_test)
        if settings.smoke_test:
            loaded = smoke(loaded)
        inputs = driver.Inputs(space=loaded, base=base(), command=command(settings.name))
        outcome = driver.run(settings, inputs, prog=prog)
    except (*driver.INPUT_ERRORS, driver.InputError) as exc:
        return fail(prog, str(exc))
    return outcome.status


def supervised_main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    """main, run from a shell: the search runs in a child process this one watches
    (tuning/supervisor.py), so that a killed search leaves no Ray behind and its folder unlocked."""
    from tuning import supervisor

    return supervisor.command(lambda: main(argv, prog), prog)
