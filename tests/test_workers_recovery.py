"""Lost workers: ``kill -9`` of the worker running a job re-queues the job once to another worker, which restarts
it cleanly (viewers are told, the file starts over); a second death fails it with a clear error.

Three tiny-causal workers heartbeat every 0.5 s, so a dead one is noticed within ~2 s.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from conftest import decode_mp4, read_stream, wait_job, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "tiny-causal"


@pytest.fixture(scope="module")
def stack(services):
    services.defaults = {"SANA_MODEL": MODEL}
    api = services.api()
    workers = [services.worker(MODEL, wait=False) for _ in range(3)]
    for w in workers:
        services.wait_worker(w)
    client = httpx.Client(base_url=api, timeout=30)
    yield type("Stack", (), {"url": api, "client": client, "workers": workers, "services": services})
    client.close()


def worker_running(stack, job_id: str, attempt: int, chunks: int = 1):
    """Wait until ``attempt`` of the job has published ``chunks`` chunks; returns the worker process running it."""
    def reached():
        job = stack.client.get(f"/jobs/{job_id}").json()
        assert job["status"] in ("queued", "running"), job
        return job if job["attempt"] == attempt and job["status"] == "running" and job["chunks"] >= chunks else None

    job = wait_until(reached, 120, interval=0.05, what=f"attempt {attempt} of job {job_id} to publish a chunk")
    pid = worker_pid(stack, job_id)
    return next(w for w in stack.workers if w.pid == pid), job


def worker_pid(stack, job_id: str) -> int:
    """The process id of the worker that took the job's latest attempt (worker names end in -<pid>)."""
    from workers.jobs import read_job

    client = stack.services.redis.client()
    try:
        return int(read_job(client, job_id)["worker"].rsplit("-", 1)[1])
    finally:
        client.close()


def stall_until_taken_over(stack, services, frames: int, seed: int):
    """Start two more workers, submit a stream, pause (SIGSTOP) the worker of its first attempt until another worker
    runs attempt 2, then let it go on: (job id, the stalled worker, the one running attempt 2)."""
    import os
    import signal

    fresh = [services.worker(MODEL, wait=False) for _ in range(2)]
    for w in fresh:
        services.wait_worker(w)
    stack.workers.extend(fresh)
    job_id = stack.client.post("/generate", json={"prompt": "a ball", "frames": frames, "seed": seed}).json()["id"]
    first, _ = worker_running(stack, job_id, attempt=1, chunks=2)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second, _ = worker_running(stack, job_id, attempt=2)
    finally:
        os.kill(first.pid, signal.SIGCONT)  # back while attempt 2 runs
    assert second is not first
    return job_id, first, second


def test_killed_worker_job_is_requeued_and_finishes_elsewhere(stack, services):
    job_id = stack.client.post("/generate", json={"prompt": "a ball", "frames": 129, "seed": 11}).json()["id"]
    viewed: list = []
    viewer = threading.Thread(target=lambda: viewed.extend(read_stream(stack.url, job_id)))
    viewer.start()

    first, _ = worker_running(stack, job_id, attempt=1)
    first.kill9()

    job = wait_job(stack.client, job_id, timeout=120)
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 2 and "re-queued" in job["requeued"] and str(first.pid) in job["requeued"]
    assert worker_pid(stack, job_id) != first.pid
    video = stack.client.get(f"/jobs/{job_id}/video").content
    assert len(decode_mp4(video)) == 129
    assert not list(services.output_dir.glob(f"{job_id}*.partial"))

    # The viewer who watched throughout was told, and got attempt 2 whole after the restart marker.
    viewer.join(120)
    kinds = [e["type"] for e, _ in viewed]
    assert kinds[-1] == "done"
    # A viewer that connects before any worker took the job first gets the plain {"status": "queued"} snapshot.
    assert any(e["type"] == "status" and e["status"] == "queued" and "re-queued" in e.get("reason", "")
               for e, _ in viewed)
    restart = kinds.index("restart")
    before = [e for e, _ in viewed[:restart] if e["type"] == "chunk"]
    assert before and [e["index"] for e in before] == list(range(len(before)))
    assert all(e["attempt"] == 1 for e in before)
    after = viewed[restart + 1:]
    assert after[0][0]["type"] == "start" and after[0][0]["attempt"] == 2
    chunks = [(e, d) for e, d in after if e["type"] == "chunk"]
    assert [e["index"] for e, _ in chunks] == list(range(job["progress"]["blocks_total"]))
    assert all(e["attempt"] == 2 for e, _ in chunks)
    assert b"".join(d for _, d in after if d is not None) == video


