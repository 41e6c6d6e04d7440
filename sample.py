"""Draw samples from a trained flow.

    .venv/bin/python sample.py CHECKPOINT --out PATH [--n N] [--temperature T] [--seed S] [--tol TOL]

The documented entry point; the same command is installed as ``cnf-sample``
(see :mod:`cnf_prune.commands.sample` for every option).
"""

import sys

from cnf_prune.commands.sample import main

if __name__ == "__main__":
    sys.exit(main())
