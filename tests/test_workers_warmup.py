"""Start-up warm-up: a worker whose denoiser compiles makes one short video at its default size before it registers,
so the first job does not pay the compile; the warm-up leaves nothing behind that changes a job's video.

On a CPU nothing compiles, so ``auto`` makes no warm-up here; ``on`` forces one (the same code path a GPU takes).
"""

from __future__ import annotations

import concurrent.futures
import sys

import httpx
import numpy as np
import pytest
from conftest import Proc, decode_mp4, wait_job

from workers.jobs import read_job
from workers.registry import live_workers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

MODEL = "tiny-causal"


def test_warmed_worker_reports_it_and_makes_the_same_videos(services):
    services.defaults = {"SANA_MODEL": MODEL, "SANA_WORKER_FAST": "on"}
    api = services.api()
    warmed = services.worker(MODEL, SANA_WORKER_WARMUP="on")
    cold = services.worker(MODEL, SANA_WORKER_OVERLAP_DECODE="false")  # auto: nothing compiles on a CPU: no warm-up
    client = httpx.Client(base_url=api, timeout=30)

    workers = {w["name"].rsplit("-", 1)[1]: w for w in client.get("/models").json()["models"][0]["workers"]}
    assert workers[str(cold.pid)]["warmup_s"] is None
    assert workers[str(warmed.pid)]["warmup_s"] > 0
    assert workers[str(warmed.pid)]["overlap_decode"] is True and workers[str(cold.pid)]["overlap_decode"] is False
    defaults = client.get("/models").json()["models"][0]["defaults"]
    assert defaults["mode"] == "stream"
    # Two blocks of the default stream (the first absorbs the remainder), one step each.
    assert f"(stream {defaults['width']}x{defaults['height']}, " in warmed.log()
    assert "warm-up" not in cold.log()

    # The same request on both workers at once: each takes one (both idle) and the videos are identical.
    body = {"prompt": "a purple ball rolling", "frames": 45, "seed": 21}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ids = list(pool.map(lambda _: client.post("/generate", json=body).json()["id"], range(2)))
    jobs = [wait_job(client, job_id, timeout=240) for job_id in ids]
    assert all(j["status"] == "succeeded" for j in jobs), jobs
    r = services.redis.client()
    ran_on = {int(read_job(r, job_id)["worker"].rsplit("-", 1)[1]) for job_id in ids}
    r.close()
    assert ran_on == {warmed.pid, cold.pid}
    videos = [decode_mp4(client.get(f"/jobs/{job_id}/video").content) for job_id in ids]
    assert len(videos[0]) == len(videos[1]) == 45
    assert all(np.array_equal(a, b) for a, b in zip(*videos))
    client.close()


def test_a_stuck_warm_up_exits_the_worker_instead_of_never_registering(services):
    proc = Proc("worker-stuck", [sys.executable, "-m", "workers", "--model", MODEL, "--device", "cpu",
                                 "--metrics-port", "0"],
                services.env(SANA_WORKER_WARMUP="on", SANA_WORKER_WARMUP_TIMEOUT_S="0.001"), services.workdir)
    services.procs.append(proc)
    assert proc.popen.wait(timeout=240) == 1
    assert "warm-up did not finish in 0.001s" in proc.log()
    r = services.redis.client()
    assert not any(w.get("pid") == proc.pid for w in live_workers(r))
    r.close()


@pytest.mark.parametrize("preset, videos, frames", [
    ("tiny-causal", 1, 9 + 12),  # default blocks [3, 3, 3]: the first block is a regular one already
    ("demo-causal", 2, 17 + 16 + 13),  # default blocks [5, 4, ...]: then also a stream whose first block is 4
])
def test_stream_warm_up_covers_both_first_block_lengths(preset, videos, frames):
    from engine.pipeline import VideoPipeline
    from workers.tasks import warm_up

    pipe = VideoPipeline.from_pretrained(preset, device="cpu")
    ran = warm_up(pipe)
    assert (ran["mode"], ran["videos"], ran["frames"]) == ("stream", videos, frames)
