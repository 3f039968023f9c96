"""Trial arrays in a search (`--arrays K`): K trials at a time trained together, as one stacked
model (`trainable/arrays.py`), by one Ray actor that holds the device, the ArrayServer.

Each member is still a Ray Tune trial of its own: one Optuna trial, one line of the journal and of
the CSV files, its own checkpoint every epoch, stopped by ASHA or the stall rule like any trial,
resumed after a SIGKILL from its checkpoint. What changes is where its epochs run: the trial
(`ArrayMember`, a stand-in for the Trainer in tuning/engine/trial.py) sends its configuration and
state to the server and gets back the epoch's metrics and its new state. The server trains the
members whose requests arrived together as one array per batch size, precision and model shape,
rebuilt for each round from the members' states, so that a trial that ASHA stopped simply sends
no more requests and a new one joins at the next round. A round starts when every member seen in
the last round has asked again, or `WAIT_SECONDS` after the first request: a stopped trial costs
the others one wait, once.

Each member's epoch is the epoch its separate run trains (its own seed, data order and learning
rate schedule; `trainable/arrays.py` says how exact), so the search's results do not depend on
who trained alongside whom. Not for a user's own training loop or streamed data (those train as
separate trials, said once).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
import torch

from trainable.config import TrainConfig
from trainable.data import Data
from tuning.engine.usercode import UserCode
from tuning.settings import SearchSettings

WAIT_SECONDS = 0.5  # how long a round waits for members that have not asked again


class ArrayServer:
    """The Ray actor that trains every member's epochs (`ray.remote` applied in `start_server`)."""

    def __init__(self, data: Data, threads: int, challenge_window: int, model: Any = None,
                 wait: float = WAIT_SECONDS) -> None:
        from trainable.hardware import flush_denormals

        self.device = torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
        flush_denormals(self.device)
        torch.set_num_threads(max(1, threads))
        self.tensors = [torch.from_numpy(a) for a in (data.train_inputs, data.train_labels, data.test_inputs,
                                                      data.test_labels)]
        self.input_shape, self.num_classes = data.input_shape, data.num_classes
        self.challenge_window, self.model, self.wait = challenge_window, model, wait
        self.cond = threading.Condition()
        self.pending: dict[int, tuple[str, TrainConfig, dict[str, Any] | None]] = {}
        self.results: dict[int, tuple[dict[str, Any], dict[str, Any]] | BaseException] = {}
        self.last_round: set[str] = set()  # members in the last round: who the next one waits for
        self.first_request = 0.0
        self.busy = False
        self.tickets = 0
        self.rounds: list[dict[str, Any]] = []  # what each round trained together, for tests and the bench
        self.kept: dict[tuple, tuple[tuple[str, ...], Any]] = {}  # last round's arrays, by group

    def epoch(self, member: str, config: dict[str, Any], state: dict[str, Any] | None) -> tuple[dict, dict]:
        """Train `member`'s next epoch (after `state`, a Trainer checkpoint, or its first) with
        whoever else asks at about the same time; its metrics and its new state."""
        with self.cond:
            ticket = self.tickets = self.tickets + 1
            if not self.pending:
                self.first_request = time.monotonic()
            self.pending[ticket] = (member, TrainConfig.from_dict(config), state)
            self.cond.notify_all()
            while ticket not in self.results:
                waiting = {m for m, _, _ in self.pending.values()}
                due = self.first_request + self.wait - time.monotonic()
                if not self.busy and self.pending and (self.last_round <= waiting or due <= 0):
                    batch, self.pending = self.pending, {}
                    self.busy = True
                    self.cond.release()
                    try:
                        done = self._round(batch)
                    finally:
                        self.cond.acquire()
                        self.busy = False
                    self.results.update(done)
                    self.last_round = {batch[t][0] for t, r in done.items()  # who will ask again
                                       if not isinstance(r, BaseException) and not _last_epoch(r[0], batch[t][1])}
                    self.cond.notify_all()
                else:
                    self.cond.wait(timeout=max(0.01, due) if not self.busy else None)
            result = self.results.pop(ticket)
        if isinstance(result, BaseException):
            raise result
        return result

    def _round(self, batch: dict[int, tuple[str, TrainConfig, dict[str, Any] | None]]) -> dict[int, Any]:
        """One epoch of every member in `batch`: one array per group that can share a stack."""
        from trainable.fit import autocast_dtype

        groups: dict[tuple, list[int]] = {}
        for ticket, (_, config, _) in batch.items():
            key = (config.batch_size, str(autocast_dtype(config.precision, self.device)), config.model,
                   tuple(sorted((k, repr(v)) for k, v in (config.model_args or {}).items())))
            groups.setdefault(key, []).append(ticket)
        done: dict[int, Any] = {}
        kept: dict[tuple, tuple[tuple[str, ...], Any]] = {}
        for key, tickets in groups.items():
            tickets.sort(key=lambda t: batch[t][0])  # by member: the same stack order round after round
            members = tuple(batch[t][0] for t in tickets)
            configs = [batch[t][1] for t in tickets]
            try:
                trainer = self._trainer(key, members, configs, [batch[t][2] for t in tickets])
                metrics = trainer.run_epoch()
                for m in metrics.values():
                    m["array_members"] = len(tickets)  # trained together this epoch (journalled, in epochs.csv)
                for i, t in enumerate(tickets):  # states go back to the trial's process: on the CPU
                    done[t] = (metrics[i], _on_cpu(trainer.member_state_dict(i)) if i in trainer.members
                               else _final_state(trainer, i, batch[t][2]))
                kept[key] = (members, trainer)
                self.rounds.append({"members": list(members), "batch_size": configs[0].batch_size})
            except Exception as exc:  # noqa: BLE001 - each member's trial reports it as its own failure
                for t in tickets:
                    done[t] = exc
        self.kept = kept
        return done

    def _trainer(self, key: tuple, members: tuple[str, ...], configs: list[TrainConfig],
                 states: list[dict[str, Any] | None]) -> Any:
        """The array for these members: last round's, kept as it is, where the same members come back
        with the states it gave them (the usual case: building and loading cost ~15% of an epoch of
        the tutorial's MLP on a 2-core CPU); else built from their configurations and states."""
        from trainable.arrays import ArrayTrainer

        previous = self.kept.get(key)
        if previous is not None and previous[0] == members:
            trainer = previous[1]
            if all(i in trainer.members and state is not None and len(state["history"]) == trainer.epochs_done(i)
                   for i, state in enumerate(states)):
                return trainer
        trainer = ArrayTrainer(configs, *self.tensors, input_shape=self.input_shape, num_classes=self.num_classes,
                               device=self.device, challenge_window=self.challenge_window,
                               build=_builder(self.model, self.input_shape, self.num_classes))
        for i, state in enumerate(states):
            if state is not None:
                trainer.load_member_state(i, state)
        return trainer

    def trained_together(self) -> list[dict[str, Any]]:
        return list(self.rounds)

    def device_type(self) -> str:
        return self.device.type


