"""``sana-video serve``: the API and one worker in one command, for a single box.

The worker is a child process (``python -m workers``): a crash of either side shows, and the API stays
responsive while the worker's engine computes. Ctrl-C (or SIGTERM) stops the API, then the worker, which first
finishes or abandons its job like any worker shutdown (an abandoned job is re-queued for the next start).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

log = logging.getLogger("sana.serve")


def run_serve(host: str | None = None, port: int | None = None, model: str | None = None,
              device: str | None = None) -> None:
    from server.app import run_api

    cmd = [sys.executable, "-m", "workers"]
    if model:
        cmd += ["--model", model]
    if device:
        cmd += ["--device", device]
    env = dict(os.environ)
    if model:
        env["SANA_MODEL"] = model  # the API accepts the worker's model before the worker has registered
        os.environ["SANA_MODEL"] = model
        from server.settings import get_settings

        get_settings.cache_clear()
    # Own process group: the terminal's Ctrl-C reaches the API only; the worker is stopped in order below.
    worker = subprocess.Popen(cmd, env=env, start_new_session=True)
    log.info("worker pid %d: %s", worker.pid, " ".join(cmd))
    try:
        run_api(host, port)
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the Ctrl-C it handled; the API has shut down cleanly by then
    finally:
        _stop(worker)


def _stop(worker: subprocess.Popen, grace_s: float = 30.0) -> None:
    if worker.poll() is not None:
        return
    worker.send_signal(signal.SIGTERM)  # warm shutdown: the running job may finish
    try:
        worker.wait(timeout=grace_s)
        return
    except subprocess.TimeoutExpired:
        pass
    worker.send_signal(signal.SIGTERM)  # second signal: RQ's cold shutdown
    try:
        worker.wait(timeout=5)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
