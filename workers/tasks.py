"""The job a worker runs: one video generation, from the queue's parameters to published chunks.

The worker process loads its engine once (``load_engine``); RQ then calls ``generate_video`` in that same
process for every job it takes, so no job pays for loading weights.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
from rq import get_current_job

from engine.errors import EngineError, GenerationCancelled, InvalidParams
from engine.types import GenerationParams, Progress
from server.settings import Settings, get_settings
from workers import jobs, metrics
from workers.jobs import JobStatus
from workers.output import JobOutput

log = logging.getLogger("sana.worker")


@dataclass
class Engine:
    """The loaded pipeline of this worker process and what it reports about itself."""

    pipe: Any  # engine.pipeline.VideoPipeline
    worker_name: str
    device: str
    precision: str  # what runs the denoiser: "torch" or an engine precision (nvfp4, fp8, bf16)
    fast: str = "reference"  # engine.fast.apply_fast_path's label: reference, fast, fast-fp8 or tensorrt
    engines: tuple[str, ...] = ()  # TensorRT engine folders in use


_engine: Engine | None = None


def load_engine(model: str, device: str, precision: str, worker_name: str,
                engine_path: str | None = None, fast: str = "auto") -> Engine:
    """Load the pipeline once for the life of the worker process, with the denoiser ``precision`` asks for:
    "torch" (the PyTorch transformer), "nvfp4"/"fp8"/"bf16" (TensorRT engines under ``engine_path``), or "auto"
    (the best this GPU and those engines allow, else torch); a PyTorch denoiser then gets the fast path ``fast``
    asks for (auto, on, off, fp8; see ``engine.fast.apply_fast_path``). Raises engine errors that say what is
    missing."""
    from engine.fast import apply_fast_path
    from engine.pipeline import VideoPipeline
    from engine.trt import load_denoiser

    global _engine
    pipe = VideoPipeline.from_pretrained(model, device=device)
    choice = load_denoiser(pipe, precision, engine_path)
    pipe.transformer = choice.module
    label = apply_fast_path(pipe, fast)
    _engine = Engine(pipe=pipe, worker_name=worker_name, device=str(pipe.device), precision=choice.precision,
                     fast=label, engines=tuple(str(f) for f in choice.engines))
    # Everything alive now lives as long as the process: keep it out of the collector's way, so the
    # collection after each job (free_memory) takes microseconds instead of a second.
    gc.collect()
    gc.freeze()
    return _engine


def compiles(pipe) -> bool:
    """Whether the denoiser runs torch.compile'd code, whose first call per input shape compiles it."""
    settings = getattr(pipe.transformer, "fast_settings", None)
    return bool(settings is not None and settings.compile)


def warm_up(pipe) -> dict[str, Any]:
    """Make one short video with the model's default size and guidance, so the first job of that size does not
    pay the start-up of compiled code. A clip takes one step at the default frame count; a stream two blocks (the
    first, which absorbs the remainder, and a regular one, each with its commit pass) of one step, the block shapes
    of a default stream, then, where the default's first block is longer than a regular one, a stream of one
    regular block (the first block of a length that divides evenly). Returns what it ran, with its seconds."""
    from engine.pipeline import frames_of_blocks, latent_frames, stream_blocks

    params = dataclasses.replace(pipe.resolve(GenerationParams(prompt="warm-up")), steps=1)
    runs = [params]
    if params.mode == "stream":
        k = pipe.preset.block_latent_frames
        blocks = stream_blocks(latent_frames(params.frames), k)[:2]
        runs = [dataclasses.replace(params, frames=sum(frames_of_blocks(blocks)))]
        if blocks[0] != k:
            runs.append(dataclasses.replace(params, frames=sum(frames_of_blocks([k]))))
    t0 = time.monotonic()
    frames = 0
    try:
        for run in runs:
            frames += sum(chunk.num_frames for chunk in pipe.generate(run))
    finally:
        free_memory(str(pipe.device))
    seconds = time.monotonic() - t0
    return {"mode": params.mode, "width": params.width, "height": params.height, "frames": frames,
            "videos": len(runs), "seconds": round(seconds, 2)}


