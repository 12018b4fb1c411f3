"""What the lifespan builds once and routes receive by injection: bundle, pipeline, batcher, metrics."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from typing import Annotated

import numpy as np
from fastapi import Depends, Request

from service.admission import Decoder
from service.batcher import MicroBatcher
from service.bundle import Bundle, build_pipeline, check_digest
from service.errors import NotReady
from service.guard import SIDE_MAX_IMAGES, GuardPipeline, GuardResult, PlainPipeline
from service.manifest import strip_calibrated, threshold_problems
from service.metrics import Metrics
from service.selftest import self_test_async
from service.settings import Settings
from service.upload import BodyBudget

log = logging.getLogger(__name__)


def pipeline_for(settings: Settings, bundle: Bundle) -> GuardPipeline:
    """The guard as the settings ask for it (the service and `backdoor-guard scan` both run this one)."""
    check_digest(bundle.digest, settings.bundle_sha256)  # here too, whatever loaded the bundle
    pipeline: GuardPipeline
    if settings.signals == "none":
        log.warning("GUARD_SIGNALS=none: the guard is off; answers carry the model's label and no verdict")
        return PlainPipeline(bundle.classify)
    if settings.strip_n is not None and "strip" not in bundle.signal_names:
        raise ValueError(
            f"GUARD_STRIP_N is set but {bundle.root} runs no strip signal (its manifest's `signals`): unset it, or "
            "serve a bundle calibrated with STRIP"
        )
    if settings.strip_n is not None:
        _, calibrated_n = strip_calibrated(bundle.manifest, "n")
        if settings.strip_n != calibrated_n:
            raise ValueError(
                f"GUARD_STRIP_N={settings.strip_n}, but {bundle.root}'s STRIP was calibrated at N = {calibrated_n}: "
                "its threshold and fusion table hold only there. Unset it, or calibrate at that N (python -m "
                f"training calibrate --strip-n {settings.strip_n})"
            )
    pipeline = build_pipeline(
        bundle, strip_n=settings.strip_n, avoid_infected=settings.avoid_infected_labels,
        early_exit=settings.strip_early_exit,
    )  # fmt: skip
    if settings.fused_threshold is not None and pipeline.fusion is not None:
        if problems := threshold_problems(bundle.manifest, len(bundle.class_names), settings.fused_threshold):
            raise ValueError("; ".join(problems))
        pipeline.fusion = replace(pipeline.fusion, threshold=settings.fused_threshold)
    if pipeline.fusion is None:
        raise ValueError(f"{bundle.root} is not calibrated: run `python -m training calibrate`")
    return pipeline


# The default chunk (GUARD_CHUNK_IMAGES=0): CHUNK_ROWS rows over every model the guard calls per image (the
# classifier with the image and each signal's extra rows, every STRIP overlay included; the repaired model; the
# expert; each restoration's autoencoder), and never fewer than MIN_CHUNK_IMAGES images, which single-image traffic
# at concurrency 8 batches anyway. ONNX Runtime keeps each session's largest call, so the bound is in rows. make
# soak (bench/soak.py) measured 64-image batches at 1.19x the single-image steady state's memory with 16-image
# chunks with STRIP at N = 4 (9 rows per image), 1.80x with 46; without STRIP (5 rows per image) 1.42x with 28-image
# chunks and 1.69x with 48 (96 classifier rows, the rule before it counted the other models); 1.06x with 8-image
# chunks at N = 32. A whole batch of the service at concurrency 32 (about 16 images) runs in one call per model,
# where 8-image chunks cost the guard much of its throughput (a one-off run, not a repo command).
CHUNK_ROWS = 144
MIN_CHUNK_IMAGES = 8


def chunk_images(pipeline: GuardPipeline, one: np.ndarray) -> int:
    """The default chunk for this pipeline: CHUNK_ROWS rows over all its models' calls, at least MIN_CHUNK_IMAGES.
    one: a single model input. A restoration signal (one with `restore`) also runs its autoencoder once per image."""
    rows = 1 + sum(len(s.prepare(one)) + hasattr(s, "restore") for s in pipeline.signals)
    return max(MIN_CHUNK_IMAGES, CHUNK_ROWS // rows)


@dataclass
class Runtime:
    settings: Settings
    bundle: Bundle
    pipeline: GuardPipeline
    batcher: MicroBatcher
    metrics: Metrics
    decoder: Decoder
    chunk_images: int  # most images per guard call (GUARD_CHUNK_IMAGES, or derived: `chunk_images`)
    body_budget: BodyBudget  # upload bytes held at once across requests (GUARD_BODY_BUDGET_BYTES)
    ready: bool = False
    warmup_error: str | None = None

    @property
    def guarded(self) -> bool:
        """False when the guard is off (GUARD_SIGNALS=none)."""
        return not isinstance(self.pipeline, PlainPipeline)

    @classmethod
    def build(cls, settings: Settings, bundle: Bundle) -> Runtime:
        pipeline = pipeline_for(settings, bundle)
        metrics = Metrics([s.name for s in pipeline.signals])
        pipeline.on_stage = metrics.stage_seconds
        chunk = settings.chunk_images or chunk_images(pipeline, bundle.strip_bank[:1])
        log.info("the guard runs at most %d images per call (GUARD_CHUNK_IMAGES)", chunk)
        batcher = MicroBatcher(
            lambda images: pipeline.run_in_chunks(images, chunk),
            settings.max_batch,
            settings.max_delay_ms / 1000,
            settings.max_queue,
            metrics.observe_batch,
        )
        metrics.queue_limit.set(settings.max_queue)
        metrics.model.info(
            {
                "name": bundle.manifest["name"],
                "sha256": bundle.manifest["files"]["classifier"]["sha256"],
                "provider": bundle.sessions["classifier"].get_providers()[0],
                "bundle_sha256": bundle.digest,
            }
        )
        decoder = Decoder(
            bundle.preprocessing, settings.max_pixels, settings.decode_budget_pixels, settings.decode_threads
        )
        return cls(settings, bundle, pipeline, batcher, metrics, decoder, chunk, BodyBudget(settings.body_budget))

    def warm_up_images(self) -> np.ndarray:
        """The warm-up batch: a few clean images of the STRIP bank, float32 (B, 1, H, W)."""
        return self.bundle.strip_bank[: self.settings.warm_up_batch]

    def warm_up_batches(self) -> list[np.ndarray]:
        """What must pass before the service is ready: the warm-up batch, and where the guard runs small batches on
        its twin (GuardPipeline.small: other sessions) and the warm-up batch does not reach it, one image too, so
        that the first single-image request neither meets cold sessions nor finds them broken."""
        batch = self.warm_up_images()
        twin = self.pipeline.small is not None and len(batch) > SIDE_MAX_IMAGES
        return [batch, batch[:1]] if twin else [batch]

    async def warm_up(self) -> None:
        """The warm-up batches through the real path, then (the guard on) the self-test (service.selftest); ready
        only if every batch comes back finite and the self-test passes."""
        try:
            for images in self.warm_up_batches():
                check_warm_up(await self.batcher.submit(images))
            if self.guarded:
                test = await self_test_async(self.bundle, self.batcher.guard)
                for probe, rate in test.rates.items():
                    self.metrics.self_test.labels(probe=probe).set(rate)
                log.info("self-test: flagged %s", test.summary())
                test.check()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # reported by /v2/health/ready
            self.warmup_error = f"warm-up failed: {err}"
            log.exception("warm-up failed; the service stays not ready")
            return
        self.ready = True
        self.metrics.ready.set(1)
        log.info("warm-up passed: ready")


def check_warm_up(result: GuardResult) -> None:
    """Raise if the warm-up batch's logits or (with the guard on) fused scores are not all finite."""
    if not np.isfinite(result.original.logits).all():
        raise ValueError("warm-up produced non-finite logits")
    if result.signals and not np.isfinite(result.score).all():
        raise ValueError("warm-up produced non-finite scores")


async def get_runtime(request: Request) -> Runtime:
    """The loaded runtime. `async` although it awaits nothing: FastAPI runs a plain `def` dependency in its thread
    pool, a thread hop on every request for a dictionary lookup."""
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise NotReady("the models are not loaded")
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
