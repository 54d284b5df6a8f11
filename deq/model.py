"""The seed model (SPEC): a ResNet-style DEQ cell and the CIFAR-10 classifier around it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import Tensor, nn

from .layer import BACKWARD_MODES, DEQFixedPoint, DEQInfo
from .solvers import check_solver_kwargs

__all__ = ["ModelConfig", "ResNetCell", "DEQClassifier", "CIFAR10_CLASSES"]

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
ARCHS = ("seed", "large")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


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

    arch: str = "seed"  # "seed" (SPEC) or "large" (downsampling stem, DEQ at 16x16, conv head)
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
    backward_kwargs: dict | None = None
    phantom_steps: int = 1

    def __post_init__(self) -> None:
        """Check every field's type and range before anything is built: configs come from
        JSON files, also from the Hub (untrusted). Raises ValueError naming the field."""
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        for name, low, high in _INT_RANGES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        for name in ("n_channels", "n_inner_channels"):
            if (value := getattr(self, name)) % self.n_groups:
                raise ValueError(f"{name}={value} must be divisible by n_groups={self.n_groups}")
        if self.arch == "large" and self.n_channels < 2:  # its stem has n_channels // 2
            raise ValueError(f"n_channels must be >= 2 for arch 'large', got {self.n_channels}")
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
        if self.backward_kwargs is not None:
            if not isinstance(self.backward_kwargs, dict):
                raise ValueError(
                    f"backward_kwargs must be a dict or null, got {type(self.backward_kwargs).__name__}"
                )
            check_solver_kwargs(self.solver, self.backward_kwargs, "backward_kwargs")

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


class DEQClassifier(nn.Module):
    """Images (B, 3, 32, 32), RGB floats in [0, 1] -> logits (B, n_classes).

    arch "seed": normalise -> Conv(3, C) -> BN -> DEQ(ResNetCell) -> BN -> AvgPool -> Linear.
    arch "large": normalise -> conv stem to (C, 16, 16) -> DEQ(ResNetCell) -> BN -> strided conv
    -> global average pool -> Linear.
    """

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config = config or ModelConfig()  # validated when it was built
        c = config.n_channels
        self.register_buffer("mean", torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CIFAR10_STD).view(1, 3, 1, 1), persistent=False)
        if config.arch == "seed":
            self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=True), nn.BatchNorm2d(c))
        else:  # "large": an explicit stem down to 16x16, so the equilibrium is wide but cheap
            self.stem = nn.Sequential(
                nn.Conv2d(3, c // 2, 3, padding=1, bias=False), nn.BatchNorm2d(c // 2), nn.ReLU(),
                nn.Conv2d(c // 2, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c),
            )  # fmt: skip
        cell = ResNetCell(c, config.n_inner_channels, config.n_groups, config.init_std)
        self.deq = DEQFixedPoint(
            cell,
            solver=config.solver,
            backward=config.backward,
            backward_kwargs=config.backward_kwargs,
            phantom_steps=config.phantom_steps,
            **config.solver_kwargs,
        )
        if config.arch == "seed":
            pooled = config.image_size // config.pool_size
            self.head = nn.Sequential(
                nn.BatchNorm2d(c),
                nn.AvgPool2d(config.pool_size, config.pool_size),
                nn.Flatten(),
                nn.Linear(c * pooled * pooled, config.n_classes),
            )
        else:
            self.head = nn.Sequential(
                nn.BatchNorm2d(c),
                nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, config.n_classes),
            )  # fmt: skip

    def inject(self, images: Tensor) -> Tensor:
        """The input injection x (B, C, H, W), computed once per image."""
        return self.stem((images - self.mean) / self.std)

    def forward(
        self, images: Tensor, return_info: bool = False, jacobian_penalty: bool = False
    ) -> Tensor | tuple[Tensor, DEQInfo]:
        z, info = self.deq(self.inject(images), jacobian_penalty=jacobian_penalty)
        logits = self.head(z)
        return (logits, info) if return_info else logits
