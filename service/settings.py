"""The service's one Settings class: every knob, from GUARD_* environment variables, validated at start."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from service.upload import UploadLimits

# The bundle shipped with the repository: the embedded default.
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


class Settings(BaseSettings):
    """Configuration; `GUARD_<NAME>` sets each field (e.g. GUARD_PORT=9000)."""

    model_config = SettingsConfigDict(env_prefix="GUARD_", extra="ignore", frozen=True)

    models_dir: Path = Field(DEFAULT_MODELS_DIR, description="guard bundle folder holding manifest.json")
    bundle_sha256: str | None = Field(
        None,
        pattern="^[0-9a-f]{64}$",
        description="refuse to start unless the bundle's root digest (SHA-256 of manifest.json) is this",
    )
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    signals: str = Field(
        "all",
        pattern="^(all|none)$",
        description="all: the bundle's signals and the fused verdict; none: the guard off, plain inference through "
        "the same stack (the model's label, `backdoor: null`: no verdict, never a silent clean)",
    )
    strip_n: int | None = Field(
        None, ge=1, description="STRIP overlays per image; default: the N the bundle was calibrated at"
    )
    strip_early_exit: bool = Field(
        True,
        description="stop STRIP's overlays on an image once none of the rest can change its fused verdict (the "
        "same verdicts; its STRIP entropy is then the mean over the overlays it ran, `overlays` in the evidence)",
    )
    fused_threshold: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,  # fused scores lie in [0, 1]: at 1 nothing could ever be flagged
        description="override the bundle's fused-verdict threshold (a clean percentile, below 1)",
    )
    avoid_infected_labels: bool = Field(
        True, description="never give a suspected image a label Neural Cleanse flagged as infected"
    )
    max_batch: int = Field(64, ge=1, le=4096, description="most images in one guarded batch")
    # 0 by default: a batch takes the images queued when the guard is free, and under load they queue while the
    # previous batch runs. With a 2 ms wait (the first default) make bench measured single-image p50 6.3 ms
    # guarded and 3.6 ms off (commit a3ef997), without it 2.8 and 1.2 (commit 87e5719), and the same share of
    # the unguarded throughput at concurrency 32 (55% and 56%).
    max_delay_ms: float = Field(
        0.0, ge=0.0, le=1000.0, description="longest wait for more images to fill a batch, ms (0: none)"
    )
    max_queue: int = Field(1024, ge=1, description="most images waiting or running; beyond it requests get 503")
    max_files: int = Field(64, ge=1, description="most files in one request")
    max_file_bytes: int = Field(4 << 20, ge=1, description="largest file, bytes")
    max_pixels: int = Field(40_000_000, ge=1, description="largest decoded image, pixels (width x height)")
    decode_threads: int = Field(2, ge=1, le=64, description="threads that decode images too large to decode inline")
    decode_budget_pixels: int = Field(
        40_000_000, ge=1, description="most pixels being decoded at once across all requests (bounds decode memory)"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="seconds a client has to send a request's line and headers"
    )
    body_timeout_s: float = Field(60.0, gt=0, le=3600, description="seconds a client has to send a whole upload")
    body_budget_bytes: int = Field(
        0, ge=0, description="bytes of /classify uploads and /infer bodies held at once across all requests; past "
        "them a request gets 503 (0: twice the largest valid /classify request)",
    )  # fmt: skip
    shutdown_timeout_s: float = Field(
        8.0, ge=0, le=3600, description="on SIGTERM, seconds in-flight requests get to finish before they are cut"
    )
    # ONNX Runtime's arenas keep the memory of the largest call they have seen: unchunked, batches of 64 images
    # (2,240 classifier rows at STRIP N = 32) held about 1 GB for good (the hardening issue measured 1,011 MiB).
    # Larger batches run as consecutive chunks, so a batch of 64 holds little more than single-image traffic at
    # concurrency 8 holds anyway (reports/soak.md). The default is derived from the rows the bundle's signals give
    # every model per image (service.runtime.chunk_images): 28 images for the shipped bundle, 16 with STRIP at
    # N = 4, 8 at N = 32.
    chunk_images: int = Field(
        0,
        ge=0,
        description="most images the guard runs through its models at once (bounds a batch's memory); "
        "0 = as many as make 144 rows over all the guard's models (every STRIP overlay counted), at least 8",
    )
    ort_threads: int = Field(
        0, ge=0,
        description="ONNX Runtime intra-op threads of each model's session; 0 = all cores. Batches of at most 4 "
        "images run on a second session of each model with half as many, two models at a time (none with 1 thread)",
    )  # fmt: skip
    prefer_gpu: bool = Field(True, description="use the CUDA provider when onnxruntime-gpu sees a GPU")
    api_key: SecretStr | None = Field(None, description="when set, /classify requires header X-API-Key")
    access_log: bool = Field(False, description="log every request (costly at high request rates)")
    log_level: str = Field("info", pattern="^(critical|error|warning|info|debug)$", description="log level")

    @model_validator(mode="after")
    def _models_dir_exists(self) -> Settings:
        if not (self.models_dir / "manifest.json").is_file():
            raise ValueError(f"models_dir {self.models_dir} holds no manifest.json (set GUARD_MODELS_DIR)")
        return self

    @model_validator(mode="after")
    def _limits_fit_together(self) -> Settings:
        """Limits that contradict each other would leave the service never ready or answering 503 forever."""
        problems = []
        if self.max_queue < self.max_files:
            problems.append(
                f"GUARD_MAX_QUEUE ({self.max_queue}) must be at least GUARD_MAX_FILES ({self.max_files}): "
                "a request with that many files could never be admitted"
            )
        if self.max_queue < self.warm_up_batch:
            problems.append(
                f"GUARD_MAX_QUEUE ({self.max_queue}) must be at least the warm-up batch ({self.warm_up_batch}, "
                "the smaller of 8 and GUARD_MAX_BATCH): the service would never become ready"
            )
        if self.decode_budget_pixels < self.max_pixels:
            problems.append(
                f"GUARD_DECODE_BUDGET_PIXELS ({self.decode_budget_pixels}) must be at least GUARD_MAX_PIXELS "
                f"({self.max_pixels}): the largest allowed image could never be decoded"
            )
        if 0 < self.body_budget_bytes < self.largest_body:
            problems.append(
                f"GUARD_BODY_BUDGET_BYTES ({self.body_budget_bytes}) must be at least the largest valid request "
                f"({self.largest_body} bytes: GUARD_MAX_FILES files of GUARD_MAX_FILE_BYTES, with framing), or 0"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def upload_limits(self) -> UploadLimits:
        """The per-request limits of a /classify upload."""
        from service.upload import UploadLimits

        return UploadLimits(self.max_files, self.max_file_bytes, self.body_timeout_s)

    @property
    def largest_body(self) -> int:
        """Bytes of the largest /classify body the per-request limits let through."""
        return self.upload_limits.max_body_bytes

    @property
    def body_budget(self) -> int:
        """GUARD_BODY_BUDGET_BYTES, or (0) twice the largest valid request."""
        return self.body_budget_bytes or 2 * self.largest_body

    @property
    def warm_up_batch(self) -> int:
        """Images in the warm-up batch that must pass before the service is ready."""
        return min(8, self.max_batch)
