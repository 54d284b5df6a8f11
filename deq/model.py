"""The classifier: a ResNet-style DEQ cell between a stem and a head, chosen by architecture.

    images (B, 3, S, S) in [0, 1] -> normalise -> stem -> x -> DEQ: z* = f(z*, x) -> head -> logits

``ModelConfig`` (validated, saved as JSON in every checkpoint) rebuilds a model; architectures
are looked up in ``ARCHITECTURES`` (add one with ``register_architecture``); ``predict`` is the
one road from images to logits under any solver settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import Tensor, nn

from .layer import BACKWARD_MODES, DEQFixedPoint, DEQInfo
from .solvers import SolverStats, check_solver_kwargs, lookup

__all__ = [
    "ModelConfig", "ResNetCell", "DEQClassifier", "Architecture", "ARCHITECTURES", "register_architecture",
]  # fmt: skip

#: Per-channel mean and standard deviation the stem's input is normalised with (CIFAR-10's).
INPUT_MEAN = (0.4914, 0.4822, 0.4465)
INPUT_STD = (0.2470, 0.2435, 0.2616)


#: (field, smallest, largest) of ModelConfig's integer fields. The caps keep a hostile config
#: from allocating gigabytes before failing; every shipped model is far inside them.
_INT_RANGES = (
    ("n_channels", 1, 1024), ("n_inner_channels", 1, 2048), ("n_groups", 1, 1024), ("n_classes", 1, 1000),
    ("image_size", 1, 256), ("pool_size", 1, 256), ("phantom_steps", 1, 100),
)  # fmt: skip


def _default_solver_kwargs() -> dict:
    return {"m": 5, "lam": 1e-4, "tol": 1e-2, "max_iter": 25}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a classifier; saved as JSON in every checkpoint."""

    arch: str = "seed"  # a name in ARCHITECTURES: "seed" or "large" (DEQ at 16x16, conv head)
    n_channels: int = 48
    n_inner_channels: int = 64
    n_groups: int = 8
    init_std: float = 0.01
    n_classes: int = 10
    image_size: int = 32
    pool_size: int = 8
    solver: str = "anderson"
    solver_kwargs: dict = field(default_factory=_default_solver_kwargs)
    backward: str = "implicit"
    backward_solver: str | None = None  # None: the forward solver
    backward_kwargs: dict | None = None  # None: the forward solver's options
    phantom_steps: int = 1

    def __post_init__(self) -> None:
        """Check every field's type and range before anything is built: configs come from
        JSON files, also from the Hub (untrusted). Raises ValueError naming the field."""
        if not isinstance(self.arch, str) or self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {sorted(ARCHITECTURES)}, got {self.arch!r}")
        for name, low, high in _INT_RANGES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        for name in ("n_channels", "n_inner_channels"):
            if (value := getattr(self, name)) % self.n_groups:
                raise ValueError(f"{name}={value} must be divisible by n_groups={self.n_groups}")
        if self.n_channels < ARCHITECTURES[self.arch].min_channels:
            raise ValueError(
                f"n_channels must be >= {ARCHITECTURES[self.arch].min_channels} for arch {self.arch!r}, "
                f"got {self.n_channels}"
            )
        if self.image_size % self.pool_size:
            raise ValueError(f"pool_size={self.pool_size} must divide image_size={self.image_size}")
        std = self.init_std
        if not isinstance(std, (int, float)) or isinstance(std, bool) or not 0 <= std < math.inf:
            raise ValueError(f"init_std must be a finite number >= 0, got {std!r}")
        if self.backward not in BACKWARD_MODES:
            raise ValueError(f"backward must be one of {BACKWARD_MODES}, got {self.backward!r}")
        if not isinstance(self.solver_kwargs, dict):
            raise ValueError(f"solver_kwargs must be a dict, got {type(self.solver_kwargs).__name__}")
        check_solver_kwargs(self.solver, self.solver_kwargs, "solver_kwargs")
        if self.backward_solver is not None:
            lookup(self.backward_solver)  # ValueError naming the registered solvers
        if self.backward_kwargs is not None:
            if not isinstance(self.backward_kwargs, dict):
                raise ValueError(
                    f"backward_kwargs must be a dict or null, got {type(self.backward_kwargs).__name__}"
                )
            check_solver_kwargs(self.backward_solver or self.solver, self.backward_kwargs, "backward_kwargs")
            if self.backward_kwargs.get("early_exit"):
                raise ValueError("backward_kwargs: early_exit is for the forward solve only")

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Build from JSON-like data, rejecting unknown keys (never silently dropped)."""
        if not isinstance(data, dict):
            raise ValueError(f"model config must be a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"model config: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> ModelConfig:
        return ModelConfig.from_dict({**self.to_dict(), **changes})


class ResNetCell(nn.Module):
    """f(z, x) = norm3(relu(z + norm2(x + W2 * norm1(relu(W1 * z))))); z, x: (B, C, H, W)."""

    def __init__(self, n_channels: int, n_inner_channels: int, n_groups: int, init_std: float):
        super().__init__()
        for name, value in (("n_channels", n_channels), ("n_inner_channels", n_inner_channels)):
            if value % n_groups:
                raise ValueError(f"{name}={value} must be divisible by n_groups={n_groups}")
        self.conv1 = nn.Conv2d(n_channels, n_inner_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(n_inner_channels, n_channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(n_groups, n_inner_channels)
        self.norm2 = nn.GroupNorm(n_groups, n_channels)
        self.norm3 = nn.GroupNorm(n_groups, n_channels)
        nn.init.normal_(self.conv1.weight, 0.0, init_std)
        nn.init.normal_(self.conv2.weight, 0.0, init_std)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        y = self.norm1(torch.relu(self.conv1(z)))
        return self.norm3(torch.relu(z + self.norm2(x + self.conv2(y))))


# ----------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Architecture:
    """How a classifier wraps its DEQ cell: ``stem(config)`` maps normalised images (B, 3, S, S)
    to the injection x (B, n_channels, H, W); ``head(config)`` maps z* (same shape) to logits."""

    stem: Callable[[ModelConfig], nn.Module]
    head: Callable[[ModelConfig], nn.Module]
    min_channels: int = 1


#: name -> Architecture; ``ModelConfig.arch`` is one of these names.
ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(name: str, architecture: Architecture, *, replace: bool = False) -> None:
    """Make ``architecture`` available as ``ModelConfig(arch=name)``."""
    if name in ARCHITECTURES and not replace:
        raise ValueError(f"architecture {name!r} is already registered (pass replace=True to replace it)")
    ARCHITECTURES[name] = architecture


def _seed_stem(config: ModelConfig) -> nn.Module:  # Conv(3, C) -> BN, at full resolution
    return nn.Sequential(
        nn.Conv2d(3, config.n_channels, 3, padding=1, bias=True), nn.BatchNorm2d(config.n_channels)
    )


def _seed_head(config: ModelConfig) -> nn.Module:  # BN -> AvgPool -> Linear
    c, pooled = config.n_channels, config.image_size // config.pool_size
    return nn.Sequential(
        nn.BatchNorm2d(c),
        nn.AvgPool2d(config.pool_size, config.pool_size),
        nn.Flatten(),
        nn.Linear(c * pooled * pooled, config.n_classes),
    )


def _large_stem(config: ModelConfig) -> nn.Module:  # down to half resolution: a wide but cheap equilibrium
    c = config.n_channels
    return nn.Sequential(
        nn.Conv2d(3, c // 2, 3, padding=1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(),
        nn.Conv2d(c // 2, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c),
    )  # fmt: skip


def _large_head(config: ModelConfig) -> nn.Module:  # BN -> strided conv -> global average pool -> Linear
    c = config.n_channels
    return nn.Sequential(
        nn.BatchNorm2d(c),
        nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, config.n_classes),
    )  # fmt: skip


register_architecture("seed", Architecture(_seed_stem, _seed_head))
register_architecture("large", Architecture(_large_stem, _large_head, min_channels=2))  # stem: C // 2


# ----------------------------------------------------------------------------- the classifier


class DEQClassifier(nn.Module):
    """Images (B, 3, S, S), RGB floats in [0, 1] -> logits (B, n_classes).

    normalise -> ``stem`` -> DEQ(ResNetCell) -> ``head``, the stem and head of
    ``ARCHITECTURES[config.arch]``.
    """

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config = config or ModelConfig()  # validated when it was built
        architecture = ARCHITECTURES[config.arch]
        self.register_buffer("mean", torch.tensor(INPUT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(INPUT_STD).view(1, 3, 1, 1), persistent=False)
        self.stem = architecture.stem(config)
        cell = ResNetCell(config.n_channels, config.n_inner_channels, config.n_groups, config.init_std)
        self.deq = DEQFixedPoint(
            cell,
            solver=config.solver,
            backward=config.backward,
            backward_solver=config.backward_solver,
            backward_kwargs=config.backward_kwargs,
            phantom_steps=config.phantom_steps,
            **config.solver_kwargs,
        )
        self.head = architecture.head(config)

    def inject(self, images: Tensor) -> Tensor:
        """The input injection x (B, C, H, W), computed once per image."""
        return self.stem((images - self.mean) / self.std)

    def forward(
        self,
        images: Tensor,
        return_info: bool = False,
        jacobian_penalty: bool = False,
        spectral_radius_iters: int = 0,
    ) -> Tensor | tuple[Tensor, DEQInfo]:
        """Training and plain inference with the model's own solver settings (the regulariser
        options are ``DEQFixedPoint.forward``'s)."""
        x = self.inject(images)
        z, info = self.deq(x, jacobian_penalty=jacobian_penalty, spectral_radius_iters=spectral_radius_iters)
        logits = self.head(z)
        return (logits, info) if return_info else logits

    def predict(
        self,
        images: Tensor,
        solver: str | None = None,
        *,
        on_logits: Callable[[Tensor], None] | None = None,
        **overrides,
    ) -> tuple[Tensor, SolverStats]:
        """Logits (B, n_classes) of images (B, 3, S, S) in [0, 1] and the forward solve's stats,
        without autograd. ``overrides`` (tol, max_iter, beta, callback, z0, ...) replace the
        model's own solver settings for this call only; with another ``solver`` than the model's,
        the options not given are that solver's defaults, not the model's.

        ``on_logits(logits)``, if given, sees the head's logits (B, n_classes) of every
        f-evaluation's output f(z_k): the answer the network would give at that depth."""
        if on_logits is not None and not callable(on_logits):
            raise ValueError(f"on_logits must be callable, got {type(on_logits).__name__}")
        observe = None if on_logits is None else (lambda fz: on_logits(self.head(fz)))
        with torch.no_grad():
            z, stats = self.deq.solve(self.inject(images), solver=solver, observe=observe, **overrides)
            return self.head(z), stats
