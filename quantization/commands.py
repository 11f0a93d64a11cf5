"""What ``sana-video quantize`` and ``sana-video build-engine`` do. Bad input raises a typed EngineError subclass
(QuantizationError, InvalidParams, UnknownModel, CheckpointError, BackendError...) whose message says what is
accepted; output folders appear only once complete.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from engine.errors import InvalidParams
from engine.model import pointwise_convs_to_linear
from engine.types import GenerationParams
from quantization.calibration import CalibrationSettings, forward_loop, read_prompts
from quantization.errors import QuantizationError, require_modelopt
from quantization.policy import LayerPolicy, check_precision, quantized_names
from quantization.quantize import (
    _check_output_folder,
    staged_folder,
    is_quantized_folder,
    load_quantized,
    plain_copy,
    quantize_transformer,
    read_quant_config,
    recipe_from_config,
    save_quantized,
)


def quantize_pipeline(pipe, precision: str, settings: CalibrationSettings, policy: LayerPolicy | None = None,
                      log=None):
    """Quantize ``pipe.transformer`` in place, calibrated by denoising ``settings.prompts``: (plan, recipe)."""
    def on_prompt(i, prompt):
        if log is not None:
            log(f"calibration {i + 1}/{len(settings.prompts)}: {prompt}")

    return quantize_transformer(pipe.transformer, precision, forward_loop(pipe, settings, on_prompt), policy)


def cli_quantize(model: str, precision: str, out: str | Path, calib_prompts: str | Path | Sequence[str] | None = None,
                 device: str | None = None, *, policy: LayerPolicy | None = None, steps: int | None = None,
                 frames: int | None = None, height: int | None = None, width: int | None = None, log=None) -> dict:
    """Quantize ``model`` (preset, folder or hub id) to ``precision`` ("nvfp4" or "fp8") with ModelOpt and save
    it in ``out`` (a new or empty folder). Calibration denoises ``calib_prompts`` (a text file, one prompt a
    line, or a list; default: a built-in varied set) at the preset's sampling settings unless ``steps``,
    ``frames``, ``height``, ``width`` say otherwise; ``log(str)`` receives progress lines. Returns a summary
    (layers quantized/kept, folder)."""
    from engine.pipeline import VideoPipeline

    precision = check_precision(precision)
    require_modelopt()
    out = Path(out)
    _check_output_folder(out)
    policy = policy or LayerPolicy()
    pipe = VideoPipeline.from_pretrained(model, device=device)
    prompts = read_prompts(calib_prompts, pipe)
    settings = CalibrationSettings(prompts, steps=steps, frames=frames, height=height, width=width)
    _check_settings(pipe, settings)
    started = time.perf_counter()
    plan, recipe = quantize_pipeline(pipe, precision, settings, policy, log)
    calibration = {"prompts": list(prompts), "steps": steps, "frames": frames, "height": height, "width": width,
                   "seconds": round(time.perf_counter() - started, 1), "device": str(pipe.device)}
    save_quantized(pipe.transformer, out, precision=precision, policy=policy, plan=plan, recipe=recipe,
                   base_model=model, calibration=calibration)
    kept = [n for n, d in plan.items() if not d.quantize]
    return {"out": str(out), "precision": precision, "quantized_layers": len(quantized_names(plan)),
            "kept_layers": len(kept), "calibration_prompts": len(prompts), "seconds": calibration["seconds"]}


def _check_settings(pipe, settings: CalibrationSettings) -> None:
    """Every calibration run is checked before the first one starts (a prompt too long for the text encoder would
    otherwise fail after hours of calibration)."""
    for i, prompt in enumerate(settings.prompts, 1):
        try:
            pipe.resolve(GenerationParams(prompt=prompt, steps=settings.steps, frames=settings.frames,
                                          height=settings.height, width=settings.width))
        except InvalidParams as exc:
            raise QuantizationError(f"calibration settings rejected by the model (prompt {i}: {prompt!r}): {exc}") \
                from exc


def prepare_engine_onnx(model: str | Path, precision: str, height: int, width: int, frames: int, folder: str | Path,
                        *, calib_prompts=None, device: str | None = None, batch: int = 2, log=None):
    """Export the clip-step ONNX of one resolution bucket into ``folder``: (ExportedGraph, model info).

    ``model``: a quantized folder (from ``cli_quantize``; its precision must equal ``precision``) or a model
    (preset, folder, hub id), quantized here with the default calibration when ``precision`` is fp8/nvfp4.
    """
    from engine.pipeline import VideoPipeline
    from engine.trt import ENGINE_PRECISIONS, ONNX_FILE
    from quantization.onnx_export import StepShapes, export_onnx

    precision = check_precision(precision, ENGINE_PRECISIONS)
    quantized = is_quantized_folder(model)
    if quantized:
        config = read_quant_config(model)
        if config["precision"] != precision:
            raise QuantizationError(f"{model} is quantized to {config['precision']}, not {precision} (accepted: --precision {config['precision']})")
        base = config["base_model"]
    else:
        base = str(model)
    pipe = VideoPipeline.from_pretrained(base, device=device)
    if pipe.causal:
        raise QuantizationError(f"{base} is block-causal: engines cover the bidirectional clip step (accepted: clip models)")
    params = pipe.resolve(GenerationParams(prompt="engine shape", height=height, width=width, frames=frames, mode="clip"))
    text_len = pipe.text_encoder.encode(["engine shape"])[0].shape[1]
    recipe = None
    if quantized:
        qmodel, _ = load_quantized(model, device=pipe.device, dtype=pipe.dtype)
        transformer, recipe = plain_copy(qmodel), recipe_from_config(config)
        del qmodel
    elif precision in ("fp8", "nvfp4"):
        settings = CalibrationSettings(read_prompts(calib_prompts, pipe))
        _, recipe = quantize_pipeline(pipe, precision, settings, log=log)
        transformer = plain_copy(pipe.transformer)
    else:
        transformer = pointwise_convs_to_linear(pipe.transformer)
    shapes = StepShapes.for_video(transformer.config, params.height, params.width, params.frames, text_len, batch)
    graph = export_onnx(transformer, Path(folder) / ONNX_FILE, shapes, recipe=recipe, dtype=torch.bfloat16)
    info = {"model": str(model), "base_model": base, "height": params.height, "width": params.width,
            "frames": params.frames, "batch": batch, "text_len": text_len,
            "quantized_layers": len(recipe or {})}
    return graph, info


def cli_build_engine(model: str | Path, precision: str, height: int, width: int, frames: int, out: str | Path, *,
                     calib_prompts=None, device: str | None = None, batch: int = 2, log=None) -> dict:
    """Build a TensorRT engine folder ``out`` for ``model`` at one resolution bucket (``height`` x ``width``
    pixels, ``frames`` frames, CFG batch ``batch``): transformer.onnx, engine.plan and the engine.json sidecar.
    Needs TensorRT and a GPU of the precision's compute capability (nvfp4 >= 10.0, fp8 >= 8.9, bf16 >= 8.0)."""
    from engine.trt import ENGINE_PRECISIONS, build_engine, check_capability, gpu_capability, import_tensorrt

    precision = check_precision(precision, ENGINE_PRECISIONS)
    import_tensorrt()
    check_capability(precision, gpu_capability())
    out = Path(out)
    with staged_folder(out) as tmp:
        graph, info = prepare_engine_onnx(model, precision, height, width, frames, tmp, calib_prompts=calib_prompts,
                                          device=device or "cuda", batch=batch, log=log)
        g = graph.to_dict()
        build_engine(graph.path, tmp, precision=precision, inputs=g["inputs"], output=g["output"], model=info)
    return {"out": str(out), "precision": precision, **info}
