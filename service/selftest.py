"""The start-up self-test: the guard, as it will serve, must still catch the stand-in triggers it was calibrated on.

A manifest can pass every range check and still blind the guard: a fusion tail wide enough to mute a signal, a
GUARD_FUSED_THRESHOLD that no triggered image reaches, a preprocessing or a reference file that moves every score.
Calibration records, for each label Neural Cleanse watches, the fused rate at which the guard flagged clean images
stamped with that label's reversed trigger (manifest `calibration.neural_cleanse_reversed_triggers.LABEL.fused_tpr`;
every bundle has one: the scan always watches at least its most trigger-like label, and a reversed trigger flips
labels on a clean model too). Before the service is ready (and in `backdoor-guard verify` and `scan`), the guard runs
on the STRIP bank, the bundle's own clean images:

- clean: it must flag at most TOLERANCE more than the bundle's target FPR of them;
- stand-ins: on the bank images the classifier does not already give label L, stamped with L's reversed trigger
  (calibration's stand-ins on other clean images), it must flag at least the recorded rate less TOLERANCE.

The tolerance is wide: on the shipped bundle and the suite's (make evaluate), a one-off check found the bank's rates
close to the recorded ones, well inside it, where tables shifted above the clean scores fall past it
(tests/service/test_bundle_validation.py). The attacker's trigger plays no part.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from service.guard import GuardResult
from service.manifest import real

if TYPE_CHECKING:
    from service.bundle import Bundle

A_RATE = real(0, 1)  # the manifest's own check of a finite number in [0, 1] (NaN, bools and strings fail it)
TOLERANCE = 0.10  # how far a rate may fall from the recorded one (or rise past the target FPR) before start-up stops


class SelfTestFailed(ValueError):
    """The guard, as configured, no longer does what its calibration recorded: the service stays not ready."""


@dataclass(frozen=True)
class Probe:
    name: str  # "clean", or "stand_in_L" for label L's reversed trigger
    images: np.ndarray  # float32 (N, C, H, W)
    expected: float  # the recorded rate: the target FPR for the clean bank, the stand-in's fused TPR for the others

    @property
    def clean(self) -> bool:
        return self.name == "clean"

    def problem(self, flagged: np.ndarray) -> str | None:
        rate = float(np.mean(flagged))
        if self.clean and rate > self.expected + TOLERANCE:
            return (f"it flags {rate:.1%} of the clean bank's {len(flagged)} images, the target FPR is "
                    f"{self.expected:.1%}")  # fmt: skip
        if not self.clean and rate < self.expected - TOLERANCE:
            return (f"it flags {rate:.1%} of {len(flagged)} bank images stamped with Neural Cleanse's reversed "
                    f"trigger for label {self.name.removeprefix('stand_in_')}, calibration recorded "
                    f"{self.expected:.1%}")  # fmt: skip
        return None


def recorded_rate(key: Any, entry: Any, classes: int) -> tuple[int, float] | None:
    """(label, fused TPR) of one recorded stand-in, or None where either is not what calibration writes: a rate
    that is NaN would pass any comparison, so it is a problem, never a pass."""
    if not (isinstance(key, str) and key.isascii() and key.isdigit() and int(key) < classes):
        return None
    rate: Any = entry.get("fused_tpr") if isinstance(entry, Mapping) else None
    return None if A_RATE(rate) is not None else (int(key), float(rate))


def stand_ins(bundle: Bundle, original_labels: np.ndarray) -> tuple[list[Probe], list[str]]:
    """The stamped probes, per recorded label the bank images whose original label is another, stamped; and the
    problems with the record."""
    calibration = bundle.manifest.get("calibration")
    recorded = calibration.get("neural_cleanse_reversed_triggers") if isinstance(calibration, Mapping) else None
    if not isinstance(recorded, Mapping) or not recorded:
        return [], ["the manifest records no stand-in trigger to test with (calibration is incomplete)"]
    probes, problems = [], []
    for key, entry in recorded.items():
        if (parsed := recorded_rate(key, entry, len(bundle.class_names))) is None:
            where = f"calibration.neural_cleanse_reversed_triggers.{key}"
            problems.append(f"{where}: not a label with a fused_tpr in [0, 1]")
            continue
        label, rate = parsed
        others = bundle.strip_bank[original_labels != label]
        if not len(others):  # a classifier that gives every clean image one label is no classifier to guard
            problems.append(f"the classifier gives every clean bank image label {label}: nothing to stamp")
            continue
        probes.append(Probe(f"stand_in_{label}", bundle.stamp_reversed(others, label), rate))
    return probes, problems


@dataclass
class SelfTest:
    rates: dict[str, float]  # probe -> the share of its images the guard flagged
    problems: list[str]

    def summary(self) -> str:
        """The rates as a line: "clean 2.0%, stand_in_0 99.6%"."""
        return ", ".join(f"{probe} {rate:.1%}" for probe, rate in self.rates.items())

    def check(self) -> None:
        if self.problems:
            raise SelfTestFailed(
                "self-test failed, the guard as configured does not do what its calibration recorded: "
                + "; ".join(self.problems)
            )


def _judge(probe: Probe, result: GuardResult, test: SelfTest) -> None:
    test.rates[probe.name] = float(np.mean(result.backdoor))
    if (problem := probe.problem(result.backdoor)) is not None:
        test.problems.append(problem)


async def self_test_async(bundle: Bundle, run: Callable[[np.ndarray], Awaitable[GuardResult]]) -> SelfTest:
    """Run the probes through `run`: the guard as it serves (the service's micro-batcher)."""
    test = SelfTest({}, [])
    clean = Probe("clean", bundle.strip_bank, float(bundle.manifest["thresholds"]["target_fpr"]))
    result = await run(clean.images)
    _judge(clean, result, test)
    probes, problems = stand_ins(bundle, result.original.labels)
    test.problems += problems
    for probe in probes:
        _judge(probe, await run(probe.images), test)
    return test


def self_test(bundle: Bundle, run: Callable[[np.ndarray], GuardResult]) -> SelfTest:
    """`self_test_async` through a synchronous `run` (a GuardPipeline's run_in_chunks): verify and scan."""

    async def run_async(images: np.ndarray) -> GuardResult:
        return run(images)

    return asyncio.run(self_test_async(bundle, run_async))
