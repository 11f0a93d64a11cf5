"""Where one attempt of a job puts its video: the output file, the chunk table and the Redis stream.

Every fragmented-MP4 segment is written once and the same bytes go three ways, in this order:

1. appended to ``<output_dir>/<id>.<attempt>.mp4.partial`` (named ``<id>.mp4`` when the job succeeds, deleted
   when it fails or is cancelled: a finished name is always a complete file);
2. recorded in the chunk table ``sana:job:<id>:chunks`` (the chunk event plus its byte offset in the file),
   so a viewer who falls behind the stream's bounded retention reads the chunk from the file instead;
3. appended to the stream ``sana:job:<id>:stream`` for live viewers.

A re-queued job (its first worker died) starts a new attempt: a file of its own, the chunk table reset, and
a ``start`` entry with the new attempt number is appended. Viewers treat a start of a newer attempt as
"restart from chunk 0" (``server/stream.py``), so they never mix bytes of two attempts.

A worker taken for lost may only have stalled. Should it come back, its attempt no longer owns the job: every write
to the record, the chunk table and the stream checks the attempt in the same transaction, and the attempt stops with
``AttemptSuperseded`` at its next write or denoising step, having touched nothing but its own file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import redis

from server.settings import Settings
from workers import jobs

log = logging.getLogger("sana.outputs")


def video_path(output_dir: Path, job_id: str) -> Path:
    return Path(output_dir) / f"{job_id}.mp4"


def partial_path(output_dir: Path, job_id: str, attempt: int) -> Path:
    return Path(output_dir) / f"{job_id}.{attempt}.mp4.partial"


def partial_paths(output_dir: Path, job_id: str) -> list[Path]:
    """The partial files of every attempt of a job."""
    return sorted(Path(output_dir).glob(f"{job_id}.*.mp4.partial"))


# uuid4().hex job ids (server/routes.py): <id>.mp4, <id>.<attempt>.mp4.partial (and an older <id>.mp4.partial)
_OUTPUT_NAME = re.compile(r"^([0-9a-f]{32})(\.\d+)?\.mp4(\.partial)?$")


def sweep_expired(r: redis.Redis, output_dir: Path, ttl_s: float, now: float | None = None) -> list[Path]:
    """Delete the output files whose job has expired: ``<id>.mp4`` (or a ``<id>.<attempt>.mp4.partial`` a lost attempt
    left) with no job record left in Redis and not written for ``ttl_s`` seconds. Returns the deleted paths.

    A finished file is last written when its job ends, and the record lives ``ttl_s`` (SANA_RESULT_TTL_S) from then
    on, so a video goes when its record does (the ``expires_at`` the API shows). Both conditions must hold: a file
    whose record still exists is never deleted, and a Redis that lost its data (no persistence) costs no video
    younger than the retention time. Files of other names are left alone.
    """
    now = time.time() if now is None else now
    try:
        entries = list(os.scandir(output_dir))
    except FileNotFoundError:
        return []
    old = []
    for entry in entries:
        match = _OUTPUT_NAME.match(entry.name)
        try:
            if match and entry.is_file(follow_symlinks=False) and now - entry.stat().st_mtime >= ttl_s:
                old.append((Path(entry.path), match.group(1)))
        except OSError:  # deleted meanwhile (another sweeper, the job's own clean-up), or unreadable: not ours now
            continue
    if not old:
        return []
    with r.pipeline(transaction=False) as pipe:
        for _, job_id in old:
            pipe.exists(jobs.job_key(job_id))
        alive = pipe.execute()
    deleted = []
    for (path, _), exists in zip(old, alive):
        if exists:
            continue
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # e.g. a read-only mount: skip it, sweep the rest
            log.warning("cannot delete expired output %s: %s", path, exc)
            continue
        deleted.append(path)
    return deleted


class JobOutput:
    """The output of one attempt of one job. Use ``begin``, then ``chunk``/``progress``, then ``finish`` or
    ``discard``."""

    def __init__(self, r: redis.Redis, job_id: str, attempt: int, settings: Settings):
        self.r = r
        self.job_id = job_id
        self.attempt = attempt
        self.settings = settings
        self.partial = partial_path(settings.output_dir, job_id, attempt)
        self.final = video_path(settings.output_dir, job_id)
        self._file = None
        self.chunks = 0
        self.bytes = 0

    def _publish(self, pipe, event: dict, data: bytes = b"") -> None:
        jobs.publish_event(pipe, self.job_id, event, data, maxlen=self.settings.stream_maxlen)

    def begin(self, start_event: dict[str, Any], init_segment: bytes) -> None:
        """Open a fresh output file with the MP4 init segment and announce the attempt to viewers."""
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.partial, "wb")
        self._file.write(init_segment)
        self._file.flush()
        self.bytes = len(init_segment)
        event = dict(start_event, type="start", attempt=self.attempt, init_bytes=len(init_segment))

        def writes(pipe) -> None:
            pipe.delete(jobs.chunks_key(self.job_id))
            pipe.hset(jobs.job_key(self.job_id), mapping={
                "init": init_segment, "init_attempt": self.attempt, "start": json.dumps(event),
                "chunks": 0, "bytes": self.bytes,
            })
            self._publish(pipe, event, init_segment)

        jobs.write_as_attempt(self.r, self.job_id, self.attempt, writes)

    def chunk(self, chunk_event: dict[str, Any], segment: bytes) -> dict[str, Any]:
        """Append one media segment everywhere; returns the event sent to viewers."""
        offset = self.bytes
        self._file.write(segment)
        self._file.flush()
        self.bytes += len(segment)
        self.chunks += 1
        event = dict(chunk_event, type="chunk", attempt=self.attempt, offset=offset, bytes=len(segment),
                     t=round(time.time(), 6))

        def writes(pipe) -> None:
            pipe.rpush(jobs.chunks_key(self.job_id), json.dumps(event))
            pipe.hset(jobs.job_key(self.job_id), mapping={"chunks": self.chunks, "bytes": self.bytes})
            self._publish(pipe, event, segment)

        jobs.write_as_attempt(self.r, self.job_id, self.attempt, writes)
        return event

    def progress(self, progress: dict[str, Any], eta_s: float | None) -> None:
        event = {"type": "progress", "attempt": self.attempt, **progress, "eta_s": eta_s}
        mapping: dict[str, Any] = {"progress": json.dumps(progress)}

        def writes(pipe) -> None:
            if eta_s is None:
                pipe.hdel(jobs.job_key(self.job_id), "eta_s")
            else:
                mapping["eta_s"] = eta_s
            pipe.hset(jobs.job_key(self.job_id), mapping=mapping)
            self._publish(pipe, event)

        jobs.write_as_attempt(self.r, self.job_id, self.attempt, writes)

    def finish(self, tail: bytes) -> Path:
        """Write the closing bytes, make the file durable and give it its final name (if this attempt still owns the
        job: else AttemptSuperseded, and the file is left for ``discard``)."""
        if tail:
            self._file.write(tail)
        self.bytes += len(tail)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self._publish_file()
        record = {"tail": tail, "bytes": self.bytes}
        jobs.write_as_attempt(self.r, self.job_id, self.attempt,
                              lambda pipe: pipe.hset(jobs.job_key(self.job_id), mapping=record))
        return self.final

    def _publish_file(self) -> None:
        """Give the partial file the video's name, unless another attempt took the job meanwhile. A hard link does
        not replace an existing video: one there now was named by an attempt that owned the job before this one
        (and lost it before it could end the job), so the owner replaces it, anyone else stops."""
        superseded = jobs.AttemptSuperseded(self.job_id, self.attempt)
        if not jobs.owns(self.r, self.job_id, self.attempt):
            raise superseded
        try:
            os.link(self.partial, self.final)
        except FileExistsError:
            if not jobs.owns(self.r, self.job_id, self.attempt):
                raise superseded from None
            os.replace(self.partial, self.final)
        except FileNotFoundError:  # the lost-worker clean-up removed our file: the job went on without us
            raise superseded from None
        except OSError:  # a filesystem without hard links
            os.replace(self.partial, self.final)
        else:
            self.partial.unlink()

    def discard(self) -> None:
        """Drop the partial file (failed or cancelled attempt)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.partial.unlink(missing_ok=True)
