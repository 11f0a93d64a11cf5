"""The deployment against real processes: the API as its slim image runs it (no torch), a tiny-causal worker,
the example websocket clients, the container healthchecks, and every metric the Grafana dashboard queries.

Started once for the module: redis-server, ``sana-video api`` with the engine's libraries made unimportable
(what docker/Dockerfile.api installs), and one worker with its /metrics port.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, Proc, decode_mp4, free_port, wait_job, wait_until

sys.path.insert(0, str(ROOT / "docker"))
import requirements  # noqa: E402

pytestmark = pytest.mark.slow

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "sana-video.json"
MODEL = "tiny-causal"
# Import names of the distributions the API image leaves out.
IMPORT_NAMES = {"huggingface-hub": "huggingface_hub"}
BLOCKED_MODULES = sorted(IMPORT_NAMES.get(d, d) for d in requirements.ENGINE_ONLY)

SITECUSTOMIZE = f'''
import sys

BLOCKED = {BLOCKED_MODULES!r}


class NotInTheApiImage:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not installed in the API image)")
        return None


sys.meta_path.insert(0, NotInTheApiImage())
'''


@pytest.fixture(scope="module")
def stack(services, tmp_path_factory):
    services.defaults["SANA_MODEL"] = MODEL
    metrics_port = free_port()
    worker = services.worker(MODEL, metrics_port=metrics_port, wait=False)  # loads while the API starts

    blocker = tmp_path_factory.mktemp("api-image")
    (blocker / "sitecustomize.py").write_text(SITECUSTOMIZE)
    port = free_port()
    env = services.env(PYTHONPATH=f"{blocker}{os.pathsep}{ROOT}", SANA_PORT=str(port), SANA_HOST="127.0.0.1")
    # The image's entrypoint runs `sana-video api`, i.e. engine.cli's api command.
    api = Proc("slim-api", [sys.executable, "-m", "engine.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
               env, services.workdir)
    services.procs.append(api)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if not api.alive():
            raise AssertionError(f"the API without the engine's libraries exited:\n{api.log()}")
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, 60, what="API /healthz")
    services.wait_worker(worker)
    return SimpleNamespace(api=url, api_env=env, api_proc=api, worker=worker,
                           worker_metrics=f"http://127.0.0.1:{metrics_port}/metrics", services=services)


def test_the_api_process_really_runs_without_the_engine_libraries(stack):
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=stack.api_env, capture_output=True, text=True)
    assert probe.returncode != 0 and "not installed in the API image" in probe.stderr
    models = httpx.get(f"{stack.api}/models").json()
    assert MODEL in [m["name"] for m in models["models"]]


def run_python_client(stack, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "stream_client.py"), "--server", stack.api, "-q", *args],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )
    assert proc.returncode == 0, f"stream_client.py failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


def test_python_client_streams_a_video_to_a_file(stack, tmp_path):
    out = tmp_path / "ball.mp4"
    result = run_python_client(stack, "a red ball bouncing slowly", "-o", str(out), "--frames", "57", "--seed", "3")
    assert result["path"] == str(out) and not out.with_name("ball.mp4.part").exists()
    frames = decode_mp4(out)
    assert len(frames) == 57 == result["frames"]
    assert frames[0].shape == (64, 64, 3)
    job = httpx.get(f"{stack.api}/jobs/{result['id']}").json()
    assert job["status"] == "succeeded" and result["chunks"] == job["progress"]["blocks_total"]
    # What the client assembled from the stream is, byte for byte, the file the server keeps.
    assert out.read_bytes() == httpx.get(f"{stack.api}/jobs/{result['id']}/video").content


def test_python_client_replays_a_finished_job(stack, tmp_path):
    job = httpx.post(f"{stack.api}/generate", json={"prompt": "a blue square", "frames": 33}).json()
    with httpx.Client(base_url=stack.api) as client:
        assert wait_job(client, job["id"])["status"] == "succeeded"
    out = tmp_path / "replay.mp4"
    result = run_python_client(stack, "--job", job["id"], "-o", str(out))
    assert result["frames"] == 33 and len(decode_mp4(out)) == 33
    assert out.read_bytes() == httpx.get(f"{stack.api}/jobs/{job['id']}/video").content


def test_python_client_reports_a_rejected_request(stack, tmp_path):
    out = tmp_path / "bad.mp4"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "stream_client.py"), "--server", stack.api, "x", "-o", str(out),
         "--frames", "34"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "HTTP 422" in proc.stderr and "frames" in proc.stderr
    assert not out.exists() and not out.with_name("bad.mp4.part").exists()


def readme_snippet(language: str, holding: str) -> str:
    """The deployment section's one ``language`` block that holds ``holding``."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("<!-- deploy:start -->"):text.index("<!-- deploy:end -->")]
    (snippet,) = [s for s in re.findall(rf"```{language}\n(.*?)```", section, flags=re.S) if holding in s]
    return snippet


