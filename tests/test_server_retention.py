"""Output retention: a finished video is deleted with its job record (SANA_RESULT_TTL_S after the job ended), by the
API's sweep; nothing younger than the retention time and nothing with a live record is touched."""

from __future__ import annotations

import os
import time
import uuid

import httpx
import pytest
from conftest import decode_mp4, metric_value, wait_job, wait_until

from workers import jobs, output

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_sweep_deletes_only_expired_outputs(services, tmp_path):
    r = services.redis.client()
    folder = tmp_path / "outputs"
    folder.mkdir()
    ttl, now = 3600.0, time.time()

    def make(name: str, age_s: float, record: bool = False):
        path = folder / name
        path.write_bytes(b"\x00" * 64)
        os.utime(path, (now - age_s, now - age_s))
        if record:
            r.hset(jobs.job_key(name.split(".")[0]), mapping={"id": name.split(".")[0], "status": "succeeded"})
        return path

    ids = [uuid.uuid4().hex for _ in range(5)]
    expired = make(f"{ids[0]}.mp4", ttl + 60)
    lost_attempt = make(f"{ids[1]}.2.mp4.partial", ttl + 60)
    recorded = make(f"{ids[2]}.mp4", 10 * ttl, record=True)  # its record still exists: kept, whatever its age
    young = make(f"{ids[3]}.mp4", ttl - 60)  # no record (Redis lost its data?) but inside the retention time: kept
    other = make("notes.mp4", 10 * ttl)  # not a job's file
    (folder / f"{ids[4]}.mp4").mkdir()  # not a file
    os.utime(folder / f"{ids[4]}.mp4", (now - 10 * ttl, now - 10 * ttl))

    deleted = output.sweep_expired(r, folder, ttl, now=now)

    assert sorted(deleted) == sorted([expired, lost_attempt])
    assert not expired.exists() and not lost_attempt.exists()
    assert recorded.exists() and young.exists() and other.exists() and (folder / f"{ids[4]}.mp4").is_dir()
    assert output.sweep_expired(r, folder, ttl, now=now) == []
    assert output.sweep_expired(r, tmp_path / "missing", ttl) == []
    r.close()


def test_a_video_goes_with_its_record(services):
    api = services.api(SANA_RESULT_TTL_S="10", SANA_OUTPUT_SWEEP_S="1", SANA_STREAM_TTL_S="10")
    worker = services.worker("tiny", SANA_RESULT_TTL_S="10", SANA_STREAM_TTL_S="10")
    client = httpx.Client(base_url=api, timeout=30)
    job_id = client.post("/generate", json={"prompt": "a green square", "frames": 9, "width": 64,
                                             "height": 64, "seed": 3}).json()["id"]
    job = wait_job(client, job_id, timeout=120)
    assert job["status"] == "succeeded", job
    path = services.output_dir / f"{job_id}.mp4"
    assert path.is_file()
    assert len(decode_mp4(client.get(f"/jobs/{job_id}/video").content)) == 9
    expires_at = client.get(f"/v1/videos/{job_id}").json()["expires_at"]
    assert expires_at is not None and -1 < expires_at - time.time() <= 10.5

    wait_until(lambda: not path.exists(), 30, interval=0.2, what=f"{path.name} to be deleted after its record expired")
    assert time.time() >= expires_at - 1  # not before the expiry the API announced
    assert client.get(f"/jobs/{job_id}").status_code == 404
    assert client.get(f"/jobs/{job_id}/video").status_code == 404
    assert metric_value(client.get("/metrics").text, "sana_outputs_expired_total") >= 1
    client.close()
    worker.stop()


def test_sweep_zero_keeps_every_file(services, tmp_path):
    folder = tmp_path / "kept"
    folder.mkdir()
    path = folder / f"{uuid.uuid4().hex}.mp4"
    path.write_bytes(b"\x00" * 64)
    os.utime(path, (time.time() - 3600, time.time() - 3600))  # no record, older than the retention time
    api = services.api(SANA_OUTPUT_DIR=str(folder), SANA_RESULT_TTL_S="1", SANA_OUTPUT_SWEEP_S="0")
    time.sleep(3)  # a sweeping API deletes such a file at once (test above)
    assert path.exists()
    assert metric_value(httpx.get(f"{api}/metrics").text, "sana_outputs_expired_total") == 0
