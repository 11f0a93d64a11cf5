"""HTTP routes: jobs, their videos, the OpenAI-style aliases, models, health and metrics. Routes stay thin: the
work is in ``server/admission.py`` (what may run) and ``workers/jobs.py`` (the queue and the records).

URLs in answers are relative to the API's base URL (stream_url is a websocket path).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import redis
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from server import metrics
from engine.errors import InvalidParams
from server.admission import LimitExceeded, admit, preset_capabilities, served_model_names
from server.forms import FormAsJsonRoute, form_body
from server.deps import MediaOwnerDep, OwnerDep, RedisDep, SettingsDep, owned_record
from server.schemas import (
    ErrorBody,
    GenerateRequest,
    JobCreated,
    JobView,
    ModelInfo,
    ModelList,
    VideoCreateRequest,
    VideoObject,
    WorkerInfo,
)
from server.settings import Settings
from workers import jobs
from workers.jobs import TERMINAL, JobStatus
from workers.output import video_path
from workers.registry import canonical_model, served_models

router = APIRouter()

_NOT_FOUND = {404: {"model": ErrorBody, "description": "No such job (or another key's)."}}
_AUTH = {401: {"model": ErrorBody, "description": "Missing or wrong API key."}}
_LIMITS = {
    400: {"model": ErrorBody, "description": "The body could not be parsed (not UTF-8 JSON)."},
    413: {"model": ErrorBody, "description": "The body is over SANA_MAX_BODY_BYTES."},
    429: {"model": ErrorBody, "description": "Over a server limit (frames, pixels); see Retry-After."},
    503: {"model": ErrorBody, "description": "Queue full or Redis unreachable; see Retry-After."},
}


def urls(job_id: str) -> dict[str, str]:
    return {"status_url": f"/jobs/{job_id}", "video_url": f"/jobs/{job_id}/video",
            "stream_url": f"/jobs/{job_id}/stream"}


def job_view(r: redis.Redis, record: dict[str, Any]) -> JobView:
    status = record["status"]
    cancel_requested = status == JobStatus.RUNNING and bool(r.exists(jobs.cancel_key(record["id"])))
    return JobView(
        id=record["id"],
        model=record["model"],
        status=status,
        progress=record.get("progress") or {},
        eta_s=record.get("eta_s") if status == JobStatus.RUNNING else None,
        timings=record.get("timings") or {},
        error=record.get("error") if status in (JobStatus.FAILED, JobStatus.CANCELLED) else None,
        params=record.get("params") or {},
        attempt=record.get("attempt", 0),
        requeued=record.get("requeued"),
        created_at=record["created_at"],
        started_at=record.get("started_at"),
        finished_at=record.get("finished_at"),
        chunks=record.get("chunks", 0),
        bytes=record.get("bytes", 0),
        cancel_requested=cancel_requested,
        **{k: v for k, v in urls(record["id"]).items() if k != "status_url"},
    )


def submit(req: GenerateRequest, r: redis.Redis, settings: Settings, owner: str) -> str:
    model, params = admit(req, r, settings)
    job_id = uuid.uuid4().hex
    jobs.submit_job(r, job_id=job_id, model=model, params=params, owner=owner, settings=settings)
    metrics.JOBS_SUBMITTED.labels(model).inc()
    return job_id


def cancel(r: redis.Redis, record: dict[str, Any], settings: Settings) -> JSONResponse | None:
    """Cancel; None when it worked (or will, at the next step), a 409 answer when the job had already ended."""
    if record["status"] in TERMINAL:
        return JSONResponse(status_code=409, content={
            "detail": f"job {record['id']} already {record['status']}; nothing to cancel", "status": record["status"]})
    status = jobs.request_cancel(r, record["id"], settings)
    if status in TERMINAL and status != JobStatus.CANCELLED:  # it ended in the meantime
        return JSONResponse(status_code=409, content={
            "detail": f"job {record['id']} already {status}; nothing to cancel", "status": status})
    return None


def video_file(record: dict[str, Any], settings: Settings, range_header: str | None = None
               ) -> FileResponse | JSONResponse:
    if record["status"] != JobStatus.SUCCEEDED:
        return JSONResponse(status_code=409, content={
            "detail": f"job {record['id']} is {record['status']}; the video exists once it has succeeded",
            "status": record["status"]})
    path = video_path(settings.output_dir, record["id"])
    if not path.is_file():
        return JSONResponse(status_code=410, content={"detail": f"the video of job {record['id']} was removed",
                                                      "status": record["status"]})
    size = path.stat().st_size
    ranges = requested_ranges(range_header)
    if ranges is None:  # none asked for, or a Range we do not read: the whole file (RFC 9110 14.2)
        return WholeFileResponse(path, media_type="video/mp4", filename=path.name)
    if not any((first is None and last) or (first is not None and first < size) for first, last in ranges):
        return JSONResponse(status_code=416, headers={"Content-Range": f"bytes */{size}"}, content={"detail": [{
            "loc": ["header", "range"], "msg": f"no range of {range_header!r} is in the file's {size} bytes",
            "type": "range_not_satisfiable", "field": "range",
            "accepted": f"bytes=FIRST-LAST with FIRST < {size}, or bytes=-N with N > 0"}]})
    return FileResponse(path, media_type="video/mp4", filename=path.name)


_RANGE_SPEC = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


def requested_ranges(header: str | None) -> list[tuple[int | None, int | None]] | None:
    """The (first, last) byte ranges of a Range header (first None for a suffix of ``last`` bytes), or None when
    there is none or it is not a valid bytes range (then it is ignored, as HTTP asks)."""
    if not header:
        return None
    unit, _, specs = header.partition("=")
    if unit.strip().lower() != "bytes" or not specs.strip():
        return None
    out: list[tuple[int | None, int | None]] = []
    for spec in specs.split(","):
        m = _RANGE_SPEC.match(spec)
        if m is None or m.groups() == ("", ""):
            return None
        first, last = (int(g) if g else None for g in m.groups())
        if first is not None and last is not None and last < first:
            return None
        out.append((first, last))
    return out


class WholeFileResponse(FileResponse):
    """The file as a 200, whatever Range the request carries (one we chose to ignore)."""

    async def __call__(self, scope, receive, send) -> None:
        scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k != b"range"])
        await super().__call__(scope, receive, send)


# ------------------------------------------------------------------------------------------------ jobs


@router.post("/generate", status_code=202, response_model=JobCreated, tags=["jobs"],
             responses={**_AUTH, **_LIMITS})
def generate(req: GenerateRequest, response: Response, r: RedisDep, settings: SettingsDep,
             owner: OwnerDep) -> JobCreated:
    """Queue a video. Follow it with GET status_url, watch it on the stream_url websocket, download video_url."""
    job_id = submit(req, r, settings, owner)
    response.headers["Location"] = f"/jobs/{job_id}"
    return JobCreated(id=job_id, status=JobStatus.QUEUED, **urls(job_id))


@router.get("/jobs/{job_id}", response_model=JobView, tags=["jobs"], responses={**_AUTH, **_NOT_FOUND})
def get_job(job_id: str, r: RedisDep, owner: OwnerDep) -> JobView:
    return job_view(r, owned_record(r, job_id, owner))


@router.delete("/jobs/{job_id}", response_model=JobView, status_code=202, tags=["jobs"],
               responses={**_AUTH, **_NOT_FOUND, 409: {"model": ErrorBody, "description": "Already ended."}})
def delete_job(job_id: str, r: RedisDep, settings: SettingsDep, owner: OwnerDep, response: Response):
    """Cancel: a queued job leaves the queue at once (200, cancelled); a running one stops at its next denoising
    step (202, still running with cancel_requested until its worker has stopped)."""
    conflict = cancel(r, owned_record(r, job_id, owner), settings)
    if conflict is not None:
        return conflict
    view = job_view(r, owned_record(r, job_id, owner))
    if view.status == JobStatus.CANCELLED:
        response.status_code = 200
    return view


@router.head("/jobs/{job_id}/video", include_in_schema=False)  # size and range support, probed before a download
@router.get("/jobs/{job_id}/video", tags=["jobs"], response_class=FileResponse,
            responses={**_AUTH, **_NOT_FOUND, 200: {"content": {"video/mp4": {}}},
                       409: {"model": ErrorBody, "description": "Not finished (or did not succeed)."},
                       416: {"model": ErrorBody, "description": "No byte range asked for is in the file."}})
def get_video(job_id: str, request: Request, r: RedisDep, settings: SettingsDep, owner: MediaOwnerDep):
    """The MP4 once the job has succeeded (Range requests supported)."""
    return video_file(owned_record(r, job_id, owner), settings, request.headers.get("range"))


# ------------------------------------------------------------------------------------------- OpenAI-style


_OPENAI_STATUS = {
    JobStatus.QUEUED: "queued", JobStatus.RUNNING: "in_progress", JobStatus.SUCCEEDED: "completed",
    JobStatus.FAILED: "failed", JobStatus.CANCELLED: "failed",
}


def video_object(record: dict[str, Any], settings: Settings) -> VideoObject:
    params = record.get("params") or {}
    status = record["status"]
    progress = record.get("progress") or {}
    fraction = 1.0 if status == JobStatus.SUCCEEDED else float(progress.get("fraction", 0.0))
    error = None
    if status in (JobStatus.FAILED, JobStatus.CANCELLED):
        err = record.get("error") or {}
        error = {"code": "cancelled" if status == JobStatus.CANCELLED else err.get("type", "failed"),
                 "message": err.get("message", status)}
    frames, fps = params.get("frames"), params.get("fps")
    finished = record.get("finished_at")
    return VideoObject(
        id=record["id"], model=record["model"], status=_OPENAI_STATUS[JobStatus(status)],
        progress=int(round(100 * fraction)), created_at=int(record["created_at"]),
        completed_at=int(finished) if finished and status == JobStatus.SUCCEEDED else None,
        expires_at=int(finished + settings.result_ttl_s) if finished else None,
        seconds=f"{frames / fps:g}" if frames and fps else "",
        size=f"{params.get('width')}x{params.get('height')}" if params.get("width") else "",
        error=error,
    )


def create_video(req: VideoCreateRequest, r: RedisDep, settings: SettingsDep, owner: OwnerDep) -> VideoObject:
    """Queue a video, as OpenAI's API does: a JSON body, or the multipart form that OpenAI's SDK sends
    (``client.videos.create(model=..., prompt=..., seconds="4", size="832x480")``; /generate's other fields go in
    ``extra_body``). Reference images (``input_reference``) are refused: text to video only."""
    model = canonical_model(req.model) if req.model else canonical_model(settings.model)
    workers = served_models(r).get(model, [])
    default_fps = (workers[0].get("defaults", {}).get("fps") if workers else None) or 16
    try:
        job_id = submit(req.to_generate(default_fps), r, settings, owner)
    except (InvalidParams, LimitExceeded) as exc:
        raise _in_request_terms(exc, req, req.fps or default_fps) from exc
    return video_object(jobs.read_job(r, job_id), settings)


router.add_api_route("/v1/videos", create_video, methods=["POST"], response_model=VideoObject, status_code=202,
                     tags=["openai"], responses={**_AUTH, **_LIMITS}, openapi_extra=form_body(VideoCreateRequest),
                     route_class_override=FormAsJsonRoute)


def _in_request_terms(exc: InvalidParams | LimitExceeded, req: VideoCreateRequest, fps: int):
    """An admission error about frames or width/height, named after what the client sent: seconds or size."""
    if exc.field == "frames" and req.seconds is not None:
        most = [int(n) for n in re.findall(r"\d+", exc.accepted)][-1:]
        accepted = f"0 < seconds <= {(most[0] - 1) / fps:g} at {fps} fps" if most else exc.accepted
        return type(exc)("seconds", f"{req.seconds:g} s at {fps} fps ({exc.message})", accepted)
    if exc.field in ("width", "height") and req.size is not None:
        return type(exc)("size", f"{req.size}: {exc.message}", f"WIDTHxHEIGHT with {exc.accepted}")
    return exc


@router.get("/v1/videos/{video_id}", response_model=VideoObject, tags=["openai"],
            responses={**_AUTH, **_NOT_FOUND})
def get_video_object(video_id: str, r: RedisDep, settings: SettingsDep, owner: OwnerDep) -> VideoObject:
    return video_object(owned_record(r, video_id, owner), settings)


@router.head("/v1/videos/{video_id}/content", include_in_schema=False)
@router.get("/v1/videos/{video_id}/content", tags=["openai"], response_class=FileResponse,
            responses={**_AUTH, **_NOT_FOUND, 200: {"content": {"video/mp4": {}}},
                       409: {"model": ErrorBody, "description": "Not finished (or did not succeed)."},
                       416: {"model": ErrorBody, "description": "No byte range asked for is in the file."}})
def get_video_content(video_id: str, request: Request, r: RedisDep, settings: SettingsDep, owner: MediaOwnerDep,
                      variant: str = "video"):
    if variant != "video":
        raise HTTPException(422, detail=[{"loc": ["query", "variant"], "msg": f"unknown variant {variant!r}",
                                          "type": "value_error", "field": "variant", "accepted": "video"}])
    return video_file(owned_record(r, video_id, owner), settings, request.headers.get("range"))


@router.delete("/v1/videos/{video_id}", response_model=VideoObject, tags=["openai"],
               responses={**_AUTH, **_NOT_FOUND, 409: {"model": ErrorBody, "description": "Already ended."}})
def delete_video(video_id: str, r: RedisDep, settings: SettingsDep, owner: OwnerDep):
    """Cancel, as DELETE /jobs/{id} does (409 once ended); answers the video object, 200, as OpenAI's API does."""
    conflict = cancel(r, owned_record(r, video_id, owner), settings)
    if conflict is not None:
        return conflict
    return video_object(owned_record(r, video_id, owner), settings)