def test_second_death_fails_the_job_with_a_clear_error(stack, services):
    job_id = stack.client.post("/generate", json={"prompt": "a cat", "frames": 201, "seed": 12}).json()["id"]
    first, _ = worker_running(stack, job_id, attempt=1)
    first.kill9()
    second, _ = worker_running(stack, job_id, attempt=2)
    assert second is not first
    second.kill9()

    job = wait_job(stack.client, job_id, timeout=120)
    assert job["status"] == "failed", job
    assert job["error"]["type"] == "WorkerLost"
    assert "during attempt 2" in job["error"]["message"] and "not retried" in job["error"]["message"]
    assert not list(services.output_dir.glob(f"{job_id}*.partial"))
    assert not (services.output_dir / f"{job_id}.mp4").exists()
    video = stack.client.get(f"/jobs/{job_id}/video")
    assert video.status_code == 409 and video.json()["status"] == "failed"
    events = read_stream(stack.url, job_id)  # a viewer arriving now learns how it ended
    assert events[-1][0]["type"] == "error" and events[-1][0]["error"]["type"] == "WorkerLost"


def test_a_stalled_worker_that_comes_back_leaves_the_job_to_the_next_attempt(stack, services):
    """A worker that stops heartbeating is taken for lost, but it may only have stalled (paused VM, network cut).
    When it comes back while the re-queued attempt runs elsewhere, it stops without touching the job's record, chunk
    table, stream or files: the job finishes whole, from the second attempt alone."""
    import redis as redis_lib
    from workers import jobs

    job_id, first, second = stall_until_taken_over(stack, services, frames=401, seed=13)

    job = wait_job(stack.client, job_id, timeout=180)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    r = redis_lib.Redis.from_url(services.redis.url)
    table = [json.loads(x) for x in r.lrange(jobs.chunks_key(job_id), 0, -1)]
    r.close()
    assert [e["attempt"] for e in table] == [2] * len(table)
    assert [e["index"] for e in table] == list(range(job["progress"]["blocks_total"]))
    video = stack.client.get(f"/jobs/{job_id}/video").content
    assert len(decode_mp4(video)) == 401
    wait_until(lambda: "stopped: attempt 1" in first.log(), 60, what="the stalled attempt to stop")
    assert not list(services.output_dir.glob(f"{job_id}*.partial"))
    assert first.alive()  # the stalled worker goes on serving


def test_a_stalled_worker_that_came_back_leaves_the_owner_lost_worker_detection(stack, services):
    """After a stalled worker came back and stopped its lost attempt, the attempt that owns the job is still watched:
    its worker dying fails the job at attempt 2. (The stalled attempt used to finish RQ's shared job as done, with
    its stale retry count: the owner's death then went unnoticed, the record "running" for good, or the job ran a
    third time.)"""
    from rq.job import Job
    from rq.serializers import JSONSerializer

    job_id, first, second = stall_until_taken_over(stack, services, frames=801, seed=15)
    wait_until(lambda: "stopped: attempt 1" in first.log(), 60, what="the stalled attempt to stop")
    client = services.redis.client()
    try:
        assert Job.fetch(job_id, connection=client, serializer=JSONSerializer).get_status() == "started"
    finally:
        client.close()
    assert stack.client.get(f"/jobs/{job_id}").json()["status"] == "running"
    second.kill9()

    job = wait_job(stack.client, job_id, timeout=120)
    assert job["status"] == "failed" and job["attempt"] == 2, job
    assert job["error"]["type"] == "WorkerLost" and "during attempt 2" in job["error"]["message"]
    assert not list(services.output_dir.glob(f"{job_id}*.partial"))
    assert first.alive()


