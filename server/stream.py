"""WS /jobs/{id}/stream?from_chunk=K: watch a job live, join late, reconnect, or replay a finished job.

What the server sends (the client sends nothing; auth as for HTTP, or ``?access_token=`` for browsers):

- ``{"type": "start", "attempt", "width", "height", "fps", "mode", "frames_total", "blocks_total",
  "steps_per_block", "codec", "mime", "init_bytes"}`` then one binary message: the MP4 init segment;
- ``{"type": "chunk", "index", "start_frame", "frames", "bytes", "offset", "attempt"}`` then one binary
  message: that chunk's media segment (``offset`` is its position in the MP4 file);
- ``{"type": "progress", "fraction", "block", "blocks_total", "step", "steps_total", "frames_done", "eta_s"...}``
  (the newest one per read: a slow viewer gets fewer, never stale-first);
- ``{"type": "status", "status", "attempt", "progress", "from_chunk"}`` first, the job's state when the viewer
  connected (after the current attempt's start + init segment when it has one);
- ``{"type": "status", "status": "queued", "reason"}`` when the job's worker was lost and the job re-queued;
- ``{"type": "restart", "attempt"}`` when a re-queued job starts over on another worker: drop what you have,
  a new start + init segment and chunks from 0 follow;
- ``{"type": "tail", "bytes"}`` then binary: closing bytes of the file, if the encoder has any;
- last ``{"type": "done", "status": "succeeded" | "cancelled", ...}`` or ``{"type": "error", "status": "failed",
  "error": {...}}``; then the server closes (1000).

Every chunk from K on is sent exactly once per attempt, in index order: init + chunks K.. is a playable
fragmented MP4 (each chunk starts with an IDR frame). Entries come from the job's Redis Stream; a chunk the
stream no longer holds (bounded retention, or the stream expired after the job ended) is read from the output
file at the offset the chunk table recorded. Each viewer reads at its own pace, so none slows the worker or
another viewer.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect

from server import metrics
from server.deps import authenticate
from server.settings import Settings
from workers import jobs
from workers.jobs import TERMINAL, JobStatus
from workers.output import partial_path, video_path

router = APIRouter()

_READ_COUNT = 16  # entries per read: bounds a replaying viewer's memory (chunks can be MBs)
_BLOCK_MS = 1000


class ChunkUnavailable(Exception):
    pass


async def _deny(websocket: WebSocket, status: int, detail: str) -> None:
    """Refuse the handshake with an HTTP status where the server supports it, else close with 4000+status."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(JSONResponse(status_code=status, content={"detail": detail}))
    else:
        await websocket.close(code=4000 + status, reason=detail)


@router.websocket("/jobs/{job_id}/stream")
async def stream_job(websocket: WebSocket, job_id: str):
    """Query: ``from_chunk`` (first chunk index to send, default 0), ``access_token`` (instead of the header)."""
    settings: Settings = websocket.app.state.settings
    ar: aioredis.Redis = websocket.app.state.aredis
    header = websocket.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else None
    owner = authenticate(settings, token or websocket.query_params.get("access_token"))
    if owner is None:
        await _deny(websocket, 401, "missing or invalid API key")
        return
    # Checked here, not as a typed Query: a failed check there refuses the handshake with a bare 403.
    raw = websocket.query_params.get("from_chunk", "0")
    from_chunk = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 12 else -1
    if from_chunk < 0:
        await _deny(websocket, 422, f"from_chunk: {raw!r} is not a chunk index (accepted: an integer "
                    "0..999999999999)")
        return
    job_owner = await ar.hget(jobs.job_key(job_id), "owner") if jobs.is_job_id(job_id) else None  # None: no job
    if job_owner is None or job_owner.decode() != owner:
        await _deny(websocket, 404, f"no job {job_id}")
        return
    await websocket.accept()
    metrics.WEBSOCKET_VIEWERS.inc()
    viewer = Viewer(websocket, ar, job_id, from_chunk, settings)
    pump = asyncio.create_task(viewer.run())
    watch = asyncio.create_task(_until_disconnect(websocket))
    try:
        done, _ = await asyncio.wait({pump, watch}, return_when=asyncio.FIRST_COMPLETED)
        if pump in done:
            watch.cancel()
            exc = pump.exception()
            if exc is None:
                await websocket.close(1000)
            elif not isinstance(exc, (WebSocketDisconnect, RuntimeError)):
                await websocket.close(1011)
                raise exc
        else:
            pump.cancel()
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client left while we were closing
    finally:
        for task in (pump, watch):
            task.cancel()
        metrics.WEBSOCKET_VIEWERS.dec()


async def _until_disconnect(websocket: WebSocket) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return


