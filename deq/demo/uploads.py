"""Which file a request's image payload may be read from: never one of the server's own.

A Gradio image payload is ``{"path": ..., "url": ...}`` as the client sent it. Only two kinds of
path are read: files in the web framework's upload folder (where uploads and clicked examples
are stored) and the app's own examples; a pasted image arrives as a base64 ``data:`` URL.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Collection
from pathlib import Path

from .limits import MAX_PASTED_IMAGE_BYTES

__all__ = ["image_source", "MAX_DATA_URL_CHARS"]

#: Length of the base64 text of the largest pasted image.
MAX_DATA_URL_CHARS = 4 * (MAX_PASTED_IMAGE_BYTES // 3 + 1)
_REFUSED = "Only images uploaded to this app can be read."


def image_source(payload: object, upload_folder: Path, examples: Collection[Path]) -> str | bytes | None:
    """The file behind an image payload: a local path, or a data: URL's bytes; None when there
    is no image. ValueError (a message for the user) for anything else. ``examples``: resolved
    paths of the example images."""
    if payload is None:
        return None
    if not isinstance(payload, dict):
        raise ValueError("Expected an image file.")
    if payload.get("path"):
        return _stored_file(payload["path"], upload_folder, examples)
    url = payload.get("url") or ""
    if not isinstance(url, str):
        raise ValueError("Expected an image file.")
    if url.startswith("data:") and "," in url:
        encoded = url.split(",", 1)[1]
        if len(encoded) > MAX_DATA_URL_CHARS:  # checked before decoding anything
            raise ValueError(
                f"The pasted image is over {MAX_PASTED_IMAGE_BYTES // 2**20} MB: upload the file instead."
            )
        try:
            return base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise ValueError("The pasted image is not valid base64 data.") from None
    raise ValueError("Upload the image file itself (links are not fetched).")


def _stored_file(path: object, upload_folder: Path, examples: Collection[Path]) -> str:
    """``path`` resolved, if it is inside ``upload_folder`` or one of ``examples``; any other
    server path gets one refusal that says nothing about whether it exists."""
    try:
        resolved = Path(path).resolve() if isinstance(path, str) else None
    except (OSError, ValueError):  # e.g. an embedded NUL byte
        resolved = None
    if resolved is not None and (resolved in examples or resolved.is_relative_to(upload_folder.resolve())):
        return str(resolved)
    raise ValueError(_REFUSED)