def test_a_worker_stopped_while_taking_a_job_leaves_it_to_the_next(stack, services):
    """A worker stopped (docker compose stop) just as it takes a job from the queue, before the job starts, leaves
    the job's id in RQ's intermediate list: the record said queued, and nothing ran it. It goes back to the queue
    within a heartbeat TTL and the next worker runs it as its first attempt."""
    import os
    import signal
    import time

    import redis as redis_lib
    from workers import jobs

    taker = services.worker("tiny")  # the only worker of its queue, so it is the one that takes the job
    time.sleep(1.5)  # registered; now blocked in its dequeue
    os.kill(taker.pid, signal.SIGSTOP)  # blocked in its dequeue: Redis still hands it the job
    job_id = stack.client.post("/generate", json={"prompt": "a ball", "frames": 9, "seed": 16, "model": "tiny"}
                               ).json()["id"]
    r = redis_lib.Redis.from_url(services.redis.url)
    try:
        queue = jobs.get_queue(r, "tiny")
        wait_until(lambda: r.lrange(queue.intermediate_queue_key, 0, -1) == [job_id.encode()], 10,
                   what="the stopped worker to take the job")
        os.kill(taker.pid, signal.SIGTERM)
        os.kill(taker.pid, signal.SIGCONT)
        taker.popen.wait(30)
        assert stack.client.get(f"/jobs/{job_id}").json()["status"] == "queued"
        # The API's lost-worker pass puts it back (no worker of this model is left to do it).
        wait_until(lambda: r.lrange(queue.key, 0, -1) == [job_id.encode()], 30, what="the job back on its queue")
        assert r.llen(queue.intermediate_queue_key) == 0
    finally:
        r.close()
    services.worker("tiny")
    job = wait_job(stack.client, job_id, timeout=120)
    assert job["status"] == "succeeded" and job["attempt"] == 1, job
    assert len(decode_mp4(stack.client.get(f"/jobs/{job_id}/video").content)) == 9


