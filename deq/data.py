"""CIFAR-10 as uint8 tensors held on the training device, cut into batches there.

Two sources, same result ((N, 3, 32, 32) uint8 images, (N,) int64 labels in CIFAR-10 order):
- a class-folder directory ``root/{train,test}/<class>/*`` (the offline JPEG copy), decoded
  once and cached as safetensors beside it (or under ~/.cache/deq when root is read-only);
- torchvision's own ``CIFAR10`` (``root/cifar-10-batches-py``, or ``download=True``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = [
    "CIFAR10_CLASSES", "load_cifar10", "split_validation", "random_subset", "batches", "augment",
    "describe_source",
]  # fmt: skip

#: The class names, in label order.
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
_EXPECTED = (
    "expected either a class-folder layout <root>/{train,test}/<class>/<image> with the "
    f"classes {', '.join(CIFAR10_CLASSES)} (32x32 images), or a torchvision CIFAR-10 root "
    "holding cifar-10-batches-py (pass download=True / --download to fetch it)"
)


def describe_source(root: str | Path) -> str:
    """Human-readable data set name for model cards."""
    root = Path(root)
    if (root / "train").is_dir():
        jpeg = any(
            p.suffix.lower() in {".jpg", ".jpeg"} for p in (root / "train" / CIFAR10_CLASSES[0]).iterdir()
        )
        return "CIFAR-10 (JPEG q75 copy)" if jpeg else "CIFAR-10 (class-folder copy)"
    return "CIFAR-10"


def load_cifar10(
    root: str | Path, split: str, *, download: bool = False, cache_dir: str | Path | None = None
) -> tuple[Tensor, Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of ``split`` ("train" or "test")."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root).expanduser()
    if (root / split).is_dir():
        return _load_folder(root, split, cache_dir)
    if (root / "cifar-10-batches-py").is_dir() or download:
        return _load_torchvision(root, split, download)
    raise FileNotFoundError(f"no CIFAR-10 data at {root}: {_EXPECTED}")


def _load_torchvision(root: Path, split: str, download: bool) -> tuple[Tensor, Tensor]:
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=split == "train", download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(f"CIFAR-10 at {root}: {err}; {_EXPECTED}") from None
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    return images, torch.tensor(ds.targets, dtype=torch.int64)


def _list_folder(root: Path, split: str) -> list[tuple[Path, int]]:
    split_dir = root / split
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if found != sorted(CIFAR10_CLASSES):
        raise ValueError(f"{split_dir} has class folders {found}; {_EXPECTED}")
    files = []
    for label, name in enumerate(CIFAR10_CLASSES):
        images = [p for p in sorted((split_dir / name).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:  # training on nine classes while the card says CIFAR-10 would misreport the run
            raise ValueError(f"class folder {split_dir / name} holds no images; {_EXPECTED}")
        files += [(path, label) for path in images]
    return files


def _decode(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
    except OSError as err:
        raise ValueError(f"cannot read image {path}: {err}") from None
    if arr.shape != (32, 32, 3):
        raise ValueError(f"{path} is {arr.shape[1]}x{arr.shape[0]}, expected 32x32; {_EXPECTED}")
    return arr


def _cache_path(root: Path, split: str, files: list[tuple[Path, int]], cache_dir) -> list[Path]:
    # keyed on each file's name, size and modification time: a replaced image gets a new cache
    stats = ((p, p.stat()) for p, _ in files)
    key = hashlib.sha1(
        "\n".join(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}" for p, st in stats).encode()
    )
    name = f"cifar10-{split}-{key.hexdigest()[:12]}.safetensors"
    if cache_dir is not None:
        return [Path(cache_dir) / name]
    return [root / ".cache" / name, Path.home() / ".cache" / "deq" / name]


def _load_folder(root: Path, split: str, cache_dir) -> tuple[Tensor, Tensor]:
    files = _list_folder(root, split)
    candidates = _cache_path(root, split, files, cache_dir)
    for cache in candidates:
        if cache.is_file():
            try:
                data = load_file(str(cache))
                images, labels = data["images"], data["labels"]
                if images.shape == (len(files), 3, 32, 32) and labels.shape == (len(files),):
                    return images, labels
                log.warning("decoded-image cache %s does not match the data; rebuilding it", cache)
            except (SafetensorError, OSError, KeyError) as err:
                log.warning("decoded-image cache %s is unreadable (%s); rebuilding it", cache, err)
    images = torch.from_numpy(np.stack([_decode(p) for p, _ in files]).transpose(0, 3, 1, 2).copy())
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    for cache in candidates:  # first writable place wins; no cache at all is fine too
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(cache.name + ".tmp")
            save_file({"images": images, "labels": labels}, str(tmp))
            tmp.replace(cache)
            break
        except OSError:
            continue
    return images, labels


def split_validation(
    images: Tensor, labels: Tensor, n_val: int, seed: int = 0
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """((train images, labels), (validation images, labels)): ``n_val`` images held out of a
    training set by a fixed seeded shuffle, the same on every machine, so that model selection
    never needs the test set. ``n_val`` = 0 gives an empty validation set."""
    n = len(labels)
    if not isinstance(n_val, int) or isinstance(n_val, bool) or not 0 <= n_val < n:
        raise ValueError(f"n_val must be an integer in [0, {n}), got {n_val!r}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(labels.device)
    val, train = order[:n_val], order[n_val:]
    return (images[train], labels[train]), (images[val], labels[val])


def random_subset(images: Tensor, labels: Tensor, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``n`` images and their labels drawn by a fixed seeded shuffle (the same on every machine),
    on their own device. The data sets are stored class by class, so a prefix would not do.
    ``n`` >= the set's size gives the whole set, shuffled."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n].to(labels.device)
    return images[keep], labels[keep]


def augment(x: Tensor, generator: torch.Generator | None = None, pad: int = 4) -> Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip of a batch (B, C, H, W), on x's device."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded[
        torch.arange(b, device=x.device)[:, None, None, None],
        torch.arange(x.shape[1], device=x.device)[None, :, None, None],
        rows,
        cols,
    ]
    flip = torch.rand(b, device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def batches(
    images: Tensor,
    labels: Tensor | None,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    augment_data: bool = False,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Float images in [0, 1] (B, 3, 32, 32) and labels (None without ``labels``), cut on the
    tensors' device.

    With ``world_size > 1`` each rank gets its own interleaved shard of the (shuffled) order.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    n = images.shape[0]
    order = (
        torch.randperm(n, device=images.device, generator=generator)
        if shuffle
        else torch.arange(n, device=images.device)
    )
    order = order[rank::world_size]
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        x = images[idx].float().div_(255)
        if augment_data:
            x = augment(x, generator)
        yield x, None if labels is None else labels[idx]