def _last_epoch(metrics: dict[str, Any], config: TrainConfig) -> bool:
    return metrics["epoch"] >= config.epochs or bool(metrics.get("diverged"))


def _builder(model: Any, input_shape: Any, num_classes: int) -> Any:
    """ArrayTrainer's `build` for a model factory given as a callable; None: the configuration names it."""
    if model is None:
        return None
    from trainable.models import build_model

    return lambda config: build_model(model, config.model_args, input_shape, num_classes)


def _on_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_on_cpu(v) for v in value]
    return value


def _final_state(trainer: Any, member: int, before: dict[str, Any] | None) -> dict[str, Any]:
    """A member that diverged has left the stack: its history is kept, its weights are not worth
    a checkpoint (its separate run stops there too), so the state it came with, history updated."""
    return {**(before or {}), "history": trainer.history(member)}


def why_not(data: Any, loop: Any, base: TrainConfig, model: Any = None) -> str | None:
    """Why this search's trials cannot train as arrays (then they train separately), or None.
    The model is tried: two members of the base configuration, one epoch on a few batches."""
    if loop is not None:
        return "a training loop of your own trains each trial itself"
    if not all(hasattr(data, name) for name in ("train_inputs", "train_labels", "test_inputs", "test_labels")):
        return "the data set is streamed from its Dataset, not held as tensors"
    from trainable.arrays import ArrayTrainer

    n = 2 * base.batch_size
    tensors = [torch.from_numpy(a[:n]) for a in (data.train_inputs, data.train_labels, data.test_inputs,
                                                 data.test_labels)]
    build = _builder(model, data.input_shape, data.num_classes)
    try:
        ArrayTrainer([base.with_updates(epochs=1), base.with_updates(epochs=1, seed=base.seed + 1)], *tensors,
                     input_shape=data.input_shape, num_classes=data.num_classes, device="cpu", build=build).run_epoch()
    except Exception as exc:  # noqa: BLE001 - what torch.func or the stacking said, in the note
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"the model cannot be trained as a stack of models ({type(exc).__name__}: {first[:200]})"
    return None


