"""Job server benchmark on this machine with the tiny models (CPU): a report, not a test.

Starts a private redis-server, the API and workers as subprocesses (the same launchers as the test suite), then
measures:

1. submission throughput: POST /generate from C concurrent clients while no worker consumes (API + Redis only);
2. queue-to-start latency: an idle worker's delay from submission to the job's start (record timestamps),
   one job at a time, and jobs per second through one worker for a burst of tiny jobs;
3. websocket fan-out: V viewers of one stream job; each chunk's delivery lag (receive time minus the time the
   worker published it), whether every viewer got the same bytes, and the job's run time next to a job with no
   viewer (a slow or numerous audience must not slow the worker).

    python benchmarks/bench_server.py [--out benchmarks/results/server_cpu_tiny.json] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Services, wait_job  # noqa: E402  (the launchers the tests use)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def summary(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """p50/p95/max/mean of ``values`` (seconds), in milliseconds by default."""
    return {"p50": round(pct(values, 50) * scale, 2), "p95": round(pct(values, 95) * scale, 2),
            "max": round(max(values) * scale, 2), "mean": round(statistics.fmean(values) * scale, 2),
            "n": len(values)}


# ---------------------------------------------------------------------------------------------- submissions


async def submission_throughput(url: str, total: int, concurrency: int) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    body = {"prompt": "a dot", "frames": 1, "width": 16, "height": 16, "steps": 1}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            while not queue.empty():
                i = queue.get_nowait()
                t0 = time.perf_counter()
                r = await http.post("/generate", json=dict(body, seed=i))
                latencies.append(time.perf_counter() - t0)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"requests": total, "concurrency": concurrency, "wall_s": round(wall, 3),
            "requests_per_s": round(total / wall, 1), "latency_ms": summary(latencies),
            "statuses": {str(k): v for k, v in statuses.items()}}


# ---------------------------------------------------------------------------------------------- queue to start


def queue_to_start(url: str, services: Services, sequential: int, burst: int) -> dict:
    from workers.jobs import read_job

    r = services.redis.client()
    body = {"prompt": "a dot", "frames": 1, "width": 16, "height": 16, "steps": 1, "model": "tiny"}
    waits = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(sequential):  # one at a time: the worker is idle when each arrives
            job_id = http.post("/generate", json=dict(body, seed=i)).json()["id"]
            assert wait_job(http, job_id)["status"] == "succeeded"
            rec = read_job(r, job_id)
            waits.append(rec["started_at"] - rec["created_at"])
        t0 = time.perf_counter()
        ids = [http.post("/generate", json=dict(body, seed=1000 + i)).json()["id"] for i in range(burst)]
        for job_id in ids:
            assert wait_job(http, job_id, timeout=600)["status"] == "succeeded"
        wall = time.perf_counter() - t0
    r.close()
    return {"idle_worker_queue_to_start_ms": summary(waits),
            "burst": {"jobs": burst, "wall_s": round(wall, 3), "jobs_per_s": round(burst / wall, 2)}}


# ---------------------------------------------------------------------------------------------- fan-out


async def viewer(url: str, job_id: str, lags: list[float]) -> bytes:
    import websockets

    data = bytearray()
    ws_url = "ws" + url.removeprefix("http") + f"/jobs/{job_id}/stream"
    async with websockets.connect(ws_url, max_size=None, open_timeout=60) as ws:
        async for message in ws:
            if isinstance(message, bytes):
                data += message
                continue
            event = json.loads(message)
            if event["type"] == "chunk" and "t" in event:
                lags.append(time.time() - event["t"])
            if event["type"] in ("done", "error"):
                break
    return bytes(data)


async def fan_out(url: str, viewers: int, frames: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        job = (await http.post("/generate", json={"prompt": "a ball", "model": "tiny-causal", "frames": frames,
                                                  "seed": viewers})).json()
        lags: list[float] = []
        results = await asyncio.gather(*(viewer(url, job["id"], lags) for _ in range(viewers)))
        while (status := (await http.get(job["status_url"])).json())["status"] not in (
                "succeeded", "failed", "cancelled"):
            await asyncio.sleep(0.1)
        video = (await http.get(job["video_url"])).content
    out = {"viewers": viewers, "frames": frames, "job_run_s": status["timings"].get("run_s"),
           "all_viewers_got_the_file_bytes": all(r == video for r in results)}
    if lags:
        out["chunk_delivery_lag_ms"] = summary(lags)
    return out


async def job_without_viewers(url: str, frames: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        job = (await http.post("/generate", json={"prompt": "a ball", "model": "tiny-causal", "frames": frames,
                                                  "seed": 0})).json()
        while (status := (await http.get(job["status_url"])).json())["status"] not in (
                "succeeded", "failed", "cancelled"):
            await asyncio.sleep(0.1)
    return status["timings"]["run_s"]


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "server_cpu_tiny.json"))
    parser.add_argument("--quick", action="store_true", help="fewer requests and viewers (a smoke run)")
    args = parser.parse_args()
    quick = args.quick

    results: dict = {
        "benchmark": "server", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
        "setup": "redis-server, API (uvicorn, 1 process), workers on CPU with the tiny presets, all on this host",
    }
    with tempfile.TemporaryDirectory() as tmp:
        services = Services(Path(tmp))
        services.defaults = {"SANA_MAX_QUEUE": "100000", "SANA_HEARTBEAT_S": "2"}
        try:
            url = services.api()
            total, concurrency = (200, 16) if quick else (2000, 64)
            print(f"submission throughput: {total} requests, {concurrency} clients ...", flush=True)
            results["submission"] = asyncio.run(submission_throughput(url, total, concurrency))
            services.redis.client().flushdb()  # drop the jobs no worker will run

            clip = services.worker("tiny", wait=False)
            stream = services.worker("tiny-causal", wait=False)
            services.wait_worker(clip)
            services.wait_worker(stream)
            print("queue to start ...", flush=True)
            results["queue_to_start"] = queue_to_start(url, services, 10 if quick else 50, 20 if quick else 200)

            frames = 65 if quick else 129
            print("fan-out ...", flush=True)
            baseline = asyncio.run(job_without_viewers(url, frames))
            results["fan_out"] = {"frames": frames, "job_run_s_without_viewers": baseline, "runs": []}
            for v in ((1, 10) if quick else (1, 10, 50, 100)):
                print(f"  {v} viewers ...", flush=True)
                results["fan_out"]["runs"].append(asyncio.run(fan_out(url, v, frames)))
        finally:
            services.stop()
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