def run_snippet(snippet: str, tmp_path) -> subprocess.CompletedProcess:
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_readme_python_snippet_streams_a_video(stack, tmp_path):
    snippet = readme_snippet("python", "websockets")
    assert 'SERVER = "http://localhost:8000"' in snippet
    proc = run_snippet(snippet.replace('SERVER = "http://localhost:8000"', f'SERVER = "{stack.api}"'), tmp_path)
    assert proc.stdout.strip().endswith("done succeeded")
    assert len(decode_mp4(tmp_path / "fox.mp4")) == 33  # the model's default length


def test_readme_openai_sdk_snippet_makes_a_video(stack, tmp_path):
    """OpenAI's SDK against the API as its image runs it (python-multipart parses the SDK's form)."""
    snippet = readme_snippet("python", "from openai import OpenAI")
    for old, new in (('"http://localhost:8000/v1"', f'"{stack.api}/v1"'), ('"sana-video-480p"', f'"{MODEL}"'),
                     ('seconds="5"', 'seconds="2"'), ('size="832x480"', 'size="64x64"')):
        assert old in snippet
        snippet = snippet.replace(old, new)
    run_snippet("import warnings\nwarnings.simplefilter('ignore', DeprecationWarning)\n" + snippet, tmp_path)
    assert len(decode_mp4(tmp_path / "fox.mp4")) == 33  # 4k+1 nearest 2 s x 16 fps


