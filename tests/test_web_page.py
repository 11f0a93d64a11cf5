"""The web page at / in headless Chromium against a real API and a tiny-causal worker: submit from the form,
watch the progress bar, play the stream through MediaSource while the job is still generating, download the
MP4, find the job again in the recent list; with an API key too.

Screenshots are kept in test-artifacts/ (web-live-playback.png while the stream plays, web-finished.png).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from conftest import ROOT, decode_mp4, wait_until

pytestmark = pytest.mark.slow

ARTIFACTS = ROOT / "test-artifacts"
MODEL = "tiny-causal"
CLIP_MODEL = "tiny"  # bidirectional: whole clips
API_KEY = "page-test-key"
# Long enough (11 blocks, about a second each on CPU) that the first blocks play well before the last is made.
LIVE_FRAMES = 129
FPS = 16

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    profile = tempfile.mkdtemp(prefix="sana-web-test-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--mute-audio",
                f"--user-data-dir={profile}", "--autoplay-policy=no-user-gesture-required", "--window-size=1280,1100"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def site(services):
    services.defaults["SANA_MODEL"] = MODEL
    workers = [services.worker(MODEL, wait=False), services.worker(CLIP_MODEL, wait=False)]  # load meanwhile
    open_api = services.api()
    keyed_api = services.api(SANA_API_KEYS=API_KEY)
    for worker in workers:
        services.wait_worker(worker)
    return {"open": open_api, "keyed": keyed_api}


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def page_state(driver) -> dict:
    return js(driver, """
        const v = document.getElementById('player');
        const job = window.sanaPage && window.sanaPage.job;
        return {
          currentTime: v.currentTime, readyState: v.readyState, paused: v.paused, ended: v.ended,
          duration: v.duration, bufferedEnd: v.buffered.length ? v.buffered.end(v.buffered.length - 1) : 0,
          status: job && job.status, streamDone: job && job.streamDone, chunks: job && job.chunksReceived,
          jobId: job && job.id, progress: document.getElementById('progress').value,
          error: document.getElementById('job-error').textContent,
        };""")


def page_log(driver, kind: str | None = None) -> list[dict]:
    log = js(driver, "return window.sanaPage ? window.sanaPage.log : []")
    return [e for e in log if kind is None or e["kind"] == kind]


def console(driver) -> str:
    try:
        return "\n".join(e["message"] for e in driver.get_log("browser"))
    except Exception:  # noqa: BLE001 (only for failure messages)
        return ""


def wait_page(driver, predicate, timeout: float, what: str) -> dict:
    """Poll the page until ``predicate(state)`` holds; returns that state."""
    def reached():
        state = page_state(driver)
        return state if predicate(state) else None

    try:
        return wait_until(reached, timeout, interval=0.1, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\npage: {page_state(driver)}\nconsole:\n{console(driver)}") from None


def open_page(driver, base: str) -> None:
    driver.get(base + "/")
    wait_until(lambda: js(driver, "return document.getElementById('model').options.length > 0 || "
                                  "document.getElementById('form-error').textContent !== ''"),
               30, what="the model list")


def fill(driver, **fields) -> None:
    for name, value in fields.items():
        element = driver.find_element(By.ID, name)
        element.clear()
        element.send_keys(str(value))


def screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path


def test_browser_plays_h264_through_media_source(browser, site):
    open_page(browser, site["open"])
    supported = js(browser, "return MediaSource.isTypeSupported('video/mp4; codecs=\"avc1.64001f\"')")
    assert supported, ("this Chromium cannot play H.264 through MediaSource: install a build with proprietary "
                       "codecs (Debian's `chromium` package has them)")


def test_form_shows_the_served_model_and_its_defaults(browser, site):
    open_page(browser, site["open"])
    models = httpx.get(f"{site['open']}/models").json()
    (served,) = [m for m in models["models"] if m["name"] == MODEL]
    assert js(browser, "return document.getElementById('model').value") == MODEL
    for field in ("width", "height", "frames", "fps", "steps"):
        value = js(browser, f"return document.getElementById('{field}').value")
        assert value == str(served["defaults"][field]), field
    checked = js(browser, "return document.querySelector('input[name=mode]:checked').value")
    assert checked == served["defaults"]["mode"] == "stream"
    assert "block-causal" in browser.find_element(By.ID, "limits").text


def test_video_plays_while_the_job_is_still_generating(browser, site):
    base = site["open"]
    open_page(browser, base)
    fill(browser, prompt="a red ball bouncing slowly", frames=LIVE_FRAMES, seed=7)
    browser.find_element(By.ID, "submit").click()

    # Playback has started (the clock moves) ...
    state = wait_page(browser, lambda s: s["currentTime"] > 0 and s["jobId"], 90, "the video to start playing")
    job = httpx.get(f"{base}/jobs/{state['jobId']}").json()
    screenshot(browser, "web-live-playback.png")
    # ... while the server is still generating: the job runs and has blocks left to make.
    assert job["status"] == "running", job
    assert job["chunks"] < job["progress"]["blocks_total"], job
    playing = page_log(browser, "video-playing")
    assert playing and playing[0]["streamDone"] is False and playing[0]["status"] == "running", playing
    assert page_log(browser, "media-segment")[0]["status"] == "running"
    assert 0 < state["progress"] < 1

    # A dropped websocket resumes from the next chunk: nothing is lost or played twice.
    js(browser, "window.sanaPage.job.socket.close()")
    wait_until(lambda: len(page_log(browser, "ws-open")) == 2, 30, what="the page to reconnect")
    resumed_from = page_log(browser, "ws-open")[1]["from_chunk"]
    assert resumed_from >= 1

    # The stream plays to its end: every frame was appended, then endOfStream.
    final = wait_page(browser, lambda s: s["ended"], 120, "the streamed video to play to its end")
    assert final["status"] == "succeeded" and final["progress"] == 1
    assert abs(final["bufferedEnd"] - LIVE_FRAMES / FPS) < 1.5 / FPS, final
    assert final["chunks"] == job["progress"]["blocks_total"]
    indices = [e["index"] for e in page_log(browser, "media-segment")]
    assert indices == list(range(job["progress"]["blocks_total"])), indices
    assert len(page_log(browser, "init-segment")) == 1
    assert browser.find_element(By.ID, "job-status").text == "succeeded"
    screenshot(browser, "web-finished.png")

    # Download button: the finished MP4, every frame.
    link = browser.find_element(By.ID, "download")
    assert link.is_displayed()
    video = httpx.get(urljoin(base + "/", link.get_attribute("href")))
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert len(decode_mp4(video.content)) == LIVE_FRAMES

    # Recent jobs: listed with its final status, and still there after a reload.
    item = browser.find_element(By.CSS_SELECTOR, f"#recent li[data-job-id='{state['jobId']}']")
    assert "succeeded" in item.text and "a red ball bouncing slowly" in item.text
    browser.refresh()
    item = wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, f"#recent li[data-job-id='{state['jobId']}']"),
                      10, what="the recent job after a reload")[0]
    item.find_element(By.TAG_NAME, "button").click()
    replay = wait_page(browser, lambda s: s["readyState"] >= 1 and s["duration"] > 0, 30, "the finished video to load")
    assert abs(replay["duration"] - LIVE_FRAMES / FPS) < 1.5 / FPS


def test_a_clip_model_plays_its_clip_when_done(browser, site):
    open_page(browser, site["open"])
    Select(browser.find_element(By.ID, "model")).select_by_value(CLIP_MODEL)
    modes = js(browser, "return [...document.querySelectorAll('input[name=mode]')]"
                        ".map((r) => [r.value, r.checked, r.disabled])")
    assert sorted(modes) == [["clip", True, False], ["stream", False, True]]
    assert "bidirectional" in browser.find_element(By.ID, "limits").text
    fill(browser, prompt="a white cat sleeping", frames=33)
    browser.find_element(By.ID, "submit").click()
    state = wait_page(browser, lambda s: s["ended"], 90, "the clip to play to its end")
    assert state["status"] == "succeeded" and state["progress"] == 1
    assert abs(state["bufferedEnd"] - 33 / FPS) < 1.5 / FPS
    job = httpx.get(f"{site['open']}/jobs/{state['jobId']}").json()
    assert job["model"] == CLIP_MODEL and job["params"]["mode"] == "clip"
    assert state["chunks"] == job["chunks"] >= 1


def test_cancel_button_stops_a_running_job(browser, site):
    base = site["open"]
    open_page(browser, base)
    fill(browser, prompt="a slow gray car", frames=801)
    browser.find_element(By.ID, "submit").click()
    wait_page(browser, lambda s: s["status"] == "running", 60, "the job to run")
    browser.find_element(By.ID, "cancel").click()
    state = wait_page(browser, lambda s: s["status"] == "cancelled", 60, "the job to be cancelled")
    assert httpx.get(f"{base}/jobs/{state['jobId']}").json()["status"] == "cancelled"
    assert "cancel" in state["error"]
    assert not browser.find_element(By.ID, "download").is_displayed()


def test_readme_javascript_snippet_plays_in_the_browser(browser, site):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("<!-- deploy:start -->"):text.index("<!-- deploy:end -->")]
    (snippet,) = re.findall(r"```js\n(.*?)```", section, flags=re.S)
    open_page(browser, site["open"])
    js(browser, "window.__snippet = (async () => {" + snippet + "})().then(() => 'ok', (e) => String(e));")
    state = wait_page(browser, lambda s: s["ended"], 60, "the README snippet's video to play to its end")
    assert abs(state["bufferedEnd"] - 33 / FPS) < 1.5 / FPS  # the model's default length
    assert browser.execute_async_script("window.__snippet.then(arguments[0])") == "ok"


def test_with_an_api_key(browser, site):
    base = site["keyed"]
    browser.get(base + "/")
    js(browser, "localStorage.clear()")
    open_page(browser, base)
    assert "API key" in browser.find_element(By.ID, "form-error").text
    browser.find_element(By.CSS_SELECTOR, "details summary").click()
    key = browser.find_element(By.ID, "api-key")
    key.send_keys(API_KEY)
    js(browser, "arguments[0].dispatchEvent(new Event('change'))", key)
    wait_until(lambda: js(browser, "return document.getElementById('model').value") == MODEL, 10,
               what="models listed with the key")

    fill(browser, prompt="a blue circle moving left", frames=33)
    browser.find_element(By.ID, "submit").click()
    state = wait_page(browser, lambda s: s["status"] == "succeeded" and s["ended"], 90, "the keyed job to play")
    assert state["chunks"] > 0  # it streamed over the websocket (the key rides as ?access_token=)
    href = browser.find_element(By.ID, "download").get_attribute("href")
    assert f"access_token={API_KEY}" in href
    assert httpx.get(href).status_code == 200
    assert httpx.get(href.split("?")[0]).status_code == 401