def test_idle_workers_stop_at_once(services):
    """SIGTERM (docker compose stop) to workers waiting for jobs: each exits cleanly within seconds. RQ's command
    listener, stopped in the worker's teardown, could hold it there for up to a minute (a race: four workers make
    it show)."""
    import os
    import signal
    import subprocess
    import time

    idle = [services.worker("tiny", wait=False) for _ in range(4)]
    for w in idle:
        services.wait_worker(w)
    time.sleep(1.0)
    for w in idle:
        os.kill(w.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for w in idle:
        try:
            assert w.popen.wait(max(0.1, deadline - time.monotonic())) == 0, w.log()
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {w.pid} still running 10 s after SIGTERM:\n{w.log()}") from None


def test_a_worker_stopped_twice_mid_job_hands_the_job_on(stack, services):
    """A second SIGTERM (or Ctrl-C) stops a worker in the middle of a job: RQ raises SystemExit inside it. The job is
    re-queued like a lost worker's, and another worker finishes it (it used to stay "running" for good)."""
    import os
    import signal
    import time

    fresh = [services.worker(MODEL, wait=False) for _ in range(2)]
    for w in fresh:
        services.wait_worker(w)
    stack.workers.extend(fresh)
    job_id = stack.client.post("/generate", json={"prompt": "a cat", "frames": 201, "seed": 14}).json()["id"]
    first, _ = worker_running(stack, job_id, attempt=1)
    os.kill(first.pid, signal.SIGTERM)  # warm shutdown: would wait for the job
    time.sleep(1.5)  # RQ ignores a second signal within a second of the first
    os.kill(first.pid, signal.SIGTERM)  # cold: SystemExit inside the job
    first.popen.wait(30)

    job = wait_job(stack.client, job_id, timeout=180)
    assert job["status"] == "succeeded" and job["attempt"] == 2, job
    assert "was stopped during attempt 1" in job["requeued"]
    assert worker_pid(stack, job_id) != first.pid
    assert len(decode_mp4(stack.client.get(f"/jobs/{job_id}/video").content)) == 201
    assert not list(services.output_dir.glob(f"{job_id}*.partial"))


def test_a_stopped_worker_acts_only_for_its_own_attempt(services, tmp_path, monkeypatch):
    """on_job_failure for a worker stopped mid-job (SystemExit): it re-queues the job and drops the partial file of
    the attempt that worker ran, and leaves alone an attempt that took the job from it while it was stalled."""
    import types
    import uuid

    import redis as redis_lib
    from server.settings import get_settings
    from workers import jobs
    from workers.output import partial_path

    monkeypatch.setenv("SANA_OUTPUT_DIR", str(tmp_path))
    get_settings.cache_clear()
    r = redis_lib.Redis.from_url(services.redis.url)
    try:
        for mine, expected in ((1, "running"), (2, "queued")):  # the record's attempt is 2
            job_id = uuid.uuid4().hex
            r.hset(jobs.job_key(job_id), mapping={"id": job_id, "status": "running", "attempt": 2, "worker": "w-b",
                                                  "progress": '{"fraction": 0.3}', "chunks": 10, "bytes": 2330})
            partial_path(tmp_path, job_id, 2).write_bytes(b"attempt 2")
            job = types.SimpleNamespace(id=job_id, retries_left=1, sana_attempt=mine)
            jobs.on_job_failure(job, r, SystemExit, SystemExit(), None)
            record = jobs.read_job(r, job_id)
            assert record["status"] == expected and record["attempt"] == 2
            # Re-queued, it shows no progress of the lost attempt (the next one starts from the beginning).
            assert ("progress" in record and "chunks" in record) == (expected == "running")
            assert partial_path(tmp_path, job_id, 2).exists() == (mine == 1)
            assert getattr(job, "requeue_on_stop", False) == (mine == 2)
            assert getattr(job, "sana_superseded", False) == (mine == 1)
        # Stopped before its attempt began (the take done, start_attempt not): the job goes back as never started.
        job_id = uuid.uuid4().hex
        r.hset(jobs.job_key(job_id), mapping={"id": job_id, "status": "queued", "attempt": 0})
        job = types.SimpleNamespace(id=job_id, retries_left=1)
        jobs.on_job_failure(job, r, SystemExit, SystemExit(), None)
        assert job.sana_untaken and not getattr(job, "sana_superseded", False)
        assert jobs.read_job(r, job_id)["status"] == "queued"
    finally:
        r.close()
        get_settings.cache_clear()


def test_only_the_owning_attempt_names_the_video(services, tmp_path, monkeypatch):
    import uuid

    import redis as redis_lib
    from server.settings import get_settings
    from workers import jobs
    from workers.output import JobOutput, video_path

    monkeypatch.setenv("SANA_OUTPUT_DIR", str(tmp_path))
    get_settings.cache_clear()
    r = redis_lib.Redis.from_url(services.redis.url)
    try:
        job_id = uuid.uuid4().hex
        r.hset(jobs.job_key(job_id), mapping={"id": job_id, "status": "running", "attempt": 1})
        a = JobOutput(r, job_id, 1, get_settings())
        a.begin({"frames_total": 1}, b"init-a")
        a.chunk({"index": 0, "start_frame": 0, "frames": 1}, b"chunk-a")
        jobs.start_attempt(r, job_id)  # a was taken for lost: attempt 2 runs the job now
        b = JobOutput(r, job_id, 2, get_settings())
        b.begin({"frames_total": 1}, b"init-b")
        with pytest.raises(jobs.AttemptSuperseded):
            a.chunk({"index": 1, "start_frame": 1, "frames": 1}, b"late-a")
        video_path(tmp_path, job_id).write_bytes(b"left by a stale attempt")  # named, then it lost the job
        b.chunk({"index": 0, "start_frame": 0, "frames": 1}, b"chunk-b")
        assert b.finish(b"tail-b") == video_path(tmp_path, job_id)
        with pytest.raises(jobs.AttemptSuperseded):
            a.finish(b"tail-a")
        a.discard()
        assert video_path(tmp_path, job_id).read_bytes() == b"init-bchunk-btail-b"
        assert [e["attempt"] for e in map(json.loads, r.lrange(jobs.chunks_key(job_id), 0, -1))] == [2]
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"{job_id}.mp4"]
    finally:
        r.close()
        get_settings.cache_clear()


