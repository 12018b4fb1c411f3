"""MicroBatcher on a fake guard: batching, routing of rows back to their jobs, failure isolation."""

import asyncio

import numpy as np
import pytest

from service.batcher import BatchStats, MicroBatcher
from service.guard import GuardResult, Prediction, SignalResult


def fake_guard(images: np.ndarray) -> GuardResult:
    """Echoes each image's first pixel as its label; an image whose pixel is -1 poisons the batch."""
    if (images[:, 0, 0, 0] == -1).any():
        raise ValueError("poisoned batch")
    ids = images[:, 0, 0, 0]
    logits = np.eye(100)[ids.astype(int)]
    pred = Prediction(logits, np.zeros((len(images), 1)))
    signal = SignalResult(ids.copy(), np.zeros(len(ids), bool))
    return GuardResult(pred, pred, images, {"detrigger": signal}, ids.copy(), np.zeros(len(ids), bool), ids, ids)


def job(*ids: int) -> np.ndarray:
    x = np.zeros((len(ids), 1, 2, 2), np.float32)
    x[:, 0, 0, 0] = ids
    return x


async def run_jobs(jobs: list[np.ndarray], **kw: float) -> tuple[list, list[BatchStats]]:
    stats: list[BatchStats] = []
    batcher = MicroBatcher(
        fake_guard, on_batch=stats.append, **{"max_batch": 8, "max_delay_s": 0.05, "max_queue": 100, **kw}
    )
    batcher.start()
    try:
        results = await asyncio.gather(*(batcher.submit(j) for j in jobs), return_exceptions=True)
    finally:
        await batcher.stop()
    return results, stats


def test_rows_go_back_to_their_own_jobs_and_batches_fill() -> None:
    jobs = [job(1, 2), job(3), job(4, 5, 6), job(7), job(8, 9)]
    results, stats = asyncio.run(run_jobs(jobs))
    for j, r in zip(jobs, results, strict=True):
        np.testing.assert_array_equal(r.labels, j[:, 0, 0, 0])
    assert sum(s.images for s in stats) == 9
    assert len(stats) == 2 and max(s.images for s in stats) <= 8  # 9 images, batches of at most 8


def test_one_failing_job_fails_alone() -> None:
    jobs = [job(1), job(-1, 2), job(3)]
    results, _ = asyncio.run(run_jobs(jobs))
    assert isinstance(results[1], ValueError)
    np.testing.assert_array_equal(results[0].labels, [1])
    np.testing.assert_array_equal(results[2].labels, [3])


def test_a_failure_outside_the_guard_fails_that_batch_and_the_worker_goes_on() -> None:
    """An error in the batcher's own work (here the metrics hook, after the batch was answered) fails only what that
    batch left unanswered, and later requests are still served: a worker that died would leave every one of them
    waiting for ever."""

    async def scenario() -> tuple[list, list]:
        calls: list[int] = []

        def on_batch(stats: BatchStats) -> None:
            calls.append(stats.images)
            if len(calls) == 1:
                raise RuntimeError("metrics hook failed")

        batcher = MicroBatcher(fake_guard, 8, 0.0, 100, on_batch)
        batcher.start()
        try:
            first = await asyncio.gather(batcher.submit(job(1)), return_exceptions=True)
            async with asyncio.timeout(5):
                later = await asyncio.gather(batcher.submit(job(2)), batcher.submit(job(3)))
        finally:
            await batcher.stop()
        return first, later

    first, later = asyncio.run(scenario())
    assert first[0].labels.tolist() == [1]  # answered before the hook failed
    assert [r.labels.tolist() for r in later] == [[2], [3]]


def test_a_job_larger_than_a_batch_still_runs() -> None:
    results, stats = asyncio.run(run_jobs([job(*range(1, 12))], max_batch=4))
    np.testing.assert_array_equal(results[0].labels, range(1, 12))
    assert stats[0].images == 11


def test_queue_limit() -> None:
    from service.errors import Overloaded

    async def scenario() -> None:
        batcher = MicroBatcher(fake_guard, max_batch=8, max_delay_s=0.0, max_queue=3)
        batcher.start()
        try:
            with pytest.raises(Overloaded):
                await batcher.submit(job(1, 2, 3, 4))
            assert (await batcher.submit(job(1, 2, 3))).labels.tolist() == [1, 2, 3]
        finally:
            await batcher.stop()

    asyncio.run(scenario())


def test_without_a_wait_a_batch_takes_what_queued_while_the_previous_one_ran() -> None:
    """max_delay 0 (the default): the first job runs at once, alone; the jobs submitted meanwhile are
    waiting when the guard is free again and go together, within max_batch."""
    import threading

    release = threading.Event()

    def slow_guard(images: np.ndarray) -> GuardResult:
        if images[0, 0, 0, 0] == 1:
            release.wait(5)  # the first batch holds the guard until every other job is queued
        return fake_guard(images)

    async def scenario() -> list[BatchStats]:
        stats: list[BatchStats] = []
        batcher = MicroBatcher(slow_guard, max_batch=4, max_delay_s=0.0, max_queue=100, on_batch=stats.append)
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.submit(job(1)))
            await asyncio.sleep(0.05)  # the worker has taken job 1 and is running it
            rest = [asyncio.ensure_future(batcher.submit(job(i))) for i in range(2, 7)]
            await asyncio.sleep(0.05)
            release.set()
            for r, i in zip(await asyncio.gather(first, *rest), range(1, 7), strict=True):
                assert r.labels.tolist() == [i]
        finally:
            await batcher.stop()
        return stats

    assert [s.images for s in asyncio.run(scenario())] == [1, 4, 1]
    from service.settings import Settings

    assert Settings.model_fields["max_delay_ms"].default == 0.0  # what the service runs with unless told
