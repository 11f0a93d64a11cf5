"""The deployment section of the README stays true: its configuration table is the settings class, every
variable the compose file reads is documented, and the files it points at exist. (Its Python and JavaScript
snippets run against a live server in test_deploy_stack.py and test_web_page.py.)"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "deploy"))
import config_table  # noqa: E402


def deploy_section() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("<!-- deploy:start -->"):text.index("<!-- deploy:end -->")]


def documented_variables(section: str) -> set[str]:
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]*)` \|", section, flags=re.M))


def test_configuration_table_is_generated_from_the_settings():
    section = deploy_section()
    table = section[section.index(config_table.START) + len(config_table.START):section.index(config_table.END)]
    assert table.strip() == config_table.render(), "README table is stale: run python deploy/config_table.py --write"
    for name, field in Settings.model_fields.items():
        assert f"| `{config_table.env_name(name, field)}` |" in table, name


def compose_variables() -> set[str]:
    """Variables the compose file interpolates (${VAR...}) or passes through from the environment (VAR: null)."""
    text = (ROOT / "docker-compose.yml").read_text()
    names = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", text))
    compose = yaml.safe_load(text)
    for key, value in compose.items():
        if key.startswith("x-") and isinstance(value, dict):
            env = value.get("environment", value)
            names |= {k for k, v in env.items() if v is None and k.isupper()}
    return names


def test_every_variable_the_deployment_reads_is_documented():
    documented = documented_variables(deploy_section())
    scripts = " ".join(p.read_text() for p in (ROOT / "docker").glob("entrypoint-*.sh"))
    read = compose_variables() | set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", scripts))
    missing = sorted(read - documented)
    assert not missing, f"variables read by docker-compose.yml or docker/ but not in the README: {missing}"
    settings = {config_table.env_name(n, f) for n, f in Settings.model_fields.items()}
    unused = sorted(documented - read - settings)
    assert not unused, f"README documents variables nothing reads: {unused}"


def test_paths_the_section_names_exist():
    section = deploy_section()
    paths = set(re.findall(r"`((?:examples|server|deploy|docker)/[\w./-]+)`", section))
    assert {"examples/stream_client.py", "server/static/app.js"} <= paths
    for path in paths:
        assert (ROOT / path).exists(), path
