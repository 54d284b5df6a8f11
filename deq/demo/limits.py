"""Request-size limits for the web app: a pure ASGI middleware (no web framework imported).

A client can send a JSON body of any size (a huge model label or data: URL); without a bound the
server reads and parses all of it. ``RequestBodyLimit`` answers 413 before reading a body whose
declared length is too large, and stops reading one without a declared length once it passes the
limit, so memory stays flat under repeated oversized requests.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from .images import MAX_FILE_BYTES

__all__ = ["RequestBodyLimit", "MAX_JSON_BODY_BYTES", "MAX_UPLOAD_BODY_BYTES", "MAX_PASTED_IMAGE_BYTES"]

#: The largest image accepted inline (a pasted image arrives as a base64 data: URL in JSON).
MAX_PASTED_IMAGE_BYTES = 5 * 1024 * 1024
#: Any request but a file upload: the base64 of the largest pasted image plus room for the rest.
MAX_JSON_BODY_BYTES = 4 * (MAX_PASTED_IMAGE_BYTES // 3 + 1) + 256 * 1024
#: File uploads (multipart): the file size limit plus form overhead.
MAX_UPLOAD_BODY_BYTES = MAX_FILE_BYTES + 1024 * 1024

Scope = dict[str, Any]
Message = dict[str, Any]


class RequestBodyLimit:
    """ASGI middleware: HTTP request bodies over ``max_bytes`` get 413; paths ending in one of
    ``upload_suffixes`` may send up to ``max_upload_bytes``."""

    def __init__(
        self,
        app: Callable[..., Awaitable[None]],
        max_bytes: int = MAX_JSON_BODY_BYTES,
        max_upload_bytes: int = MAX_UPLOAD_BODY_BYTES,
        upload_suffixes: tuple[str, ...] = ("/upload",),
    ):
        for name, value in (("max_bytes", max_bytes), ("max_upload_bytes", max_upload_bytes)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.app = app
        self.max_bytes = max_bytes
        self.max_upload_bytes = max_upload_bytes
        self.upload_suffixes = upload_suffixes

    def limit_for(self, path: str) -> int:
        return self.max_upload_bytes if path.rstrip("/").endswith(self.upload_suffixes) else self.max_bytes

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                too_large = True
            if too_large:
                await _reject(send, limit)
                return
        seen = 0
        started = refused = False

        async def limited_receive() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # answer 413 now; to the app the client has gone away
                    if not started and not refused:
                        refused = True
                        await _reject(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the app's own answer after the refusal is dropped
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


async def _reject(send, limit: int) -> None:
    body = json.dumps({"error": f"Request body over the {limit // 2**20} MB limit."}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
