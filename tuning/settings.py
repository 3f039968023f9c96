"""SearchSettings: how ONE search runs, as one frozen dataclass.

Built from the command line (`hptune search`, `python tuning/search.py`) or from the Python API
(`tuning.search(...)`), stored in the experiment's `experiment.json` and read back typed
(`Experiment.settings`). Everything below the command line takes this object, never argparse's
namespace. What a trial trains (learning rate, model, data, ...) is the TrainConfig and the
search space, not these settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from trainable.errors import UsageError
from tuning.noise import GRACE
from tuning.objective import DEFAULT_OBJECTIVE, OBJECTIVES

SAMPLERS = ("tpe", "random", "cmaes", "gp", "qmc")
# who stops a trial early (tuning/engine/schedulers.py): the noise rule, Ray Tune's ASHA, Syne Tune's
STOPPING = ("noise", "asha", "syne-asha")
DEFAULT_SAMPLES, SMOKE_SAMPLES = 20, 3
# the first point a trial is judged at, by stopping rule, unless --grace-period says (a share of its schedule)
DEFAULT_GRACE = {"noise": GRACE, "asha": 0.25, "syne-asha": 0.25}
# Splits larger than this (bytes, as tensors) are not loaded into memory once for all trials: each
# trial reads a map-style Dataset through a DataLoader instead (--data-memory raises it).
DEFAULT_DATA_MEMORY = 8 << 30


@dataclass(frozen=True)
class Grace:
    """ASHA's first rung: a share of each trial's schedule (`progress`), or a number of epochs."""

    time_attr: str  # "progress" (epoch / epochs, 0..1) or "epoch"
    value: float

    @classmethod
    def parse(cls, text: str | int | float) -> Grace:
        """"25%" (of each trial's schedule) or "3" / 3 (epochs); ValueError otherwise."""
        text = str(text).strip()
        try:
            if text.endswith("%"):
                share = float(text[:-1]) / 100
                if 0 < share < 1:
                    return cls("progress", share)
            elif int(text) >= 1:
                return cls("epoch", int(text))
        except ValueError:
            pass
        raise ValueError(f"expected a share of the schedule such as 25% (above 0, below 100) "
                         f"or a whole number of epochs, got {text!r}")

    def __str__(self) -> str:
        return f"{100 * self.value:g}%" if self.time_attr == "progress" else str(int(self.value))


@dataclass(frozen=True)
class SearchSettings:
    """Every option of a search; the defaults are those of `python tuning/search.py`."""

    # what is searched, and how
    samples: int = DEFAULT_SAMPLES  # trials in all, the baseline included
    sampler: str = "tpe"  # one of SAMPLERS
    seed: int = 0  # the sampler's seed; training seeds come from the configuration
    objective: str = DEFAULT_OBJECTIVE  # what ASHA and Optuna steer by (tuning.objective.OBJECTIVES)
    challenge_window: int = 3  # the train loss must fall in each of the last K epochs
    warm_start: str | None = None  # an earlier experiment folder whose trials the new study is given
    baseline: bool = True  # run the base configuration (the tutorial's by default) first
    center: bool = True  # the first sampled trial is the space's center
    early_stop: bool = True  # the stopping rule and the stall rule
    stopping: str = "noise"  # one of STOPPING
    until_converged: bool = False  # start no new trial once the best can no longer improve beyond its noise
    grace: Grace | None = None  # the first point a trial is judged at (ASHA's first rung); None: DEFAULT_GRACE
    reduction_factor: float = 3.0  # ASHA keeps the best 1/F at each rung
    time_budget: float | None = None  # seconds after which the search stops (running trials: interrupted)
    smoke_test: bool = False  # synthetic data, 3 samples, 2 epochs
    # resources
    cpus_per_trial: float = 1.0  # torch threads follow (whole CPUs)
    gpus_per_trial: float | None = None  # None: 0.25 where the cluster has a GPU, else 0
    max_concurrent: int | None = None  # None: as resources allow
    arrays: int = 0  # K > 1: trials train K at a time as one stacked model (tuning/engine/arrays.py)
    max_failures: int = 2  # retries of a trial that raises, from its last checkpoint
    num_cpus: int | None = None  # local cluster only
    num_gpus: int | None = None  # local cluster only
    address: str | None = None  # None: a private local Ray; "auto" or HOST:PORT: join that cluster
    storage: str | None = None  # Ray's checkpoints (a path or URI every node reaches); None: <folder>/ray
    data_memory: int = DEFAULT_DATA_MEMORY  # bytes: larger map-style data sets are read per trial
    # output
    results_dir: str = "results"
    name: str | None = None  # None: search-<date>-<time>
    restart: bool = False  # start the named experiment anew (the old folder is kept aside)
    top: int = 5  # trials drawn in the report's learning curves
    confirm_seeds: int = 0  # re-train the winner with N new seeds
    tensorboard: bool = False
    mlflow: str | None = None  # a tracking URI; "": $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here
    wandb: str | None = None  # a W&B project: a run per trial, grouped by the search
    quiet: bool = False  # only the summary
    verbose: bool = False  # Ray's own output too
    cache_dir: str | None = None  # decoded image folders (default ~/.cache/hptune)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """UsageError (one line, exit 2) for settings that contradict themselves or the tool."""
        if self.samples < 1:
            raise UsageError(f"samples must be >= 1, got {self.samples}")
        if self.stopping not in STOPPING:
            raise UsageError(f"stopping must be one of {', '.join(STOPPING)}, got {self.stopping!r}")
        if self.sampler not in SAMPLERS:
            raise UsageError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.objective not in OBJECTIVES:
            raise UsageError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.challenge_window < 1:
            raise UsageError(f"challenge window must be >= 1, got {self.challenge_window}")
        if self.gpus_per_trial is not None and self.gpus_per_trial < 0:
            raise UsageError(f"--gpus-per-trial must be >= 0, got {self.gpus_per_trial}")
        if self.gpus_per_trial is not None and self.gpus_per_trial > 1:
            raise UsageError(f"--gpus-per-trial {self.gpus_per_trial:g}: a trial trains on one device, "
                             "so at most 1 (a fraction shares a GPU)")
        if self.cpus_per_trial <= 0:
            raise UsageError(f"--cpus-per-trial must be > 0, got {self.cpus_per_trial}")
        if self.reduction_factor <= 1:
            raise UsageError(f"--reduction-factor must be > 1, got {self.reduction_factor}")
        if self.address and self.address.startswith("ray://"):
            raise UsageError("--address ray://...: Ray Client runs Tune on the head node, away from this folder's "
                             "journal; run the search on the head node with --address auto")
        if self.address and (self.num_cpus or self.num_gpus is not None):
            raise UsageError("--num-cpus/--num-gpus describe a local cluster; "
                             "with --address the cluster's own resources are used")
        if self.time_budget is not None and self.time_budget <= 0:
            raise UsageError(f"--time-budget must be > 0 seconds, got {self.time_budget}")
        if self.quiet and self.verbose:
            raise UsageError("--quiet and --verbose contradict each other; choose one")
        if self.max_failures < 0 or self.confirm_seeds < 0 or self.top < 1:
            raise UsageError("max_failures and confirm_seeds must be >= 0, top >= 1")
        if self.arrays < 0 or self.arrays > 1024:
            raise UsageError(f"--arrays must be 0 (off) to 1024 members, got {self.arrays}")
        if self.data_memory < 0:
            raise UsageError(f"--data-memory must be >= 0, got {self.data_memory}")

    @property
    def mode(self) -> str:
        """'max' or 'min': the direction of the objective."""
        return OBJECTIVES[self.objective][1]

    def grace_period(self) -> Grace:
        """The grace period in force: --grace-period, or the stopping rule's own (DEFAULT_GRACE)."""
        return self.grace if self.grace is not None else Grace("progress", DEFAULT_GRACE.get(self.stopping, 0.25))

    def named(self) -> SearchSettings:
        """These settings with a name: their own, or `search-YYYYmmdd-HHMMSS` (now) if they have none."""
        if self.name is not None:
            return self
        import datetime as dt

        return self.replace(name=dt.datetime.now().strftime("search-%Y%m%d-%H%M%S"))

    def replace(self, **changes: Any) -> SearchSettings:
        return dataclasses.replace(self, **changes)

    # --- experiment.json ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["grace"] = None if self.grace is None else str(self.grace)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SearchSettings:
        """Settings as stored in experiment.json; keys this version does not know are ignored
        (a folder written by a newer version still opens), missing ones take the defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in values.items() if k in known}
        if kept.get("grace") is not None and not isinstance(kept["grace"], Grace):
            kept["grace"] = Grace.parse(kept["grace"])
        return cls(**kept)

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed search must share with the run it continues."""
        return {
            "samples": self.samples,
            "sampler": self.sampler,
            "seed": self.seed,
            "objective": self.objective,
            "challenge_window": self.challenge_window,
            "baseline": self.baseline,
            "early_stop": self.early_stop,
            "stopping": self.stopping,
            "until_converged": self.until_converged,
            "warm_start": self.warm_start,
        }


def parse_size(text: str) -> int:
    """'8G', '512M', '2.5GB', '1000000' -> bytes; ValueError otherwise."""
    units = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in units and value[-1:] else ""
    number = value[: -len(unit)] if unit else value
    try:
        size = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"expected a size such as 8G, 512M or 1000000 (bytes), got {text!r}") from None
    if size < 0:
        raise ValueError(f"a size must be >= 0, got {text!r}")
    return int(size)


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