def test_rq_maintenance_runs_a_job_stuck_after_its_take_instead_of_failing_it(services, monkeypatch):
    """RQ's own pass over the intermediate list hands a job taken but never started to handle_job_failure: the job
    goes back to its queue (its record still queued) instead of failing in RQ while the record stays queued."""
    import uuid

    import redis as redis_lib
    from rq.job import Job
    from rq.serializers import JSONSerializer
    from server.settings import get_settings
    from workers import jobs
    from workers.worker import STUCK_IN_INTERMEDIATE, GenerationWorker

    monkeypatch.setenv("REDIS_URL", services.redis.url)
    get_settings.cache_clear()
    r = redis_lib.Redis.from_url(services.redis.url)
    try:
        model = f"stuck-{uuid.uuid4().hex[:8]}"
        job_id = uuid.uuid4().hex
        jobs.submit_job(r, job_id=job_id, model=model, params={"prompt": "a ball"}, owner="", settings=get_settings())
        queue = jobs.get_queue(r, model)
        assert r.lmove(queue.key, queue.intermediate_queue_key) == job_id.encode()  # a worker's take
        worker = GenerationWorker([model], connection=r, name=f"w-{job_id[:6]}", settings=get_settings(), info={})
        job = Job.fetch(job_id, connection=r, serializer=JSONSerializer)
        worker.handle_job_failure(job, queue, exc_string=STUCK_IN_INTERMEDIATE + ".")
        queue.intermediate_queue.remove(job_id)  # what RQ's pass does next
        assert r.lrange(queue.key, 0, -1) == [job_id.encode()] and r.llen(queue.intermediate_queue_key) == 0
        job = Job.fetch(job_id, connection=r, serializer=JSONSerializer)
        assert job.get_status() == "queued" and job.retries_left == jobs.RETRIES_ON_WORKER_LOSS
        assert jobs.read_job(r, job_id)["status"] == "queued"

        # One cancelled meanwhile only leaves the list.
        other = uuid.uuid4().hex
        jobs.submit_job(r, job_id=other, model=model, params={"prompt": "a cat"}, owner="", settings=get_settings())
        r.lrem(queue.key, 1, other)
        r.rpush(queue.intermediate_queue_key, other)
        assert jobs.request_cancel(r, other, get_settings()) == "cancelled"
        assert not jobs.push_back(r, queue, other)
        assert not jobs.push_back(r, queue, other, from_intermediate=True)
        assert r.llen(queue.intermediate_queue_key) == 0 and r.lrange(queue.key, 0, -1) == [job_id.encode()]
    finally:
        r.close()
        get_settings.cache_clear()


def test_an_id_that_left_the_intermediate_list_and_came_back_is_seen_afresh(tmp_path, monkeypatch):
    """A job taken and started, then re-queued (its worker died) and taken again, is not counted as waiting since
    its first take: it stays with the worker that took it (it once ran a third time)."""
    import time
    import uuid

    from conftest import RedisServer
    from server.settings import get_settings
    from workers import jobs

    monkeypatch.setenv("SANA_HEARTBEAT_S", "0.5")  # a heartbeat TTL of 2 s
    get_settings.cache_clear()
    # A Redis of its own: the module's API and workers pass over every queue with the same TTL, and would put the
    # id back before this test's own pass does.
    server = RedisServer(tmp_path / "redis")
    r = server.client()
    try:
        model = f"back-{uuid.uuid4().hex[:8]}"
        job_id = uuid.uuid4().hex
        jobs.submit_job(r, job_id=job_id, model=model, params={"prompt": "a ball"}, owner="", settings=get_settings())
        queue = jobs.get_queue(r, model)
        r.lmove(queue.key, queue.intermediate_queue_key)  # taken; a pass sees it before its start
        assert jobs.requeue_untaken(r, queue) == []
        r.lrem(queue.intermediate_queue_key, 1, job_id)  # started (it left the list); a pass sees it gone
        assert jobs.requeue_untaken(r, queue) == []
        time.sleep(2.2)
        r.rpush(queue.intermediate_queue_key, job_id)  # re-queued later and taken again, not started yet
        assert jobs.requeue_untaken(r, queue) == [] and r.llen(queue.key) == 0
        time.sleep(2.2)  # now it has waited a heartbeat TTL unstarted: back on the queue
        assert jobs.requeue_untaken(r, queue) == [job_id] and r.lrange(queue.key, 0, -1) == [job_id.encode()]
    finally:
        r.close()
        server.stop()
        get_settings.cache_clear()


def test_a_queue_maintenance_lock_is_short_and_only_its_holder_releases_it(tmp_path, monkeypatch):
    """RQ's registry cleaning and the lost-worker pass share one lock per queue. A worker that dies holding it
    (killed while cleaning) holds off the other processes' passes for Settings.maintenance_lock_s, not RQ's 15
    minutes; a holder whose lock expired and was taken by another leaves the new holder's lock alone."""
    import threading
    import uuid

    from conftest import RedisServer
    from server.settings import get_settings
    from workers import jobs
    from workers.worker import GenerationWorker

    monkeypatch.setenv("SANA_HEARTBEAT_S", "0.5")
    get_settings.cache_clear()
    server = RedisServer(tmp_path / "redis")
    r = server.client()
    try:
        model = f"lock-{uuid.uuid4().hex[:8]}"
        worker = GenerationWorker([model], connection=r, name=f"w-{model}", settings=get_settings(), info={})
        queue = worker.queues[0]  # the queues RQ's own cleaning locks
        assert queue.acquire_maintenance_lock()
        assert 0 < r.ttl(queue.registry_cleaning_key) <= get_settings().maintenance_lock_s == 10
        assert not jobs.get_queue(r, model).acquire_maintenance_lock()  # one cleaner at a time

        other = threading.Thread(target=queue.release_maintenance_lock)  # not the holder
        other.start()
        other.join()
        assert r.exists(queue.registry_cleaning_key)
        queue.release_maintenance_lock()
        assert not r.exists(queue.registry_cleaning_key)
    finally:
        r.close()
        server.stop()
        get_settings.cache_clear()


