"""Drive the app at the ASGI level, where a test controls every chunk of the body and sees how much was read.

TestClient sends a body whole; these tests need what a real client can do: stream without Content-Length,
stall, disconnect half-way, and check that the service refused before reading what it did not need.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI

from service.app import create_app
from service.settings import Settings

BOUNDARY = "guardtestboundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def part_head(name: str = "files", filename: str | None = "a.png") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\nContent-Type: image/png\r\n\r\n".encode()


def multipart(*blobs: bytes) -> bytes:
    body = io.BytesIO()
    for i, blob in enumerate(blobs):
        body.write(part_head(filename=f"img{i}.png") + blob + b"\r\n")
    body.write(f"--{BOUNDARY}--\r\n".encode())
    return body.getvalue()


def chunks_of(data: bytes, size: int = 64 << 10) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@dataclass
class Exchange:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    received: int = 0  # body bytes the app pulled through `receive`

    def json(self) -> Any:
        import json

        return json.loads(self.body)


@asynccontextmanager
async def running(settings: Settings, **kw: Any) -> AsyncIterator[FastAPI]:
    """The app with its lifespan started and warmed up."""
    app = create_app(settings, **kw)
    async with app.router.lifespan_context(app):
        deadline = time.monotonic() + 60
        while not app.state.runtime.ready:
            assert time.monotonic() < deadline, "never ready"
            await asyncio.sleep(0.02)
        yield app


async def exchange(
    app: FastAPI,
    chunks: Iterable[bytes],
    headers: dict[str, str] | None = None,
    path: str = "/classify",
    method: str = "POST",
    then: str = "end",  # after the chunks: "end" the body, "stall" forever, or "disconnect"
) -> Exchange:
    out = Exchange()
    source = iter(chunks)
    pending: bytes | None = next(source, None)
    done = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal pending
        if pending is not None:
            chunk, pending = pending, next(source, None)
            out.received += len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": pending is not None or then != "end"}
        if then == "stall":
            await done.wait()  # until the response is sent, as a stalled client would
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out.status = message["status"]
            out.headers = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
        elif message["type"] == "http.response.body":
            out.body += message.get("body", b"")
            if not message.get("more_body"):
                done.set()

    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {"content-type": CONTENT_TYPE}).items()]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": raw,
        "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    await app(scope, receive, send)  # type: ignore[arg-type]
    return out
