"""Prometheus metrics of the API process (the Grafana dashboard queries these exact names)."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter("sana_http_requests", "HTTP requests answered, by route template, method and status.",
                   ["route", "method", "status"])
REQUEST_DURATION = Histogram(
    "sana_http_request_duration_seconds", "Time to answer an HTTP request (to the last body byte).",
    ["route", "method"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
QUEUE_DEPTH = Gauge("sana_queue_depth", "Jobs waiting in a model's queue (sampled at scrape time).", ["model"])
WEBSOCKET_VIEWERS = Gauge("sana_websocket_viewers", "Open websocket streams.")
JOBS_SUBMITTED = Counter("sana_jobs_submitted", "Jobs accepted into a queue, by model.", ["model"])
OUTPUTS_EXPIRED = Counter("sana_outputs_expired", "Output files deleted because their job record had expired.")


class RequestMetrics:
    """ASGI middleware counting HTTP requests by route template (not raw path: ids would explode the labels)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            method = scope["method"]
            REQUESTS.labels(template, method, str(status)).inc()
            REQUEST_DURATION.labels(template, method).observe(time.perf_counter() - start)


def render() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST
