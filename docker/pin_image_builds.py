"""Print pip constraints pinning the base image's own builds of torch and TensorRT to their installed versions.

NGC's torch carries a local version such as ``2.8.0a0+5228986c39.nv25.6``; an exact pin keeps pip from
replacing it with a generic wheel while it resolves ``torch>=2.4`` for this project.
"""

from __future__ import annotations

import importlib.metadata

KEEP = ("torch", "tensorrt", "triton", "torchvision")

for dist in KEEP:
    try:
        print(f"{dist}=={importlib.metadata.version(dist)}")
    except importlib.metadata.PackageNotFoundError:
        pass
