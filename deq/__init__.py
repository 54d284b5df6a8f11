"""deq: Deep Equilibrium Models in PyTorch (solvers, implicit layer, CIFAR-10 classifier)."""

from .layer import BACKWARD_MODES, DEQFixedPoint, DEQInfo, unroll
from .model import CIFAR10_CLASSES, DEQClassifier, ModelConfig, ResNetCell
from .solvers import SOLVERS, SolverStats, anderson, broyden, forward_iteration, get_solver

__all__ = [
    "BACKWARD_MODES",
    "CIFAR10_CLASSES",
    "DEQClassifier",
    "DEQFixedPoint",
    "DEQInfo",
    "ModelConfig",
    "ResNetCell",
    "SOLVERS",
    "SolverStats",
    "anderson",
    "broyden",
    "forward_iteration",
    "get_solver",
    "unroll",
]
