"""The README configuration table, generated from the settings class (server/settings.py).

    python deploy/config_table.py            # print the table
    python deploy/config_table.py --write    # replace it in README.md, between the config-table markers

tests/test_deploy_readme.py fails when the README's table differs from this output.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from server.settings import Settings  # noqa: E402

README = ROOT / "README.md"
START = "<!-- config-table:start -->"
END = "<!-- config-table:end -->"


def env_name(name: str, field) -> str:
    """The environment variable of a settings field: its first alias, else the prefixed field name."""
    choices = getattr(field.validation_alias, "choices", None)
    if choices:
        return str(choices[0])
    if isinstance(field.validation_alias, str):
        return field.validation_alias
    return f"{Settings.model_config.get('env_prefix', '')}{name}".upper()


def default_text(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if value is None:
        return "*(unset)*"
    if value in ([], "", ()):
        return "*(empty)*"
    return f"`{value}`"


def rows() -> list[tuple[str, str, str]]:
    return [(env_name(name, field), default_text(field), markdown_text(field.description or ""))
            for name, field in Settings.model_fields.items()]


def markdown_text(text: str) -> str:
    """Table-cell safe: no column breaks, and <placeholders> shown rather than taken for HTML tags."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def render() -> str:
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    lines += [f"| `{var}` | {default} | {meaning} |" for var, default, meaning in rows()]
    return "\n".join(lines)


def replace_table(text: str, table: str) -> str:
    start, end = text.index(START) + len(START), text.index(END)
    return text[:start] + "\n" + table + "\n" + text[end:]


def main(argv: list[str]) -> int:
    table = render()
    if "--write" in argv:
        README.write_text(replace_table(README.read_text(), table))
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
