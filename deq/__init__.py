"""deq: Deep Equilibrium Models in PyTorch: solvers and their registry, the implicit layer, the
CIFAR-10 classifier. The library imports no UI: the web demo's logic lives in ``deq.demo``."""

from .data import CIFAR10_CLASSES
from .layer import BACKWARD_MODES, DEQFixedPoint, DEQInfo, spectral_radius, unroll
from .model import ARCHITECTURES, Architecture, DEQClassifier, ModelConfig, ResNetCell, register_architecture
from .solvers import (
    SOLVERS,
    PerSample,
    Solver,
    SolverStats,
    anderson,
    broyden,
    forward_iteration,
    get_solver,
    register_solver,
    unregister_solver,
)

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "BACKWARD_MODES",
    "CIFAR10_CLASSES",
    "DEQClassifier",
    "DEQFixedPoint",
    "DEQInfo",
    "ModelConfig",
    "PerSample",
    "ResNetCell",
    "SOLVERS",
    "Solver",
    "SolverStats",
    "anderson",
    "broyden",
    "forward_iteration",
    "get_solver",
    "register_architecture",
    "register_solver",
    "spectral_radius",
    "unregister_solver",
    "unroll",
]
