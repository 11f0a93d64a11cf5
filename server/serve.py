"""``sana-video serve``: the API and one worker in one command, for a single box; a worker that exits stops the API.

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
import threading

log = logging.getLogger("sana.serve")


def run_serve(host: str | None = None, port: int | None = None, model: str | None = None,
              device: str | None = None) -> int:
    """Serve until Ctrl-C (0), or until the worker exits on its own: then the API stops too and the worker's exit
    code is returned (2 for a bad model or device), so no API is left up taking jobs that nothing will run."""
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
    stopping = threading.Event()
    exited: dict[str, int] = {}

    def watch(server) -> None:
        threading.Thread(target=_watch, args=(worker, server, stopping, exited), name="worker-watch",
                         daemon=True).start()

    try:
        run_api(host, port, server_ready=watch)
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the Ctrl-C it handled; the API has shut down cleanly by then
    finally:
        stopping.set()
        _stop(worker)
    if "code" in exited:  # the worker ended serve: its own code, or 1 should it have exited 0 on its own
        return exited["code"] or 1
    return 0


def _watch(worker: subprocess.Popen, server, stopping: threading.Event, exited: dict[str, int]) -> None:
    """The worker exited while the API runs: say so and stop the API (uvicorn's graceful shutdown)."""
    code = worker.wait()
    if stopping.is_set():
        return
    exited["code"] = code
    log.error("the worker exited (code %d): stopping the API", code)
    server.should_exit = True


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
