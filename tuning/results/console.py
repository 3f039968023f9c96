"""How trials read on the console: one line per trial, the same words in the summary."""

from __future__ import annotations

from typing import Any

from tuning.results.journal import TrialRecord


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