def node_websocket_command() -> list[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (needed for the JavaScript client example)")
    probe = "process.exit(typeof WebSocket === 'function' ? 0 : 1)"
    for flags in ([], ["--experimental-websocket"]):
        if subprocess.run([node, *flags, "-e", probe], capture_output=True).returncode == 0:
            return [node, *flags]
    pytest.skip("this node has no WebSocket, even with --experimental-websocket (Node 22+ has it)")


def test_javascript_client_streams_a_video_to_a_file(stack, tmp_path):
    node = node_websocket_command()
    out = tmp_path / "js.mp4"
    proc = subprocess.run([*node, str(ROOT / "examples" / "stream_client.mjs"), "a green tree", str(out), "45"],
                          env=dict(os.environ, SANA_SERVER=stack.api), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"stream_client.mjs failed:\n{proc.stderr}"
    result = json.loads(proc.stdout)
    assert len(decode_mp4(out)) == 45
    assert out.read_bytes() == httpx.get(f"{stack.api}/jobs/{result['id']}/video").content


def test_container_healthchecks_pass_against_the_running_services(stack):
    script = str(ROOT / "docker" / "healthcheck.py")
    api_port = stack.api.rsplit(":", 1)[1]
    worker_port = stack.worker_metrics.split(":")[2].split("/")[0]
    api = subprocess.run([sys.executable, script, "api"], env={"SANA_PORT": api_port}, capture_output=True, text=True)
    assert api.returncode == 0, api.stderr
    worker = subprocess.run([sys.executable, script, "worker"], env={"SANA_WORKER_METRICS_PORT": worker_port,
                                                                     "SANA_HEARTBEAT_S": "0.5"},
                            capture_output=True, text=True)
    assert worker.returncode == 0, worker.stderr


# ------------------------------------------------------------------------------------------------ dashboard

_METRIC = re.compile(r"\b(sana_[a-z0-9_]+)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []

    def walk(panels):
        for panel in panels:
            queries.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def exported_samples(text: str) -> dict[str, set[str]]:
    """Sample name -> label names seen on it, from a Prometheus text exposition."""
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def test_dashboard_queries_cover_the_issue_list():
    names = {m.group(1) for q in dashboard_queries() for m in _METRIC.finditer(q)}
    wanted = ["sana_queue_depth", "sana_worker_job_duration_seconds_bucket", "sana_worker_step_duration_seconds_bucket",
              "sana_worker_block_duration_seconds_bucket", "sana_worker_frames_per_second",
              "sana_worker_realtime_factor", "sana_worker_gpu_memory_bytes", "sana_worker_block_state_bytes",
              "sana_worker_jobs_total", "sana_http_requests_total"]
    assert not [n for n in wanted if n not in names]


def test_every_metric_the_dashboard_queries_is_exported(stack):
    # At least one finished stream job (and a websocket viewer) so that every labelled series exists.
    job = httpx.post(f"{stack.api}/generate", json={"prompt": "a yellow sun", "frames": 33}).json()
    with httpx.Client(base_url=stack.api) as client:
        assert wait_job(client, job["id"])["status"] == "succeeded"
    exported = exported_samples(httpx.get(f"{stack.api}/metrics").text)
    exported.update(exported_samples(httpx.get(stack.worker_metrics).text))

    problems = []
    for query in dashboard_queries():
        labels_in_query: set[str] = set()
        for match in _METRIC.finditer(query):
            name, matchers = match.group(1), match.group(2) or ""
            if name not in exported:
                problems.append(f"{name} (in {query!r}) is not exported")
                continue
            labels_in_query |= exported[name]
            for label in _MATCHER.findall(matchers):
                if label not in exported[name]:
                    problems.append(f"{name} has no label {label!r} (in {query!r})")
        for group in _BY.findall(query):
            for label in filter(None, (g.strip() for g in group.split(","))):
                if label not in labels_in_query:
                    problems.append(f"no metric of {query!r} has the label {label!r} it groups by")
        for metric, label in re.findall(r"label_values\((sana_[a-z0-9_]+),\s*(\w+)\)", query):
            if label not in exported.get(metric, set()):
                problems.append(f"the dashboard variable reads label {label!r} of {metric}, which lacks it")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------------ prometheus

# Dashboard queries that are empty while nothing goes wrong (no 5xx answers in a healthy run).
EMPTY_WHEN_HEALTHY = ('status=~"5.."',)
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def test_prometheus_config_is_valid():
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    proc = subprocess.run([PROMTOOL, "check", "config", str(ROOT / "deploy" / "prometheus" / "prometheus.yml")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def prometheus_query(url: str, expr: str) -> list[dict]:
    answer = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", f"{expr!r}: {answer.get('error')}"
    return answer["data"]["result"]


def test_every_dashboard_panel_shows_data_in_a_real_prometheus(stack, tmp_path):
    """A real Prometheus scrapes the API and the worker while jobs run; then every dashboard query, as Grafana
    would send it, must parse and return data."""
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus)")
    worker_target = stack.worker_metrics.split("/")[2]
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [
            {"job_name": "sana-api", "static_configs": [{"targets": [stack.api.split("/")[2]]}]},
            {"job_name": "sana-worker", "static_configs": [{"targets": [worker_target]}]},
        ],
    }))
    port = free_port()
    proc = Proc("prometheus", [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{port}"], dict(os.environ), stack.services.workdir)
    stack.services.procs.append(proc)
    url = f"http://127.0.0.1:{port}"

    def targets_up() -> bool:
        if not proc.alive():
            raise AssertionError(f"prometheus exited:\n{proc.log()}")
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code != 200:
                return False  # still starting: the query API answers plain text until then
            return sum(float(r["value"][1]) for r in prometheus_query(url, "up")) == 2
        except httpx.HTTPError:
            return False

    wait_until(targets_up, 60, interval=0.5, what="prometheus to scrape the API and the worker")

    # Two jobs with scrapes between them: counters and histograms then have increases for rate().
    with httpx.Client(base_url=stack.api) as client:
        for prompt in ("a pink moon", "a cyan sea"):
            job = client.post("/generate", json={"prompt": prompt, "frames": 33}).json()
            assert wait_job(client, job["id"])["status"] == "succeeded"
            done = sum(sample.value for family in text_string_to_metric_families(httpx.get(stack.worker_metrics).text)
                       for sample in family.samples if sample.name == "sana_worker_jobs_total")
            wait_until(lambda: sum(float(r["value"][1]) for r in
                                   prometheus_query(url, "sana_worker_jobs_total")) >= done,
                       30, interval=0.5, what="prometheus to scrape the finished job")

    problems = []
    for expr in dashboard_queries():
        if expr.startswith("label_values("):
            metric, label = re.match(r"label_values\((\w+),\s*(\w+)\)", expr).groups()
            values = httpx.get(f"{url}/api/v1/label/{label}/values", params={"match[]": metric}).json()["data"]
            if MODEL not in values:
                problems.append(f"{expr}: {values}")
            continue
        query = expr.replace("$__rate_interval", "5m").replace("$model", ".*")
        result = prometheus_query(url, query)
        finite = [r for r in result if math.isfinite(float(r["value"][1]))]
        if not finite and not any(marker in expr for marker in EMPTY_WHEN_HEALTHY):
            problems.append(f"no data for {expr!r}: {result}")
    assert not problems, "\n".join(problems)
