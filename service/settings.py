"""The service's one Settings class: every knob, from GUARD_* environment variables, validated at start."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The bundle shipped with the repository: the embedded default.
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[1] / "models"


class Settings(BaseSettings):
    """Configuration; `GUARD_<NAME>` sets each field (e.g. GUARD_PORT=9000)."""

    model_config = SettingsConfigDict(env_prefix="GUARD_", extra="ignore", frozen=True)

    models_dir: Path = Field(DEFAULT_MODELS_DIR, description="guard bundle folder holding manifest.json")
    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    strip_n: int | None = Field(
        None, ge=1, description="STRIP overlays per image; default: the N the bundle was calibrated at"
    )
    fused_threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="override the bundle's fused-verdict threshold (a clean percentile)"
    )
    avoid_infected_labels: bool = Field(
        True, description="never give a suspected image a label Neural Cleanse flagged as infected"
    )
    max_batch: int = Field(64, ge=1, le=4096, description="most images in one guarded batch")
    max_delay_ms: float = Field(2.0, ge=0.0, le=1000.0, description="longest wait to fill a batch, ms")
    max_queue: int = Field(1024, ge=1, description="most images waiting or running; beyond it requests get 503")
    max_files: int = Field(64, ge=1, description="most files in one request")
    max_file_bytes: int = Field(4 << 20, ge=1, description="largest file, bytes")
    max_pixels: int = Field(40_000_000, ge=1, description="largest decoded image, pixels (width x height)")
    ort_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = all cores")
    prefer_gpu: bool = Field(True, description="use the CUDA provider when onnxruntime-gpu sees a GPU")
    api_key: SecretStr | None = Field(None, description="when set, /classify requires header X-API-Key")
    access_log: bool = Field(False, description="log every request (costly at high request rates)")
    log_level: str = Field("info", pattern="^(critical|error|warning|info|debug)$", description="log level")

    @model_validator(mode="after")
    def _models_dir_exists(self) -> Settings:
        if not (self.models_dir / "manifest.json").is_file():
            raise ValueError(f"models_dir {self.models_dir} holds no manifest.json (set GUARD_MODELS_DIR)")
        return self
