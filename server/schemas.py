"""Request and response bodies of the HTTP API (pydantic): the one place that defines them.

Field constraints here are model-independent (types and absolute ranges); what depends on the model (its frame
and pixel limits, which modes it has) is checked against the serving workers in ``server/admission.py``, and the
engine validates again before any work starts.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

Mode = Literal["clip", "stream"]
Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]

MAX_PROMPT_CHARS = 4000
MAX_SIDE = 4096
MAX_FRAMES = 100_001
MAX_SEED = 2**63 - 1


def _frames_4k1(value: int | None) -> int | None:
    if value is not None and (value - 1) % 4:
        raise ValueError(f"{value} is not of the form 4k+1 (1, 5, 9, ..., 81, ...): the VAE packs 4 frames per latent")
    return value


class _RequestChecks(BaseModel):
    """Checks shared by every request that creates a job (fields are declared by the subclasses)."""

    @field_validator("frames", check_fields=False)
    @classmethod
    def _frames(cls, value: int | None) -> int | None:
        return _frames_4k1(value)

    @field_validator("prompt", check_fields=False)
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must contain a non-space character")
        return value


class GenerateRequest(_RequestChecks):
    """POST /generate. Unset fields take the model's defaults (see GET /models)."""

    # strict: JSON numbers only (no "5", no true for 1), as the schema says.
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "examples": [{"prompt": "a red ball bouncing on a wooden floor", "frames": 33, "width": 64, "height": 64}]
    })

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="What the video shows.")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS, description="What it should not show (CFG).")
    width: int | None = Field(None, ge=16, le=MAX_SIDE, multiple_of=16, description="Pixels, multiple of 16.")
    height: int | None = Field(None, ge=16, le=MAX_SIDE, multiple_of=16, description="Pixels, multiple of 16.")
    frames: int | None = Field(None, ge=1, le=MAX_FRAMES, description="Frame count of the form 4k+1.")
    fps: int | None = Field(None, ge=1, le=60, description="Frames per second of the output video.")
    steps: int | None = Field(None, ge=1, le=200, description="Denoising steps (per block for streams).")
    guidance_scale: float | None = Field(None, ge=0.0, le=20.0,
                                        description="Classifier-free guidance scale; 1 or less: no guidance.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Same seed and parameters give the same video.")
    mode: Mode | None = Field(None, description="clip (bidirectional models) or stream (block-causal models).")
    model: str | None = Field(None, min_length=1, max_length=200, description="A served model (GET /models).")


def accepted_range(model: type[BaseModel], field: str) -> str | None:
    """Human-readable accepted values of ``field``, built from its pydantic constraints."""
    info = model.model_fields.get(field)
    if info is None:
        return None
    ge = le = gt = lt = mult = min_len = max_len = None
    for m in info.metadata:
        ge = getattr(m, "ge", ge)
        le = getattr(m, "le", le)
        gt = getattr(m, "gt", gt)
        lt = getattr(m, "lt", lt)
        mult = getattr(m, "multiple_of", mult)
        min_len = getattr(m, "min_length", min_len)
        max_len = getattr(m, "max_length", max_len)
    parts = []
    if min_len is not None or max_len is not None:
        parts.append(f"{min_len or 0}..{max_len} characters")
    if gt is not None or lt is not None:
        low = f"{gt} < " if gt is not None else (f"{ge} <= " if ge is not None else "")
        high = f" < {lt}" if lt is not None else (f" <= {le}" if le is not None else "")
        parts.append(f"{low}{field}{high}")
    elif ge is not None or le is not None:
        parts.append(f"{ge}..{le}")
    if mult:
        parts.append(f"multiple of {mult}")
    if field == "frames":
        parts.append("4k+1")
    if field == "mode":
        parts.append("clip or stream")
    return ", ".join(parts) or None


class JobCreated(BaseModel):
    id: str
    status: Status
    status_url: str
    video_url: str
    stream_url: str


class JobProgress(BaseModel):
    fraction: float = 0.0
    block: int = 0
    blocks_total: int = 0
    step: int = 0
    steps_total: int = 0
    frames_done: int = 0
    frames_total: int = 0


class JobError(BaseModel):
    type: str
    message: str
    field: str | None = None
    accepted: str | None = None


