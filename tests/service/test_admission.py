"""Admission before work: what is refused is refused before it costs the body, the decode or the queue."""

import asyncio
import itertools
import time

import numpy as np
import pytest

from service.admission import PixelBudget
from service.preprocess import Preprocessing
from service.settings import Settings
from tests.conftest import MODELS
from tests.service.asgi import CONTENT_TYPE, chunks_of, exchange, multipart, part_head, running
from tests.service.conftest import png

pytestmark = pytest.mark.data
MiB = 1 << 20


def run(coro):  # one event loop per test: the app's lifespan lives and dies inside it
    return asyncio.run(coro)


def small_png() -> bytes:
    return png(np.full((28, 28), 128, np.uint8))


def endless_file(chunk: int = MiB) -> itertools.chain:
    """One file part that never ends (300 MiB and beyond, streamed with no Content-Length)."""
    return itertools.chain([part_head()], itertools.repeat(b"\x00" * chunk, 300))


def error_code(response) -> str:
    return response.json()["error"]["code"]


def test_a_full_queue_refuses_before_reading_the_body() -> None:
    async def scenario():
        async with running(Settings(models_dir=MODELS)) as app:
            runtime = app.state.runtime
            runtime.batcher.pending = runtime.settings.max_queue  # as if 1,024 images were queued
            r = await exchange(app, chunks_of(multipart(small_png())))
            runtime.batcher.pending = 0
            return r

    r = run(scenario())
    assert r.status == 503 and error_code(r) == "overloaded" and r.headers["retry-after"] == "1"
    assert r.received == 0, "the body was read before refusing"
    assert r.headers["connection"] == "close"  # the unread body is not drained over keep-alive


def test_a_wrong_key_and_a_declared_oversize_are_refused_before_reading_the_body() -> None:
    async def scenario():
        settings = Settings(models_dir=MODELS, api_key="k", max_files=2, max_file_bytes=1000)
        async with running(settings) as app:
            no_key = await exchange(app, chunks_of(multipart(small_png())))
            declared = {"content-type": CONTENT_TYPE, "content-length": str(300 * MiB), "x-api-key": "k"}
            too_big = await exchange(app, endless_file(), headers=declared)
            return no_key, too_big

    no_key, too_big = run(scenario())
    assert no_key.status == 401 and no_key.received == 0
    assert too_big.status == 413 and error_code(too_big) == "too_large" and too_big.received == 0


def test_a_chunked_upload_is_cut_at_the_file_limit_whatever_it_declares() -> None:
    """No Content-Length, 300 MiB streamed: refused once one file passes GUARD_MAX_FILE_BYTES."""

    async def scenario():
        async with running(Settings(models_dir=MODELS)) as app:
            return app.state.runtime.settings, await exchange(app, endless_file())

    settings, r = run(scenario())
    assert r.status == 413 and error_code(r) == "too_large" and r.json()["error"]["file_index"] == 0
    assert r.received <= settings.max_file_bytes + MiB + 4096  # the limit, plus the chunk that crossed it


def test_many_small_parts_cannot_pass_the_body_limit() -> None:
    """Parts that are not files are never stored, but they count: the body as a whole is bounded too."""

    async def scenario():
        settings = Settings(models_dir=MODELS, max_files=2, max_file_bytes=1000)
        async with running(settings) as app:
            junk = (part_head(name="other", filename=None) + b"x" * 200_000 + b"\r\n" for _ in range(10_000))
            return app.state.runtime.settings, await exchange(app, junk)

    settings, r = run(scenario())
    assert r.status in (400, 413), r.body
    assert r.received <= (settings.max_files + 16) * (settings.max_file_bytes + (16 << 10)) + 300_000


