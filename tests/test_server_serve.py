"""``sana-video serve``: the API and one worker from one command, both stopped by one Ctrl-C."""

from __future__ import annotations

import os
import signal
import sys

import httpx
import pytest
from conftest import Proc, free_port, wait_job, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_serve_runs_api_and_worker_and_stops_both_on_ctrl_c(services):
    port = free_port()
    code = f"from server.serve import run_serve; run_serve('127.0.0.1', {port}, 'tiny', 'cpu')"
    serve = Proc("serve", [sys.executable, "-c", code], services.env(SANA_MODEL="sana-video-480p"), services.workdir)
    services.procs.append(serve)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert serve.alive(), serve.log()
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, 120, interval=0.3, what="the API and its worker to be ready")
    with httpx.Client(base_url=url) as client:
        models = client.get("/models").json()
        assert models["default"] == "tiny"  # serve's --model becomes the API's default model
        [worker] = next(m for m in models["models"] if m["name"] == "tiny")["workers"]
        worker_pid = int(worker["name"].rsplit("-", 1)[1])
        job_id = client.post("/generate", json={"prompt": "a dot", "frames": 5, "width": 32, "height": 32}).json()["id"]
        assert wait_job(client, job_id)["status"] == "succeeded"

    os.kill(serve.pid, signal.SIGINT)
    assert serve.popen.wait(timeout=60) == 0, serve.log()
    assert not pid_alive(worker_pid)  # serve waited for its worker before exiting


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_serve_stops_when_its_worker_cannot_start(services):
    """A model that does not exist: the worker exits 2 with its one-line error, and serve stops its API with the same
    code instead of queueing jobs that nothing will run."""
    port = free_port()
    serve = Proc("serve-bad", [sys.executable, "-m", "engine.cli", "serve", "--model", "nope", "--port", str(port),
                               "--device", "cpu"], services.env(), services.workdir)
    services.procs.append(serve)
    assert serve.popen.wait(timeout=120) == 2, serve.log()
    assert "unknown model 'nope'" in serve.log() and "the worker exited (code 2)" in serve.log()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
