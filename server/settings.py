"""Settings of the API and the workers, read from the environment: the one place for limits and addresses.

Every field documents itself (its description feeds the README configuration table). Variables are named
``SANA_<FIELD>`` except ``REDIS_URL``, the conventional name.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Precision = Literal["auto", "torch", "nvfp4", "fp8", "bf16"]
FastMode = Literal["auto", "on", "off", "fp8"]  # engine.fast.FAST_MODES
Warmup = Literal["auto", "on", "off"]


class Settings(BaseSettings):
    # Empty variables count as unset (compose files list every variable, most of them empty).
    # populate_by_name: Settings(redis_url=...) in code sets the field (the env alias alone would ignore it).
    model_config = SettingsConfigDict(env_prefix="SANA_", extra="ignore", env_ignore_empty=True, populate_by_name=True)

    redis_url: str = Field(
        "redis://localhost:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "SANA_REDIS_URL"),
        description="Redis holding the job queues, job records and chunk streams (env REDIS_URL).",
    )
    model: str = Field(
        "demo",
        description="Default model: used when a request names none, and accepted even before its worker is up.",
    )
    output_dir: Path = Field(
        Path("outputs"),
        description="Folder of finished MP4 files (<job id>.mp4); a volume shared by the API and all workers.",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated API keys. Empty: no auth. Set: every job, video and model route needs "
        "'Authorization: Bearer <key>' and each key sees only its own jobs (health, metrics, the web page and the "
        "API docs hold no job data and stay open).",
    )
    max_frames: int = Field(8001, ge=1, description="Largest number of frames one request may ask for.")
    max_pixels: int = Field(1280 * 720, ge=256, description="Largest width x height one request may ask for.")
    max_queue: int = Field(1000, ge=1, description="Queued jobs per model beyond which submissions get 503.")
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="Largest request body in bytes; larger ones get 413 before they are read."
    )
    retry_after_s: int = Field(10, ge=1, description="Retry-After seconds sent with 429 and 503 answers.")
    submit_check_s: float = Field(
        2.0,
        ge=0,
        description="Seconds a submission waits for a live worker of its model to check it as the engine will (the "
        "prompt's token count among others), so that a request that cannot run gets 422 at once, not a failed job "
        "after its queue wait; without an answer in time the job is queued and checked when it runs. 0: no check.",
    )
    stream_maxlen: int = Field(
        512,
        ge=8,
        description="Entries kept in a job's Redis chunk stream; older chunks are served from the output file.",
    )
    stream_ttl_s: int = Field(3600, ge=1, description="Seconds a job's chunk stream lives after the job ends.")
    result_ttl_s: int = Field(
        7 * 24 * 3600,
        ge=1,
        description="Seconds a job record (status, progress, errors) and its MP4 file live after the job ends.",
    )
    output_sweep_s: int = Field(
        600,
        ge=0,
        description="Seconds between the API's passes that delete MP4 files whose job record has expired; 0 keeps "
        "every file.",
    )
    job_timeout_s: int = Field(4 * 3600, ge=10, description="A job running longer than this is failed.")
    heartbeat_s: float = Field(
        5.0,
        gt=0,
        description="Worker heartbeat period. A worker silent for 3 periods is dead: its job is re-queued once.",
    )
    worker_device: str | None = Field(None, description="Default worker device (cuda:N or cpu); auto when unset.")
    worker_precision: Precision = Field(
        "auto",
        description="Default worker denoiser: auto (the best TensorRT engine this GPU can run, else torch), torch, "
        "or an engine precision (nvfp4, fp8, bf16; needs the worker's --engine folder).",
    )
    worker_fast: FastMode = Field(
        "auto",
        description="Default fast path of a worker's PyTorch denoiser: auto (fused kernels + torch.compile on CUDA, "
        "the reference elsewhere), on, off, or fp8 (also FP8 linears; needs compute capability >= 8.9).",
    )
    worker_warmup: Warmup = Field(
        "auto",
        description="Before taking jobs, a worker makes one short video at its default size, so the first job does "
        "not pay torch.compile's start-up (tens of seconds on a GPU): auto (when the fast path compiles), on, off.",
    )
    worker_warmup_timeout_s: float = Field(
        1800, gt=0, description="A warm-up not done after this many seconds is stuck: the worker exits with status 1."
    )
    worker_overlap_decode: bool = Field(
        True,
        description="Streams on a GPU: decode each block on a second CUDA stream while the next block is denoised "
        "(480p on an H100: 40.0 instead of 37.4 frames/s, about 2 GiB more GPU memory reserved); false decodes "
        "each block before the next one starts.",
    )
    worker_engine: str | None = Field(
        None, description="Default folder of the worker's TensorRT engines (what --engine gives one worker)."
    )
    worker_metrics_port: int = Field(
        9101, ge=0, le=65535, description="Port of a worker's Prometheus /metrics; 0 turns it off."
    )
    host: str = Field("0.0.0.0", description="Address the API listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the API listens on.")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected redis://HOST:PORT/DB, rediss://... (TLS) or unix://PATH")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @property
    def heartbeat_ttl_s(self) -> int:
        """Seconds after the last heartbeat at which a worker (and its running job) counts as lost."""
        return max(2, round(3 * self.heartbeat_s))

    @property
    def maintenance_lock_s(self) -> int:
        """Expiry of a queue's maintenance lock: a process killed while cleaning the queue (re-queueing the jobs of
        lost workers) holds off the others' passes this long at most."""
        return max(10, 2 * self.heartbeat_ttl_s)


@lru_cache
def get_settings() -> Settings:
    return Settings()


def settings_error() -> str | None:
    """Why the settings (SANA_* variables, REDIS_URL) do not parse, naming each variable; None when they do."""
    from pydantic import ValidationError

    try:
        get_settings()
    except ValidationError as exc:
        bad = []
        for e in exc.errors():
            name = str(e["loc"][0]) if e["loc"] else "?"
            variable = name if name.isupper() else f"SANA_{name.upper()}"  # REDIS_URL is read without the prefix
            bad.append(f"{variable}={e.get('input')!r}: {e['msg']}")
        return "invalid setting: " + "; ".join(bad)
    return None
