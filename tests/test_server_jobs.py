"""The job API end to end: a real redis-server, the API under uvicorn, worker processes on the tiny presets.

One API and two workers (``tiny``: clips, ``tiny-causal``: streams, on the fast path) serve the whole module.
Chunk streams keep only 8 entries here, so replays of finished jobs read their early chunks back from the output
files.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading

import httpx
import pytest
from conftest import decode_mp4, free_port, metric_value, read_stream, wait_job, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def stack(services):
    services.defaults = {"SANA_STREAM_MAXLEN": "8"}
    api = services.api()
    metrics_port = free_port()
    clip = services.worker("tiny", wait=False, metrics_port=metrics_port)
    stream = services.worker("tiny-causal", wait=False, SANA_WORKER_FAST="on")  # FastBlocks (CPU references)
    services.wait_worker(clip)
    services.wait_worker(stream)
    client = httpx.Client(base_url=api, timeout=30)
    yield type("Stack", (), {"url": api, "client": client, "services": services,
                             "worker_metrics": f"http://127.0.0.1:{metrics_port}/metrics"})
    client.close()


def submit(client: httpx.Client, **body) -> str:
    body.setdefault("prompt", "a red ball bouncing")
    r = client.post("/generate", json=body)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_models_list_live_workers_with_limits(stack):
    models = {m["name"]: m for m in stack.client.get("/models").json()["models"]}
    assert set(models) == {"tiny", "tiny-causal"}
    assert models["tiny"]["causal"] is False and models["tiny-causal"]["causal"] is True
    assert models["tiny"]["workers"][0]["device"] == "cpu"
    assert models["tiny"]["precision"] == ["torch"]  # auto, with no TensorRT engine: the PyTorch denoiser
    assert models["tiny"]["workers"][0]["precision_requested"] == "auto"
    assert models["tiny"]["workers"][0]["fast"] == "reference"  # auto on CPU
    assert models["tiny"]["workers"][0]["fast_requested"] == "auto"
    assert models["tiny-causal"]["workers"][0]["fast"] == "fast"
    assert models["tiny"]["limits"]["max_pixels"] == 256 * 256
    assert models["tiny-causal"]["defaults"]["mode"] == "stream"
    ready = stack.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model"] == "tiny"


def test_clip_job_progresses_succeeds_and_downloads(stack, services):
    client = stack.client
    created = client.post("/generate", json={"prompt": "a blue square sliding left", "frames": 33, "width": 64,
                                             "height": 48, "steps": 24, "seed": 7})
    assert created.status_code == 202
    body = created.json()
    assert body["status"] == "queued" and created.headers["location"] == body["status_url"]
    job_id = body["id"]

    fractions, statuses = [], []
    def finished():
        job = client.get(body["status_url"]).json()
        statuses.append(job["status"])
        if job["status"] == "running" and job["progress"]["steps_total"]:
            fractions.append(job["progress"]["fraction"])
            assert job["progress"]["blocks_total"] == 1 and job["progress"]["steps_total"] == 24
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    job = wait_until(finished, 120, interval=0.05, what="the clip job to finish")
    assert job["status"] == "succeeded", job
    assert "running" in statuses
    assert fractions and fractions == sorted(fractions) and any(0 < f < 1 for f in fractions)
    assert job["progress"]["fraction"] == 1.0 and job["progress"]["frames_done"] == 33
    assert job["params"]["width"] == 64 and job["params"]["height"] == 48 and job["params"]["mode"] == "clip"
    assert job["attempt"] == 1 and job["error"] is None and job["eta_s"] is None
    assert job["timings"]["run_s"] > 0 and "first_chunk_s" in job["timings"]

    video = client.get(body["video_url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    frames = decode_mp4(video.content)
    assert len(frames) == 33 and frames[0].shape == (48, 64, 3)
    assert video.content == (services.output_dir / f"{job_id}.mp4").read_bytes()
    assert not list(services.output_dir.glob(f"{job_id}*.partial"))

    part = client.get(body["video_url"], headers={"Range": "bytes=100-299"})
    assert part.status_code == 206 and part.content == video.content[100:300]
    assert part.headers["content-range"] == f"bytes 100-299/{len(video.content)}"
    # A Range we do not read (another unit, last before first, no numbers) is ignored: the whole file, as HTTP asks.
    for odd in ("items=0-1", "bytes=5-2", "bytes=-", "bytes=a-b"):
        whole = client.get(body["video_url"], headers={"Range": odd})
        assert whole.status_code == 200 and whole.content == video.content, odd
    size = len(video.content)
    beyond = client.get(f"/v1/videos/{job_id}/content", headers={"Range": f"bytes={size}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{size}"
    assert beyond.json()["detail"][0]["field"] == "range" and str(size) in beyond.json()["detail"][0]["accepted"]
    # Download managers and players probe with HEAD first: the size and range support, no body.
    for url in (body["video_url"], f"/v1/videos/{job_id}/content"):
        head = client.head(url)
        assert head.status_code == 200 and head.content == b"", url
        assert int(head.headers["content-length"]) == len(video.content)
        assert head.headers["accept-ranges"] == "bytes" and head.headers["content-type"] == "video/mp4"


def test_eta_is_reported_while_running(stack):
    job_id = submit(stack.client, frames=33, width=64, height=64, steps=40)

    def eta_seen():
        job = stack.client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            pytest.fail(f"the job ended before any ETA was seen: {job}")
        return job if job["status"] == "running" and job["eta_s"] is not None else None

    job = wait_until(eta_seen, 60, interval=0.05, what="an ETA")
    assert job["eta_s"] >= 0 and 1 <= job["progress"]["step"] <= 40
    assert wait_job(stack.client, job_id)["status"] == "succeeded"


@pytest.mark.parametrize("body, field, accepted", [
    ({"width": 65}, "width", "multiple of 16"),
    ({"height": 8}, "height", "16..4096"),
    ({"frames": 34}, "frames", "4k+1"),
    ({"prompt": ""}, "prompt", "1..4000 characters"),
    ({"prompt": "x" * 4001}, "prompt", "1..4000 characters"),
    ({"steps": 0}, "steps", "1..200"),
    ({"guidance_scale": 99}, "guidance_scale", "0.0..20.0"),
    ({"mode": "movie"}, "mode", "clip or stream"),
    ({"model": "nope"}, "model", "tiny, tiny-causal"),
    ({"mode": "stream"}, "mode", "clip"),                 # tiny is bidirectional
    ({"model": "tiny-causal", "mode": "clip"}, "mode", "stream"),
    ({"frames": 133}, "frames", "1..129"),                # beyond the tiny model's clip length
    ({"width": 512, "height": 512}, "width", "65536"),    # beyond the tiny model's pixels
])
def test_invalid_fields_get_422_naming_field_and_range(stack, body, field, accepted):
    body = {"prompt": "a cat", **body}
    r = stack.client.post("/generate", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    item = next(d for d in detail if d["field"] == field)
    assert accepted in (item.get("accepted") or ""), item


def test_unknown_fields_and_bad_json_are_422(stack):
    r = stack.client.post("/generate", json={"prompt": "a cat", "colour": "red"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "colour"
    for path in ("/generate", "/v1/videos"):
        r = stack.client.post(path, content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["detail"][0]["field"] == "body", r.text


def test_bad_from_chunk_is_refused_naming_the_field(stack):
    from websockets.exceptions import InvalidStatus

    job_id = submit(stack.client, frames=5, width=32, height=32, steps=2)
    for bad in ("-1", "abc", "1.5", "9" * 40):
        with pytest.raises(InvalidStatus) as info:
            read_stream(stack.url, job_id, from_chunk=bad)
        response = info.value.response
        assert response.status_code == 422, bad
        detail = json.loads(response.body)["detail"]
        assert "from_chunk" in detail and "0..999999999999" in detail
    assert wait_job(stack.client, job_id)["status"] == "succeeded"
    assert read_stream(stack.url, job_id, from_chunk="0")[-1][0]["type"] == "done"


def test_oversized_bodies_get_413_before_they_are_read(stack):
    big = b'{"prompt": "' + b"a" * (2 << 20) + b'"}'
    r = stack.client.post("/generate", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["detail"][0]["accepted"] == "at most 1048576 bytes", r.text

    def chunked():  # no Content-Length: refused once the bytes pass the limit
        yield b'{"prompt": "'
        for _ in range(64):
            yield b"a" * (64 << 10)
        yield b'"}'

    r = stack.client.post("/v1/videos", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["detail"][0]["field"] == "body", r.text
    small = submit(stack.client, prompt="a small red circle", frames=5, width=32, height=32, steps=2)
    assert wait_job(stack.client, small)["status"] == "succeeded"


def test_a_prompt_longer_than_the_model_reads_is_422_at_submit(stack):
    """Only the model's tokenizer can count a prompt's tokens: a live worker checks the request as its job would run,
    so the client hears of it at once instead of from a failed job after its queue wait."""
    long = " ".join(["red"] * 40)
    depth = {m["name"]: m["queue_depth"] for m in stack.client.get("/models").json()["models"]}
    for model in ("tiny", "tiny-causal"):
        for field, body in (("prompt", {"prompt": long}), ("negative_prompt", {"prompt": "a", "negative_prompt": long})):
            r = stack.client.post("/generate", json={**body, "model": model, "frames": 5})
            assert r.status_code == 422, r.text
            detail = r.json()["detail"][0]
            assert detail["field"] == field and "tokens, more than model" in detail["msg"], detail
            assert detail["accepted"].startswith("at most 32 tokens"), detail
    r = stack.client.post("/v1/videos", json={"prompt": long, "model": "tiny"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "prompt", r.text
    assert {m["name"]: m["queue_depth"] for m in stack.client.get("/models").json()["models"]} == depth
    assert submit(stack.client, prompt=" ".join(["red"] * 20), model="tiny", frames=5, width=32, height=32, steps=1)


def test_other_keys_of_a_job_are_not_jobs(stack):
    """A job's other Redis keys (its chunk list, stream, cancel flag) are named by its id plus a suffix; a path id
    of that form is no job: 404, as any unknown id, never the job store's error."""
    from websockets.exceptions import InvalidStatus

    job_id = submit(stack.client, prompt="a small red circle", frames=5, width=32, height=32, steps=2)
    assert wait_job(stack.client, job_id)["status"] == "succeeded"
    for suffix in (":chunks", ":stream", ":cancel", "X"):
        bad = job_id + suffix
        for method, path in (("GET", f"/jobs/{bad}"), ("DELETE", f"/jobs/{bad}"), ("GET", f"/jobs/{bad}/video"),
                             ("GET", f"/v1/videos/{bad}"), ("GET", f"/v1/videos/{bad}/content")):
            r = stack.client.request(method, path)
            assert r.status_code == 404, (method, path, r.status_code, r.text)
        with pytest.raises(InvalidStatus) as info:
            read_stream(stack.url, bad)
        assert info.value.response.status_code == 404
    assert stack.client.get(f"/jobs/{job_id}").status_code == 200