@dataclass(frozen=True)
class ArrayPlan:
    """The one seam between the search and --arrays: what each trial asks of Ray, how many trials
    run at once, and the stand-in each trial trains with instead of a Trainer."""

    server: Any  # the ArrayServer actor
    resources: dict[str, float]
    max_concurrent: int

    def trainer(self, config: TrainConfig, trial_id: str) -> ArrayMember:
        return ArrayMember(self.server, trial_id, config)


def plan_arrays(settings: SearchSettings, data: Data, base: TrainConfig, code: UserCode,
                res: dict[str, float]) -> ArrayPlan | None:
    """The search's arrays, or None: without --arrays, or where they cannot apply (said once, and
    the trials train separately)."""
    if settings.arrays <= 1:
        return None
    reason = why_not(data, base.loop or code.loop, base, code.model)
    if reason:
        print(f"hptune: note: --arrays {settings.arrays}: {reason}, so trials train separately", file=sys.stderr,
              flush=True)
        return None
    server = start_server(data, settings.arrays, res, settings.challenge_window, code.model)  # it holds the device
    return ArrayPlan(server, {"cpu": res["cluster_cpus"] / settings.arrays, "gpu": 0.0},
                     min(settings.max_concurrent or settings.arrays, settings.arrays))


def start_server(data: Data, members: int, res: dict[str, float], challenge_window: int, model: Any = None) -> Any:
    """The search's ArrayServer, on one device: a whole GPU where the cluster has one, else CPUs
    (torch threads: the CPUs `members` trials would have had, at most the cluster's)."""
    gpus = min(1.0, res["cluster_gpus"])
    threads = max(1, min(int(res["cluster_cpus"]), int(res["cpu"] * members)))
    actor = ray.remote(ArrayServer).options(num_cpus=0, num_gpus=gpus, max_concurrency=max(64, 4 * members))
    return actor.remote(data, threads, challenge_window, model)


class ArrayMember:
    """A trial's stand-in for the Trainer when its epochs run in the ArrayServer: `run()`,
    `history`, `state_dict()`, `load_state_dict()` and `data_device`, as tuning/engine/trial.py uses them."""

    def __init__(self, server: Any, member: str, config: TrainConfig) -> None:
        self.server, self.member, self.config = server, member, config
        self._state: dict[str, Any] | None = None
        self.history: list[dict[str, Any]] = []
        self._device: str | None = None

    @property
    def data_device(self) -> str:
        """Where the data and the array live: the server's device."""
        if self._device is None:
            self._device = ray.get(self.server.device_type.remote())
        return self._device

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = state
        self.history = [dict(m) for m in state.get("history", [])]

    def state_dict(self) -> dict[str, Any]:
        assert self._state is not None
        return self._state

    def run(self) -> Iterator[dict[str, Any]]:
        while not (self.history and _last_epoch(self.history[-1], self.config)):
            metrics, self._state = ray.get(self.server.epoch.remote(self.member, self.config.to_dict(), self._state))
            self.history = [dict(m) for m in self._state["history"]]
            yield metrics
