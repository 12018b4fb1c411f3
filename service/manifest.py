"""What a bundle's manifest.json may say: parsed without NaN or Infinity, every value the guard reads checked.

A value the service cannot trust stops the start with one line (BundleError), never a guard that silently
judges everything clean: a NaN threshold compares false with every score.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from service.preprocess import COLOR_CHANNELS, RESAMPLES, Preprocessing

MANIFEST = "manifest.json"


class BundleError(RuntimeError):
    """The bundle is missing, incomplete or tampered with: refuse to run it."""


class _Constant(str):
    """A JSON NaN, Infinity or -Infinity, kept as its text so that the error can say where it was."""


def parse_manifest(raw: bytes, path: Path) -> dict[str, Any]:
    """The manifest's JSON, refusing NaN and ±Infinity (Python's json accepts them): a NaN threshold compares
    false with every score, so the guard would call every image clean."""
    try:
        manifest: dict[str, Any] = json.loads(raw, parse_constant=_Constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} holds {type(manifest).__name__}, not a JSON object")
    if constants := [f"{where} is {value}" for where, value in _leaves(manifest) if isinstance(value, _Constant)]:
        raise BundleError(f"{path}: {'; '.join(constants)}: JSON NaN and Infinity are not numbers a threshold can be")
    return manifest


def _leaves(tree: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every leaf of a JSON tree: "thresholds.fused.levels[3]"."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{where}.{key}" if where else str(key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _leaves(value, f"{where}[{i}]")
    else:
        yield where, tree


SCHEMA_VERSION = 1
SIGNALS = ("detrigger", "masked_ae", "strip", "activation")  # what a bundle without a `signals` list runs
# service.preprocess.image_to_pixels turns every upload into 8-bit gray: one channel is all it can feed.
COLORS = tuple(COLOR_CHANNELS)  # Pillow modes: "L" (1 channel), "RGB" (3)
BLENDS = ("sum", "mean")
# The tensors the service feeds and fetches by name (Bundle.classify, image_model, stamp_reversed).
TENSORS = {
    "classifier": (("images",), ("logits", "features")),
    "repaired_classifier": (("images",), ("logits", "features")),  # optional: only when the bundle has one
    "backdoor_expert": (("images",), ("logits", "features")),  # optional: only when the bundle has one
    "detrigger_ae": (("images",), ("restored",)),
    "masked_ae": (("images",), ("restored",)),
    "reversed_triggers": (("images", "label"), ("stamped",)),
}
NORMALISATION = ("mean", "std")  # preprocessing keys that bundles from before colour support lack (identity)
IMAGE_TENSORS = ("images", "restored", "stamped")  # (batch, C, H, W), as the preprocessing contract makes them
Shape = list[int | str | None]  # as ONNX Runtime reports it: a dynamic axis is a name ("batch") or None
Check = Callable[[Any], str | None]  # a manifest value -> what is wrong with it, or None


@dataclass(frozen=True)
class ModelIO:
    """An ONNX model's tensors as its session reports them: name -> shape."""

    inputs: dict[str, Shape]
    outputs: dict[str, Shape]

    @classmethod
    def of(cls, session: Any) -> ModelIO:
        inputs, outputs = session.get_inputs(), session.get_outputs()
        return cls({t.name: list(t.shape) for t in inputs}, {t.name: list(t.shape) for t in outputs})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    if not isinstance(v, int | float) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # a JSON integer past float's range (10**400)
        return False


def show(v: Any) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def real(lo: float = -math.inf, hi: float = math.inf, *, open_lo: bool = False, open_hi: bool = False) -> Check:
    """A finite number in [lo, hi]; open_lo / open_hi leave the bound out."""
    if math.isinf(lo) and math.isinf(hi):
        want = "a finite number"
    elif math.isinf(hi):
        want = f"a finite number {'>' if open_lo else '>='} {lo:g}"
    else:
        want = f"a finite number in {'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"

    def check(v: Any) -> str | None:
        ok = _is_real(v) and (lo < v if open_lo else lo <= v) and (v < hi if open_hi else v <= hi)
        return None if ok else f"{show(v)}, must be {want}"

    return check


def integer(lo: int, hi: int) -> Check:
    return lambda v: None if _is_int(v) and lo <= v <= hi else f"{show(v)}, must be an integer in [{lo}, {hi}]"


