"""Decoding under a budget: what an upload must be granted before it may cost memory and CPU.

The header of every file is read first (cheap: Pillow parses it without decoding pixels), so the work is
known before it is done: small images decode on the event loop (a thread hop costs more than they do);
larger ones in a bounded pool of decode threads, each holding a share of a pixel budget for as long as it
decodes. The budget caps the memory that decoding can hold across all requests at once, and the pool keeps
the event loop free, so /v2/health/live answers while the largest allowed images decode.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import numpy as np

from service.decode import Header, decode_pixels, open_image
from service.preprocess import Preprocessing, to_model_input

# Images up to this many pixels decode inline: a 256 x 256 PNG takes well under a millisecond.
INLINE_DECODE_PIXELS = 1 << 16


class PixelBudget:
    """A first-come first-served semaphore counted in pixels (a large image cannot be starved by small ones)."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.used = capacity, 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @asynccontextmanager
    async def take(self, pixels: int) -> AsyncIterator[None]:
        pixels = min(pixels, self.capacity)  # settings guarantee max_pixels <= capacity; never deadlock anyway
        if self._waiters or self.used + pixels > self.capacity:
            future = asyncio.get_running_loop().create_future()
            self._waiters.append((pixels, future))
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():  # granted just as we were cancelled: give it back
                    self._release(pixels)
                else:
                    # A release between the cancellation and this line may already have dropped it (`_wake`)
                    with contextlib.suppress(ValueError):
                        self._waiters.remove((pixels, future))
                    self._wake()
                raise
        else:
            self.used += pixels
        try:
            yield
        finally:
            self._release(pixels)

    def _release(self, pixels: int) -> None:
        self.used -= pixels
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            pixels, future = self._waiters[0]
            if future.done():  # cancelled, and its task has not run yet to leave the queue: it takes nothing
                self._waiters.popleft()
                continue
            if self.used + pixels > self.capacity:
                break
            self._waiters.popleft()
            self.used += pixels
            future.set_result(None)


class Decoder:
    """Uploaded files -> float32 model input, under the pixel budget and off the event loop when it matters."""

    def __init__(self, contract: Preprocessing, max_pixels: int, budget_pixels: int, threads: int) -> None:
        self.contract, self.max_pixels = contract, max_pixels
        self.budget = PixelBudget(budget_pixels)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def headers(self, uploads: list[tuple[str | None, bytes]]) -> list[Header]:
        """Read and check every file's header; raises the first file's typed 4xx."""
        return [open_image(data, i, name, self.max_pixels) for i, (name, data) in enumerate(uploads)]

    async def _one(self, header: Header, index: int) -> np.ndarray:
        if header.pixels <= INLINE_DECODE_PIXELS:
            return decode_pixels(header, index, self.contract)
        async with self.budget.take(header.pixels):
            work = asyncio.get_running_loop().run_in_executor(self._pool, decode_pixels, header, index, self.contract)
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                # A thread cannot be stopped: its pixels stay taken until it is done, or the budget would let more
                # decode at once than GUARD_DECODE_BUDGET_PIXELS (a sibling file failing cancels this one). Shielded
                # and in a loop, because a second cancellation (a shutdown) would otherwise cancel `work` itself,
                # which ends the wait while the thread still decodes.
                while not work.done():
                    with contextlib.suppress(BaseException):
                        await asyncio.shield(work)
                raise

    async def decode(self, headers: list[Header]) -> np.ndarray:
        """float32 (N, 1, H, W) model input; the first failing file's error is raised."""
        if sum(h.pixels for h in headers) <= INLINE_DECODE_PIXELS:
            # Small all together (the common case): decode them here and now. A task per file would hand the event
            # loop to every other ready request before the first pixel, and the decode metric would time that queue.
            # More pixels than that go through tasks, so that the loop can answer others between files.
            pixels = [decode_pixels(h, i, self.contract) for i, h in enumerate(headers)]
            return to_model_input(np.stack(pixels), self.contract)
        tasks = [asyncio.ensure_future(self._one(h, i)) for i, h in enumerate(headers)]
        try:
            pixels = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one bad file fails the request: stop the others' waiting for the budget
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return to_model_input(np.stack(pixels), self.contract)
