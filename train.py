"""Train a continuous normalizing flow (optionally pruned or gated).

    .venv/bin/python train.py CONFIG --out RUN_DIR [--set KEY=VALUE ...] [--resume]

The documented entry point; the same command is installed as ``cnf-train``. Its
arguments, configuration and run are in :mod:`cnf_prune.commands.train`, the loop
in :mod:`cnf_prune.trainer`.
"""

import sys

from cnf_prune.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