def current_engine() -> Engine:
    if _engine is None:
        raise RuntimeError("no engine loaded in this process: generate_video runs inside `sana-video worker`")
    return _engine


def gpu_memory_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.memory_allocated(device))
    return 0


def free_memory(device: str) -> None:
    """Give the memory of a finished or cancelled job back to the device."""
    import torch

    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe_error(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, InvalidParams):
        return {"type": "InvalidParams", "field": exc.field, "message": exc.message, "accepted": exc.accepted}
    return {"type": type(exc).__name__, "message": str(exc) or type(exc).__name__}


def resolve_params(pipe, raw_params: dict[str, Any]) -> GenerationParams:
    """A job's parameters (plain JSON; keys that are not GenerationParams fields ignored) resolved by ``pipe``;
    raises InvalidParams."""
    names = {f.name for f in dataclasses.fields(GenerationParams)}
    return pipe.resolve(GenerationParams(**{k: v for k, v in raw_params.items() if k in names}))


def check_params(pipe, params: dict[str, Any]) -> dict[str, Any] | None:
    """What the job's run would refuse in ``params`` (a submit check, ``jobs.answer_checks``): the InvalidParams it
    raises as an error dict, or None. Anything else is left for the run to report."""
    try:
        resolve_params(pipe, params)
    except InvalidParams as exc:
        return describe_error(exc)
    except Exception:  # noqa: BLE001 - not the request's fault as far as a check can tell
        log.exception("submit check of %r failed", params)
    return None


def generate_video(job_id: str, model: str, params: dict[str, Any]) -> dict[str, Any]:
    """RQ entry point: run job ``job_id`` on this worker's engine. Returns a short summary for RQ's result."""
    engine = current_engine()
    job = get_current_job()
    r = job.connection
    attempt = jobs.start_attempt(r, job_id, worker=engine.worker_name, device=engine.device,
                                 started_at=time.time())
    if attempt is None:  # cancelled (or ended) between the dequeue and now
        return {"status": "skipped"}
    job.sana_attempt = attempt  # for on_job_failure, should this worker be stopped in the middle of the attempt
    log.info("job %s: attempt %d on %s", job_id, attempt, engine.worker_name)
    result = JobRun(engine, r, job_id, attempt, get_settings()).run(params)
    if result.get("status") == "superseded":
        job.sana_superseded = True  # the worker leaves RQ's job (shared with the attempt that owns it) as it is
    return result