def text(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip() else f"{show(v)}, must be a non-empty string"


def one_of(*allowed: Any) -> Check:
    def check(v: Any) -> str | None:
        ok = any(type(v) is type(a) and v == a for a in allowed)
        return None if ok else f"{show(v)}, must be one of {', '.join(map(show, allowed))}"

    return check


def keys(*names: str, optional: tuple[str, ...] = ()) -> Check:
    """A dict with exactly these keys, and any of `optional` (keys that bundles from before them lack)."""
    want = sorted(names)

    def check(v: Any) -> str | None:
        got = sorted(k for k in v if k not in optional) if isinstance(v, dict) else v
        if got == want:
            return None
        extra = f" (and optionally {show(sorted(optional))})" if optional else ""
        return f"has keys {show(sorted(v) if isinstance(v, dict) else v)}, must have exactly {show(want)}{extra}"

    return check


def items(each: Check, *, nonempty: bool = False, distinct: bool = False, most: int | None = None) -> Check:
    """A list whose every item passes `each` (and at most `most` of them)."""

    def check(v: Any) -> str | None:
        if not isinstance(v, list) or (nonempty and not v):
            return f"{show(v)}, must be a {'non-empty ' if nonempty else ''}list"
        if most is not None and len(v) > most:
            return f"{len(v)} items, must be at most {most}"
        for i, item in enumerate(v):
            if problem := each(item):
                return f"[{i}] = {problem}"
        seen = [json.dumps(item) for item in v]
        if distinct and (twice := [item for i, item in enumerate(seen) if item in seen[:i]]):
            return f"{twice[0]} appears more than once, must be listed once"
        return None

    return check


def per_channel(channels: int, each: Check) -> Check:
    """One value for every channel, or one for all."""
    as_list = items(each, nonempty=True)

    def check(v: Any) -> str | None:
        if problem := as_list(v):
            return problem
        return None if len(v) in (1, channels) else f"{len(v)} values, must be 1 or {channels} (one per channel)"

    return check


def matches(n: int, of: str) -> Check:
    return lambda v: None if _is_int(v) and v == n else f"{show(v)}, must be {n} ({of})"


def count(n: int, of: str) -> Check:
    return lambda v: None if not isinstance(v, list) or len(v) == n else f"{len(v)} entries, {of} has {n}"


def series(each: Check, *, strict: bool, length: int | None = None) -> Check:
    """A non-empty list of numbers passing `each` that never decreases (strict: always increases)."""
    as_list = items(each, nonempty=True)

    def check(v: Any) -> str | None:
        if problem := as_list(v):
            return problem
        if length is not None and len(v) != length:
            return f"{len(v)} values, must be {length} (one per level)"
        for i, (a, b) in enumerate(pairwise(v), 1):
            if b < a or (strict and b == a):
                return f"[{i}] = {b:g} after {a:g}, must {'increase' if strict else 'never decrease'}"
        return None

    return check


# A fusion tail's scale (the mean excess of clean scores over the table's last quantile) at most this many times the
# largest magnitude in the table (and at least 1, for tables of tiny scores). The bundles make evaluate builds stay
# under 4 times (the largest: the MNIST bundle's repaired signal, whose table's top is small beside its tail). A scale
# far past that describes no clean scores: it mutes the signal, whose surprise then barely grows past its table, and
# a triggered image it alone would catch is called clean. A sanity bound on unbounded scores only: for signals whose
# scores are bounded, `_reachable` checks exactly that the fused threshold can be passed, and the self-test
# (service.selftest) checks at start-up that the guard still catches Neural Cleanse's reversed triggers.
TAIL_REACH = 10.0


def tail_scale(quantiles: Any) -> Check:
    """The exponential tail's scale of a signal: > 0, and within TAIL_REACH of its table's magnitude."""
    if not isinstance(quantiles, list) or not quantiles or not all(_is_real(q) for q in quantiles):
        return real(0, open_lo=True)  # the table's own check reports it
    magnitude = max(1.0, *(abs(float(q)) for q in (quantiles[0], quantiles[-1])))
    return real(0, TAIL_REACH * magnitude, open_lo=True)


def unit_scale(v: Any) -> str | None:
    """preprocessing.scale: 1/255, the only one there is. The autoencoders, STRIP's blend, the triggers and the
    restored images all work on pixels in [0, 1]; a model that wants another range says so with mean and std."""
    if _is_real(v) and math.isclose(float(v), 1 / 255, rel_tol=1e-9):
        return None
    return f"{show(v)}, must be 1/255 (8-bit levels to [0, 1]; set mean and std for another model input range)"


def neurons(classes: int, width: int) -> Check:
    """Neural Cleanse's label -> indices of the penultimate-layer neurons its reversed trigger excites most."""
    label, each = integer(0, classes - 1), items(integer(0, width - 1), nonempty=True)

    def check(v: Any) -> str | None:
        if not isinstance(v, dict) or not v:
            return f"{show(v)}, must map at least one label to its neurons"
        for key, indices in v.items():
            if not (key.isascii() and key.isdigit()) or label(int(key)):
                return f"label {show(key)}, must be an integer in [0, {classes - 1}]"
            if problem := each(indices):
                return f"label {key}: {problem}"
        return None

    return check


def _fixed(shape: Shape | None, rank: int) -> list[int] | None:
    """The fixed dimensions after the batch axis of a tensor of this rank, or None."""
    if shape is None or len(shape) != rank:
        return None
    dims = [d for d in shape[1:] if isinstance(d, int) and not isinstance(d, bool)]
    return dims if len(dims) == rank - 1 else None


def _recorded(spec: Any) -> dict[str, Any]:
    """The manifest's [{"name", "shape", "dtype"}] as name -> shape; empty if malformed (then every tensor differs)."""
    if not isinstance(spec, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in spec):
        return {}
    return {t["name"]: t.get("shape") for t in spec}


def signal_names(manifest: Mapping[str, Any]) -> list[str]:
    """The signals a bundle runs: its manifest's `signals` (name -> parameters), or the four of every bundle."""
    listed = manifest.get("signals")
    return list(listed) if isinstance(listed, dict) else list(SIGNALS)


def strip_calibrated(manifest: Mapping[str, Any], key: str) -> tuple[str, Any]:
    """(where, value) of the STRIP parameter `key` ("n", "blend") its threshold and fusion table were calibrated
    with: recorded beside its threshold, or (bundles calibrated before it was) the calibration config's."""
    where = f"thresholds.strip.{key}"
    where = where if _at(manifest, where) is not _MISSING else f"configs.strip.{key}"
    return where, _at(manifest, where)


def _params(manifest: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """The manifest's parameters of signal `name` (none for bundles without a `signals` list)."""
    params = _at(manifest, f"signals.{name}")
    return params if isinstance(params, dict) else {}


def _io_problems(manifest: Mapping[str, Any], models: Mapping[str, ModelIO], chw: list[int]) -> list[str]:
    """The tensors the service feeds and fetches exist, image tensors are [batch, *chw], and the manifest
    records each model's tensors as the session reports them."""
    problems = []
    for name, (inputs, outputs) in TENSORS.items():
        if name not in models:  # an optional model the bundle does not have (Bundle.load requires the others)
            continue
        for kind, needed in (("inputs", inputs), ("outputs", outputs)):
            actual: dict[str, Shape] = getattr(models[name], kind)
            recorded, where = _recorded(manifest["files"][name].get(kind)), f"files.{name}.{kind}"
            problems += [f"{where}: the ONNX model has no {t!r}" for t in needed if t not in actual]
            problems += [
                f"{where}: {t} has shape {shape}, must be [batch, {', '.join(map(str, chw))}]"
                for t, shape in actual.items()
                if t in IMAGE_TENSORS and _fixed(shape, 4) != chw
            ]
            problems += [
                f"{where}: {t} recorded as {show(recorded.get(t))}, the ONNX model has {show(actual.get(t))}"
                for t in sorted(recorded.keys() | actual.keys())
                if recorded.get(t) != actual.get(t)
            ]
    return problems


def _bank_problems(bank: np.ndarray, chw: list[int], recorded: Any) -> list[str]:
    """The STRIP bank: clean images (M, C, H, W) in [0, 1], as many as the manifest says."""
    where = "files.strip_bank"
    if bank.ndim != 4 or list(bank.shape[1:]) != chw or not np.issubdtype(bank.dtype, np.number):
        return [f"{where}: {bank.dtype} {list(bank.shape)}, must be numbers shaped [M, {', '.join(map(str, chw))}]"]
    problems = []
    if recorded != list(bank.shape):
        problems.append(f"{where}.shape: {show(recorded)}, the file holds {list(bank.shape)}")
    if not np.isfinite(bank).all():
        problems.append(f"{where}: {int((~np.isfinite(bank)).sum())} non-finite values, must be images in [0, 1]")
    elif len(bank) and (bank.min() < 0 or bank.max() > 1):
        problems.append(f"{where}: values in [{bank.min():g}, {bank.max():g}], must be images in [0, 1]")
    return problems


_MISSING = object()


def _at(manifest: Mapping[str, Any], where: str) -> Any:
    """The value at a dotted path ("thresholds.fused.levels"), or _MISSING."""
    value: Any = manifest
    for key in where.split("."):
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def validate_manifest(manifest: Mapping[str, Any], models: Mapping[str, ModelIO], bank: np.ndarray) -> None:
    """Every value the service reads from the manifest, against its range and the ONNX models it describes.

    A value out of range can fail open (a threshold no score reaches) as surely as a NaN, so the service and
    `backdoor-guard verify` refuse the bundle with one line that lists every problem.
    """
    clf = models["classifier"]
    chw = _fixed(clf.inputs.get("images"), 4)
    logits, features = _fixed(clf.outputs.get("logits"), 2), _fixed(clf.outputs.get("features"), 2)
    if chw is None or logits is None or features is None:  # every check below is relative to these shapes
        raise BundleError(
            f"files.classifier: the ONNX model must take images [batch, C, H, W] and give logits and features "
            f"[batch, width]; it takes {clf.inputs} and gives {clf.outputs}"
        )
    classes, width, (channels, height, width_px) = logits[0], features[0], chw
    rules: list[tuple[str, Check]] = [
        ("schema_version", one_of(SCHEMA_VERSION)),
        ("name", text),
        ("class_names", items(text, nonempty=True, distinct=True)),
        ("class_names", count(classes, "the classifier's logits output")),
        (
            "preprocessing",
            keys(*(f.name for f in fields(Preprocessing) if f.name not in NORMALISATION), optional=NORMALISATION),
        ),
        ("preprocessing.height", matches(height, "the ONNX models' input height")),
        ("preprocessing.width", matches(width_px, "the ONNX models' input width")),
        ("preprocessing.color", one_of(*(c for c, n in COLOR_CHANNELS.items() if n == channels))),
        ("preprocessing.resample", one_of(*RESAMPLES)),
        ("preprocessing.scale", unit_scale),
        ("preprocessing.layout", one_of("NCHW")),
        *(
            (f"preprocessing.{name}", per_channel(channels, each))
            for name, each in (("mean", real()), ("std", real(0, open_lo=True)))
            if _at(manifest, f"preprocessing.{name}") is not _MISSING  # absent: identity
        ),
        ("configs.strip.n", integer(1, len(bank))),
        ("configs.strip.blend", one_of(*BLENDS)),
        *(  # the strip signal's own parameters, where its manifest entry sets them
            (f"signals.strip.{key}", check)
            for key, check in (
                ("n", integer(1, len(bank))),
                ("blend", one_of(*BLENDS)),
                ("rounds", series(integer(1, len(bank)), strict=True)),
            )
            if _at(manifest, f"signals.strip.{key}") is not _MISSING
        ),
        # A scan that finds all labels but one (or all) infected describes no model: the label policy needs two free
        ("neural_cleanse.flagged_labels", items(integer(0, classes - 1), distinct=True, most=max(0, classes - 2))),
        ("neural_cleanse.activation_neurons", neurons(classes, width)),
    ]
    from service.guard import RULES
    from service.signals import REGISTRY  # each signal knows the range of its own threshold

    names = signal_names(manifest)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise BundleError(f"{MANIFEST} lists signals this service does not have: {unknown}; known: {sorted(REGISTRY)}")
    if "detrigger" not in names:  # GuardPipeline needs it: the label policy takes a flagged image's label from it
        raise BundleError(f"{MANIFEST}: signals {names} must include detrigger (the label policy's restoration)")
    needed = {REGISTRY[n].model for n in names} - models.keys()
    if needed:
        raise BundleError(f"{MANIFEST}: signals {names} need model(s) {sorted(needed)}, which files does not list")
    references = {ref for n in names if (ref := REGISTRY[n].reference) is not None} - manifest["files"].keys()
    if references:
        raise BundleError(f"{MANIFEST}: signals {names} need file(s) {sorted(references)}, which files does not list")
    if "thresholds" in manifest:  # absent until calibration, which loads the bundle to compute them
        levels = _at(manifest, "thresholds.fused.levels")
        rules += [
            ("thresholds.target_fpr", real(0, 1, open_lo=True, open_hi=True)),
            # a clean percentile; fused scores lie in [0, 1], so at 1 nothing could ever be flagged
            ("thresholds.fused.threshold", real(0, 1, open_hi=True)),
            ("thresholds.fused.levels", series(real(0, 1, open_hi=True), strict=True)),
            ("thresholds.fused.quantiles", keys(*names)),
            ("thresholds.fused.tail_scale", keys(*names)),
        ]
        if _at(manifest, "thresholds.fused.rule") is not _MISSING:  # bundles calibrated before it: "max"
            rules.append(("thresholds.fused.rule", one_of(*RULES)))
        if _at(manifest, "thresholds.label_source") is not _MISSING:  # bundles calibrated before it: "restored"
            sources = ("restored", "repaired", "both") if "repaired" in names else ("restored",)
            rules.append(("thresholds.label_source.source", one_of(*sources)))
        if "strip" in names:
            # STRIP's threshold and fusion table hold only at the N and blend they were calibrated at: those recorded
            # beside its threshold, or (bundles calibrated before they were) the calibration config's
            for key in ("n", "blend"):
                runs = _params(manifest, "strip").get(key, _at(manifest, f"configs.strip.{key}"))
                fitted, _ = strip_calibrated(manifest, key)
                if key == "n" and _is_int(runs):  # else signals.strip.n's own check reports it
                    rules.append((fitted, matches(runs, "the N the strip signal runs at")))
                elif key == "blend" and runs in BLENDS:
                    rules.append((fitted, one_of(runs)))
        for name in names:
            if (bounds := REGISTRY[name].threshold_bounds(classes, _params(manifest, name))) is not None:
                rules.append((f"thresholds.{name}.threshold", real(*bounds)))
        length = len(levels) if isinstance(levels, list) else None
        for name in names:  # a signal's clean quantiles are its scores, in the range its scores can take
            scores = real(*REGISTRY[name].score_bounds(classes, _params(manifest, name)))
            rules.append((f"thresholds.fused.quantiles.{name}", series(scores, strict=False, length=length)))
            table = _at(manifest, f"thresholds.fused.quantiles.{name}")
            rules.append((f"thresholds.fused.tail_scale.{name}", tail_scale(table)))
    problems = _io_problems(manifest, models, chw)
    for name in names:  # each signal's own parameters, and those its threshold was fitted with
        if isinstance(manifest.get("signals"), dict) and not isinstance(manifest["signals"][name], dict):
            problems.append(f"signals.{name}: must be an object of parameters")
        fitted = _at(manifest, f"thresholds.{name}")
        calibrated = None if "thresholds" not in manifest else fitted if isinstance(fitted, dict) else {}
        problems += REGISTRY[name].parameter_problems(_params(manifest, name), calibrated)
    for where, check in rules:
        value = _at(manifest, where)
        if problem := "missing" if value is _MISSING else check(value):
            problems.append(f"{where}: {problem}")
    problems += _bank_problems(bank, chw, manifest["files"]["strip_bank"].get("shape"))
    if not problems and "thresholds" in manifest:
        problems += _reachable(manifest, names, classes)
    if problems:
        raise BundleError(f"{MANIFEST} has values the guard cannot trust: " + "; ".join(problems))


def _reachable(
    manifest: Mapping[str, Any], names: list[str], classes: int, threshold: float | None = None
) -> list[str]:
    """The fused threshold (the manifest's, or `threshold`: GUARD_FUSED_THRESHOLD's) must be one some image could
    exceed: when every signal's score is bounded above, the surprise of all of them at their highest (summed under
    fisher, the largest under max) must pass it."""
    from service.guard import Fusion, fused_surprise
    from service.signals import REGISTRY

    fusion = Fusion.from_manifest(manifest["thresholds"]["fused"])
    if threshold is not None:
        fusion = replace(fusion, threshold=threshold)
    tops = [REGISTRY[n].score_bounds(classes, _params(manifest, n))[1] for n in names]
    if any(math.isinf(top) for top in tops):
        return []  # an unbounded score reaches any threshold (tail_scale keeps the tail within reach)
    most = [float(fusion.surprise(n, np.array([top]))[0]) for n, top in zip(names, tops, strict=True)]
    reach = max(most) if fusion.rule == "max" else sum(most)
    need = float(fused_surprise(fusion.threshold))
    if reach > need:
        return []
    where = "thresholds.fused.threshold" if threshold is None else "GUARD_FUSED_THRESHOLD"
    return [f"{where}: {fusion.threshold!r} cannot be exceeded: every signal at its highest score "
            f"adds up to a surprise of {reach:.3g}, the threshold needs more than {need:.3g}"]  # fmt: skip


def threshold_problems(manifest: Mapping[str, Any], classes: int, threshold: float) -> list[str]:
    """What is wrong with serving a validated bundle at another fused threshold (GUARD_FUSED_THRESHOLD)."""
    return _reachable(manifest, signal_names(manifest), classes, threshold)