@pytest.mark.parametrize("late", ["after the last chunk", "after the file is closed"])
def test_a_cancel_after_the_last_check_is_honoured(tmp_path, monkeypatch, late):
    """A DELETE answered 202 (cancel requested) while the last chunk is decoded and the file closed, past the
    engine's last check: the job ends cancelled, with no video left (it used to succeed)."""
    import time
    import uuid

    from conftest import RedisServer
    from engine.pipeline import VideoPipeline
    from server.settings import get_settings
    from workers import jobs, tasks
    from workers.output import JobOutput

    monkeypatch.setenv("SANA_OUTPUT_DIR", str(tmp_path / "videos"))
    get_settings.cache_clear()
    server = RedisServer(tmp_path / "redis")
    r = server.client()
    job_id = uuid.uuid4().hex

    def cancel() -> None:
        assert jobs.request_cancel(r, job_id, get_settings()) == "running"

    class CancelledLate:
        """The tiny pipeline, with the cancel coming once its last chunk is out."""

        def __init__(self, pipe):
            self._pipe = pipe

        def __getattr__(self, name):
            return getattr(self._pipe, name)

        def generate(self, params, **kwargs):
            yield from self._pipe.generate(params, **kwargs)
            if late == "after the last chunk":
                cancel()

    if late == "after the file is closed":
        finish = JobOutput.finish

        def finish_then_cancel(self, tail):
            path = finish(self, tail)
            cancel()
            return path

        monkeypatch.setattr(JobOutput, "finish", finish_then_cancel)
    try:
        settings = get_settings()
        jobs.submit_job(r, job_id=job_id, model="tiny", params={"prompt": "a ball", "frames": 9}, owner="",
                        settings=settings)
        attempt = jobs.start_attempt(r, job_id, worker="w", device="cpu", started_at=time.time())
        pipe = CancelledLate(VideoPipeline.from_pretrained("tiny", device="cpu"))
        engine = tasks.Engine(pipe=pipe, worker_name="w", device="cpu", precision="torch")
        result = tasks.JobRun(engine, r, job_id, attempt, settings).run({"prompt": "a ball", "frames": 9})
        assert result["status"] == "cancelled"
        record = jobs.read_job(r, job_id)
        assert record["status"] == "cancelled" and "cancelled while running" in record["error"]["message"]
        assert list(settings.output_dir.iterdir()) == []
    finally:
        r.close()
        server.stop()
        get_settings.cache_clear()


def test_a_cancel_racing_the_end_of_a_job_is_409_not_202(tmp_path, monkeypatch):
    """DELETE read the job running, and it succeeded before the cancel landed: 409 (nothing to cancel), not a 202
    that shows a succeeded job."""
    import json
    import uuid

    from conftest import RedisServer
    from server.routes import cancel
    from server.settings import get_settings
    from workers import jobs

    get_settings.cache_clear()
    server = RedisServer(tmp_path / "redis")
    r = server.client()
    try:
        settings = get_settings()
        job_id = uuid.uuid4().hex
        jobs.submit_job(r, job_id=job_id, model="tiny", params={"prompt": "a ball"}, owner="", settings=settings)
        seen = dict(jobs.read_job(r, job_id), status="running")  # what the route read a moment before
        assert jobs.start_attempt(r, job_id, worker="w") == 1
        assert jobs.end_job(r, job_id, jobs.JobStatus.SUCCEEDED, allowed={"running"}, event={"type": "done"})
        answer = cancel(r, seen, settings)
        assert answer is not None and answer.status_code == 409
        assert json.loads(answer.body)["status"] == "succeeded" and not r.exists(jobs.cancel_key(job_id))
    finally:
        r.close()
        server.stop()
        get_settings.cache_clear()
