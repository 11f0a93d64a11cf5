"""A GPU worker: loads the engine once, then takes jobs from its model's queue one at a time.

It is RQ's in-process ``SimpleWorker`` (no fork per job: the weights stay loaded) with six changes:

- a heartbeat thread refreshes the worker's registration (``workers/registry.py``), RQ's worker and execution
  heartbeats, and looks for jobs of dead workers (``jobs.requeue_abandoned``), every ``SANA_HEARTBEAT_S``;
- a running job's execution expires ``3 x SANA_HEARTBEAT_S`` after the last heartbeat (RQ's default for an
  in-process worker is the job timeout, hours), so a ``kill -9`` is noticed within seconds;
- retries are for lost workers only: an exception raised by a job is final (it would recur on any worker);
- an attempt that lost its job (the worker stalled and the job went on elsewhere) leaves RQ's job, shared with the
  attempt that owns it, untouched;
- a second thread answers the API's submit checks (``jobs.answer_checks``): the request resolved as the job will be;
- the thread that listens for RQ's commands (stop-job) polls every second, so that a stopping worker exits at once.

Run it with ``sana-video worker --model NAME --device cuda:N`` (or ``python -m workers``). Any number of workers
on any number of GPUs and hosts may share a queue.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from rq import SimpleWorker
from rq.serializers import JSONSerializer

from engine.errors import SettingError
from engine.types import GenerationParams
from server.settings import Settings, get_settings
from workers import jobs, metrics, tasks
from workers.registry import canonical_model, register_worker, unregister_worker

log = logging.getLogger("sana.worker")

# The reason RQ's intermediate-queue maintenance gives handle_job_failure (rq.intermediate_queue).
STUCK_IN_INTERMEDIATE = "Job was stuck in intermediate queue"


class GenerationWorker(SimpleWorker):
    def __init__(self, models: list[str], *, connection, name: str, settings: Settings, info: dict, check=None):
        super().__init__(
            [jobs.get_queue(connection, m) for m in models],
            name=name,
            connection=connection,
            serializer=JSONSerializer,
            queue_class=jobs.ModelQueue,
            # RQ blocks on the queue for worker_ttl - 15 s between its own maintenance passes; ours run in the
            # heartbeat thread, so a short block only keeps shutdown snappy.
            worker_ttl=20,
            log_job_description=False,
        )
        self.models = models
        self.settings = settings
        self.info = info
        self._lock = threading.Lock()
        self._running = None  # (rq Job, rq Execution) while a job runs
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        # Submit checks (params -> error dict or None), answered beside the running job.
        self._check = check
        self._checker = threading.Thread(target=self._check_loop, name="submit-checks", daemon=True)

    # -- RQ hooks ----------------------------------------------------------------------------------------

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        return self.settings.heartbeat_ttl_s

    def subscribe(self) -> None:
        # RQ's own listens with sleep_time=60, and redis-py 8 joins that thread without a timeout when RQ stops it: a
        # worker stopped between jobs hung in its teardown for up to a minute (past docker's default 10 s grace).
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(sleep_time=1.0, daemon=True,
                                                       exception_handler=self._pubsub_exception_handler)

    def handle_job_success(self, job, queue, started_job_registry, execution):
        if getattr(job, "sana_superseded", False):
            return self._leave_to_owner(job, execution)
        return super().handle_job_success(job, queue, started_job_registry, execution)

    def handle_job_failure(self, job, queue, started_job_registry=None, exc_string="", execution=None):
        if getattr(job, "sana_superseded", False):
            return self._leave_to_owner(job, execution)
        # A job taken but never started (this worker was stopped before its attempt began; or RQ's maintenance
        # found it left in the intermediate list by another): it runs, it does not fail.
        untaken = getattr(job, "sana_untaken", False) or exc_string.startswith(STUCK_IN_INTERMEDIATE)
        if untaken and jobs.push_back(self.connection, queue, job.id):
            return self._leave_to_owner(job, execution)
        if not getattr(job, "requeue_on_stop", False):  # set by on_job_failure for a worker stopped mid-job
            job.retries_left = 0  # retries are for lost or stopped workers only
        return super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)

    def _leave_to_owner(self, job, execution) -> None:
        """An attempt that lost its job (this worker was taken for lost and the job re-queued), or a take that never
        became one, ends here: only its execution goes. RQ's job hash is shared with the attempt that owns the job
        now (or will); writing this attempt's outcome over it (finished, or failed, and its stale retries left)
        would hide a later death of the owner from the lost-worker check, or retry the job twice."""
        if execution is None:
            return
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(job, pipeline=pipe, execution=execution)
            pipe.execute()

    def perform_job(self, job, queue, execution) -> bool:
        with self._lock:
            self._running = (job, execution)
        try:
            return super().perform_job(job, queue, execution)
        finally:
            with self._lock:
                self._running = None

    def bootstrap(self, *args, **kwargs) -> None:
        super().bootstrap(*args, **kwargs)  # registers the RQ worker
        self.beat()  # now visible to the API as serving its models
        self._thread.start()
        if self._check is not None:
            self._checker.start()

    def work(self, *args, **kwargs) -> bool:
        try:
            return super().work(*args, **kwargs)
        finally:
            self._stopped.set()
            # A heartbeat in the middle of its lost-worker pass holds the queue's maintenance lock: let it finish
            # and release it (a daemon thread would die holding it, and hold off the other processes' passes).
            if self._thread.is_alive():
                self._thread.join(timeout=2 * self.settings.heartbeat_ttl_s)
            unregister_worker(self.connection, self.name)

    # -- heartbeat ---------------------------------------------------------------------------------------

    def beat(self) -> None:
        """Tell Redis this worker (and its running job) is alive; re-queue jobs of workers that are not."""
        with self._lock:
            running = self._running
            if running is not None:
                self.maintain_heartbeats(*running)
            else:
                self.heartbeat()
        job_id = running[0].id if running is not None else None
        register_worker(self.connection, self.name, dict(self.info, busy=job_id is not None, job=job_id),
                        self.settings.heartbeat_ttl_s)
        jobs.requeue_abandoned(self.connection, self.models)
        metrics.LAST_HEARTBEAT.set_to_current_time()
        metrics.GPU_MEMORY.labels(self.info["device"]).set(tasks.gpu_memory_bytes(self.info["device"]))

    def _check_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                jobs.answer_checks(self.connection, self.models, self._check)
            except Exception:  # Redis hiccup: the API queues unchecked jobs meanwhile
                log.exception("submit check failed")
                self._stopped.wait(1.0)

    def _heartbeat_loop(self) -> None:
        while not self._stopped.wait(self.settings.heartbeat_s):
            try:
                self.beat()
            except Exception:  # Redis hiccup: try again next period; the TTL covers a few misses
                log.exception("heartbeat failed")


def _check_services(settings: Settings) -> None:
    """Redis answers and the output folder takes files, before a model load that can take minutes: else a
    SettingError (exit 2) naming the variable, not a traceback (or every job failing) after the load."""
    import redis

    from engine.loading import unwritable_folder

    try:
        settings.output_dir.mkdir(parents=True, exist_ok=True)
        why = unwritable_folder(settings.output_dir)
    except OSError as exc:
        why = exc.strerror or str(exc)
    if why:
        raise SettingError(f"SANA_OUTPUT_DIR={str(settings.output_dir)!r}: no video can be written there ({why})")
    try:
        with redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5) as r:
            r.ping()
    except redis.RedisError as exc:
        raise SettingError(f"REDIS_URL={settings.redis_url!r}: Redis does not answer ({exc})") from exc


def pick_device(device: str | None) -> str:
    import torch

    if device:
        return device
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _warmup_watchdog(done: threading.Event, timeout_s: float) -> None:
    """A warm-up that has not finished in ``timeout_s`` is stuck (a job would be too): exit with status 1, so the
    process supervisor restarts the worker and the failure shows, instead of a worker that never registers."""
    if not done.wait(timeout_s):
        log.error("warm-up did not finish in %gs (SANA_WORKER_WARMUP_TIMEOUT_S): exiting", timeout_s)
        logging.shutdown()
        os._exit(1)


def run_worker(model: str | None = None, device: str | None = None, precision: str | None = None,
               engine_path: str | None = None, metrics_port: int | None = None, burst: bool = False,
               fast: str | None = None) -> None:
    """Load ``model`` on ``device`` and serve its queue until stopped (Ctrl-C: finish the job, then exit).

    ``precision`` picks the denoiser (auto, torch, nvfp4, fp8, bf16; see ``engine.trt.load_denoiser``), from the
    TensorRT engines under ``engine_path`` for the engine precisions; ``fast`` the fast path of a PyTorch denoiser
    (auto, on, off, fp8; see ``engine.fast.apply_fast_path``). ``burst`` exits once the queue is empty.
    """
    import torch

    settings = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model = model or settings.model
    precision = precision or settings.worker_precision
    fast = fast or settings.worker_fast
    engine_path = engine_path or settings.worker_engine
    device = pick_device(device or settings.worker_device)
    if device.startswith("cuda"):
        from engine.loading import check_device

        # Pin this process to one GPU: a bare "cuda" is the first one visible. DeviceError (exit 2) where there is
        # no CUDA or no such GPU, before set_device fails with a traceback.
        device = f"cuda:{check_device(device, None).index or 0}"
        torch.cuda.set_device(torch.device(device))
    name = f"{socket.gethostname()}-{os.getpid()}"

    # /metrics answers while the model loads (container healthchecks); the heartbeat gauge starts after.
    metrics.serve_metrics(settings.worker_metrics_port if metrics_port is None else metrics_port)
    _check_services(settings)
    log.info("loading %s on %s (precision %s, fast path %s)", model, device, precision, fast)
    engine = tasks.load_engine(model, device, precision, name, engine_path, fast)
    pipe = engine.pipe
    pipe.overlap_decode = settings.worker_overlap_decode
    log.info("denoiser: %s, %s%s", engine.precision, engine.fast,
             f" ({', '.join(engine.engines)})" if engine.engines else "")

    warmup_s = None
    if settings.worker_warmup == "on" or (settings.worker_warmup == "auto" and tasks.compiles(pipe)):
        # Before registering: the API routes no job here until the first one can start at full speed.
        log.info("warm-up: one short video at the default size (at most %gs)", settings.worker_warmup_timeout_s)
        done = threading.Event()
        threading.Thread(target=_warmup_watchdog, args=(done, settings.worker_warmup_timeout_s), daemon=True).start()
        try:
            ran = tasks.warm_up(pipe)
            warmup_s = ran["seconds"]
            log.info("warm-up done in %.1fs (%s %dx%d, %d frames in %d videos)", warmup_s, ran["mode"], ran["width"],
                     ran["height"], ran["frames"], ran["videos"])
        except Exception:  # the worker still serves; its first job then pays the start-up itself
            log.exception("warm-up failed")
        finally:
            done.set()

    models = list(dict.fromkeys([pipe.name, canonical_model(model)]))
    defaults = pipe.resolve(GenerationParams(prompt="defaults")).to_dict()
    info = {
        "model": pipe.name,
        "device": engine.device,
        "precision": engine.precision,
        "precision_requested": precision,
        "fast": engine.fast,
        "fast_requested": fast,
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "warmup_s": warmup_s,
        "overlap_decode": bool(pipe.overlap_decode),  # SANA_WORKER_OVERLAP_DECODE as applied (streams on CUDA)
        "engines": list(engine.engines),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "causal": bool(pipe.causal),
        "limits": pipe.limits(),
        "defaults": {k: defaults[k] for k in ("width", "height", "frames", "fps", "steps", "guidance_scale", "mode")},
        "checks": True,  # answers the API's submit checks (jobs.answer_checks)
    }
    r = jobs.connect(settings.redis_url)
    worker = GenerationWorker(models, connection=r, name=name, settings=settings, info=info,
                              check=lambda params: tasks.check_params(pipe, params))
    log.info("worker %s serving %s", name, ", ".join(models))
    worker.work(burst=burst, logging_level="INFO")