class JobView(BaseModel):
    """GET /jobs/{id}."""

    id: str
    model: str
    status: Status
    progress: JobProgress
    eta_s: float | None = Field(None, description="Seconds left: measured time per step x steps left.")
    timings: dict[str, float] = Field(default_factory=dict, description="queue_wait_s, run_s, first_chunk_s, total_s")
    error: JobError | None = None
    params: dict[str, Any]
    attempt: int = Field(0, description="1 on the first worker; 2 after a lost worker's job was re-queued.")
    requeued: str | None = Field(None, description="Why the job was re-queued, if it was.")
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    chunks: int = 0
    bytes: int = 0
    cancel_requested: bool = False
    video_url: str
    stream_url: str


class WorkerInfo(BaseModel):
    name: str
    device: str
    precision: str = Field(description="What runs the denoiser: torch, or a TensorRT engine precision.")
    precision_requested: str | None = None
    fast: str | None = Field(None, description="The PyTorch denoiser's path: reference, fast, fast-fp8, or "
                             "tensorrt (a TensorRT denoiser, no fast path).")
    fast_requested: str | None = None
    dtype: str | None = None
    warmup_s: float | None = Field(None, description="Seconds its start-up warm-up took (None: it made none).")
    overlap_decode: bool | None = Field(None, description="Whether its streams decode each block on a second CUDA "
                                        "stream while the next is denoised (SANA_WORKER_OVERLAP_DECODE; GPU only).")
    host: str | None = None
    busy: bool = False
    job: str | None = None
    last_heartbeat: float | None = None


class ModelInfo(BaseModel):
    name: str
    workers: list[WorkerInfo]
    queue_depth: int
    causal: bool | None = None
    precision: list[str] = Field(default_factory=list)
    limits: dict[str, Any] = Field(default_factory=dict)
    defaults: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]


class ErrorBody(BaseModel):
    detail: Any


# ------------------------------------------------------------------------------------------- OpenAI-style aliases

_SIZE = re.compile(r"^(\d{1,4})x(\d{1,4})$")
_SECONDS_TEXT = re.compile(r"^\d{1,4}(\.\d{1,6})?$")


class VideoCreateRequest(_RequestChecks):
    """POST /v1/videos: OpenAI's video fields (``seconds``, ``size``) plus any of /generate's."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(None, min_length=1, max_length=200)
    seconds: Annotated[float | None, WithJsonSchema({"anyOf": [
        {"type": "number", "exclusiveMinimum": 0, "maximum": 3600},
        {"type": "string", "pattern": _SECONDS_TEXT.pattern}, {"type": "null"}]})] = Field(
        None, gt=0, le=3600,
        description="Duration, a number or a string as OpenAI's API sends it; frames = 4k+1 nearest seconds x fps.")
    size: str | None = Field(None, description="WIDTHxHEIGHT, e.g. 832x480.", examples=["832x480"])
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    frames: int | None = Field(None, ge=1, le=MAX_FRAMES)
    fps: int | None = Field(None, ge=1, le=60)
    steps: int | None = Field(None, ge=1, le=200)
    guidance_scale: float | None = Field(None, ge=0.0, le=20.0)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    mode: Mode | None = None

    @field_validator("seconds", mode="before")
    @classmethod
    def _seconds_as_text(cls, value: Any) -> Any:
        # OpenAI's API takes seconds as a string ("4", "8", "12") and answers with one; so does this one.
        if isinstance(value, str):
            if not _SECONDS_TEXT.fullmatch(value):
                raise ValueError("expected a number of seconds, e.g. 4 or \"4\"")
            return float(value)
        return value

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is None:
            return value
        m = _SIZE.match(value)
        if not m:
            raise ValueError("expected WIDTHxHEIGHT, e.g. 832x480")
        for side in map(int, m.groups()):
            if not 16 <= side <= MAX_SIDE or side % 16:
                raise ValueError(f"sides must be multiples of 16 in 16..{MAX_SIDE}")
        return value

    @model_validator(mode="after")
    def _one_duration(self) -> "VideoCreateRequest":
        if self.seconds is not None and self.frames is not None:
            raise ValueError("give seconds or frames, not both")
        return self

    def to_generate(self, default_fps: int) -> GenerateRequest:
        data = self.model_dump(exclude={"seconds", "size"})
        if self.size is not None:
            w, h = self.size.split("x")
            data["width"], data["height"] = int(w), int(h)
        if self.seconds is not None:
            fps = self.fps or default_fps
            k = max(0, round((self.seconds * fps - 1) / 4))
            data["frames"] = min(4 * k + 1, 4 * ((MAX_FRAMES - 1) // 4) + 1)
        return GenerateRequest(**data)


class VideoObject(BaseModel):
    """OpenAI's video object over one of our jobs."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int = Field(description="Percent, 0..100.")
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    seconds: str
    size: str
    error: dict[str, str] | None = None
