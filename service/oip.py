"""The Open Inference Protocol (KServe v2 / Triton) inference request and response, JSON and binary tensors.

A request body is JSON, optionally followed by raw tensor bytes (the binary tensor extension: the JSON's length is
in the `Inference-Header-Content-Length` header and each binary input says its `binary_data_size`). The guard takes
one input, `images`: FP32 `[B, C, H, W]` in [0, 1] (the preprocessing contract's model input) or UINT8 `[B, C, H, W]`
(0..255, scaled by the contract). It answers with the tensors in OUTPUTS, and one score per signal
(`<signal>_score`); each output is JSON data or binary as the request asks (per output `binary_data`, or
`binary_data_output` for all).

Every value is checked before the guard sees it: a wrong shape, a value outside [0, 1], a NaN or a size that does
not add up is a 400, never a guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from service.errors import MalformedRequest, TooManyFiles
from service.guard import GuardResult
from service.preprocess import Preprocessing

INPUT = "images"
DATATYPES: dict[str, np.dtype[Any]] = {
    "FP32": np.dtype("<f4"), "UINT8": np.dtype("u1"), "INT64": np.dtype("<i8"), "FP64": np.dtype("<f8"),
    "BOOL": np.dtype("?"),
}  # fmt: skip
# Output name -> (datatype, description); the guard-off mode answers only PLAIN_OUTPUTS.
OUTPUTS = {
    "label": ("INT64", "the label to trust: the model's, or for a flagged image the label policy's"),
    "confidence": ("FP32", "that label's probability"),
    "backdoor": ("BOOL", "whether the image carries a trigger (the fused verdict)"),
    "score": ("FP64", "the fused score, in [0, 1]"),
    "original_label": ("INT64", "what the model says of the image as sent"),
    "restored_label": ("INT64", "what the model says of the de-triggered image"),
    "repaired_label": ("INT64", "what the repaired model says (bundles that run the repaired signal)"),
}
PLAIN_OUTPUTS = ("label", "confidence", "original_label")
# The one version of the model a service serves (a bundle is one model): the protocol's optional
# /v2/models/{name}/versions/{version}/... routes answer for it as the routes without a version do.
MODEL_VERSION = "1"
EXTENSIONS = ["binary_tensor_data"]  # Triton's name for the binary tensor extension this service speaks
SIGNAL_SUFFIX = "_score"


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    images: np.ndarray  # float32 (B, C, H, W) in [0, 1]
    outputs: list[tuple[str, bool]]  # (name, binary) in the order asked; empty: every output


def _fail(message: str) -> MalformedRequest:
    return MalformedRequest(f"inference request: {message}")


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """(the JSON part, the binary part) of a request body."""
    if header_length is None:
        head, rest = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise _fail(f"Inference-Header-Content-Length {header_length!r} is not a number") from None
        if not 0 < n <= len(body):
            raise _fail(f"Inference-Header-Content-Length {n} is outside the body's {len(body)} bytes")
        head, rest = body[:n], body[n:]
    try:
        request = orjson.loads(head)
    except orjson.JSONDecodeError as err:
        raise _fail(f"the JSON part does not parse ({err})") from None
    if not isinstance(request, dict):
        raise _fail("the JSON part must be an object")
    return request, rest


def _flat(data: Any, shape: list[int]) -> list[Any]:
    """JSON tensor data -> a flat list: flat (row-major; the caller checks the count), or nested exactly as `shape`,
    every list at depth d holding shape[d] items and values only at the last depth. Anything else is refused:
    ragged lists, or axes in another order, would pass a count of the values and be read as other images."""
    if not isinstance(data, list):
        raise _fail("an input's data must be a list")
    if not any(isinstance(item, list) for item in data):
        return data
    if len(data) != shape[0]:
        raise _fail(f"{INPUT}'s nested data holds {len(data)} images; its shape {shape} says {shape[0]}")
    out: list[Any] = []
    stack = [(iter(data), 0)]
    while stack:
        items, depth = stack[-1]
        for item in items:
            if isinstance(item, list):
                if depth + 1 == len(shape) or len(item) != shape[depth + 1]:
                    raise _fail(f"{INPUT}'s nested data does not follow its shape {shape}: nest it as the shape "
                                "says, or send it flat")  # fmt: skip
                stack.append((iter(item), depth + 1))
                break
            if depth != len(shape) - 1:
                raise _fail(f"{INPUT}'s nested data does not follow its shape {shape}: a value where a list of "
                            f"{shape[depth + 1]} belongs")  # fmt: skip
            out.append(item)
        else:
            stack.pop()
    return out


def parse_request(
    request: dict[str, Any], binary: bytes, contract: Preprocessing, max_images: int, known: set[str]
) -> InferRequest:
    """Validate an inference request against the contract; `known`: the output names this bundle answers."""
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _fail(f"needs exactly one input, {INPUT!r}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT:
        raise _fail(f"the input is named {tensor.get('name')!r}; this model takes {INPUT!r}")
    datatype = tensor.get("datatype")
    if datatype not in ("FP32", "UINT8"):
        raise _fail(f"{INPUT} has datatype {datatype!r}; send FP32 in [0, 1] or UINT8")
    shape = tensor.get("shape")
    want = list(contract.chw)
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or shape[1:] != want
        or shape[0] < 1
    ):
        raise _fail(f"{INPUT} has shape {shape}; this model takes [B, {', '.join(map(str, want))}] with B >= 1")
    if shape[0] > max_images:
        raise TooManyFiles(f"{shape[0]} images in one request; at most {max_images} (GUARD_MAX_FILES)")
    count = int(np.prod(shape))
    dtype = DATATYPES[datatype]
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise _fail(f"{INPUT}.parameters must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if size != count * dtype.itemsize or size != len(binary):
            raise _fail(
                f"{INPUT} says binary_data_size {size}; {shape} {datatype} is {count * dtype.itemsize} bytes and "
                f"the body holds {len(binary)} after the JSON"
            )
        values = np.frombuffer(binary, dtype=dtype)
    else:
        if binary:
            raise _fail("binary data follows the JSON but no input says binary_data_size")
        flat = _flat(tensor.get("data"), shape)
        if len(flat) != count:
            raise _fail(f"{INPUT} has {len(flat)} values; shape {shape} needs {count}")
        kind = (int, float) if datatype == "FP32" else (int,)
        if not all(isinstance(v, kind) and not isinstance(v, bool) for v in flat):
            raise _fail(f"{INPUT}: every value must be a {'number' if datatype == 'FP32' else 'whole number'}")
        try:
            values = np.asarray(flat, dtype=np.float64 if datatype == "FP32" else np.int64)
        except OverflowError:
            raise _fail(f"{INPUT}: a value is out of range") from None
        if datatype == "UINT8" and ((values < 0).any() or (values > 255).any()):
            raise _fail(f"{INPUT}: UINT8 values must be 0..255")
    if datatype == "FP32":
        images = values.astype(np.float32).reshape(shape)
        bad = ~np.isfinite(images) | (images < 0) | (images > 1)
        if bad.any():
            i = int(np.argwhere(bad)[0][0])
            raise MalformedRequest(f"{INPUT}: image {i} has a value that is not a number in [0, 1]", i)
    else:
        images = values.astype(np.float32).reshape(shape) * np.float32(contract.scale)
    return InferRequest(_request_id(request), np.ascontiguousarray(images), _outputs(request, known))


def _request_id(request: dict[str, Any]) -> str | None:
    rid = request.get("id")
    if rid is not None and not isinstance(rid, str):
        raise _fail("id must be a string")
    return rid


def _outputs(request: dict[str, Any], known: set[str]) -> list[tuple[str, bool]]:
    params = request.get("parameters") or {}
    if not isinstance(params, dict):
        raise _fail("parameters must be an object")
    all_binary = params.get("binary_data_output", False) is True
    asked = request.get("outputs")
    if asked is None or asked == []:  # none named: every output (Triton's reading of an empty list too)
        return [(name, all_binary) for name in sorted(known, key=output_order)]
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise _fail("outputs must be a list of objects")
    out: list[tuple[str, bool]] = []
    for o in asked:
        name, parameters = o.get("name"), o.get("parameters") or {}
        if not isinstance(name, str) or name not in known:
            raise _fail(f"no output {name!r}; this model gives {sorted(known, key=output_order)}")
        if any(name == n for n, _ in out):  # as Triton; and each output at most once bounds the answer's size
            raise _fail(f"output {name!r} is asked for more than once")
        if not isinstance(parameters, dict):
            raise _fail(f"output {name!r}: parameters must be an object")
        out.append((name, parameters.get("binary_data", all_binary) is True))
    return out


def output_order(name: str) -> tuple[int, str]:
    """OUTPUTS in their order, then the signals' scores by name."""
    return (list(OUTPUTS).index(name), "") if name in OUTPUTS else (len(OUTPUTS), name)