def test_uploads_in_flight_are_held_to_the_body_budget() -> None:
    """Each request is bounded, many at once are not: past GUARD_BODY_BUDGET_BYTES a request gets 503 as its body
    arrives, and the bytes go back to the budget when a request ends, however it ends."""
    limits = {"models_dir": MODELS, "max_files": 2, "max_file_bytes": 100_000}
    settings = Settings(**limits, body_budget_bytes=Settings(**limits).largest_body)  # the least it may be

    async def scenario():
        async with running(settings) as app:
            budget = app.state.runtime.body_budget
            # a slow client: most of the budget in a part that is not a file, then nothing more
            holding = (part_head(name="other", filename=None), b"x" * (settings.largest_body - 200_000))
            slow = asyncio.ensure_future(exchange(app, holding, then="stall"))
            async with asyncio.timeout(10):  # its bytes reach the budget as they arrive
                while budget.used < settings.largest_body - 200_000:
                    await asyncio.sleep(0.01)
            refused = await exchange(app, chunks_of(multipart(small_png()) + b"x" * 300_000))
            alongside = await exchange(app, chunks_of(multipart(small_png())))  # small enough to fit beside it
            slow.cancel()
            await asyncio.gather(slow, return_exceptions=True)
            after = await exchange(app, chunks_of(multipart(small_png()) + b"x" * 300_000))
            return refused, alongside, after, budget.used

    refused, alongside, after, used = run(scenario())
    assert refused.status == 503 and error_code(refused) == "overloaded", refused.body
    assert refused.headers.get("connection") == "close" and refused.headers.get("retry-after") == "1"
    assert alongside.status == 200 and used == 0
    assert after.status != 503  # the slow client's bytes went back (whatever the padding makes of the request)


@pytest.mark.parametrize("count", [65, 66, 100, 300])
def test_too_many_files_is_413_at_any_count(count: int) -> None:
    async def scenario():
        async with running(Settings(models_dir=MODELS)) as app:
            return await exchange(app, chunks_of(multipart(*[small_png()] * count)))

    r = run(scenario())
    assert r.status == 413 and error_code(r) == "too_many_files", r.body


