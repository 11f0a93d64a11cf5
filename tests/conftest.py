"""Shared fixtures for tests that run the real service: a private redis-server on a free port, the API under
uvicorn and worker processes on the tiny presets, all as subprocesses.

Use ``services`` (module scope) to start what a test module needs once::

    def test_x(services):
        api = services.api()                      # http://127.0.0.1:<port>, env from services.env(...)
        services.worker("tiny")                   # returns a Proc once the worker heartbeats in Redis
        ...

Everything a module started is stopped when the module ends; logs land in the module's tmp folder and are
printed when a process fails to come up.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the project's packages, installed or not
    sys.path.insert(0, str(ROOT))
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@pytest.fixture
def triton_interpreter():
    """``run(code, timeout=600)``: runs a check in a fresh Python with TRITON_INTERPRET=1 (it must be set before
    Triton is imported, so not in this process); the check must exit 0 and print "ok" last. Skips without Triton."""
    from engine.kernels import triton_available

    if not triton_available():
        pytest.skip("Triton is not installed")

    def run(code: str, timeout: float = 600) -> None:
        path = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]

    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` seconds pass (fails)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        time.sleep(interval)


class Proc:
    """A subprocess with its log file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        self.pid = self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill9(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.popen.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


class RedisServer:
    def __init__(self, workdir: Path):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc = Proc("redis", [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", str(workdir)], dict(os.environ), workdir)
        client = redis.Redis.from_url(self.url)
        wait_until(lambda: _pings(client), 10, what=f"redis-server on port {self.port}")
        client.close()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        self.proc.stop()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


class Services:
    """Starts API and worker processes against one private Redis; stops them all at the end."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.redis = RedisServer(workdir / "redis")
        self.output_dir = workdir / "outputs"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        self.defaults: dict[str, str] = {}

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SANA_") and k != "REDIS_URL"}
        env.update({
            "REDIS_URL": self.redis.url,
            "SANA_OUTPUT_DIR": str(self.output_dir),
            "SANA_MODEL": "tiny",
            "SANA_HEARTBEAT_S": "0.5",
            "SANA_WORKER_METRICS_PORT": "0",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1",  # several workers share 2 cores
        })
        env.update(self.defaults)
        env.update({k: str(v) for k, v in overrides.items()})
        return env

    def api(self, **env: str) -> str:
        """Start an API process; returns its base URL once /healthz answers."""
        port = free_port()
        proc = Proc(f"api-{port}", [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port)],
                    self.env(**env), self.workdir)
        self.procs.append(proc)
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            if not proc.alive():
                raise AssertionError(f"API exited:\n{proc.log()}")
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 60, what="API /healthz")
        return url

    def worker(self, model: str = "tiny", wait: bool = True, metrics_port: int = 0, device: str = "cpu",
               timeout: float = 120, **env: str) -> Proc:
        """Start a worker on ``model`` and ``device``; with ``wait``, return once it heartbeats in Redis (at most
        ``timeout`` seconds: a GPU worker compiles and warms up first)."""
        proc = Proc(f"worker-{model}-{len(self.procs)}",
                    [sys.executable, "-m", "workers", "--model", model, "--device", device,
                     "--metrics-port", str(metrics_port)], self.env(**env), self.workdir)
        self.procs.append(proc)
        if wait:
            self.wait_worker(proc, timeout)
        return proc

    def wait_worker(self, proc: Proc, timeout: float = 120) -> None:
        from workers.registry import live_workers

        client = self.redis.client()

        def registered() -> bool:
            if not proc.alive():
                raise AssertionError(f"worker exited:\n{proc.log()}")
            return any(w.get("pid") == proc.pid for w in live_workers(client))

        try:
            wait_until(registered, timeout, interval=0.2, what=f"worker {proc.name} to register")
        finally:
            client.close()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def services(tmp_path_factory, request):
    s = Services(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))
    try:
        yield s
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------------ helpers


def wait_job(client: httpx.Client, job_id: str, statuses=("succeeded", "failed", "cancelled"),
             timeout: float = 120, headers: dict | None = None) -> dict:
    """Poll GET /jobs/{id} until its status is one of ``statuses``; returns the job."""
    last = {}

    def reached():
        job = client.get(f"/jobs/{job_id}", headers=headers).json()
        last.update(job)
        return job if job["status"] in statuses else None

    try:
        return wait_until(reached, timeout, interval=0.1, what=f"job {job_id} to reach {statuses}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; job: {last}") from None


def decode_mp4(data_or_path) -> list:
    """Decode every video frame of an MP4 (bytes or path) with PyAV; returns RGB arrays."""
    import io

    import av

    src = io.BytesIO(data_or_path) if isinstance(data_or_path, (bytes, bytearray)) else str(data_or_path)
    with av.open(src) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def ws_url(base_url: str, path: str) -> str:
    return "ws" + base_url.removeprefix("http") + path


def read_stream(base_url: str, job_id: str, from_chunk: int = 0, stop=None, headers: dict | None = None,
                timeout: float = 120, access_token: str | None = None) -> list[tuple[dict, bytes | None]]:
    """Read WS /jobs/{id}/stream: a list of (event, binary payload or None) until the server closes, or until
    ``stop(event)`` returns True (the client then closes: a viewer that leaves)."""
    import json

    from websockets.exceptions import ConnectionClosedOK
    from websockets.sync.client import connect

    out: list[tuple[dict, bytes | None]] = []
    url = ws_url(base_url, f"/jobs/{job_id}/stream?from_chunk={from_chunk}")
    if access_token:
        url += f"&access_token={access_token}"
    with connect(url, additional_headers=headers or {}, open_timeout=10, max_size=None) as ws:
        while True:
            try:
                message = ws.recv(timeout=timeout)
            except ConnectionClosedOK:
                return out
            assert isinstance(message, str), "a binary message must follow its JSON event"
            event = json.loads(message)
            data = None
            if event["type"] in ("start", "chunk", "tail"):
                data = ws.recv(timeout=timeout)
                assert isinstance(data, bytes), f"{event['type']} event without its binary payload"
            out.append((event, data))
            if stop is not None and stop(event):
                return out


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of sample ``name`` with exactly ``labels`` in a Prometheus text exposition, else None."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None
