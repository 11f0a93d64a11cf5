"""The API and worker images, checked without a Docker engine: build context, users, healthchecks, entrypoints,
the dependency split between the images, and the healthcheck script against real HTTP servers."""

from __future__ import annotations

import http.server
import re
import shlex
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {"api": ROOT / "docker" / "Dockerfile.api", "worker": ROOT / "docker" / "Dockerfile.worker"}

sys.path.insert(0, str(ROOT / "docker"))
import healthcheck  # noqa: E402
import requirements  # noqa: E402


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + "$")


def ignored(path: str) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; a matched folder hides its contents."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in dockerignore_patterns():
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!"))
        if any(regex.match(p) for p in prefixes):
            result = not negate
    return result


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_copy_sources_exist_and_reach_the_build_context(image):
    copies = [args for keyword, args in instructions(DOCKERFILES[image]) if keyword == "COPY"]
    assert copies
    for args in copies:
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"{image}: COPY {source}: no such path in the repository"
            assert not ignored(source), f"{image}: COPY {source}: excluded by .dockerignore"


def test_the_worker_image_has_every_package_of_the_project():
    """quantize --model demo reads its calibration captions from training/: a package missing from the image is a
    ModuleNotFoundError there only."""
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {shlex.split(args)[0] for keyword, args in instructions(DOCKERFILES["worker"]) if keyword == "COPY"}
    assert {p.rstrip("*") for p in packages} <= copied


def test_dockerignore_keeps_the_context_small():
    for path in (".git/HEAD", "tests/test_deploy_images.py", "test-artifacts/page.png", "outputs/x.mp4",
                 "engine/__pycache__/model.cpython-311.pyc", "benchmarks/results/run.json"):
        assert ignored(path), f"{path} would be sent to the Docker daemon"
    for path in ("pyproject.toml", "README.md", "engine/model.py", "server/static/app.js", "docker/healthcheck.py",
                 "engine/weights/demo/transformer/diffusion_pytorch_model.safetensors"):
        assert not ignored(path), f"{path} is needed by the images but ignored"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_runs_as_a_non_root_user_with_a_healthcheck(image):
    steps = instructions(DOCKERFILES[image])
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{image} image runs as root"
    keywords = [keyword for keyword, _ in steps]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN"), (
        f"{image}: install steps should run before switching to the unprivileged user"
    )
    (health,) = [args for keyword, args in steps if keyword == "HEALTHCHECK"]
    assert f'"{image}"' in health and "docker/healthcheck.py" in health


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_entrypoint_scripts_are_valid_shell(image):
    (entrypoint,) = [args for keyword, args in instructions(DOCKERFILES[image]) if keyword == "ENTRYPOINT"]
    script = ROOT / "docker" / Path(entrypoint.strip('[]" ')).name
    assert script.exists()
    subprocess.run(["sh", "-n", str(script)], check=True)
    mode = subprocess.run(["git", "ls-files", "-s", str(script.relative_to(ROOT))], cwd=ROOT,
                          capture_output=True, text=True).stdout.split()
    if mode:  # committed: git must record it executable (the image also chmods it)
        assert mode[0] == "100755"
    # With arguments the container runs them instead of the service (`docker compose run worker sh`).
    out = subprocess.run(["sh", str(script), "echo", "passed through"], capture_output=True, text=True)
    assert out.stdout.strip() == "passed through"


def test_worker_entrypoint_runs_the_worker_command_from_the_environment(tmp_path):
    # A stand-in `sana-video` on PATH records the command line the entrypoint builds.
    fake = tmp_path / "sana-video"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "SANA_MODEL": "sana-video-480p-longlive",
           "SANA_WORKER_PRECISION": "nvfp4", "SANA_WORKER_METRICS_PORT": "9200"}
    out = subprocess.run(["sh", str(ROOT / "docker" / "entrypoint-worker.sh")], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["worker", "--model", "sana-video-480p-longlive", "--device", "cuda:0",
                   "--precision", "nvfp4", "--metrics-port", "9200"]

    # Under an NVIDIA base image the command passes through NVIDIA's entrypoint first, exactly once.
    nvidia = tmp_path / "nvidia_entrypoint.sh"
    nvidia.write_text('#!/bin/sh\necho nvidia-entrypoint\nexec "$@"\n')
    nvidia.chmod(0o755)
    env["NVIDIA_ENTRYPOINT"] = str(nvidia)
    out = subprocess.run(["sh", str(ROOT / "docker" / "entrypoint-worker.sh")], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "nvidia-entrypoint" and out[1:4] == ["worker", "--model", "sana-video-480p-longlive"]
    assert out.count("nvidia-entrypoint") == 1
    env.pop("SANA_MODEL")
    failed = subprocess.run(["sh", str(ROOT / "docker" / "entrypoint-worker.sh")], env=env,
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "SANA_MODEL" in failed.stderr


def test_image_requirements_come_from_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = pyproject["project"]["dependencies"]
    api = requirements.requirements(pyproject, "api")
    worker = requirements.requirements(pyproject, "worker")
    api_names = {requirements.distribution(d) for d in api}
    assert {"fastapi", "uvicorn", "redis", "rq", "prometheus-client", "pydantic-settings"} <= api_names
    assert not api_names & requirements.ENGINE_ONLY
    assert set(deps) <= set(worker)
    assert set(pyproject["project"]["optional-dependencies"]["quant"]) <= set(worker)
    # Everything the API leaves out is a real dependency name (a typo would silently keep it in the image).
    assert requirements.ENGINE_ONLY <= {requirements.distribution(d) for d in deps}


class _Metrics(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802 (http.server API)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def metrics_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def run_healthcheck(kind: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "docker" / "healthcheck.py"), kind],
                          env=env, capture_output=True, text=True, timeout=30)


def test_worker_healthcheck_requires_a_recent_heartbeat(metrics_server):
    env = {"SANA_WORKER_METRICS_PORT": str(metrics_server.server_address[1]), "SANA_HEARTBEAT_S": "5"}
    name = healthcheck.HEARTBEAT
    _Metrics.body = f"# TYPE {name} gauge\n{name} {time.time() - 2:.3f}\n".encode()
    assert run_healthcheck("worker", env).returncode == 0
    _Metrics.body = f"# TYPE {name} gauge\n{name} {time.time() - 600:.9e}\n".encode()
    stale = run_healthcheck("worker", env)
    assert stale.returncode == 1 and "heartbeat" in stale.stderr
    _Metrics.body = f"# TYPE {name} gauge\n{name} 0.0\n".encode()  # loading: no heartbeat yet
    assert run_healthcheck("worker", env).returncode == 0


def test_healthchecks_fail_when_nothing_listens(metrics_server):
    port = metrics_server.server_address[1]
    metrics_server.shutdown()
    metrics_server.server_close()
    for kind, var in (("api", "SANA_PORT"), ("worker", "SANA_WORKER_METRICS_PORT")):
        result = run_healthcheck(kind, {var: str(port)})
        assert result.returncode == 1 and "unhealthy" in result.stderr