# ------------------------------------------------------------------------------------------------ service


@router.get("/models", response_model=ModelList, tags=["service"], responses=_AUTH)
def list_models(r: RedisDep, settings: SettingsDep, owner: OwnerDep) -> ModelList:
    """Models with a live worker (and the configured default, which queues jobs even before its worker is up)."""
    served = served_models(r)
    out = []
    for name in served_model_names(served, settings):
        workers = served.get(name, [])
        # No worker yet (the configured default): what its preset says, as admission checks it.
        first = workers[0] if workers else (preset_capabilities(name) or {})
        out.append(ModelInfo(
            name=name,
            workers=[WorkerInfo(**{k: w.get(k) for k in WorkerInfo.model_fields if k in w}) for w in workers],
            queue_depth=jobs.queue_depth(r, name),
            causal=first.get("causal"),
            precision=sorted({w.get("precision", "auto") for w in workers}),
            limits=first.get("limits", {}),
            defaults=first.get("defaults", {}),
        ))
    return ModelList(default=canonical_model(settings.model), models=out)


@router.get("/healthz", tags=["service"])
def healthz() -> dict[str, str]:
    """The API process is alive."""
    return {"status": "ok"}


@router.get("/readyz", tags=["service"], responses={503: {"model": ErrorBody, "description": "Not ready."}})
def readyz(r: RedisDep, settings: SettingsDep):
    """Redis answers and a worker of the default model heartbeats."""
    model = canonical_model(settings.model)
    try:
        r.ping()
        workers = served_models(r).get(model, [])
    except redis.RedisError as exc:
        return JSONResponse(status_code=503, content={"detail": f"redis unreachable: {exc}"})
    if not workers:
        return JSONResponse(status_code=503, content={"detail": f"no live worker for model {model}"})
    return {"status": "ready", "model": model, "workers": len(workers), "time": time.time()}


@router.get("/metrics", tags=["service"], response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
def prometheus_metrics(r: RedisDep, settings: SettingsDep) -> Response:
    try:  # every queue, including a model whose workers are all gone (its jobs wait: the dashboard shows it)
        for name in sorted(set(jobs.queued_models(r)) | set(served_model_names(served_models(r), settings))):
            metrics.QUEUE_DEPTH.labels(name).set(jobs.queue_depth(r, name))
    except redis.RedisError:
        pass  # the process metrics still matter when Redis is down
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
