"""Dynamic micro-batching: images of concurrent requests run through the guard together, off the event loop.

A request submits its images as one job and awaits its own slice of the batch's result. The worker takes
the first waiting job, then keeps adding jobs until the batch holds `max_batch` images or `max_delay` has
passed (0, the service's default: the jobs already waiting, no more), runs the whole guard once in a
worker thread, and hands each job its rows. While a batch runs, new jobs queue up, so under load batches
fill by themselves. If a batch fails, its jobs are retried one by one, so that one bad job fails only its
own request. Beyond `max_queue` images waiting or running, `submit` refuses at once (503) instead of
queueing without bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from service.errors import Overloaded
from service.guard import GuardResult

log = logging.getLogger(__name__)


@dataclass
class BatchStats:
    """What one batch cost; the app turns it into metrics."""

    images: int
    jobs: int
    queued_s: list[float]  # per job: from submit to the batch starting
    compute_s: float


@dataclass
class _Job:
    images: np.ndarray  # float32 (k, 1, H, W)
    future: asyncio.Future[GuardResult]
    submitted: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    def __init__(
        self,
        run: Callable[[np.ndarray], GuardResult],
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        on_batch: Callable[[BatchStats], None] = lambda stats: None,
    ) -> None:
        self.run, self.max_batch, self.max_delay_s, self.max_queue = run, max_batch, max_delay_s, max_queue
        self.on_batch = on_batch
        self.pending = 0  # images submitted and not yet answered
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._carry: _Job | None = None  # a job that did not fit the previous batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guard")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._work(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True, cancel_futures=True)

    @contextmanager
    def admission(self, n: int) -> Iterator[None]:
        """Hold n of the queue's places (decoding and waiting count too); raises Overloaded when they are taken.

        A request is admitted before its images are decoded, so an overloaded guard refuses at the cost of
        reading a header, not of decoding and then refusing.
        """
        if self.pending + n > self.max_queue:
            raise self.overloaded()
        self.pending += n
        try:
            yield
        finally:
            self.pending -= n

    @property
    def full(self) -> bool:
        return self.pending >= self.max_queue

    def overloaded(self) -> Overloaded:
        return Overloaded(
            f"{self.pending} images are already waiting or running (limit {self.max_queue}); retry shortly",
            headers={"Retry-After": "1"},
        )

    async def submit(self, images: np.ndarray) -> GuardResult:
        """Guard one request's images; raises Overloaded when the queue is full."""
        with self.admission(len(images)):
            return await self.guard(images)

    async def guard(self, images: np.ndarray) -> GuardResult:
        """Guard images whose places the caller already holds (see `admission`)."""
        job = _Job(images, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        return await job.future

    async def _next_batch(self) -> list[_Job]:
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, size = [first], len(first.images)
        deadline = time.perf_counter() + self.max_delay_s
        while size < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if size + len(job.images) > self.max_batch:
                self._carry = job  # first in line for the next batch
                break
            batch.append(job)
            size += len(job.images)
        return batch

    async def _work(self) -> None:
        while True:
            batch = [job for job in await self._next_batch() if not job.future.done()]
            if not batch:
                continue
            try:
                await self._run(batch)
            except Exception as err:  # never the worker's end: every later request would wait for ever
                log.exception("the micro-batcher failed a batch of %d jobs", len(batch))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(err)

    async def _run(self, batch: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        images = np.concatenate([job.images for job in batch])
        try:
            result = await loop.run_in_executor(self._executor, self.run, images)
            self._answer(batch, result)
        except Exception:  # isolate the failing job below
            log.exception("a batch of %d jobs failed; retrying them one by one", len(batch))
            for job in batch:
                if job.future.done():  # its client went away meanwhile: nothing to run it for
                    continue
                try:
                    self._answer([job], await loop.run_in_executor(self._executor, self.run, job.images))
                except Exception as err:  # this job's own failure, reported to it alone
                    if not job.future.done():
                        job.future.set_exception(err)
        queued = [started - job.submitted for job in batch]
        self.on_batch(BatchStats(len(images), len(batch), queued, time.perf_counter() - started))

    @staticmethod
    def _answer(batch: list[_Job], result: GuardResult) -> None:
        if len(batch) == 1:  # the whole batch is one request's: nothing to split
            if not batch[0].future.done():
                batch[0].future.set_result(result)
            return
        start = 0
        for job in batch:
            stop = start + len(job.images)
            if not job.future.done():  # the client may have gone away
                job.future.set_result(result.take(slice(start, stop)))
            start = stop
