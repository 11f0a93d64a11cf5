"""SANA-Video Linear DiT engine: model, block state, pipeline, video output, CLI.

Heavy modules (torch, diffusers) load on first use, so light users (the API process importing presets or errors)
stay light.
"""

from __future__ import annotations

__all__ = ["load_transformer", "save_transformer", "SanaVideoTransformer", "BlockState", "VideoPipeline"]


def __getattr__(name: str):
    if name in ("load_transformer", "save_transformer"):
        from engine import loading

        return getattr(loading, name)
    if name == "SanaVideoTransformer":
        from engine.model import SanaVideoTransformer

        return SanaVideoTransformer
    if name == "BlockState":
        from engine.state import BlockState

        return BlockState
    if name == "VideoPipeline":
        from engine.pipeline import VideoPipeline

        return VideoPipeline
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
