"""Prometheus metrics of one app (own registry, so tests can build many apps). Base units, bounded labels."""

from __future__ import annotations

from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics

from service.batcher import BatchStats
from service.guard import GuardResult, fused_surprise

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# The *_created series double the exposition and no dashboard reads them.
disable_created_metrics()

ENTROPY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5)
# The fused verdict's surprise, -ln(1 - fused score) (service.guard.Fusion: the sum of the signals' surprises): on
# clean images each signal's is about exponential, so the sum's clean mean is about the number of signals (5 in
# the shipped bundle), whose threshold is 11.7; past FUSED_CAP the score rounds to 1 and the cap is recorded.
FUSED_BUCKETS = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 15.0, 20.0, 30.0)
FUSED_CAP = 50.0


class Metrics:
    def __init__(self, signals: list[str]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "guard_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "guard_request_duration_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queued = Histogram(
            "guard_queue_wait_seconds",
            "Time a request's images waited for a batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "guard_batch_compute_seconds", "Time the guard took for one batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.decode = Histogram(
            "guard_decode_seconds", "Time to decode and preprocess one request", buckets=LATENCY_BUCKETS, registry=r
        )
        self.encode = Histogram(
            "guard_encode_seconds", "Time to build one response's JSON", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "guard_batch_size_images", "Images per guarded batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.images = Counter(
            "guard_images", "Images judged, by verdict (unguarded: GUARD_SIGNALS=none)", ["verdict"], registry=r
        )
        self.triggers = Counter(
            "guard_signal_triggers", "Images each signal flagged on its own", ["signal"], registry=r
        )
        self.entropy = Histogram(
            "guard_strip_entropy", "STRIP entropy (log2) of judged images, over the overlays each ran: watch for drift",
            buckets=ENTROPY_BUCKETS, registry=r,
        )  # fmt: skip
        self.fused = Histogram(
            "guard_fused_surprise",
            "Fused verdict's surprise -ln(1 - fused score) of judged images, whatever signals the bundle runs: "
            "watch for drift (its threshold: thresholds.fused.surprise of /v2/models/{name})",
            buckets=FUSED_BUCKETS, registry=r,
        )  # fmt: skip
        self.stage = Counter(
            "guard_stage_seconds", "Time spent in each stage of the guard, summed over batches", ["stage"], registry=r
        )
        self.queue = Gauge("guard_queue_images", "Images waiting or running", registry=r)
        self.queue_limit = Gauge(
            "guard_queue_limit_images", "Most images waiting or running before requests get 503", registry=r
        )
        self.ready = Gauge("guard_ready", "1 once the models are loaded and warmed up", registry=r)
        self.self_test = Gauge(
            "guard_self_test_flagged_ratio",
            "Share of the start-up self-test's images the guard flagged: the clean bank (probe=clean) and the bank "
            "stamped with each Neural Cleanse reversed trigger (probe=stand_in_LABEL)",
            ["probe"], registry=r,
        )  # fmt: skip
        self.model = Info("guard_model", "The guarded model and its bundle", registry=r)
        # Each labelled series looked up once (`labels` takes a lock and checks the labels on every call, per batch
        # and stage); created here, they also export zeros from the start, so rates exist
        verdicts = ("backdoor", "clean") if signals else ("unguarded",)
        self._verdicts = {v: self.images.labels(verdict=v) for v in verdicts}
        self._triggers = {name: self.triggers.labels(signal=name) for name in signals}
        self._stages: dict[str, Any] = {}

    def stage_seconds(self, stage: str, seconds: float) -> None:
        """Time spent in a stage of the guard (GuardPipeline's on_stage)."""
        child = self._stages.get(stage)
        if child is None:
            child = self._stages[stage] = self.stage.labels(stage=stage)
        child.inc(seconds)

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.images)
        self.compute.observe(stats.compute_s)
        for q in stats.queued_s:
            self.queued.observe(q)

    def observe_result(self, result: GuardResult) -> None:
        if not result.signals:  # the guard off (GUARD_SIGNALS=none): no verdict to count
            self._verdicts["unguarded"].inc(len(result.labels))
            return
        n_backdoor = int(result.backdoor.sum())
        self._verdicts["backdoor"].inc(n_backdoor)
        self._verdicts["clean"].inc(len(result.backdoor) - n_backdoor)
        for name, signal in result.signals.items():
            self._triggers[name].inc(int(signal.triggered.sum()))
        for value in np.minimum(fused_surprise(result.score), FUSED_CAP):  # a score of 1 is past the cap
            self.fused.observe(float(value))
        if "strip" in result.signals:  # bundles that run STRIP (not the default since make cost dropped it)
            for value in result.signals["strip"].evidence.get("entropy", []):
                self.entropy.observe(float(value))
