"""Workers on a GPU, as `docker compose up` runs them (skipped without CUDA): each process pins itself to its device,
compiles the fast path and warms up before it registers, and jobs through the API come back as real videos, a
stream over the websocket and a clip, with the object the prompt names moving the way it says."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from conftest import decode_mp4, read_stream, wait_job

from training.evaluate import measure

pytestmark = [
    pytest.mark.slow,
    pytest.mark.gpu,
    pytest.mark.timeout(900),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a worker on the GPU"),
]


def test_gpu_workers_serve_streams_and_clips(services):
    services.defaults = {"SANA_MODEL": "demo-causal"}
    api = services.api()
    stream_worker = services.worker("demo-causal", device="cuda", timeout=600)
    clip_worker = services.worker("demo", device="cuda", timeout=600)
    client = httpx.Client(base_url=api, timeout=30)
    workers = {w["name"].rsplit("-", 1)[1]: w for m in client.get("/models").json()["models"] for w in m["workers"]}
    for proc in (stream_worker, clip_worker):
        info = workers[str(proc.pid)]
        # A bare "cuda" is pinned to the first GPU; the fast path compiled, so the worker warmed up first.
        assert info["device"] == "cuda:0" and info["fast"] == "fast" and info["dtype"] == "bfloat16", info
        assert info["warmup_s"] is not None and info["warmup_s"] > 0, info
        assert "on cuda:0" in proc.log()
    assert workers[str(stream_worker.pid)]["overlap_decode"] is True

    body = {"prompt": "a green square moving right on a black background", "frames": 49, "seed": 3}
    job_id = client.post("/generate", json=body).json()["id"]
    events = read_stream(api, job_id, timeout=300)
    chunks = [e for e, _ in events if e["type"] == "chunk"]
    assert len(chunks) >= 2, [e["type"] for e, _ in events]
    assert wait_job(client, job_id, timeout=300)["status"] == "succeeded"
    stream = decode_mp4(client.get(f"/jobs/{job_id}/video").content)
    assert len(stream) == 49

    body = {"prompt": "a green square moving right on a black background", "frames": 33, "seed": 3, "model": "demo"}
    job_id = client.post("/generate", json=body).json()["id"]
    assert wait_job(client, job_id, timeout=300)["status"] == "succeeded"
    clip = decode_mp4(client.get(f"/jobs/{job_id}/video").content)
    assert len(clip) == 33

    for video in (stream, clip):
        m = measure(np.stack(video))
        assert (m.colour, m.motion) == ("green", "right"), m
    client.close()
