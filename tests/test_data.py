"""CIFAR-10 loading from class folders, caching, batches and augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deq.data import CIFAR10_CLASSES, augment, batches, describe_source, load_cifar10


def make_cifar_folder(
    root, per_class: int = 4, test_per_class: int = 2, size: int = 32, suffix: str = ".png"
):
    """A tiny class-folder CIFAR-10: each class a distinct mean colour plus noise."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for label, name in enumerate(CIFAR10_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            base = np.array([label * 25, 255 - label * 25, (label * 80) % 256])
            for i in range(n):
                img = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:04d}{suffix}")
    return root


def test_class_folders_load_in_cifar_label_order_and_cache(tmp_path):
    root = make_cifar_folder(tmp_path / "cifar")
    images, labels = load_cifar10(root, "train")
    assert images.shape == (40, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [c for c in range(10) for _ in range(4)]
    assert list((root / ".cache").glob("cifar10-train-*.safetensors"))
    again = load_cifar10(root, "train")
    assert torch.equal(again[0], images) and torch.equal(again[1], labels)
    assert describe_source(root) == "CIFAR-10 (class-folder copy)"


def test_missing_or_malformed_data_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected either a class-folder layout"):
        load_cifar10(tmp_path / "nothing", "train")
    root = make_cifar_folder(tmp_path / "c1", per_class=1, test_per_class=1)
    (root / "train" / "truck").rename(root / "train" / "lorry")
    with pytest.raises(ValueError, match="class folders"):
        load_cifar10(root, "train")
    root = make_cifar_folder(tmp_path / "c2", per_class=1, test_per_class=1, size=20)
    with pytest.raises(ValueError, match="expected 32x32"):
        load_cifar10(root, "test")
    with pytest.raises(ValueError, match="split"):
        load_cifar10(root, "validation")


def test_an_empty_class_folder_is_an_error_not_a_nine_class_run(tmp_path):
    root = make_cifar_folder(tmp_path / "c", per_class=1, test_per_class=1)
    for image in (root / "train" / "cat").iterdir():
        image.unlink()
    with pytest.raises(ValueError, match=r"class folder .*train/cat holds no images"):
        load_cifar10(root, "train")
    (root / "test" / "dog").rename(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="class folders"):
        load_cifar10(root, "test")


def test_the_cache_follows_replaced_images_and_survives_corruption(tmp_path, caplog):
    import os

    root = make_cifar_folder(tmp_path / "c", per_class=1, test_per_class=1, suffix=".bmp")
    images, _ = load_cifar10(root, "train")
    target = root / "train" / "airplane" / "0000.bmp"
    before = target.stat()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(target)  # new pixels, same size (BMP)
    assert target.stat().st_size == before.st_size
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    again, _ = load_cifar10(root, "train")
    assert again[0].sum() == 0 and torch.equal(again[1:], images[1:])
    for cache in (root / ".cache").glob("*.safetensors"):
        cache.write_bytes(b"garbage")
    with caplog.at_level("WARNING"):
        rebuilt, _ = load_cifar10(root, "train")
    assert torch.equal(rebuilt, again) and "unreadable" in caplog.text and "rebuilding" in caplog.text


def test_batches_cover_data_once_and_shard_across_ranks():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 32, 32).contiguous()
    labels = torch.arange(10)
    g = torch.Generator().manual_seed(0)
    seen = torch.cat([y for _, y in batches(images, labels, 4, shuffle=True, generator=g)])
    assert sorted(seen.tolist()) == list(range(10))
    shards = [
        torch.cat(
            [
                y
                for _, y in batches(
                    images,
                    labels,
                    3,
                    shuffle=True,
                    generator=torch.Generator().manual_seed(1),
                    rank=r,
                    world_size=2,
                )
            ]
        )
        for r in (0, 1)
    ]
    assert sorted(torch.cat(shards).tolist()) == list(range(10)) and len(shards[0]) == 5
    x, y = next(batches(images, labels, 10))
    assert x.dtype == torch.float32 and torch.allclose(x[:, 0, 0, 0] * 255, y.float())
    x_alone, no_labels = next(batches(images, None, 10))  # images only
    assert no_labels is None and torch.equal(x_alone, x)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            next(batches(images, labels, bad))


def test_augment_crops_and_flips_deterministically():
    x = torch.rand(8, 3, 32, 32)
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    # every output is a crop of the zero-padded (possibly mirrored) input
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(8):
        windows = [padded[i, :, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(a[i], w) or torch.equal(a[i], w.flip(2)) for w in windows)


def test_validation_split_is_fixed_disjoint_and_checked():
    from deq.data import split_validation

    images = torch.arange(50).view(50, 1, 1, 1).expand(50, 3, 2, 2).to(torch.uint8)
    labels = torch.arange(50) % 10
    (tx, ty), (vx, vy) = split_validation(images, labels, 12)
    again = split_validation(images, labels, 12)
    assert len(ty) == 38 and len(vy) == 12
    assert torch.equal(vx, again[1][0]) and torch.equal(ty, again[0][1])  # the same on every call
    ids = set(tx[:, 0, 0, 0].tolist()) | set(vx[:, 0, 0, 0].tolist())
    assert ids == set(range(50)) and not set(tx[:, 0, 0, 0].tolist()) & set(vx[:, 0, 0, 0].tolist())
    assert torch.equal(vy, vx[:, 0, 0, 0].long() % 10)  # labels travel with their images
    for bad in (-1, 50, 2.5, True):
        with pytest.raises(ValueError, match="n_val"):
            split_validation(images, labels, bad)