def test_a_method_a_path_does_not_have_is_405_with_allow(stack):
    job_id = "0" * 32
    for method, path, allow in (("PUT", f"/jobs/{job_id}", "DELETE, GET"), ("GET", "/generate", "POST"),
                                ("POST", f"/jobs/{job_id}/video", "GET, HEAD"), ("PATCH", "/v1/videos", "POST")):
        r = stack.client.request(method, path)
        assert r.status_code == 405 and r.headers["allow"] == allow, (method, path, r.headers.get("allow"))


def test_unknown_job_is_404_everywhere(stack):
    from websockets.exceptions import InvalidStatus

    for path in ("/jobs/nope", "/jobs/nope/video", "/v1/videos/nope", "/v1/videos/nope/content"):
        assert stack.client.get(path).status_code == 404, path
    assert stack.client.delete("/jobs/nope").status_code == 404
    with pytest.raises(InvalidStatus) as info:
        read_stream(stack.url, "nope")
    assert info.value.response.status_code == 404


def test_server_limits_answer_429_and_503_with_retry_after(stack, services):
    # A second API with tight limits whose default model has no worker, so its queue only grows.
    api = services.api(SANA_MAX_FRAMES="17", SANA_MAX_PIXELS="4096", SANA_MAX_QUEUE="2",
                       SANA_MODEL="sana-video-480p", SANA_RETRY_AFTER_S="7")
    with httpx.Client(base_url=api) as client:
        r = client.post("/generate", json={"prompt": "a cat", "frames": 21, "width": 64, "height": 64})
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        assert r.json()["detail"][0]["field"] == "frames" and "1..17" in r.json()["detail"][0]["accepted"]
        r = client.post("/generate", json={"prompt": "a cat", "frames": 17, "width": 128, "height": 64})
        assert r.status_code == 429 and r.json()["detail"][0]["field"] == "width"
        # /v1/videos names the fields its client sent: seconds and size, not frames and width.
        r = client.post("/v1/videos", json={"prompt": "a cat", "seconds": 2, "size": "64x64"})
        detail = r.json()["detail"][0]
        assert r.status_code == 429 and detail["field"] == "seconds", r.text
        assert detail["accepted"] == "0 < seconds <= 1 at 16 fps" and "33 frames" in detail["msg"]
        # Seconds as OpenAI's API sends them, a string, mean the same.
        r = client.post("/v1/videos", json={"prompt": "a cat", "seconds": "2", "size": "64x64"})
        assert r.status_code == 429 and r.json()["detail"][0]["accepted"] == detail["accepted"], r.text
        r = client.post("/v1/videos", json={"prompt": "a cat", "seconds": "two"})
        assert r.status_code == 422 and r.json()["detail"][0]["accepted"] == "0 < seconds <= 3600", r.text
        r = client.post("/v1/videos", json={"prompt": "a cat", "seconds": 1, "size": "128x64"})
        assert r.status_code == 429 and r.json()["detail"][0]["field"] == "size", r.text
        ok = [client.post("/generate", json={"prompt": "a cat", "frames": 17, "width": 64, "height": 64})
              for _ in range(2)]
        assert [o.status_code for o in ok] == [202, 202]
        full = client.post("/generate", json={"prompt": "a cat", "frames": 17, "width": 64, "height": 64})
        assert full.status_code == 503 and full.headers["retry-after"] == "7"
        assert "queue" in full.json()["detail"]
        assert client.get("/readyz").status_code == 503  # no worker for its default model
        # /models shows what admission assumes for it until its worker is up: the preset's mode, limits, sizes.
        model = next(m for m in client.get("/models").json()["models"] if m["name"] == "sana-video-480p")
        assert model["workers"] == [] and model["causal"] is False
        assert model["limits"]["mode"] == "clip" and model["limits"]["frames"]["max"] > 81
        assert model["defaults"] == {"width": 832, "height": 480, "frames": 81, "fps": 16, "mode": "clip"}
        # Without a worker, a size the request leaves out is the preset's (480x832, 81 frames) for the checks too.
        for body, field in (({"width": 4096}, "width"), ({"height": 4096}, "width"), ({"width": 64}, "frames")):
            r = client.post("/generate", json={"prompt": "a cat", **body})
            assert r.status_code in (422, 429) and r.json()["detail"][0]["field"] == field, (body, r.text)
        for o in ok:
            assert client.delete(f"/jobs/{o.json()['id']}").status_code == 200


