"""Uploads: a byte cap enforced while the body streams in, then files under server-chosen names.

The cap is enforced in ASGI middleware on the raw request body, before multipart parsing, so an
oversized upload is cut off at the cap (413) whether or not it declares its length, and what was
spooled is discarded with the request. Accepted files are copied under a random name, hashed on the way.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path

from fastapi import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COPY_BLOCK = 1 << 20


class BodyTooLargeError(Exception):
    pass


class BodySizeLimit:
    """Pure ASGI middleware: 413 once a request body passes ``max_bytes``."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _too_large(send, self.max_bytes)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLargeError:
            if not started:
                await _too_large(send, self.max_bytes)


async def _too_large(send: Send, max_bytes: int) -> None:
    body = json.dumps({"detail": f"upload larger than the {max_bytes}-byte limit"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def save_upload(upload: UploadFile, directory: Path, max_bytes: int) -> tuple[Path, str, int]:
    """Copy an upload to ``directory`` under a random name; (path, sha256, bytes). Removed on failure."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{secrets.token_hex(16)}.upload"
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "wb") as handle:
            while block := await upload.read(COPY_BLOCK):
                size += len(block)
                if size > max_bytes:
                    raise BodyTooLargeError
                digest.update(block)
                handle.write(block)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, digest.hexdigest(), size
