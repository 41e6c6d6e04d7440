"""FFJORD-style continuous normalizing flows that measure NFE and the cumulative
Jacobian norm. The public surface is re-exported here; see docs/python_api.md."""

from cnf.base import GaussianMixture, StandardNormal, fit_base
from cnf.conv import ConvField
from cnf.divergence import Exact, Hutchinson
from cnf.fields import MLPField, VectorField
from cnf.flow import Flow, FlowTrace
from cnf.model import build_flow
from cnf.multiscale import MultiscaleFlow
from cnf.odeblock import CNFBlock
from cnf.solver import Solver

__all__ = [
    "CNFBlock", "ConvField", "Exact", "Flow", "FlowTrace", "GaussianMixture", "Hutchinson",
    "MLPField", "MultiscaleFlow", "Solver", "StandardNormal", "VectorField", "build_flow", "fit_base",
]
