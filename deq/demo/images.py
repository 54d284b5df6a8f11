"""Image preprocessing for inference: any common file -> an RGB float tensor (1, 3, S, S).

Untrusted input (web uploads) is expected: every failure is a ``ValueError`` whose message can be
shown to a user as it is, and the pixel count is checked from the header before any decoding.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

__all__ = [
    "PreparedImage",
    "prepare_image",
    "load_image",
    "to_preview",
    "MAX_PIXELS",
    "MAX_FILE_BYTES",
    "FORMATS",
]

#: Largest accepted image (pixels), checked before decoding: bigger ones are refused, which
#: also keeps decompression bombs (tiny files declaring huge dimensions) out.
MAX_PIXELS = 50_000_000
#: Largest accepted file.
MAX_FILE_BYTES = 50 * 1024 * 1024
#: Formats decoded. Others are refused: EPS, for one, would run Ghostscript on the upload.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "ICO", "PPM", "TGA", "AVIF")

Source = str | os.PathLike | bytes


@dataclass
class PreparedImage:
    """tensor: (1, 3, size, size) float32 RGB in [0, 1]; notes: what was done to the input."""

    tensor: Tensor
    original_size: tuple[int, int]
    format: str
    mode: str
    notes: list[str] = field(default_factory=list)


def _check_file_size(n_bytes: int) -> None:
    if n_bytes == 0:
        raise ValueError("The file is empty.")
    if n_bytes > MAX_FILE_BYTES:
        size, limit = n_bytes / 2**20, MAX_FILE_BYTES // 2**20
        raise ValueError(f"The file is too large ({size:.0f} MB; the limit is {limit} MB).")


def _open(source: Source) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(bytes(source))
        _check_file_size(len(fp.getbuffer()))
    else:
        try:
            _check_file_size(os.path.getsize(source))
        except OSError:
            raise ValueError("The file could not be read (it does not exist or is not accessible).") from None
        fp = source
    try:
        Image.init()
        return Image.open(fp, formats=[f for f in FORMATS if f in Image.OPEN])  # reads the header only
    except Image.DecompressionBombError:
        raise ValueError(
            f"The image is too large (the limit is {MAX_PIXELS / 1e6:.0f} megapixels)."
        ) from None
    except UnidentifiedImageError:
        raise ValueError(
            "This file is not an image that can be read (supported: PNG, JPEG, GIF, WebP, BMP, TIFF, ...)."
        ) from None
    except Exception as err:  # decoders raise many types on malformed headers
        raise ValueError(f"The image file is corrupt ({type(err).__name__}).") from None


def _check_size(im: Image.Image) -> None:
    width, height = im.size
    if width < 1 or height < 1:
        raise ValueError(f"The image has no pixels ({width}x{height}).")
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"The image is too large: {width}x{height} = {width * height / 1e6:.0f} megapixels "
            f"(the limit is {MAX_PIXELS / 1e6:.0f})."
        )


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale -> 8-bit "L" (PIL's own conversion clips at 255)."""
    arr = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16"):
        arr = arr / 65535.0
    elif im.mode == "I":  # 16-bit PNGs often open as "I"; a max above 255 tells them apart
        arr = arr / (65535.0 if arr.max(initial=0) > 255 else 255.0)
    else:  # "F": [0, 1] if it already is, else its own range
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=0))
        if lo < 0 or hi > 1:
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    arr = np.nan_to_num(arr, nan=0.0).clip(0, 1)
    return Image.fromarray((arr * 255).round().astype(np.uint8), "L")


def _to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
    """Any PIL mode -> "RGB"; transparency is composited on white."""
    mode = im.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        im = _high_bit_depth_to_l(im)
    try:
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            notes.append("transparency composited on white")
            im = Image.alpha_composite(white, rgba)
        rgb = im.convert("RGB")
    except (ValueError, OSError):
        raise ValueError(f"Images in colour mode {mode} are not supported.") from None
    if mode not in ("RGB", "RGBA"):
        notes.append(f"converted from {mode} to RGB")
    return rgb


def prepare_image(source: Source, size: int = 32) -> PreparedImage:
    """Decode ``source`` (a path or the file's bytes) into a (1, 3, size, size) RGB tensor in [0, 1].

    First frame of animations, EXIF orientation applied, alpha composited on white, any colour
    mode converted, centre-cropped to a square, then resized with an antialiasing filter.
    Raises ValueError with a message fit for the user when the input cannot be used.
    """
    opened = im = _open(source)
    try:
        _check_size(im)
        fmt, mode, (width, height) = im.format or "unknown", im.mode, im.size
        notes: list[str] = []
        if getattr(im, "is_animated", False):  # n_frames would scan the whole file
            notes.append("first frame of an animation")
        if fmt == "JPEG":  # let libjpeg decode big photos at 1/2 .. 1/8 scale: far less work
            im.draft("RGB", (4 * size, 4 * size))
        try:
            im.load()
        except Exception as err:  # OSError for truncated data; decoders raise many types
            reason = "truncated" if "truncated" in str(err) else "corrupt"
            raise ValueError(
                f"The image file is {reason} and could not be decoded ({type(err).__name__})."
            ) from None
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # a broken EXIF block is no reason to refuse the pixels
            pass
        im = _to_rgb(im, notes)
        if width != height:
            notes.append(f"centre-cropped {width}x{height} to a square")
        if min(width, height) != size:
            notes.append(f"resized to {size}x{size}")
        w, h = im.size  # after draft() and EXIF rotation
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.resize(
            (size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side), reducing_gap=3.0
        )
        arr = np.asarray(im, dtype=np.uint8)  # (size, size, 3)
        tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        return PreparedImage(tensor=tensor, original_size=(width, height), format=fmt, mode=mode, notes=notes)
    finally:
        opened.close()


def load_image(source: Source, size: int = 32) -> Tensor:
    """``prepare_image(source, size).tensor``: (1, 3, size, size) float32 RGB in [0, 1]."""
    return prepare_image(source, size).tensor


def to_preview(tensor: Tensor, scale: int = 4) -> Image.Image:
    """(1, 3, H, W) or (3, H, W) tensor in [0, 1] -> RGB PIL image enlarged ``scale`` times with
    nearest-neighbour (to show the pixels the model sees)."""
    img = tensor.detach().reshape(-1, *tensor.shape[-3:])[0].clamp(0, 1).mul(255).round().byte()
    pil = Image.fromarray(img.permute(1, 2, 0).cpu().numpy(), "RGB")
    return pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