def test_cancel_queued_and_running_jobs(stack, services):
    client = stack.client
    # A long job occupies the single tiny worker...
    long_id = submit(client, frames=129, width=256, height=256, steps=200)
    wait_until(lambda: client.get(f"/jobs/{long_id}").json()["progress"].get("step", 0) >= 1, 60,
               what="the long job to make progress")
    # ...so this one waits in the queue.
    queued_id = submit(client, frames=33, width=64, height=64)
    assert client.get(f"/jobs/{queued_id}").json()["status"] == "queued"

    r = client.delete(f"/jobs/{queued_id}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert client.get(f"/jobs/{queued_id}/video").status_code == 409
    rq = services.redis.client()
    assert not rq.exists(f"rq:job:{queued_id}")  # RQ keeps nothing of it (its hash held the prompt, without expiry)
    assert not any(rq.zscore(key, queued_id) is not None for key in rq.scan_iter("rq:canceled:*"))
    rq.close()

    r = client.delete(f"/jobs/{long_id}")
    assert r.status_code in (200, 202)
    if r.status_code == 202:
        assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True
    job = wait_job(client, long_id)
    assert job["status"] == "cancelled" and "cancelled" in job["error"]["message"]
    assert job["progress"]["step"] < 200
    assert not list(services.output_dir.glob(f"{long_id}*.partial"))
    assert not (services.output_dir / f"{long_id}.mp4").exists()
    video = client.get(f"/jobs/{long_id}/video")
    assert video.status_code == 409 and video.json()["status"] == "cancelled"

    queued = client.get(f"/jobs/{queued_id}").json()
    assert queued["status"] == "cancelled" and queued["attempt"] == 0 and queued["started_at"] is None
    assert client.delete(f"/jobs/{queued_id}").status_code == 409  # already ended
    tiny = next(m for m in client.get("/models").json()["models"] if m["name"] == "tiny")
    assert tiny["queue_depth"] == 0

    # The worker is free again and still works.
    after = submit(client, frames=5, width=32, height=32, steps=2)
    assert wait_job(client, after)["status"] == "succeeded"
    worker_metrics = httpx.get(stack.worker_metrics).text
    assert metric_value(worker_metrics, "sana_worker_jobs_total", model="tiny", outcome="cancelled") == 1


def test_stream_over_websocket_with_reconnect_and_replay(stack, services):
    client = stack.client
    job_id = submit(client, model="tiny-causal", frames=65, width=64, height=64, seed=3)

    # First connection: leave after chunk 1.
    first = read_stream(stack.url, job_id, stop=lambda e: e["type"] == "chunk" and e["index"] == 1)
    start = [(e, d) for e, d in first if e["type"] == "start"]
    assert len(start) == 1 and start[0][0]["mode"] == "stream" and start[0][0]["blocks_total"] == 5
    assert start[0][0]["mime"].startswith('video/mp4; codecs="avc1.')
    init = start[0][1]
    head = [(e, d) for e, d in first if e["type"] == "chunk"]
    assert [e["index"] for e, _ in head] == [0, 1]

    # Reconnect from chunk 2: everything after, nothing twice.
    second = read_stream(stack.url, job_id, from_chunk=2)
    assert second[-1][0]["type"] == "done" and second[-1][0]["status"] == "succeeded"
    tail = [(e, d) for e, d in second if e["type"] == "chunk"]
    assert [e["index"] for e, _ in tail] == [2, 3, 4]
    assert all(e["attempt"] == 1 for e, _ in head + tail)
    closing = b"".join(d for e, d in second if e["type"] == "tail")

    stitched = init + b"".join(d for _, d in head + tail) + closing
    frames = decode_mp4(stitched)
    assert len(frames) == 65
    assert [e["start_frame"] for e, _ in head + tail] == [0, 17, 29, 41, 53]

    video = client.get(f"/jobs/{job_id}/video").content
    assert stitched == video  # the live stream and the file are the same bytes

    # Retention: the stream is bounded while the job runs and expires after it ends; so does the record.
    r = services.redis.client()
    assert r.xlen(f"sana:job:{job_id}:stream") <= 8
    assert 0 < r.ttl(f"sana:job:{job_id}:stream") <= 3600
    assert 0 < r.ttl(f"sana:job:{job_id}") <= 7 * 24 * 3600
    r.close()

    # A replay of the finished job: the stream kept 8 entries, the early chunks come from the file.
    replay = read_stream(stack.url, job_id)
    assert [e["index"] for e, _ in replay if e["type"] == "chunk"] == [0, 1, 2, 3, 4]
    replayed = b"".join(d for e, d in replay if d is not None)
    assert replayed == video
    # Once the stream has expired (deleted here, as its TTL would), the record and the file still replay it.
    r = services.redis.client()
    r.delete(f"sana:job:{job_id}:stream")
    r.close()
    expired = read_stream(stack.url, job_id)
    assert [e["index"] for e, _ in expired if e["type"] == "chunk"] == [0, 1, 2, 3, 4]
    assert expired[-1][0]["type"] == "done" and b"".join(d for e, d in expired if d is not None) == video
    late = read_stream(stack.url, job_id, from_chunk=4)
    assert [e["index"] for e, _ in late if e["type"] == "chunk"] == [4]
    assert len(decode_mp4(b"".join(d for e, d in late if d is not None))) == 12


def test_replay_of_a_cancelled_long_stream_ends_with_cancelled(stack, services):
    """A cancelled attempt deletes its partial file. A replay from chunk 0 finds the early chunks neither in the
    trimmed stream nor on disk: the viewer must get how the job ended, not an "unavailable" byte range."""
    client = stack.client
    job_id = submit(client, model="tiny-causal", frames=2001, width=64, height=64, steps=2, seed=9)
    read_stream(stack.url, job_id, stop=lambda e: e["type"] == "chunk" and e["index"] == 5)
    assert client.delete(f"/jobs/{job_id}").status_code in (200, 202)
    assert wait_job(client, job_id)["status"] == "cancelled"
    r = services.redis.client()
    kept = [json.loads(f[b"event"]) for _, f in r.xrange(f"sana:job:{job_id}:stream") if f[b"type"] == b"chunk"]
    r.close()
    assert kept and min(e["index"] for e in kept) > 0  # the replay has a gap to fill before these
    assert not list(services.output_dir.glob(f"{job_id}*"))

    replay = read_stream(stack.url, job_id)
    assert [e["type"] for e, _ in replay if e["type"] == "error"] == []
    assert replay[-1][0]["type"] == "done" and replay[-1][0]["status"] == "cancelled"
    assert "cancelled" in replay[-1][0]["error"]["message"]


def test_many_viewers_of_one_stream_get_the_same_bytes(stack):
    job_id = submit(stack.client, model="tiny-causal", frames=49, width=64, height=64, seed=5)
    results: list[bytes] = [b""] * 6
    def view(i: int) -> None:
        events = read_stream(stack.url, job_id)
        assert events[-1][0]["type"] == "done"
        results[i] = b"".join(d for e, d in events if d is not None)

    threads = [threading.Thread(target=view, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    video = stack.client.get(f"/jobs/{job_id}/video").content
    assert all(r == video for r in results)
    assert len(decode_mp4(video)) == 49


def test_openai_style_aliases(stack):
    client = stack.client
    r = client.post("/v1/videos", json={"prompt": "a green tree", "size": "64x32", "seconds": 1, "steps": 2})
    assert r.status_code == 202, r.text
    video = r.json()
    assert video["object"] == "video" and video["size"] == "64x32"
    assert video["status"] in ("queued", "in_progress", "completed")  # the idle worker may have taken it already
    done = wait_until(lambda: (v := client.get(f"/v1/videos/{video['id']}").json())["status"]
                      in ("completed", "failed") and v, 120, what="the video to complete")
    assert done["status"] == "completed" and done["progress"] == 100 and done["seconds"] == "1.0625", done
    content = client.get(f"/v1/videos/{video['id']}/content")
    assert content.status_code == 200 and len(decode_mp4(content.content)) == 17  # 4k+1 nearest 1 s x 16 fps
    assert client.get(f"/jobs/{video['id']}").json()["status"] == "succeeded"  # the same job
    assert client.delete(f"/v1/videos/{video['id']}").status_code == 409
    bad = client.post("/v1/videos", json={"prompt": "x", "size": "64by32"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "size"


def test_openai_sdk_makes_and_downloads_a_video(stack):
    """OpenAI's own client: videos.create posts a multipart form (its values all text), retrieve polls, and
    download_content fetches the MP4. /generate's fields ride in extra_body; a reference image is refused."""
    import warnings

    import openai

    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the SDK marks its videos API as OpenAI's own, ending
        video = client.videos.create(prompt="a blue square", seconds="1", size="64x32", model="tiny",
                                     extra_body={"steps": 2, "seed": 7, "guidance_scale": 1.5})
        assert video.status in ("queued", "in_progress", "completed") and video.size == "64x32"
        done = wait_until(lambda: (v := client.videos.retrieve(video.id)).status in ("completed", "failed") and v,
                          120, what="the video to complete")
        assert done.status == "completed" and done.progress == 100, done
        assert len(decode_mp4(client.videos.download_content(video.id).read())) == 17
        params = stack.client.get(f"/jobs/{video.id}").json()["params"]
        assert (params["steps"], params["seed"], params["guidance_scale"], params["width"]) == (2, 7, 1.5, 64)

        with pytest.raises(openai.UnprocessableEntityError) as refused:
            client.videos.create(prompt="a cat", input_reference=("cat.png", b"\x89PNG", "image/png"))
        assert refused.value.body["detail"][0]["field"] == "input_reference"
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            client.videos.create(prompt="a cat", extra_body={"steps": "many"})
        assert refused.value.body["detail"][0]["field"] == "steps"
        assert refused.value.body["detail"][0]["accepted"] == "1..200"


def test_a_form_body_is_checked_like_json(stack):
    """The same fields as a plain urlencoded form: one value each, numbers where numbers go, nothing unknown."""
    r = stack.client.post("/v1/videos", data={"prompt": "a cat", "size": "64by32"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "size"
    for odd in (" 5", "1_7", "\u0661", "5.0"):  # numbers as int() reads them, not as JSON does
        r = stack.client.post("/v1/videos", data={"prompt": "a cat", "steps": odd})
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "steps", (odd, r.text)
    r = stack.client.post("/v1/videos", data={"prompt": "a cat", "frobs": "3"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "frobs"
    r = stack.client.post("/v1/videos", content=b"prompt=a&prompt=b",
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 422 and "more than once" in r.json()["detail"][0]["msg"]
    r = stack.client.post("/v1/videos", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400, r.text


def test_hundred_concurrent_submissions_all_finish(stack):
    def post(i: int) -> httpx.Response:
        return httpx.post(f"{stack.url}/generate", timeout=60, json={
            "prompt": f"dot {i}", "frames": 1, "width": 16, "height": 16, "steps": 1, "seed": i})

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(post, range(100)))
    assert [a.status_code for a in answers] == [202] * 100
    ids = [a.json()["id"] for a in answers]
    assert len(set(ids)) == 100
    statuses = {job_id: wait_job(stack.client, job_id, timeout=300)["status"] for job_id in ids}
    assert set(statuses.values()) == {"succeeded"}
    metrics = stack.client.get("/metrics").text
    submitted = [line for line in metrics.splitlines() if line.startswith('sana_jobs_submitted_total{model="tiny"}')]
    assert submitted and float(submitted[0].split()[-1]) >= 100


def test_step_histogram_counts_steps_not_decoded_chunks(stack):
    """A clip of 33 frames in 4 steps is decoded in 3 chunks, each reported as progress: 4 steps are observed."""
    def steps_seen() -> float:
        text = httpx.get(stack.worker_metrics).text
        return metric_value(text, "sana_worker_step_duration_seconds_count", model="tiny", mode="clip") or 0.0

    before = steps_seen()
    job_id = submit(stack.client, frames=33, width=64, height=64, steps=4)
    assert wait_job(stack.client, job_id)["status"] == "succeeded"
    assert stack.client.get(f"/jobs/{job_id}").json()["chunks"] == 3
    assert steps_seen() - before == 4


def test_metrics_of_api_and_worker(stack):
    api = stack.client.get("/metrics")
    assert api.status_code == 200
    text = api.text
    assert metric_value(text, "sana_http_requests_total", route="/generate", method="POST", status="202") >= 100
    assert metric_value(text, "sana_http_requests_total", route="/jobs/{job_id}", method="GET", status="404") >= 1
    assert metric_value(text, "sana_http_request_duration_seconds_count", route="/jobs/{job_id}",
                        method="GET") > 100
    assert metric_value(text, "sana_queue_depth", model="tiny") == 0
    assert metric_value(text, "sana_queue_depth", model="tiny-causal") == 0
    wait_until(lambda: metric_value(stack.client.get("/metrics").text, "sana_websocket_viewers") == 0, 10,
               what="every viewer to be counted out")

    worker = httpx.get(stack.worker_metrics).text
    assert metric_value(worker, "sana_worker_jobs_total", model="tiny", outcome="succeeded") >= 100
    for name in ("sana_worker_step_duration_seconds_count", "sana_worker_block_duration_seconds_count",
                 "sana_worker_job_duration_seconds_count"):
        assert metric_value(worker, name, model="tiny", mode="clip") >= 100, name
    assert metric_value(worker, "sana_worker_frames_per_second", model="tiny") > 0
    assert metric_value(worker, "sana_worker_busy", model="tiny") == 0
    assert metric_value(worker, "sana_worker_gpu_memory_bytes", device="cpu") == 0
    assert metric_value(worker, "sana_worker_block_state_bytes", model="tiny") == 0  # clips keep no state
    assert metric_value(worker, "sana_worker_last_heartbeat_timestamp_seconds") > 1.7e9