class Viewer:
    """One websocket viewer of one job: where it is (attempt, next chunk) and how to send what comes next."""

    def __init__(self, websocket: WebSocket, ar: aioredis.Redis, job_id: str, from_chunk: int, settings: Settings):
        self.ws = websocket
        self.ar = ar
        self.job_id = job_id
        self.next = from_chunk
        self.from_chunk = from_chunk
        self.settings = settings
        self.attempt: int | None = None  # the attempt whose start/init this viewer has sent

    async def record(self) -> dict[str, Any] | None:
        raw = await self.ar.hgetall(jobs.job_key(self.job_id))
        return jobs.decode_record(raw, binary=True) if raw else None

    async def send_event(self, event: dict[str, Any], data: bytes | None = None) -> None:
        await self.ws.send_text(json.dumps(event))
        if data is not None:
            await self.ws.send_bytes(data)

    async def send_start(self, event: dict[str, Any], init: bytes) -> None:
        if self.attempt is not None:
            await self.send_event({"type": "restart", "attempt": event["attempt"]})
            self.next = 0
        self.attempt = event["attempt"]
        await self.send_event(event, init)

    async def send_chunk(self, event: dict[str, Any], data: bytes) -> None:
        if event["index"] > self.next:
            await self.fill(self.next, event["index"])
        await self.send_event(event, data)
        self.next = event["index"] + 1

    async def fill(self, lo: int, hi: int) -> None:
        """Send chunks lo..hi-1 of the current attempt from the output file (the stream no longer has them)."""
        table = [json.loads(x) for x in await self.ar.lrange(jobs.chunks_key(self.job_id), lo, hi - 1)]
        table = [e for e in table if e.get("attempt") == self.attempt and lo <= e["index"] < hi]
        if [e["index"] for e in table] != list(range(lo, hi)):
            raise ChunkUnavailable(f"chunks {lo}..{hi - 1} are neither in the stream nor in the chunk table")
        paths = (partial_path(self.settings.output_dir, self.job_id, self.attempt),
                 video_path(self.settings.output_dir, self.job_id))
        for event in table:
            data = await asyncio.to_thread(_read_range, paths, event["offset"], event["bytes"])
            await self.send_event(event, data)
            self.next = event["index"] + 1

    async def finish(self, event: dict[str, Any], tail: bytes, chunks_total: int | None) -> None:
        if event.get("status") == JobStatus.SUCCEEDED:
            if chunks_total is not None and self.next < chunks_total:
                await self.fill(self.next, chunks_total)
            if tail:
                await self.send_event({"type": "tail", "bytes": len(tail)}, tail)
            event = dict(event, video_url=f"/jobs/{self.job_id}/video")
        await self.send_event(event)

    async def finish_from_record(self, record: dict[str, Any]) -> None:
        """The job ended and its stream expired: replay what the record and the file still hold."""
        status = record["status"]
        if status == JobStatus.SUCCEEDED:
            if self.attempt != record.get("init_attempt") and "init" in record:
                await self.send_start(record["start"], record["init"])
            done = {"type": "done", "status": status, "attempt": record.get("attempt", 0),
                    "chunks": record.get("chunks", 0), "bytes": record.get("bytes", 0)}
            await self.finish(done, record.get("tail", b""), record.get("chunks", 0))
        elif status == JobStatus.CANCELLED:
            await self.send_event({"type": "done", "status": status, "error": record.get("error")})
        else:
            await self.send_event({"type": "error", "status": status, "error": record.get("error")})

    async def run(self) -> None:
        try:
            await self._run()
        except ChunkUnavailable as exc:
            # A cancelled or failed attempt deletes its file: a viewer behind it (a replay of a long stream whose
            # early chunks left the stream) gets how the job ended, not a missing byte range.
            record = await self.record()
            if record is not None and record["status"] in TERMINAL and record["status"] != JobStatus.SUCCEEDED:
                await self.finish_from_record(record)
                return
            await self.send_event({"type": "error", "status": "unavailable",
                                   "error": {"type": "ChunkUnavailable", "message": str(exc)}})

    async def _run(self) -> None:
        record = await self.record()
        if record is None:
            return
        floor = record.get("attempt", 0)
        # The stream may have trimmed the attempt's start entry: the record keeps it, with the init segment.
        if (floor > 0 and record.get("init_attempt") == floor and "init" in record
                and record["status"] != JobStatus.QUEUED):
            await self.send_start(record["start"], record["init"])
        await self.send_event({"type": "status", "status": record["status"], "attempt": floor,
                               "progress": record.get("progress"), "from_chunk": self.from_chunk})
        key = jobs.stream_key(self.job_id)
        last_id: bytes | str = "0-0"
        while True:
            reply = await self.ar.xread({key: last_id}, count=_READ_COUNT, block=_BLOCK_MS)
            if not reply:  # nothing new for a second: has the job ended and its stream expired meanwhile?
                status = await self.ar.hget(jobs.job_key(self.job_id), "status")
                if status is None:
                    await self.send_event({"type": "error", "status": "expired",
                                           "error": {"type": "Expired", "message": "the job record expired"}})
                    return
                if status.decode() in TERMINAL and not await self.ar.exists(key):
                    await self.finish_from_record(await self.record())
                    return
                continue
            progress = None
            for entry_id, fields in reply[0][1]:
                last_id = entry_id
                kind = fields[b"type"].decode()
                attempt = int(fields[b"attempt"])
                event = json.loads(fields[b"event"])
                data = fields.get(b"data", b"")
                if kind in ("done", "error"):
                    await self.finish(event, data, event.get("chunks"))
                    return
                if attempt < floor:
                    continue
                if kind == "start":
                    if self.attempt is None or attempt > self.attempt:
                        await self.send_start(event, data)
                elif kind == "chunk":
                    if attempt == self.attempt and event["index"] >= self.next:
                        await self.send_chunk(event, data)
                elif kind == "progress":
                    if attempt == self.attempt:
                        progress = event
                else:
                    await self.send_event(event)
            if progress is not None:
                await self.send_event(progress)


def _read_range(paths: tuple[Path, ...], offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of the first of ``paths`` that exists (the partial file is renamed when done)."""
    for path in paths:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except FileNotFoundError:
            continue
        if len(data) == size:
            return data
    raise ChunkUnavailable(f"bytes {offset}..{offset + size} are not in the output file")
