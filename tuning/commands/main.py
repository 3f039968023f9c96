"""hptune: the command on the PATH (`pip install -e .` puts it there). One subcommand per job;
each is a function `main(argv, prog) -> int` of a module in tuning/commands/, imported only when it runs."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from trainable.errors import USAGE_ERROR

# subcommand -> (module with main(argv, prog), or MODULE:FUNCTION, what it does)
COMMANDS = {
    "search": ("tuning.commands.search", "search hyperparameters (the tutorial's MLP, or your own model and data)"),
    "train": ("tuning.commands.train", "train one configuration without Ray, e.g. a search's best_config.yaml"),
    "show": ("tuning.commands.show", "the summary of an experiment folder, finished, interrupted or running"),
    "report": ("tuning.commands.report", "figures and an HTML page from an experiment folder"),
    "export": ("tuning.commands.export", "rewrite an experiment's trials.csv, epochs.csv and best_config.yaml"),
    "compare": ("tuning.commands.compare", "search strategies side by side on the same data and budget"),
    "bench": ("tuning.commands.bench:epoch_main", "an epoch against the tutorial's and against this machine's floor"),
    "bench-search": ("tuning.commands.bench:search_main", "how much of a search's time goes to training"),
    "bench-arrays": ("tuning.commands.bench:arrays_main", "K trials one after another against one trial array of K"),
    "explain": ("tuning.commands.explain", "why the tutorial saw its test loss below its train loss"),
    "loadtest": ("tuning.commands.loadtest", "many tiny trials: all accounted for, driver memory flat"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: hptune COMMAND [options]    (hptune COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "examples:", "  hptune search --samples 20", "  hptune show results/<name>",
              "  hptune train --config results/<name>/best_config.yaml", "", "options:",
              "  -h, --help  this list", "  --version   the installed version"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else USAGE_ERROR
    if argv[0] == "--version":
        import hptune  # imports neither torch nor Ray

        print(f"hptune {hptune.__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"hptune: error: unknown command {name!r} (commands: {', '.join(COMMANDS)}; see hptune --help)",
              file=sys.stderr)
        return USAGE_ERROR
    prog = f"hptune {name}"
    module, _, function = COMMANDS[name][0].partition(":")

    def run() -> int:
        return getattr(importlib.import_module(module), function or "main")(argv[1:], prog=prog)

    try:
        if name == "search" and from_command_line:
            from tuning.commands.search import supervised_main

            return supervised_main(argv[1:], prog)
        return run()
    except BrokenPipeError:  # `hptune show ... | head`: the reader left; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
