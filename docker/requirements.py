"""Print the pip requirements of one image, read from pyproject.toml (the one list of dependencies).

    python requirements.py api pyproject.toml      # the API: all dependencies but the engine's model stack
    python requirements.py worker pyproject.toml   # a GPU worker: all dependencies plus the `quant` extra

The API process only queues jobs, reads job records and serves files and streams; torch, the model
libraries and the video codec belong to the workers. Installing requirements before the sources gives the
images a dependency layer that survives code edits.
"""

from __future__ import annotations

import re
import sys
import tomllib

# Distributions only the engine imports (normalized names).
ENGINE_ONLY = frozenset({"torch", "diffusers", "transformers", "tokenizers", "safetensors", "huggingface-hub", "av"})
WORKER_EXTRAS = ("quant",)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"cannot read a distribution name from {requirement!r}")
    return normalize(match.group(1))


def requirements(pyproject: dict, image: str) -> list[str]:
    project = pyproject["project"]
    deps = list(project["dependencies"])
    if image == "api":
        return [d for d in deps if distribution(d) not in ENGINE_ONLY]
    if image == "worker":
        for extra in WORKER_EXTRAS:
            deps += [d for d in project.get("optional-dependencies", {}).get(extra, []) if d not in deps]
        return deps
    raise ValueError(f"unknown image {image!r}: expected api or worker")


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or argv[1] not in ("api", "worker"):
        print(f"usage: {argv[0]} api|worker [pyproject.toml]", file=sys.stderr)
        return 2
    path = argv[2] if len(argv) == 3 else "pyproject.toml"
    with open(path, "rb") as f:
        for requirement in requirements(tomllib.load(f), argv[1]):
            print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
