"""Quantization of the SANA-Video transformer: NVFP4/FP8 through NVIDIA ModelOpt (optional ``quant`` extra), the
layer policy, calibration by real denoising runs, save/restore, ONNX export with Q/DQ, and the CLI entry points.

Heavy modules (torch, ModelOpt, onnx) load on first use.
"""

from __future__ import annotations

__all__ = ["cli_quantize", "cli_build_engine", "LayerPolicy", "QuantizationError", "ModelOptUnavailable"]


def __getattr__(name: str):
    if name in ("cli_quantize", "cli_build_engine"):
        from quantization import commands

        return getattr(commands, name)
    if name == "LayerPolicy":
        from quantization.policy import LayerPolicy

        return LayerPolicy
    if name in ("QuantizationError", "ModelOptUnavailable"):
        from quantization import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'quantization' has no attribute {name!r}")
