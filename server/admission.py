"""Admission of a generation request: is the model served, does the request fit its limits and ours, is there
room in the queue. Returns the model's queue name and the parameters the job will carry.

Errors, by what the client can do about them:
- ``InvalidParams`` (422): the request can never run on this model (unknown model, frames or size beyond the
  model, a mode it does not have, a prompt longer than its text encoder reads: a live worker checks that).
  Names the field and what is accepted.
- ``LimitExceeded`` (429): over a limit this deployment sets (SANA_MAX_FRAMES, SANA_MAX_PIXELS).
- ``QueueFull`` (503): the model's queue holds SANA_MAX_QUEUE jobs; retry later.
Both 429 and 503 carry Retry-After.
"""

from __future__ import annotations

from typing import Any

import redis

from engine.errors import InvalidParams
from engine.presets import get_preset
from server.schemas import GenerateRequest
from server.settings import Settings
from workers import jobs
from workers.registry import canonical_model, served_models


class LimitExceeded(Exception):
    def __init__(self, field: str, message: str, accepted: str):
        self.field, self.message, self.accepted = field, message, accepted
        super().__init__(f"{field}: {message} (accepted: {accepted})")


class QueueFull(Exception):
    def __init__(self, model: str, depth: int, limit: int):
        self.model, self.depth, self.limit = model, depth, limit
        super().__init__(f"the queue of model {model} holds {depth} jobs (limit {limit}); retry later")


def served_model_names(served: dict[str, list], settings: Settings) -> list[str]:
    return sorted(set(served) | {canonical_model(settings.model)})


def preset_capabilities(model: str) -> dict[str, Any] | None:
    """What a model with no live worker yet can do, from its preset, in the form of a worker's registration (causal,
    limits, defaults): admission checks requests against it, and GET /models shows it. None for a model that is
    not a preset (a folder or hub id: known once its worker is up)."""
    preset = get_preset(model)
    if preset is None:
        return None
    mode = "stream" if preset.causal else "clip"
    return {
        "causal": preset.causal,
        "limits": {"mode": mode, "max_pixels": preset.max_pixels,
                   "frames": {"min": 1, "max": preset.max_frames if preset.causal else preset.max_clip_frames,
                              "rule": "4k+1"}},
        "defaults": {"width": preset.width, "height": preset.height, "frames": preset.frames, "fps": preset.fps,
                     "mode": mode},
    }


def admit(req: GenerateRequest, r: redis.Redis, settings: Settings) -> tuple[str, dict[str, Any]]:
    served = served_models(r)
    model = canonical_model(req.model) if req.model else canonical_model(settings.model)
    names = served_model_names(served, settings)
    if model not in names:
        raise InvalidParams("model", f"{req.model!r} is not served here", ", ".join(names))

    # What the model can do: from a live worker, else (model configured but no worker up yet) from its preset.
    workers = served.get(model, [])
    info = workers[0] if workers else {}
    defaults: dict[str, Any] = dict(info.get("defaults", {}))
    limits: dict[str, Any] = dict(info.get("limits", {}))
    causal = info.get("causal")
    # Sizes the checks below assume where the request leaves them out: a live worker's defaults fill the request
    # itself; without one, the preset's (the worker fills the same when it runs the job).
    assumed: dict[str, Any] = {}
    preset = None if workers else preset_capabilities(model)
    if preset is not None:
        causal, limits = preset["causal"], preset["limits"]
        assumed = {k: preset["defaults"][k] for k in ("frames", "width", "height")}

    params = req.model_dump(exclude={"model"})
    if params["mode"] is None and causal is not None:
        params["mode"] = "stream" if causal else "clip"
    for key, value in defaults.items():
        if params.get(key) is None:
            params[key] = value

    mode = params["mode"]
    if causal is not None and mode is not None:
        if mode == "stream" and not causal:
            raise InvalidParams("mode", f"model {model} is bidirectional and cannot stream", "clip")
        if mode == "clip" and causal:
            raise InvalidParams("mode", f"model {model} is block-causal and generates streams", "stream")

    frames, width, height = (params[k] if params[k] is not None else assumed.get(k)
                             for k in ("frames", "width", "height"))
    max_model_frames = limits.get("frames", {}).get("max")
    if frames is not None and max_model_frames is not None and frames > max_model_frames:
        raise InvalidParams("frames", f"{frames} is more than model {model} makes in {mode} mode",
                            f"4k+1, 1..{max_model_frames}")
    multiple = limits.get("width_height_multiple")
    for field, value in (("width", width), ("height", height)):
        if value is not None and multiple and value % multiple:
            raise InvalidParams(field, f"{value} is not a multiple of {multiple}", f"multiples of {multiple}")
    max_model_pixels = limits.get("max_pixels")
    if width is not None and height is not None and max_model_pixels and width * height > max_model_pixels:
        raise InvalidParams("width", f"{width}x{height} is more than model {model} makes",
                            f"width*height <= {max_model_pixels}")

    if frames is not None and frames > settings.max_frames:
        raise LimitExceeded("frames", f"{frames} frames is over this server's limit", f"1..{settings.max_frames}")
    if width is not None and height is not None and width * height > settings.max_pixels:
        raise LimitExceeded("width", f"{width}x{height} is over this server's pixel limit",
                            f"width*height <= {settings.max_pixels}")

    depth = jobs.queue_depth(r, model)
    if depth >= settings.max_queue:
        raise QueueFull(model, depth, settings.max_queue)

    if settings.submit_check_s > 0 and any(w.get("checks") for w in workers):
        # What only the model can tell (the prompt's tokens, among others): a live worker resolves the request as
        # the job will. No answer in time: the job is queued and checked when it runs.
        verdict = jobs.ask_worker_to_check(r, model, params, settings.submit_check_s)
        if verdict is not None and not verdict["ok"]:
            error = verdict["error"]
            raise InvalidParams(error.get("field") or "body", error["message"], error.get("accepted") or "")
    return model, params
