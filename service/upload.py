"""Read a multipart upload under limits that hold whatever the client declares.

Bytes are counted as they arrive (with or without Content-Length, chunked or not), a file is refused as
soon as it passes its size limit, the file count as soon as one file too many starts, and the whole body
has one deadline. Nothing is spooled to disk: a request holds at most `max_files` x `max_file_bytes` in
memory, and is refused the moment it would hold more; all requests together hold at most the body budget
(`BodyBudget`), past which a request is refused (503) as its body arrives. A client that disconnects mid-upload gets
`ClientGone` (499), not a server error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import Receive

from service.errors import ClientGone, MalformedRequest, NoFiles, Overloaded, RequestTimeout, TooLarge, TooManyFiles

PART_HEADER_BYTES = 8 << 10  # most header bytes one part may carry (a browser sends about 150)
FRAMING_BYTES = 16 << 10  # per file: its part headers and boundary, with room to spare
EXTRA_PARTS = 16  # parts not named `files` (ignored) a request may carry besides its files


@dataclass(frozen=True)
class UploadLimits:
    max_files: int  # file parts named `files`
    max_file_bytes: int  # bytes of one file
    timeout_s: float  # the whole body must arrive within this, seconds

    @property
    def max_body_bytes(self) -> int:
        """The largest body a valid request can have: every file at its limit, plus framing."""
        return (self.max_files + EXTRA_PARTS) * (self.max_file_bytes + FRAMING_BYTES)


class BodyBudget:
    """Bytes of upload bodies held at once across all requests (GUARD_BODY_BUDGET_BYTES). Each request is bounded
    on its own (`UploadLimits`), but many at once are not: past the budget a request is refused (503) as its body
    arrives, not queued, so the bytes held stay bounded whatever the number of clients."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.used = capacity, 0

    @contextmanager
    def hold(self) -> Iterator[BodyHold]:
        """A request's share: what it takes is given back when the request is done with its body."""
        share = BodyHold(self)
        try:
            yield share
        finally:
            self.used -= share.taken


@dataclass
class BodyHold:
    budget: BodyBudget
    taken: int = 0

    def take(self, n: int) -> None:
        budget = self.budget
        if budget.used + n > budget.capacity:
            raise Overloaded(
                f"uploads in flight hold the body budget ({budget.capacity} bytes, GUARD_BODY_BUDGET_BYTES); "
                "retry shortly", headers={"Retry-After": "1"},
            )  # fmt: skip
        budget.used += n
        self.taken += n


@dataclass
class _Part:
    header_bytes: int = 0
    header_name: bytes = b""
    header_value: bytes = b""
    disposition: bytes = b""
    is_file: bool = False
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


class _Collector:
    """python-multipart callbacks that keep the `files` parts and enforce the limits as data arrives."""

    def __init__(self, limits: UploadLimits) -> None:
        self.limits = limits
        self.files: list[tuple[str | None, bytes]] = []
        self.parts = 0
        self.part = _Part()
        self.ended = False

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.limits.max_files + EXTRA_PARTS:
            raise MalformedRequest(f"more than {self.limits.max_files + EXTRA_PARTS} parts in one request")
        self.part = _Part()

    def _header_bytes(self, n: int) -> None:
        self.part.header_bytes += n
        if self.part.header_bytes > PART_HEADER_BYTES:
            raise MalformedRequest(f"a part's headers exceed {PART_HEADER_BYTES} bytes")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(end - start)
        self.part.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(end - start)
        self.part.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.part.header_name.strip().lower() == b"content-disposition":
            self.part.disposition = self.part.header_value
        self.part.header_name, self.part.header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.disposition)
        # As browsers, curl and requests send them: a part named `files` with a filename. Other parts are
        # ignored (counted against the body limit, never stored).
        if options.get(b"name") == b"files" and b"filename" in options:
            if len(self.files) >= self.limits.max_files:
                raise TooManyFiles(f"more than {self.limits.max_files} files in one request")
            self.part.is_file = True
            self.part.filename = options[b"filename"].decode("utf-8", errors="replace")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if not self.part.is_file:
            return
        self.part.data += data[start:end]
        if len(self.part.data) > self.limits.max_file_bytes:
            index, name = len(self.files), self.part.filename
            raise TooLarge(f"file {index} ({name!r}) exceeds {self.limits.max_file_bytes} bytes", index)

    def on_part_end(self) -> None:
        if self.part.is_file:
            self.files.append((self.part.filename, bytes(self.part.data)))
        self.part = _Part()

    def on_end(self) -> None:
        self.ended = True


MAX_BOUNDARY = 70  # characters of a multipart boundary (RFC 2046 section 5.1.1)


def boundary_of(content_type: str) -> bytes:
    """The multipart boundary, or a typed 4xx."""
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise MalformedRequest("a multipart/form-data Content-Type needs a boundary parameter")
    boundary = options[b"boundary"]
    if len(boundary) > MAX_BOUNDARY:  # RFC 2046; python-multipart itself refuses past 256, as a bare ValueError
        raise MalformedRequest(f"the multipart boundary is {len(boundary)} characters long, at most {MAX_BOUNDARY}")
    return boundary


def check_declared_length(content_length: str | None, limits: UploadLimits) -> None:
    """Refuse before reading a byte when Content-Length already says the body is too large."""
    if content_length is None:
        return
    try:
        length = int(content_length)
    except ValueError:
        raise MalformedRequest(f"Content-Length {content_length!r} is not a number") from None
    if length > limits.max_body_bytes:
        raise TooLarge(
            f"request body of {length} bytes exceeds {limits.max_files} files of {limits.max_file_bytes} bytes"
        )


async def read_uploads(
    receive: Receive, content_type: str, limits: UploadLimits, hold: BodyHold | None = None
) -> list[tuple[str | None, bytes]]:
    """Every `files` part of the body as (filename, bytes), in order; raises a typed error on any limit. `hold`: the
    request's share of the body budget, which each chunk is taken from as it arrives."""
    collector = _Collector(limits)
    parser = MultipartParser(boundary_of(content_type), collector.callbacks())  # type: ignore[arg-type]
    received = 0
    try:
        async with asyncio.timeout(limits.timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone(f"the client disconnected after sending {received} bytes")
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limits.max_body_bytes:
                    raise TooLarge(f"request body exceeds {limits.max_body_bytes} bytes")
                if hold is not None:
                    hold.take(len(chunk))
                if chunk:
                    parser.write(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise RequestTimeout(f"the body did not arrive within {limits.timeout_s:g} s ({received} bytes read)") from None
    except (ValueError, LookupError) as err:  # python-multipart's parse errors, and unknown charsets
        raise MalformedRequest(f"malformed multipart body: {err}") from err
    parser.finalize()
    if not collector.ended:
        raise MalformedRequest("malformed multipart body: it ends before its closing boundary")
    if not collector.files:
        raise NoFiles("no file parts named `files` in the request")
    return collector.files
