"""python tuning/search.py --samples 20: the tutorial's entry point, the same as `hptune search`.

Kept for the tutorial's users; `hptune search --help` lists every flag. The package must be
installed (`pip install -e .`), which also puts `hptune` on the PATH.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

PROG = "python tuning/search.py"


def main(argv: Sequence[str] | None = None) -> int:
    from tuning.commands.search import main as search

    return search(argv, prog=PROG)


if __name__ == "__main__":
    from tuning.commands.search import supervised_main

    sys.exit(supervised_main(prog=PROG))
