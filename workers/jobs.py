"""The job contract between the API and the workers: Redis keys, job records and the RQ queue of each model.

A job is plain data. The RQ job (one queue per model, JSON-serialized) carries the parameters; a Redis hash
``sana:job:<id>`` is the record clients read (status, progress, timings, error). Status only moves forward::

    queued -> running -> succeeded | failed | cancelled
    queued -> cancelled
    running -> queued            (its worker died; RQ re-queues it once, see ``on_job_failure``)

Transitions are Lua scripts, so a cancel racing a worker's start, or two workers racing for a re-queued job,
resolve in one place. Each transition that a viewer must see is also appended to the job's Redis Stream
(``sana:job:<id>:stream``, see ``workers/output.py`` for the chunk entries).

Nothing here imports torch: the API process uses this module too.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import socket
import threading
import time
from enum import StrEnum
from typing import Any

import redis
from rq import Callback, Queue, Retry
from rq.exceptions import AbandonedJobError
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty

from server.settings import Settings, get_settings

TASK = "workers.tasks.generate_video"
FAILURE_CALLBACK = "workers.jobs.on_job_failure"
# A job is re-queued this many times when its worker dies (an exception raised by the engine is not retried:
# it would fail the same way again).
RETRIES_ON_WORKER_LOSS = 1


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

# Record fields holding JSON (decoded by read_job); binary fields are never decoded as text.
_JSON_FIELDS = ("params", "progress", "error", "timings", "start")
_FLOAT_FIELDS = ("created_at", "started_at", "finished_at", "eta_s", "first_chunk_at")
_INT_FIELDS = ("attempt", "chunks", "bytes", "init_attempt")
_BINARY_FIELDS = ("init", "tail")


_JOB_ID = re.compile(r"[0-9a-f]{32}")


def is_job_id(value: str) -> bool:
    """Whether ``value`` has the form of the ids the API issues (uuid4 hex). Anything else names no job: it never
    reaches Redis, where ``<id>:chunks`` would name another key of a job."""
    return _JOB_ID.fullmatch(value) is not None


def job_key(job_id: str) -> str:
    return f"sana:job:{job_id}"


def stream_key(job_id: str) -> str:
    return f"sana:job:{job_id}:stream"


def chunks_key(job_id: str) -> str:
    """List of the current attempt's chunk events (JSON with the chunk's byte offset in the output file)."""
    return f"sana:job:{job_id}:chunks"


def cancel_key(job_id: str) -> str:
    """Set by a cancel request; the worker reads it before every denoising step."""
    return f"sana:job:{job_id}:cancel"


def queue_name(model: str) -> str:
    return f"sana:{model}"


def connect(url: str) -> redis.Redis:
    """A bytes-mode client (chunk payloads are binary; RQ expects bytes too)."""
    return redis.Redis.from_url(url)


# KEYS[1] the lock, ARGV[1] its holder: deleted only by the holder (an expired lock may have been taken since).
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class ModelQueue(Queue):
    """A model's RQ queue. Its maintenance lock, which RQ's own registry cleaning and our lost-worker pass share
    (two cleaners could re-queue a job twice), expires after ``Settings.maintenance_lock_s`` instead of RQ's 15
    minutes, and is released only by the thread that holds it: a worker killed while cleaning pauses the detection
    of lost workers on this queue for seconds, not a quarter of an hour."""

    @staticmethod
    def _holder() -> str:
        return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"

    def acquire_maintenance_lock(self) -> bool:
        return bool(self.connection.set(self.registry_cleaning_key, self._holder(), nx=True,
                                        ex=get_settings().maintenance_lock_s))

    def release_maintenance_lock(self) -> None:
        self.connection.eval(_RELEASE_LOCK, 1, self.registry_cleaning_key, self._holder())


@functools.lru_cache(maxsize=256)
def get_queue(r: redis.Redis, model: str) -> ModelQueue:
    """The model's RQ queue on client ``r`` (cached: a Queue remembers the server's version, one round trip)."""
    return ModelQueue(queue_name(model), connection=r, serializer=JSONSerializer)


def queued_models(r: redis.Redis) -> list[str]:
    """Every model that has had a queue, live workers or not (RQ keeps a set of queue names)."""
    return sorted(q.name.removeprefix("sana:") for q in Queue.all(connection=r, serializer=JSONSerializer)
                  if q.name.startswith("sana:"))


# ---------------------------------------------------------------------------------------------- transitions

# KEYS[1] record, KEYS[2] (optional) a key whose existence refuses the move; ARGV[1] comma-separated statuses allowed
# now; ARGV[2] new status; ARGV[3] the attempt that must still be the record's ('' for any); ARGV[4] comma-separated
# fields to delete; ARGV[5..] field, value... Returns {1, old} when it moved, {0, current} when it did not, nil when
# the record does not exist.
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return nil end
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[3] then return {0, cur} end
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 1 then return {0, cur} end
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == cur then
    for f in string.gmatch(ARGV[4], '[^,]+') do redis.call('HDEL', KEYS[1], f) end
    redis.call('HSET', KEYS[1], 'status', ARGV[2], unpack(ARGV, 5))
    return {1, cur}
  end
end
return {0, cur}
"""

