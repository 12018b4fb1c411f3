"""Small helpers every stage shares: seeding, mini-batches, batched inference, checkpoints, progress."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

T = TypeVar("T")


def setup_torch(seed: int) -> None:
    """Seed every generator and use all cores (2 here): one call at the start of each stage."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A tqdm bar on stderr; silent when stderr is not a terminal unless GUARD_PROGRESS=1."""
    enabled = sys.stderr.isatty() or os.environ.get("GUARD_PROGRESS") == "1"
    yield from tqdm(items, desc=desc, total=total, disable=not enabled, leave=False, dynamic_ncols=True)


def minibatches(n: int, batch_size: int, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Index batches over range(n); shuffled when rng is given."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """A classifier returning (logits, features) over float32 (N, 1, H, W) -> two numpy arrays."""
    model.eval()
    outs = [model(torch.from_numpy(images[idx])) for idx in minibatches(len(images), batch_size)]
    return torch.cat([o[0] for o in outs]).numpy(), torch.cat([o[1] for o in outs]).numpy()


@torch.no_grad()
def apply_model(model: nn.Module, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """An image-to-image model over float32 (N, 1, H, W) -> numpy of the same shape."""
    model.eval()
    return np.concatenate(
        [model(torch.from_numpy(images[idx])).numpy() for idx in minibatches(len(images), batch_size)]
    )


def to_jsonable(obj: Any) -> Any:
    """Dataclass configs (nested) -> plain JSON values."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def table_head(first: str, columns: Iterable[str]) -> list[str]:
    """A markdown table's header row and rule: `first` then one cell per column."""
    cols = list(columns)
    return [f"| {first} | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]


def write_report(report: dict[str, Any], command: str, start: float, out: Path, stem: str,
                 render: Callable[[dict[str, Any]], str]) -> None:  # fmt: skip
    """Stamp a report with the command that made it and its seconds since `start` (time.perf_counter()), write
    out/stem.json and out/stem.md (`render`), and print the markdown."""
    report["command"], report["seconds"] = command, time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = render(report)
    (out / f"{stem}.md").write_text(text)
    sys.stdout.write(text)


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(payload), indent=2) + "\n")


def save_checkpoint(path: Path, model: nn.Module, arch: str, config: Any, **extra: Any) -> None:
    """Weights plus the resolved config that produced them (also written as <path>.json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"arch": arch, "config": to_jsonable(config), **to_jsonable(extra)}
    torch.save({"meta": meta, "state_dict": model.state_dict()}, path)
    write_json(path.with_suffix(".json"), meta)


def copy_checkpoint(source: Path, dest: Path) -> None:
    """A checkpoint and, where there is one, its .json config beside it (a user's .pt2 may have none)."""
    shutil.copyfile(source, dest)
    if source.with_suffix(".json").is_file():
        shutil.copyfile(source.with_suffix(".json"), dest.with_suffix(".json"))


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found: run the stage that writes it first")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return blob["meta"], blob["state_dict"]
