"""Container healthcheck for the API and worker images (stdlib only).

    python healthcheck.py api      # GET /healthz of the API on 127.0.0.1:$SANA_PORT
    python healthcheck.py worker   # GET /metrics of the worker on 127.0.0.1:$SANA_WORKER_METRICS_PORT and
                                   # require a recent heartbeat once the worker has sent one

Exit status 0 when healthy, 1 otherwise (with the reason on stderr).
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request

HEARTBEAT = "sana_worker_last_heartbeat_timestamp_seconds"


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=4) as response:
        return response.read().decode("utf-8", "replace")


def last_heartbeat(metrics_text: str) -> float | None:
    """Value of the heartbeat gauge in a Prometheus text exposition, or None when absent."""
    for line in metrics_text.splitlines():
        if line.startswith(HEARTBEAT + " ") or line.startswith(HEARTBEAT + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def check_api() -> str | None:
    port = os.environ.get("SANA_PORT", "8000")
    fetch(f"http://127.0.0.1:{port}/healthz")
    return None


def check_worker() -> str | None:
    port = os.environ.get("SANA_WORKER_METRICS_PORT", "9101")
    beat = last_heartbeat(fetch(f"http://127.0.0.1:{port}/metrics"))
    if not beat:  # still loading the model: the metrics server answering is enough
        return None
    # Three missed heartbeats make the API consider the worker lost; allow twice that before restarting it.
    allowed = max(30.0, 6 * float(os.environ.get("SANA_HEARTBEAT_S", "5")))
    age = time.time() - beat
    if age > allowed:
        return f"last heartbeat {age:.0f} s ago (allowed {allowed:.0f} s)"
    return None


def main(argv: list[str]) -> int:
    checks = {"api": check_api, "worker": check_worker}
    if len(argv) != 2 or argv[1] not in checks:
        print(f"usage: {argv[0]} api|worker", file=sys.stderr)
        return 2
    try:
        problem = checks[argv[1]]()
    except Exception as exc:  # connection refused, HTTP error, timeout
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
