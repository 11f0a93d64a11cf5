"""The compose stack: validated by Debian's docker-compose, then checked for what a GPU box relies on.

No Docker engine runs here: ``docker-compose config`` parses, interpolates and validates the file against
the Compose schema; the assertions below read its resolved output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "sana-video.json"

WORKERS = ("worker", "worker-gpu1")


def settings_env_names() -> set[str]:
    """The environment variable of every settings field (REDIS_URL has its conventional name)."""
    prefix = Settings.model_config.get("env_prefix", "")
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        names.add(choices[0] if choices else (alias or f"{prefix}{name}".upper()))
    return names


def compose_config(*args: str, env: dict[str, str] | None = None) -> dict:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (Debian: apt-get install docker-compose)")
    # Only variables the test sets reach the interpolation, not whatever the developer's shell exports.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SANA_", "GRAFANA_", "PROMETHEUS_", "HF_"))}
    clean.update(env or {})
    proc = subprocess.run(
        [binary, "-f", str(COMPOSE), *args, "config"],
        cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, f"docker-compose config failed:\n{proc.stderr}"
    return yaml.safe_load(proc.stdout)


@pytest.fixture(scope="module")
def config() -> dict:
    return compose_config()


@pytest.fixture(scope="module")
def multi_gpu() -> dict:
    return compose_config("--profile", "multi-gpu")


def container_mounts(service: dict) -> dict[str, dict]:
    """Mounts by container path, as {type, source, target}; docker-compose v1 prints the short syntax."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            kind = "bind" if source.startswith(("/", ".")) else "volume"
            volume = {"type": kind, "source": source, "target": target}
        mounts[volume["target"]] = volume
    return mounts


def test_services_and_profiles(config, multi_gpu):
    # (docker-compose v1 lists profiled services in `config` too; v2 only those of active profiles.)
    default = {name for name, s in config["services"].items() if not s.get("profiles")}
    assert default == {"redis", "api", "worker", "prometheus", "grafana"}
    assert set(multi_gpu["services"]) == default | {"worker-gpu1"}
    assert multi_gpu["services"]["worker-gpu1"]["profiles"] == ["multi-gpu"]
    for service in ("redis", "api", "worker"):
        assert "healthcheck" in config["services"][service], f"{service} has no healthcheck"
    assert config["services"]["api"]["ports"][0]["published"] in (8000, "8000")


def test_redis_persists_with_aof(config):
    redis = config["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert container_mounts(redis)["/data"]["type"] == "volume"


def test_each_worker_reserves_its_own_gpu(multi_gpu):
    seen = []
    for name in WORKERS:
        devices = multi_gpu["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
        seen += devices[0]["device_ids"]
        # Inside the container the reserved GPU is the only one: cuda:0.
        assert multi_gpu["services"][name]["environment"]["SANA_WORKER_DEVICE"] == "cuda:0"
    assert seen == ["0", "1"]


def test_worker_gpu_model_and_precision_come_from_the_environment():
    env = {"SANA_WORKER_GPU": "3", "SANA_MODEL": "sana-video-720p", "SANA_WORKER_PRECISION": "nvfp4",
           "HF_TOKEN": "hf_example", "SANA_MAX_FRAMES": "321"}
    worker = compose_config(env=env)["services"]["worker"]
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["3"]
    assert worker["environment"]["SANA_MODEL"] == "sana-video-720p"
    assert worker["environment"]["SANA_WORKER_PRECISION"] == "nvfp4"
    assert worker["environment"]["HF_TOKEN"] == "hf_example"
    assert worker["environment"]["SANA_MAX_FRAMES"] == "321"


def test_every_setting_reaches_the_containers(multi_gpu):
    services = multi_gpu["services"]
    env_keys = set(services["api"]["environment"]) | set(services["worker"]["environment"])
    missing = settings_env_names() - env_keys
    assert not missing, f"settings the compose file cannot pass to the containers: {sorted(missing)}"
    for name in ("api", *WORKERS):
        assert services[name]["environment"]["REDIS_URL"].startswith("redis://redis:")


def test_shared_volumes(multi_gpu):
    services = multi_gpu["services"]
    output_dirs = set()
    for name in ("api", *WORKERS):
        output_dir = services[name]["environment"]["SANA_OUTPUT_DIR"]
        mount = container_mounts(services[name]).get(output_dir)
        assert mount and mount["type"] == "volume", f"{name}: {output_dir} is not on a named volume"
        output_dirs.add(mount["source"])
    assert len(output_dirs) == 1, "the API and the workers must share one outputs volume"
    for name in WORKERS:
        cache = container_mounts(services[name]).get("/home/app/.cache/huggingface")
        assert cache and cache["type"] == "volume"
    caches = {container_mounts(services[n])["/home/app/.cache/huggingface"]["source"] for n in WORKERS}
    assert len(caches) == 1, "workers should share one Hugging Face cache (weights downloaded once)"


def test_prometheus_scrapes_the_api_and_every_worker(multi_gpu):
    services = multi_gpu["services"]
    scrape = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    api_sd = jobs["sana-api"]["dns_sd_configs"][0]
    assert api_sd["names"] == ["api"] and str(api_sd["port"]) == services["api"]["environment"]["SANA_PORT"]
    worker_sd = jobs["sana-worker"]["dns_sd_configs"][0]
    (alias,) = worker_sd["names"]
    for name in WORKERS:
        worker = services[name]
        assert alias in worker["networks"]["default"]["aliases"], f"{name} is not discoverable as {alias}"
        assert str(worker_sd["port"]) == worker["environment"]["SANA_WORKER_METRICS_PORT"]
    prometheus = services["prometheus"]
    mount = container_mounts(prometheus)["/etc/prometheus/prometheus.yml"]
    assert Path(mount["source"]) == PROMETHEUS


def test_grafana_provisioning_points_at_the_dashboard(config):
    grafana = config["services"]["grafana"]
    mounts = container_mounts(grafana)
    provisioning = Path(mounts["/etc/grafana/provisioning"]["source"])
    providers = yaml.safe_load((provisioning / "dashboards" / "sana-video.yml").read_text())["providers"]
    dashboards_in_container = providers[0]["options"]["path"]
    host_dir = Path(mounts[dashboards_in_container]["source"])
    assert (host_dir / DASHBOARD.name).read_text() == DASHBOARD.read_text()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_in_container}/{DASHBOARD.name}"

    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    (datasource,) = datasources
    assert datasource["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    used = {json.dumps(p["datasource"], sort_keys=True) for p in dashboard["panels"] if "datasource" in p}
    assert used == {json.dumps({"type": "prometheus", "uid": datasource["uid"]}, sort_keys=True)}
