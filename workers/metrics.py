"""Prometheus metrics of a worker process, served on its own port (``--metrics-port``; 0 turns it off).

The Grafana dashboard queries these exact names.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from engine.errors import InvalidParams

# Step latencies span ~10 ms (tiny model on CPU) to tens of seconds (720p clip, CFG, one GPU).
_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BLOCK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
_JOB_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

JOBS = Counter("sana_worker_jobs", "Jobs finished by this worker, by outcome.", ["model", "outcome"])
JOB_DURATION = Histogram(
    "sana_worker_job_duration_seconds", "Wall time of a job from start to its last byte.", ["model", "mode"],
    buckets=_JOB_BUCKETS,
)
STEP_DURATION = Histogram(
    "sana_worker_step_duration_seconds",
    "Wall time of a denoising step: one transformer forward (a stream block's commit is one), without the VAE decode.",
    ["model", "mode"],
    buckets=_STEP_BUCKETS,
)
BLOCK_DURATION = Histogram(
    "sana_worker_block_duration_seconds", "Wall time from one published chunk to the next (first: from start).",
    ["model", "mode"], buckets=_BLOCK_BUCKETS,
)
FRAMES_PER_SECOND = Gauge(
    "sana_worker_frames_per_second", "Frames generated per wall second by the last finished job.", ["model"]
)
REALTIME_FACTOR = Gauge(
    "sana_worker_realtime_factor", "Video seconds produced per wall second by the running or last stream.",
    ["model"],
)
GPU_MEMORY = Gauge("sana_worker_gpu_memory_bytes", "Memory allocated by torch on the device (0 on CPU).",
                   ["device"])
BLOCK_STATE = Gauge("sana_worker_block_state_bytes", "Bytes of the block state of the running or last stream.",
                    ["model"])
BUSY = Gauge("sana_worker_busy", "1 while a job runs, else 0.", ["model"])
LAST_HEARTBEAT = Gauge("sana_worker_last_heartbeat_timestamp_seconds", "Unix time of the last heartbeat.")


def serve_metrics(port: int) -> None:
    """Serve /metrics on ``port`` in a background thread (no-op for 0); InvalidParams when the port is taken."""
    if port:
        try:
            start_http_server(port)
        except OSError as exc:
            raise InvalidParams("metrics_port", f"cannot serve /metrics on port {port}: {exc.strerror or exc}",
                                "a free port, or 0 for none (--metrics-port, SANA_WORKER_METRICS_PORT)") from None
