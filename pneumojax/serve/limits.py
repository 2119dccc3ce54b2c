"""A limit on request bodies, as ASGI middleware: a body declared too long (``Content-Length``)
is answered 413 before it is read; one that turns out too long while it streams (chunked, or
lying about its length) stops the read with :class:`BodyTooLarge`, which the route answers
with 413. Nothing of the HTTP message is parsed here; uvicorn and Starlette do that."""

from __future__ import annotations

import json


class BodyTooLarge(Exception):
    """The request body went over the limit while it was read."""


class BodyLimit:
    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _refuse(send, self.limit)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge
            return message

        await self.app(scope, limited, send)


def too_large(limit: int) -> str:
    return f"request over the server's limit of {limit / 2**20:g} MiB (--max-upload-mb)"


async def _refuse(send, limit: int) -> None:
    body = json.dumps({"detail": too_large(limit)}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