# Record fields an attempt writes as it runs (the stream's segments, progress, chunk counts): a new attempt, or a
# job put back on its queue, starts without them.
ATTEMPT_OUTPUT = ("init", "tail", "start", "init_attempt", "chunks", "bytes", "progress", "eta_s", "first_chunk_at",
                  "error")

# A worker takes the job: queued (or running, when the previous attempt's worker died and the re-queue
# notice was lost) -> running, attempt + 1, and the previous attempt's output fields are cleared.
# ARGV: field, value... Returns the new attempt number, or {0, status} when the job may not start.
_START = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return {0, 'missing'} end
if cur ~= 'queued' and cur ~= 'running' then return {0, cur} end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HDEL', KEYS[1], ATTEMPT_OUTPUT)
redis.call('HSET', KEYS[1], 'status', 'running', unpack(ARGV))
return attempt
""".replace("ATTEMPT_OUTPUT", ", ".join(f"'{f}'" for f in ATTEMPT_OUTPUT))


def _fields(mapping: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    for k, v in mapping.items():
        if isinstance(v, (dict, list)):
            v = json.dumps(v)
        out += [k, v]
    return out


def transition(r: redis.Redis, job_id: str, allowed: set[str], to: str, *, attempt: int | None = None,
               unless: str | None = None, clear: tuple[str, ...] = (), **fields: Any) -> tuple[bool, str | None]:
    """Move the record to ``to`` if its status is one of ``allowed`` (and, given ``attempt``, the record's attempt is
    still that one; given ``unless``, that key does not exist), deleting the ``clear`` fields; returns (moved, status
    before)."""
    keys = [job_key(job_id)] + ([unless] if unless else [])
    res = r.eval(_TRANSITION, len(keys), *keys, ",".join(sorted(allowed)), to,
                 "" if attempt is None else str(attempt), ",".join(clear), *_fields(fields))
    if res is None:
        return False, None
    return bool(res[0]), res[1].decode()


class AttemptSuperseded(Exception):
    """This attempt no longer owns its job: the worker was taken for lost (it stopped heartbeating, e.g. paused or cut
    off from Redis) and the job was re-queued or ended meanwhile. The attempt must stop and write nothing shared."""

    def __init__(self, job_id: str, attempt: int, detail: str = ""):
        super().__init__(f"attempt {attempt} of job {job_id} no longer owns it{detail}")


def is_owner(status: bytes | None, current: bytes | None, attempt: int) -> bool:
    """Whether a record with ``status`` and attempt ``current`` (raw HMGET values) is run by ``attempt``."""
    return status == b"running" and current is not None and int(current) == attempt


def owns(r: redis.Redis | redis.client.Pipeline, job_id: str, attempt: int) -> bool:
    """Whether ``attempt`` is still the running attempt of the job."""
    return is_owner(*r.hmget(job_key(job_id), "status", "attempt"), attempt)


def write_as_attempt(r: redis.Redis, job_id: str, attempt: int, queue_writes) -> None:
    """Run ``queue_writes(pipe)`` (commands queued on a transaction) only while ``attempt`` owns the job: the record is
    WATCHed, so a re-queue between the check and the writes aborts them. Raises AttemptSuperseded otherwise."""
    key = job_key(job_id)
    while True:
        with r.pipeline() as pipe:
            try:
                pipe.watch(key)
                if not owns(pipe, job_id, attempt):
                    raise AttemptSuperseded(job_id, attempt)
                pipe.multi()
                queue_writes(pipe)
                pipe.execute()
                return
            except redis.WatchError:  # the record changed meanwhile: look again
                continue


def start_attempt(r: redis.Redis, job_id: str, **fields: Any) -> int | None:
    """Mark the job running for a new attempt; None when it was cancelled (or ended) meanwhile."""
    res = r.eval(_START, 1, job_key(job_id), *_fields(fields))
    if isinstance(res, list):
        return None
    return int(res)


def publish_event(r: redis.Redis | redis.client.Pipeline, job_id: str, event: dict, data: bytes = b"",
                  maxlen: int | None = None) -> None:
    """Append one event (and its binary payload, if any) to the job's stream, trimming old entries.
    Events carry ``t``, the Unix time they were published (viewers measure their lag with it)."""
    event = {**event, "t": event.get("t", round(time.time(), 6))}
    fields = {"type": event["type"], "attempt": event.get("attempt", 0), "event": json.dumps(event)}
    if "index" in event:
        fields["index"] = event["index"]
    if data:
        fields["data"] = data
    r.xadd(stream_key(job_id), fields, maxlen=maxlen or get_settings().stream_maxlen, approximate=False)


def expire_job(pipe: redis.client.Pipeline, job_id: str, settings: Settings) -> None:
    """Start the retention clocks once a job has ended."""
    pipe.expire(job_key(job_id), settings.result_ttl_s)
    pipe.expire(chunks_key(job_id), settings.result_ttl_s)
    pipe.expire(stream_key(job_id), settings.stream_ttl_s)
    pipe.delete(cancel_key(job_id))


def end_job(r: redis.Redis, job_id: str, status: JobStatus, *, allowed: set[str], event: dict,
            data: bytes = b"", settings: Settings | None = None, attempt: int | None = None,
            unless_cancelled: bool = False, **fields: Any) -> bool:
    """Move a job to a terminal status, tell its viewers, start its retention clocks. False if it had ended (or,
    given ``attempt``, a later attempt owns it; with ``unless_cancelled``, a cancel was asked for)."""
    settings = settings or get_settings()
    moved, _ = transition(r, job_id, allowed, status, attempt=attempt, finished_at=time.time(),
                          unless=cancel_key(job_id) if unless_cancelled else None, **fields)
    if not moved:
        return False
    with r.pipeline(transaction=False) as pipe:
        publish_event(pipe, job_id, event, data, maxlen=settings.stream_maxlen)
        expire_job(pipe, job_id, settings)
        pipe.execute()
    return True


# ---------------------------------------------------------------------------------------------- API side


def submit_job(r: redis.Redis, *, job_id: str, model: str, params: dict, owner: str,
               settings: Settings) -> None:
    """Write the record and put the job on its model's queue, in one transaction (never one without the other).
    ``params`` are plain JSON values."""
    with r.pipeline() as pipe:
        # RQ opens the transaction (MULTI) itself, so its commands come first.
        get_queue(r, model).enqueue(
            TASK,
            job_id,
            model,
            params,
            job_id=job_id,
            description=f"generate {model} {job_id}",
            job_timeout=settings.job_timeout_s,
            result_ttl=settings.result_ttl_s,
            failure_ttl=settings.result_ttl_s,
            retry=Retry(max=RETRIES_ON_WORKER_LOSS),
            on_failure=Callback(FAILURE_CALLBACK),
            pipeline=pipe,
        )
        pipe.hset(job_key(job_id), mapping={
            "id": job_id,
            "model": model,
            "status": JobStatus.QUEUED,
            "owner": owner,
            "params": json.dumps(params),
            "created_at": time.time(),
            "attempt": 0,
        })
        pipe.execute()


def queue_depth(r: redis.Redis, model: str) -> int:
    return get_queue(r, model).count


def read_job(r: redis.Redis, job_id: str, *, binary: bool = False) -> dict[str, Any] | None:
    """The job record as plain values, or None. ``binary`` keeps the init/tail segments (bytes)."""
    raw = r.hgetall(job_key(job_id))
    return decode_record(raw, binary=binary) if raw else None


def decode_record(raw: dict[bytes, bytes], *, binary: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = k.decode()
        if key in _BINARY_FIELDS:
            if binary:
                out[key] = v
        elif key in _JSON_FIELDS:
            out[key] = json.loads(v)
        elif key in _FLOAT_FIELDS:
            out[key] = float(v)
        elif key in _INT_FIELDS:
            out[key] = int(v)
        else:
            out[key] = v.decode()
    return out


def request_cancel(r: redis.Redis, job_id: str, settings: Settings | None = None) -> str | None:
    """Cancel a job: a queued one leaves its queue now, a running one stops at its next denoising step.

    Returns the status after the request (``running`` while the worker has yet to stop), None if unknown.
    """
    settings = settings or get_settings()
    # The flag first: a worker that starts the job right now still sees it before its first step.
    r.set(cancel_key(job_id), 1, ex=settings.job_timeout_s + 3600)
    event = {"type": "done", "status": JobStatus.CANCELLED, "attempt": 0, "chunks": 0}
    if end_job(r, job_id, JobStatus.CANCELLED, allowed={JobStatus.QUEUED}, event=event, settings=settings,
               error=json.dumps({"type": "Cancelled", "message": "cancelled before it started"})):
        _remove_from_queue(r, job_id)
        return JobStatus.CANCELLED
    record = read_job(r, job_id)
    if record is None:
        r.delete(cancel_key(job_id))
        return None
    if record["status"] in TERMINAL:
        r.delete(cancel_key(job_id))
    return record["status"]


def _remove_from_queue(r: redis.Redis, job_id: str) -> None:
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    try:
        # Deleted, not cancelled: RQ keeps a cancelled job's hash (with the prompt) without expiry, and its id in a
        # canceled registry it never cleans. Our record keeps what the API shows.
        Job.fetch(job_id, connection=r, serializer=JSONSerializer).delete(remove_from_queue=True)
    except NoSuchJobError:
        pass
    except Exception as exc:  # e.g. a worker took it meanwhile: it reads the cancelled record and skips the job
        logging.getLogger("sana.jobs").info("job %s: not removed from its queue: %s", job_id, exc)


# ---------------------------------------------------------------------------------------------- submit checks
#
# The API cannot tell alone whether a request fits the model (a prompt's tokens need the model's tokenizer): it asks
# a live worker of the model, which resolves the parameters as it would for the job. Requests go on a list per model
# that expires soon after the last one (unanswered requests do not pile up); the answer comes back on a key of the
# request's own, which expires too (an answer that came too late is never read).


def check_requests_key(model: str) -> str:
    return f"sana:check:{model}"


def check_answer_key(request_id: str) -> str:
    return f"sana:check:answer:{request_id}"


def ask_worker_to_check(r: redis.Redis, model: str, params: dict[str, Any], timeout_s: float) -> dict | None:
    """A live worker's verdict on ``params`` for ``model``: ``{"ok": True}``, or ``{"ok": False, "error": {field,
    message, accepted}}``; None when no worker answered within ``timeout_s`` (the job is then checked when it runs).
    """
    import uuid

    request_id = uuid.uuid4().hex
    request = json.dumps({"id": request_id, "params": params})
    with r.pipeline() as pipe:
        pipe.rpush(check_requests_key(model), request)
        pipe.expire(check_requests_key(model), max(1, math.ceil(timeout_s)) + 1)
        pipe.execute()
    answer = r.blpop([check_answer_key(request_id)], timeout=timeout_s)  # a late answer expires unread
    return None if answer is None else json.loads(answer[1])


def answer_checks(r: redis.Redis, models: list[str], check, wait_s: float = 1.0) -> bool:
    """Take one check request for ``models`` (waiting up to ``wait_s``) and answer it with ``check(params)``, which
    returns None when the parameters are fine or an error dict. False when there was none to answer."""
    got = r.blpop([check_requests_key(m) for m in models], timeout=wait_s)
    if got is None:
        return False
    request = json.loads(got[1])
    error = check(request["params"])
    answer = {"ok": error is None} if error is None else {"ok": False, "error": error}
    with r.pipeline() as pipe:
        pipe.rpush(check_answer_key(request["id"]), json.dumps(answer))
        pipe.expire(check_answer_key(request["id"]), 60)
        pipe.execute()
    return True


# ---------------------------------------------------------------------------------------------- lost workers


def on_job_failure(job, connection, exc_type, exc_value, tb) -> None:
    """RQ failure callback. Only a lost or stopped worker matters here: the task records its own failures.

    - RQ's StartedJobRegistry cleanup calls this for a job whose worker stopped heartbeating, before it re-queues
      the job (retries left) or fails it (none left).
    - The worker itself calls it when it is made to stop in the middle of a job (a second SIGTERM or Ctrl-C: RQ
      raises SystemExit inside the job). The record would stay "running" for good: the job is re-queued the same
      way (``requeue_on_stop`` tells the worker to keep RQ's retry), or failed when no retry is left.

    We mirror that in the record and tell viewers.
    """
    from workers.output import partial_path, partial_paths

    stopped = exc_type is not None and issubclass(exc_type, (SystemExit, KeyboardInterrupt))
    if exc_type is None or not (stopped or issubclass(exc_type, AbandonedJobError)):
        return
    settings = get_settings()
    record = read_job(connection, job.id)
    if record is None:
        return
    worker = record.get("worker", "?")
    attempt = record.get("attempt", 0)
    mine = getattr(job, "sana_attempt", None)
    if stopped and mine is None:  # stopped before this worker's attempt began
        if record["status"] == JobStatus.QUEUED:
            job.sana_untaken = True  # the worker puts it back on its queue, as a job it never started
            return
        if record["status"] == JobStatus.RUNNING and record.get("worker") == getattr(job, "worker_name", None):
            mine = attempt  # stopped inside start_attempt: the attempt is this worker's
    # A stopped worker acts only for its own attempt: one that had stalled and lost the job must leave the attempt
    # that runs it now (or the queue that holds it) alone.
    if stopped and (record["status"] != JobStatus.RUNNING or mine != attempt):
        if mine is not None and (mine != attempt or record["status"] == JobStatus.QUEUED):
            job.sana_superseded = True  # the worker leaves RQ's job (shared with that attempt) as it is
        return
    what = "was stopped" if stopped else "stopped responding"
    if job.retries_left and job.retries_left > 0:
        note = f"worker {worker} {what} during attempt {attempt}; the job was re-queued"
        # Back to queued as it was before its first start: the lost attempt's progress and chunks go (its file
        # does, below; the next attempt starts from the beginning).
        moved, _ = transition(connection, job.id, {JobStatus.RUNNING}, JobStatus.QUEUED, attempt=attempt,
                              clear=ATTEMPT_OUTPUT, requeued=note)
        job.requeue_on_stop = stopped and moved  # RQ re-enqueues it only when our record did go back to queued
        if moved:
            publish_event(connection, job.id, {"type": "status", "status": JobStatus.QUEUED, "attempt": attempt,
                                               "reason": note}, maxlen=settings.stream_maxlen)
            # The lost attempt's file (should that worker only have stalled, it writes on to an unlinked file and
            # stops at its next write: it no longer owns the job).
            partial_path(settings.output_dir, job.id, attempt).unlink(missing_ok=True)
        return
    # The dead worker could not clean up after itself; no half-written file stays behind.
    for path in partial_paths(settings.output_dir, job.id):
        path.unlink(missing_ok=True)
    error = {
        "type": "WorkerLost",
        "message": f"the worker running this job {what} during attempt {attempt} (the last, on {worker}); "
                   "it is not retried again",
    }
    end_job(connection, job.id, JobStatus.FAILED, allowed={JobStatus.RUNNING, JobStatus.QUEUED},
            event={"type": "error", "status": JobStatus.FAILED, "attempt": attempt, "error": error},
            settings=settings, attempt=attempt, error=json.dumps(error))


def requeue_abandoned(r: redis.Redis, models: list[str]) -> None:
    """Find running jobs whose worker stopped heartbeating: re-queue them once, then fail them.

    Safe to call from any process and thread (the API and every worker do, each heartbeat): RQ's queue
    maintenance lock lets one caller at a time clean a queue (two cleaners could re-queue a job twice), and the
    thread-based death penalty works off the main thread.
    """
    for model in models:
        queue = get_queue(r, model)
        if not queue.acquire_maintenance_lock():
            continue
        try:
            StartedJobRegistry(queue=queue, death_penalty_class=TimerDeathPenalty).cleanup()
            requeue_untaken(r, queue)
        finally:
            queue.release_maintenance_lock()


# KEYS[1] the record, KEYS[2] the queue, KEYS[3] its intermediate list; ARGV[1] the job id, ARGV[2] '1' to take the
# id out of the intermediate list too. To the head of the queue (it was the oldest job there) while the record says
# queued: 1 when it went back. A record that says otherwise only leaves the intermediate list.
_PUSH_BACK = """
local take = ARGV[2] == '1'
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then
  if take then redis.call('LREM', KEYS[3], 1, ARGV[1]) end
  return 0
end
if take and redis.call('LREM', KEYS[3], 1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[1])
return 1
"""


def push_back(r: redis.Redis, queue: Queue, job_id: str, from_intermediate: bool = False) -> bool:
    """Put a job that a worker took off ``queue`` but never started back at the head of the queue, if its record
    still says queued (a cancelled or expired one is not run). ``from_intermediate`` also takes the id out of RQ's
    intermediate list (our own pass); RQ's maintenance removes it itself right after handle_job_failure, so the
    worker's handling leaves the list alone. True when the job went back."""
    moved = bool(r.eval(_PUSH_BACK, 3, job_key(job_id), queue.key, queue.intermediate_queue_key, job_id,
                        "1" if from_intermediate else "0"))
    if moved:
        logging.getLogger("sana.jobs").warning("job %s: taken by a worker that never started it; back on the queue",
                                               job_id)
    return moved


def untaken_key(queue: Queue) -> str:
    """Hash of the ids in ``queue``'s intermediate list without a start, and when a pass first saw each there."""
    return f"sana:untaken:{queue.name}"


def requeue_untaken(r: redis.Redis, queue: Queue, settings: Settings | None = None) -> list[str]:
    """Put back on the queue the jobs that a worker took but never started; returns their ids.

    A worker takes a job by moving its id from the queue to RQ's intermediate list, and starts it (the started
    registry) a moment later. A worker stopped or killed in between leaves the id there: the record says queued
    and nothing would ever run it (RQ's own pass, every 10 minutes, would fail it). An id seen there without a start
    for longer than a worker's heartbeat TTL goes back to the head of the queue.
    """
    settings = settings or get_settings()
    key = untaken_key(queue)
    waiting = [raw.decode() for raw in r.lrange(queue.intermediate_queue_key, 0, -1)]
    waiting = [job_id for job_id in waiting if job_id not in queue.started_job_registry]
    seen = {k.decode(): float(v) for k, v in r.hgetall(key).items()}
    # A mark lasts only while the id stays there unstarted: one that left (started, or taken back) and came back
    # later (re-queued after its worker died, and taken again) is seen afresh, not counted from its first take.
    gone = set(seen) - set(waiting)
    if gone:
        r.hdel(key, *gone)
    now = time.time()
    back = []
    for job_id in waiting:
        if job_id not in seen:
            r.hset(key, job_id, now)
        elif now - seen[job_id] >= settings.heartbeat_ttl_s:
            r.hdel(key, job_id)
            if push_back(r, queue, job_id, from_intermediate=True):
                back.append(job_id)
    if waiting:
        r.expire(key, 24 * 3600)
    return back