def datatype_of(name: str) -> str:
    return OUTPUTS[name][0] if name in OUTPUTS else "FP64"  # <signal>_score


def output_names(signals: list[str], guarded: bool) -> set[str]:
    """The outputs a bundle answers: OUTPUTS and a score per signal. repaired_label only where the repaired signal
    runs: the guard runs the repaired model for it, not because the bundle holds the file (GuardResult.repaired)."""
    if not guarded:
        return set(PLAIN_OUTPUTS)
    names = {n for n in OUTPUTS if n != "repaired_label" or "repaired" in signals}
    return names | {s + SIGNAL_SUFFIX for s in signals}


def output_arrays(result: GuardResult, guarded: bool) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (datatype, values) of every output the result can give."""
    out: dict[str, tuple[str, np.ndarray]] = {
        "label": ("INT64", result.labels.astype(np.int64)),
        "confidence": ("FP32", result.confidence.astype(np.float32)),
        "original_label": ("INT64", result.original.labels.astype(np.int64)),
    }
    if not guarded:
        return out
    out |= {
        "backdoor": ("BOOL", result.backdoor.astype(bool)),
        "score": ("FP64", result.score.astype(np.float64)),
        "restored_label": ("INT64", result.restored.labels.astype(np.int64)),
    }
    if result.repaired is not None:
        out["repaired_label"] = ("INT64", result.repaired.labels.astype(np.int64))
    for name, signal in result.signals.items():
        out[name + SIGNAL_SUFFIX] = ("FP64", signal.score.astype(np.float64))
    return out


def encode_response(model: str, request: InferRequest, result: GuardResult, guarded: bool) -> tuple[bytes, int | None]:
    """(body, JSON length when binary outputs follow it, else None)."""
    arrays = output_arrays(result, guarded)
    outputs, blobs = [], []
    for name, binary in request.outputs:
        datatype, values = arrays[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(values.shape)}
        if binary:
            blob = values.astype(DATATYPES[datatype], copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = values.tolist()
        outputs.append(entry)
    head: dict[str, Any] = {"model_name": model, "outputs": outputs}
    if request.id is not None:
        head["id"] = request.id
    text = orjson.dumps(head)
    return (text + b"".join(blobs), len(text)) if blobs else (text, None)
