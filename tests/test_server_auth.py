"""API keys: with SANA_API_KEYS set, every route but health and metrics needs a key, and a key sees only its
own jobs (others' are 404, as if they did not exist). No worker runs here: the jobs stay queued."""

from __future__ import annotations

import httpx
import pytest
from conftest import read_stream, wait_until
from websockets.exceptions import InvalidStatus

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ALICE, BOB = "key-alice", "key-bob"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def api(services):
    return services.api(SANA_API_KEYS=f"{ALICE}, {BOB}")


@pytest.fixture(scope="module")
def alice_job(api):
    r = httpx.post(f"{api}/generate", json={"prompt": "a cat"}, headers=bearer(ALICE))
    assert r.status_code == 202
    return r.json()["id"]


def test_health_and_metrics_need_no_key(api):
    assert httpx.get(f"{api}/healthz").status_code == 200
    assert httpx.get(f"{api}/metrics").status_code == 200
    assert httpx.get(f"{api}/readyz").status_code == 503  # answers (no worker), without a key


@pytest.mark.parametrize("headers", [{}, bearer("wrong"), {"Authorization": f"Basic {ALICE}"}])
def test_missing_or_wrong_key_is_401(api, alice_job, headers):
    for method, path in [("POST", "/generate"), ("GET", f"/jobs/{alice_job}"), ("DELETE", f"/jobs/{alice_job}"),
                         ("GET", f"/jobs/{alice_job}/video"), ("GET", "/models"), ("POST", "/v1/videos"),
                         ("GET", f"/v1/videos/{alice_job}"), ("GET", f"/v1/videos/{alice_job}/content"),
                         ("DELETE", f"/v1/videos/{alice_job}")]:
        r = httpx.request(method, f"{api}{path}", headers=headers, json={"prompt": "a dog"})
        assert r.status_code == 401, (method, path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    with pytest.raises(InvalidStatus) as info:
        read_stream(api, alice_job, headers=headers)
    assert info.value.response.status_code == 401


def test_another_keys_job_is_404(api, alice_job):
    for method, path in [("GET", f"/jobs/{alice_job}"), ("DELETE", f"/jobs/{alice_job}"),
                         ("GET", f"/jobs/{alice_job}/video"), ("GET", f"/v1/videos/{alice_job}"),
                         ("GET", f"/v1/videos/{alice_job}/content"), ("DELETE", f"/v1/videos/{alice_job}")]:
        r = httpx.request(method, f"{api}{path}", headers=bearer(BOB))
        assert r.status_code == 404, (method, path, r.text)
    with pytest.raises(InvalidStatus) as info:
        read_stream(api, alice_job, headers=bearer(BOB))
    assert info.value.response.status_code == 404
    # Bob's attempts changed nothing.
    job = httpx.get(f"{api}/jobs/{alice_job}", headers=bearer(ALICE)).json()
    assert job["status"] == "queued" and job["cancel_requested"] is False


def test_the_owner_sees_its_job_by_header_or_media_token(api, alice_job):
    assert httpx.get(f"{api}/jobs/{alice_job}", headers=bearer(ALICE)).json()["id"] == alice_job
    video = httpx.get(f"{api}/jobs/{alice_job}/video", headers=bearer(ALICE))
    assert video.status_code == 409 and video.json()["status"] == "queued"
    # Browsers cannot set headers on <video> or WebSocket: the media routes take ?access_token= too.
    assert httpx.get(f"{api}/jobs/{alice_job}/video?access_token={ALICE}").status_code == 409
    assert httpx.get(f"{api}/jobs/{alice_job}?access_token={ALICE}").status_code == 401  # not a media route
    first = read_stream(api, alice_job, headers=bearer(ALICE), stop=lambda e: True)
    assert first[0][0] == {"type": "status", "status": "queued", "attempt": 0, "progress": None, "from_chunk": 0}
    by_token = read_stream(api, alice_job, access_token=ALICE, stop=lambda e: True)
    assert by_token[0][0]["status"] == "queued"


def test_owner_can_cancel_its_job(api, alice_job):
    r = httpx.delete(f"{api}/jobs/{alice_job}", headers=bearer(ALICE))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"


def test_keys_in_urls_stay_out_of_the_log(api, alice_job, services):
    """Browsers and websockets send the key as ?access_token=: the API's access log must not keep it."""
    assert httpx.get(f"{api}/jobs/{alice_job}/video", params={"access_token": ALICE}).status_code == 409
    read_stream(api, alice_job, access_token=ALICE, stop=lambda event: True)
    port = api.rsplit(":", 1)[1]
    proc = next(p for p in services.procs if p.name == f"api-{port}")
    log = wait_until(lambda: proc.log() if proc.log().count("access_token=[redacted]") >= 2 else None, 10,
                     what="the access log lines")
    assert ALICE not in log
