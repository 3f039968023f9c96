"""How trials read on the console: one line per trial, the same words in the summary; and the
search's listener that prints them as trials end (under a live line on a terminal)."""

from __future__ import annotations

import time
from typing import Any

from trainable.fit import slow_epoch_text, slow_epochs
from tuning.results.experiment import Experiment
from tuning.results.journal import TrialRecord
from tuning.results.listener import Listener, TrialStart
from tuning.results.progress_line import LineState, LiveLine, estimate_seconds_left

# How the search shows its progress: a live line above which ended trials are printed (a terminal),
# one plain line per ended trial (not a terminal), or nothing until the summary (--quiet).
LIVE, LINES, QUIET = "live", "lines", "quiet"


def fmt_params(config: dict[str, Any]) -> str:
    """'lr 2.74e-02 cosine batch_size 128 epochs 16 nesterov momentum 0.83 weight_decay 3e-05' (+ model.NAME)."""
    opt = config["optimizer"]
    momentum = f" momentum {config['momentum']:.2f}" if opt in ("sgd", "nesterov") and config["momentum"] else ""
    schedule = " cosine" if config.get("schedule") == "cosine" else ""
    model = "".join(f" model.{k} {_value(v)}" for k, v in (config.get("model_args") or {}).items())
    return (f"lr {config['lr']:.2e}{schedule} batch_size {config['batch_size']} epochs {config['epochs']} "
            f"{opt}{momentum} weight_decay {config['weight_decay']:.0e}{model}")


def _value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def fmt_result(t: TrialRecord) -> str:
    last = t.last
    if last is None:
        return f"no epoch finished ({t.error or t.status})"
    acc = last.get("test_accuracy")
    losses = f"train_loss {_num(last.get('train_loss'))} test_loss {_num(last.get('test_loss'))}"
    return f"test_accuracy {100 * acc:.1f}% {losses}" if acc is not None else losses


def _num(value: Any) -> str:
    return "nan" if value is None else f"{value:.4f}"


def fmt_objective(value: float, objective: str) -> str:
    """An objective's value as the summary shows it: 55.6% for an accuracy, 1.2586 for a loss."""
    return f"{100 * value:.1f}%" if objective == "test_accuracy" else f"{value:.4f}"


def fmt_difference(value: float, objective: str) -> str:
    """A difference of objectives: 0.2 points of accuracy, 0.0123 of a loss."""
    return f"{100 * value:.1f} points" if objective == "test_accuracy" else f"{value:.4f}"


def baseline_label(config: dict[str, Any]) -> str:
    """How the summary names the baseline: the tutorial's configuration, or the base one."""
    from trainable.config import TRAINING_HYPERPARAMETERS, TrainConfig

    try:
        given = TrainConfig.from_dict({k: v for k, v in config.items() if k != "data" or v})
    except ValueError:
        return "the base configuration"
    tutorial = TrainConfig()
    args = dict(given.model_args)
    same = (all(getattr(given, k) == getattr(tutorial, k) for k in TRAINING_HYPERPARAMETERS)
            and given.model == tutorial.model and args.pop("hidden", [512, 512]) == [512, 512] and not args)
    return "the tutorial's configuration" if same else "the base configuration"


class Console(Listener):
    """One line per ended trial (its hyperparameters, result, status and the best so far), a
    warning as soon as an epoch takes more than 3x its trial's first, and on a terminal a live
    line with the trials running and the time left."""

    def __init__(self, experiment: Experiment, *, output: str = LINES, slots: float = 1.0) -> None:
        self.samples = experiment.settings.samples
        self.output = output
        self.slots = slots
        earlier = experiment.trials  # a resumed search starts from what is done
        self.done_trials = [t for t in earlier if t.done]
        self.best: TrialRecord | None = experiment.best
        self.numbers: dict[str, int | None] = {}  # Ray id -> trial number
        self.first_epoch: dict[str, dict] = {}  # Ray id -> its epoch 1 result, to spot stalls
        # for the live line: measured in this run, or read from the journal
        self.running: dict[str, list[float]] = {}  # Ray id -> [epochs done, epochs planned, time of last report]
        self.seconds_per_epoch: list[float] = []
        self.line = LiveLine(self.samples, len(self.done_trials)) if output == LIVE else None

    def trial_started(self, start: TrialStart) -> None:
        self.numbers[start.trial] = start.number
        self.running[start.trial] = [start.resumes_after, start.config.get("epochs", 0), time.time()]
        self._show()

    def epoch(self, trial: str, metrics: dict[str, Any]) -> None:
        state = self.running.get(trial)
        if state is not None and metrics.get("epoch") is not None:
            now = time.time()
            epochs = metrics["epoch"] - state[0]
            if epochs > 0:  # wall time per epoch, the trial's start and reporting included
                self.seconds_per_epoch.extend([(now - state[2]) / epochs] * int(epochs))
            state[0], state[2] = metrics["epoch"], now
        self._warn_if_slow(trial, metrics)
        self._show()

    def _warn_if_slow(self, trial: str, metrics: dict[str, Any]) -> None:
        """Say so at once when an epoch takes more than 3x its trial's first: a stall is seen, not waited out."""
        if metrics.get("epoch") == 1:
            self.first_epoch[trial] = metrics
            return
        first = self.first_epoch.get(trial)
        if first is not None and slow_epochs([first, metrics]) and self.output != QUIET:
            number = self.numbers.get(trial)
            self._print(f"[slow] trial {'?' if number is None else number}: {slow_epoch_text([first, metrics])}")

    def trial_ended(self, trial: str, experiment: Experiment) -> None:
        self.running.pop(trial, None)
        all_trials = experiment.trials
        self.done_trials = [t for t in all_trials if t.done]
        self.best = experiment.best
        this = next((t for t in all_trials if t.trial == trial or trial in t.aliases), None)
        if this is not None and self.output != QUIET:
            best, ended = self.best, len(self.done_trials)
            met = " challenge met" if (this.last or {}).get("challenge_met") else ""
            slow = f" | {slow_epoch_text(this.epochs)}" if slow_epochs(this.epochs) else ""
            best_text = f"best so far: trial {best.number} ({fmt_result(best)})" if best is not None else ""
            self._print(f"[{ended:>3}/{self.samples}] trial {this.number:>3}{' (baseline)' if this.baseline else ''}: "
                        f"{fmt_params(this.config)} | {fmt_result(this)} | {this.status}{met}{slow} | {best_text}")
        self._show()

    def close(self) -> None:
        if self.line is not None:
            self.line.close()
            self.line = None

    def line_state(self) -> LineState:
        """What the live line shows, from what this listener has seen."""
        running = [(int(done), int(planned)) for done, planned, _ in self.running.values()]
        unstarted = max(self.samples - len(self.done_trials) - len(running), 0)
        ended_epochs = [len(t.epochs) for t in self.done_trials]
        left = estimate_seconds_left(self.seconds_per_epoch, running, unstarted, ended_epochs, self.slots)
        acc = (self.best.last or {}).get("test_accuracy") if self.best is not None else None
        best = f"trial {self.best.number} test_accuracy {100 * acc:.1f}%" if acc is not None else ""
        return LineState(self.samples, len(self.done_trials), len(running), best, left)

    def _print(self, line: str) -> None:
        if self.line is not None:
            self.line.write(line)
        else:
            print(line, flush=True)

    def _show(self) -> None:
        if self.line is not None:
            self.line.show(self.line_state())
