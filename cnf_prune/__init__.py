"""The application above the :mod:`cnf` and :mod:`pruning` libraries: experiment
configs, model building, checkpoints, the trainer and the command-line tools.

For use in Python::

    from cnf_prune import load_flow
    flow = load_flow("runs/demo/best.pt")   # the trained flow, in eval mode
    flow.log_prob(x)                        # exact log-density, nats per example
    flow.sample((1000,))                    # samples (no gradients)
    flow.rsample((16,))                     # samples differentiable w.r.t. the parameters
"""

from cnf_prune.build import build_model, load_flow, load_model
from cnf_prune.config import Config, load_config

__all__ = ["Config", "build_model", "load_config", "load_flow", "load_model"]