class JobRun:
    """One attempt of one job on this worker: progress, ETA, cancellation, chunks, outcome, metrics."""

    def __init__(self, engine: Engine, r: redis.Redis, job_id: str, attempt: int, settings: Settings):
        self.engine = engine
        self.pipe = engine.pipe
        self.r = r
        self.job_id = job_id
        self.attempt = attempt
        self.settings = settings
        self.output = JobOutput(r, job_id, attempt, settings)
        self.model = self.pipe.name
        self.mode = "stream" if self.pipe.causal else "clip"
        self.last_progress: Progress | None = None

    # -- callbacks the engine calls ------------------------------------------------------------------------

    def should_cancel(self) -> bool:
        """Whether the job was cancelled; raises AttemptSuperseded when this attempt no longer owns the job (this
        worker was taken for lost and the job re-queued): it must stop now, whoever runs the job."""
        with self.r.pipeline(transaction=False) as pipe:
            pipe.exists(jobs.cancel_key(self.job_id))
            pipe.hmget(jobs.job_key(self.job_id), "status", "attempt")
            cancelled, (status, attempt) = pipe.execute()
        if not jobs.is_owner(status, attempt, self.attempt):
            if status is None or status == b"cancelled":  # a cancel ended it meanwhile: the usual path
                return True
            raise jobs.AttemptSuperseded(self.job_id, self.attempt,
                                         f" (now: {status.decode()}, attempt {int(attempt or 0)})")
        return bool(cancelled)

    def on_progress(self, p: Progress) -> None:
        now = time.monotonic()
        last = self.last_progress
        if last is None or (p.block, p.step) != (last.block, last.step):
            # A step (a transformer forward, a stream block's commit included) ended.
            metrics.STEP_DURATION.labels(self.model, self.mode).observe(now - self.t_step)
        # A report that repeats the step hands out a decoded chunk: the next step is timed from here, so the
        # histogram holds forwards, not VAE decodes.
        self.t_step = now
        self.last_progress = p
        done = (p.block - 1) * p.steps_total + min(p.step, p.steps_total)
        total = p.blocks_total * p.steps_total
        # ETA: the measured time per step of this job (text encoding and decoding included) times the steps left.
        eta = (now - self.t_generate) / done * (total - done) if done > 0 else None
        self.output.progress(p.to_dict(), None if eta is None else round(eta, 3))

    # -- the run -----------------------------------------------------------------------------------------------

    def run(self, raw_params: dict[str, Any]) -> dict[str, Any]:
        t0 = time.monotonic()
        metrics.BUSY.labels(self.model).set(1)
        try:
            return self._run(raw_params, t0)
        except jobs.AttemptSuperseded as exc:
            # This worker was taken for lost (stalled past its heartbeats) and the job went on without it: leave the
            # record, the chunk table and the stream to the attempt that owns them.
            self.output.discard()
            log.warning("job %s: attempt %d stopped: %s", self.job_id, self.attempt, exc)
            return {"status": "superseded", "attempt": self.attempt}
        except GenerationCancelled:
            self.output.discard()
            where = ""
            if self.last_progress is not None:
                where = f" at block {self.last_progress.block} step {self.last_progress.step}"
            error = {"type": "Cancelled", "message": f"cancelled while running{where}"}
            self._end(JobStatus.CANCELLED, {"type": "done", "status": JobStatus.CANCELLED,
                                            "chunks": self.output.chunks}, error=error, t0=t0)
            log.info("job %s: cancelled%s", self.job_id, where)
            return {"status": JobStatus.CANCELLED}
        except Exception as exc:
            # (SystemExit/KeyboardInterrupt pass through: the worker is going away, the record stays running
            # and the lost-worker path re-queues the job.)
            self.output.discard()
            error = describe_error(exc)
            self._end(JobStatus.FAILED, {"type": "error", "status": JobStatus.FAILED, "error": error},
                      error=error, t0=t0)
            if isinstance(exc, EngineError):  # the request's fault: recorded, nothing for RQ to report
                log.info("job %s: failed: %s", self.job_id, exc)
                return {"status": JobStatus.FAILED, "error": error}
            raise  # a bug or a broken device: RQ keeps the traceback in its failed registry
        finally:
            metrics.BUSY.labels(self.model).set(0)
            metrics.GPU_MEMORY.labels(self.engine.device).set(gpu_memory_bytes(self.engine.device))
            free_memory(self.engine.device)

    def _run(self, raw_params: dict[str, Any], t0: float) -> dict[str, Any]:
        from engine.video import FragmentedMP4Encoder

        params = resolve_params(self.pipe, raw_params)
        plan = self.pipe.plan(params)
        self.mode = params.mode or self.mode
        jobs.write_as_attempt(self.r, self.job_id, self.attempt, lambda pipe: pipe.hset(
            jobs.job_key(self.job_id), mapping={"params": json.dumps(params.to_dict())}))

        encoder = FragmentedMP4Encoder(params.width, params.height, params.fps)
        start = {
            "width": params.width, "height": params.height, "fps": params.fps, "mode": params.mode,
            "frames_total": plan["frames_total"], "blocks_total": plan["blocks_total"],
            "steps_per_block": plan["steps_per_block"], "codec": encoder.codec_string,
            "mime": encoder.mime_type,
        }
        self.output.begin(start, encoder.init_segment())
        self.t_generate = self.t_step = self.t_chunk = time.monotonic()
        frames_done = 0
        first_chunk_s = None
        for chunk in self.pipe.generate(params, on_progress=self.on_progress, should_cancel=self.should_cancel):
            segment = encoder.encode_chunk(chunk.frames)
            self.output.chunk({"index": chunk.index, "start_frame": chunk.start_frame,
                               "frames": chunk.num_frames}, segment)
            now = time.monotonic()
            frames_done += chunk.num_frames
            if first_chunk_s is None:
                first_chunk_s = now - t0
                jobs.write_as_attempt(self.r, self.job_id, self.attempt, lambda pipe: pipe.hset(
                    jobs.job_key(self.job_id), "first_chunk_at", time.time()))
            metrics.BLOCK_DURATION.labels(self.model, self.mode).observe(now - self.t_chunk)
            self.t_chunk = now
            metrics.BLOCK_STATE.labels(self.model).set(self.pipe.last_state_bytes)
            if self.mode == "stream":
                metrics.REALTIME_FACTOR.labels(self.model).set(frames_done / params.fps / (now - self.t_generate))
        tail = encoder.close()
        # A cancel asked for after the last step (the last block was decoding): honoured, nothing is published.
        if self.should_cancel():
            raise GenerationCancelled("cancelled")
        path = self.output.finish(tail)

        wall = time.monotonic() - self.t_generate
        metrics.FRAMES_PER_SECOND.labels(self.model).set(frames_done / wall if wall > 0 else 0.0)
        final_progress = dict(self.last_progress.to_dict()) if self.last_progress else {}
        final_progress.update(fraction=1.0, frames_done=frames_done)
        done = {"type": "done", "status": JobStatus.SUCCEEDED, "chunks": self.output.chunks,
                "frames": frames_done, "bytes": self.output.bytes, "tail_bytes": len(tail)}
        if not self._end(JobStatus.SUCCEEDED, done, data=tail, t0=t0, first_chunk_s=first_chunk_s,
                         video=path.name, progress=json.dumps(final_progress), unless_cancelled=True):
            if self.should_cancel():  # cancelled in the moment since the check above: the file goes too
                path.unlink(missing_ok=True)
                raise GenerationCancelled("cancelled")
            raise jobs.AttemptSuperseded(self.job_id, self.attempt, " (it lost the job before it could end it)")
        log.info("job %s: succeeded, %d frames in %.2fs -> %s", self.job_id, frames_done, wall, path)
        return {"status": JobStatus.SUCCEEDED, "video": path.name, "frames": frames_done}

    def _end(self, status: JobStatus, event: dict, *, t0: float, data: bytes = b"", error: dict | None = None,
             first_chunk_s: float | None = None, unless_cancelled: bool = False, **fields: Any) -> bool:
        """Record the attempt's outcome; False when the job had ended or moved on to another attempt."""
        run_s = time.monotonic() - t0
        record = jobs.read_job(self.r, self.job_id) or {}
        timings = {"run_s": round(run_s, 3)}
        if "started_at" in record and "created_at" in record:
            timings["queue_wait_s"] = round(record["started_at"] - record["created_at"], 3)
            timings["total_s"] = round(record["started_at"] - record["created_at"] + run_s, 3)
        if first_chunk_s is not None:
            timings["first_chunk_s"] = round(first_chunk_s, 3)
        if error is not None:
            fields["error"] = json.dumps(error)
        event = dict(event, attempt=self.attempt)
        if error is not None and "error" not in event:
            event["error"] = error
        ended = jobs.end_job(self.r, self.job_id, status, allowed={JobStatus.RUNNING}, attempt=self.attempt,
                             event=event, data=data, settings=self.settings, unless_cancelled=unless_cancelled,
                             timings=json.dumps(timings), **fields)
        if ended:
            metrics.JOBS.labels(self.model, status.value).inc()
            metrics.JOB_DURATION.labels(self.model, self.mode).observe(run_s)
        return ended