def test_a_client_that_disconnects_mid_upload_is_499_not_a_server_error() -> None:
    async def scenario():
        async with running(Settings(models_dir=MODELS)) as app:
            body = multipart(png(np.random.default_rng(0).integers(0, 256, (200, 200)).astype(np.uint8)))
            r = await exchange(app, chunks_of(body[: len(body) // 2], 4096), then="disconnect")
            metrics = await exchange(app, [], headers={}, path="/metrics", method="GET")
            return r, metrics.body.decode()

    r, metrics = run(scenario())
    assert r.status == 499 and error_code(r) == "client_disconnected"
    assert 'guard_requests_total{route="/classify",status="499"} 1.0' in metrics
    assert 'status="500"' not in metrics


def test_a_stalled_body_times_out_with_408() -> None:
    async def scenario():
        async with running(Settings(models_dir=MODELS, body_timeout_s=0.5)) as app:
            start = time.monotonic()
            r = await exchange(app, [part_head(), b"\x89PNG"], then="stall")
            return r, time.monotonic() - start

    r, took = run(scenario())
    assert r.status == 408 and error_code(r) == "request_timeout"
    assert 0.5 <= took < 5.0


def test_the_pixel_budget_is_first_come_first_served_and_never_exceeded() -> None:
    async def scenario():
        budget, order, peak = PixelBudget(100), [], 0

        async def user(name: str, pixels: int, hold: float) -> None:
            nonlocal peak
            async with budget.take(pixels):
                peak = max(peak, budget.used)
                order.append(name)
                await asyncio.sleep(hold)

        big = asyncio.create_task(user("a", 60, 0.05))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(user("b", 90, 0.01)), asyncio.create_task(user("c", 10, 0.01))]
        await asyncio.sleep(0)
        cancelled = asyncio.create_task(user("x", 100, 0))
        await asyncio.sleep(0)
        cancelled.cancel()  # a request that fails while it waits gives its place back
        await asyncio.gather(big, *waiting, cancelled, return_exceptions=True)
        return order, peak, budget.used

    order, peak, used = run(scenario())
    assert order == ["a", "b", "c"]  # c (10) fits beside a (60) but waits its turn behind b
    assert peak <= 100 and used == 0


def test_a_waiter_cancelled_as_the_budget_frees_neither_fails_the_releaser_nor_leaks_pixels() -> None:
    """A file cancelled while it waits (a sibling failed) and a release in the same loop turn: the release must not
    hand the pixels to the cancelled waiter (that raised InvalidStateError in another request's decode and kept the
    pixels taken for good)."""

    async def scenario() -> tuple[list[object], int, bool]:
        budget = PixelBudget(10)
        done = asyncio.Event()

        async def holder() -> None:
            async with budget.take(10):
                await done.wait()

        async def waiter() -> None:
            async with budget.take(5):
                pass

        held = asyncio.create_task(holder())
        await asyncio.sleep(0)
        waiting = asyncio.create_task(waiter())
        await asyncio.sleep(0)
        done.set()  # the holder's decode ends ...
        waiting.cancel()  # ... in the same turn as the waiter is cancelled
        results = await asyncio.gather(held, waiting, return_exceptions=True)
        async with asyncio.timeout(1), budget.take(10):  # the whole budget is free again
            free = True
        return results, budget.used, free

    (released, cancelled), used, free = asyncio.run(scenario())
    assert released is None and isinstance(cancelled, asyncio.CancelledError)
    assert used == 0 and free


def test_a_cancelled_decode_holds_its_pixels_until_its_thread_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    """One bad file fails its request and cancels its siblings; a sibling's thread keeps decoding, so its share of
    the budget must stay taken until the thread ends, not be handed to the next request at once."""
    from service import admission
    from service.decode import Header

    def slow(header: Header, index: int, contract: object) -> np.ndarray:
        time.sleep(0.3)
        return np.zeros((28, 28), np.uint8)

    monkeypatch.setattr(admission, "decode_pixels", slow)
    decoder = admission.Decoder(Preprocessing(), max_pixels=10**6, budget_pixels=10**6, threads=2)
    big = Header(image=None, pixels=10**6, label="file 0")  # type: ignore[arg-type]

    async def scenario() -> tuple[int, int, int]:
        task = asyncio.ensure_future(decoder._one(big, 0))
        await asyncio.sleep(0.05)  # in its thread, holding the whole budget
        task.cancel()
        await asyncio.sleep(0.05)
        held = decoder.budget.used  # cancelled, its thread still decoding
        task.cancel()  # cancelled again while it waits for its thread (a shutdown, say)
        await asyncio.sleep(0.05)
        still = decoder.budget.used
        await asyncio.gather(task, return_exceptions=True)
        return held, still, decoder.budget.used

    held, still, after = run(scenario())
    decoder.close()
    assert held == still == 10**6 and after == 0


def test_a_small_request_decodes_without_handing_the_loop_to_others() -> None:
    """Small images decode in place: no task per file, so no other request runs in between (and the decode metric
    times the decoding, not the event loop's queue)."""
    from service import admission
    from service.decode import open_image

    decoder = admission.Decoder(Preprocessing(), max_pixels=10**6, budget_pixels=10**6, threads=1)
    headers = decoder.headers(
        [("a.png", png(np.zeros((28, 28), np.uint8))), ("b.png", png(np.ones((28, 28), np.uint8)))]
    )
    big = open_image(png(np.zeros((300, 300), np.uint8)), 0, "big.png", 10**6)

    async def scenario(files: list) -> bool:
        others: list[str] = []
        asyncio.get_running_loop().call_soon(others.append, "another request")
        x = await decoder.decode(files)
        assert x.shape[0] == len(files)
        return bool(others)

    assert run(scenario(headers)) is False
    assert run(scenario([big])) is True  # past the inline size: a thread, and the loop serves others meanwhile
    decoder.close()


def test_a_body_budget_below_the_largest_valid_request_is_refused() -> None:
    """Such a request could never be admitted: a setting that contradicts the others stops the start."""
    largest = Settings(models_dir=MODELS).largest_body
    assert Settings(models_dir=MODELS).body_budget == 2 * largest  # 0: twice the largest valid request
    assert Settings(models_dir=MODELS, body_budget_bytes=largest).body_budget == largest
    with pytest.raises(ValueError, match="GUARD_BODY_BUDGET_BYTES"):
        Settings(models_dir=MODELS, body_budget_bytes=largest - 1)
