"""Run the app under uvicorn with the limits uvicorn lacks: a header deadline, a bounded shutdown, lean memory.

uvicorn bounds how long an idle keep-alive connection lives, but not how long a client may take to send a
request's headers: 200 connections that trickle a byte a minute would be held forever (slowloris). The
protocol below arms a timer when a connection opens and whenever a request starts, and closes the
connection with 408 if the headers are not complete in time. The body's deadline is the route's
(`GUARD_BODY_TIMEOUT_S`); the shutdown bound is uvicorn's own `timeout_graceful_shutdown`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import sys
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.settings import Settings

log = logging.getLogger(__name__)
TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def header_timeout_protocol(seconds: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, closing connections whose request headers take longer than `seconds`."""

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                log.info("closing %s: no complete request headers within %g s", self.client, seconds)
                self.transport.write(TIMEOUT_RESPONSE)
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # arms uvicorn's keep-alive timer for the idle wait that follows
            self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def return_freed_memory() -> None:
    """Ask glibc to hand large freed blocks back to the system instead of keeping them for reuse.

    Decoding a 40-megapixel image allocates hundreds of MB in 16 MB blocks; glibc raises its mmap threshold
    after the first such block is freed, so later ones come from the heap and RSS never comes back down.
    A fixed threshold keeps every large block an mmap that is returned on free. No-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold = -3  # from <malloc.h>
    mallopt(m_mmap_threshold, 1 << 20)


def serve(settings: Settings, app: Any) -> None:
    return_freed_memory()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        loop="auto",  # uvloop when installed (the serve extra brings it)
        http=header_timeout_protocol(settings.header_timeout_s),
        timeout_graceful_shutdown=settings.shutdown_timeout_s,  # type: ignore[arg-type]  # a float works
    )
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the SIGINT it shut down on, as uvicorn.run
        server.run()
    if not server.started:
        raise SystemExit(3)  # uvicorn's own status for a start that failed (e.g. the port is taken)
