"""python -m trainable: `hptune train`, whose command is tuning/commands/train.py."""

import sys

from tuning.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
