"""The ModelOpt flow: convert the Mix-FFN 1x1 convs to Linear, plan layers with the policy, calibrate with real
denoising runs, quantize (NVFP4 or FP8 simulation), save and restore.

A quantized folder holds ``quant_config.json`` (precision, policy, the per-layer plan, every quantized layer's
calibrated ranges, the transformer config, where the rest of the pipeline comes from) and ``modelopt_state.pth``
(ModelOpt's ``mto.save``: its quantizer state plus the weights). ``load_quantized`` rebuilds the transformer from
the config and restores it; the ranges in the JSON are what the ONNX exporter bakes into Q/DQ nodes.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.model import SanaVideoTransformer, pointwise_convs_to_linear
from engine.presets import TransformerConfig
from quantization.errors import QuantizationError, require_modelopt
from quantization.policy import LayerDecision, LayerPolicy, check_precision, modelopt_config, quantized_names

QUANT_CONFIG = "quant_config.json"
MODELOPT_STATE = "modelopt_state.pth"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LayerQuant:
    """Calibrated ranges of one quantized linear layer: ``format`` fp8 or nvfp4; amax values are absolute maxima
    (the input's over all calibration forwards, the weight's over the tensor)."""

    format: str
    input_amax: float
    weight_amax: float


def quantize_transformer(model: SanaVideoTransformer, precision: str, forward_loop, policy: LayerPolicy | None = None):
    """Quantize ``model`` in place with ModelOpt and calibrate it with ``forward_loop(model)``.

    Returns (plan, recipe): the per-layer decisions and the calibrated ranges of each quantized layer. Raises
    QuantizationError when the policy leaves nothing to quantize or calibration never reached a planned layer.
    """
    mtq, _ = require_modelopt()
    precision = check_precision(precision)
    policy = policy or LayerPolicy()
    pointwise_convs_to_linear(model)
    plan = policy.plan(model)
    names = quantized_names(plan)
    if not names:
        raise QuantizationError("the layer policy leaves no linear layer to quantize (keep fewer blocks: "
                                "--keep-first-blocks, --keep-last-blocks; or fewer name patterns)")
    mtq.quantize(model, modelopt_config(plan, precision), forward_loop=forward_loop)
    recipe = extract_recipe(model)
    missing = sorted(set(names) - set(recipe))
    if missing:
        raise QuantizationError(f"calibration recorded no range for {len(missing)} layer(s): {', '.join(missing[:10])}")
    return plan, recipe


def extract_recipe(model) -> dict[str, LayerQuant]:
    """The calibrated ranges of every layer whose weight quantizer is enabled in a ModelOpt-quantized model."""
    recipe = {}
    for name, module in model.named_modules():
        wq, iq = getattr(module, "weight_quantizer", None), getattr(module, "input_quantizer", None)
        if wq is None or iq is None or not wq.is_enabled or not iq.is_enabled:
            continue
        if iq.amax is None:
            continue
        fmt = "nvfp4" if tuple(wq.num_bits) == (2, 1) else "fp8"
        w_amax = wq.amax if wq.amax is not None else module.weight.detach().abs().amax()
        recipe[name] = LayerQuant(fmt, float(iq.amax.float().max()), float(w_amax.float().max()))
    return recipe


def save_quantized(
    model: SanaVideoTransformer,
    out: str | Path,
    *,
    precision: str,
    policy: LayerPolicy,
    plan: dict[str, LayerDecision],
    recipe: dict[str, LayerQuant],
    base_model: str,
    calibration: dict | None = None,
) -> Path:
    """Write a quantized folder at ``out`` (which must not exist or be empty); nothing is left on failure."""
    _, mto = require_modelopt()
    import modelopt

    out = Path(out)
    with staged_folder(out) as tmp:
        config = {
            "format_version": FORMAT_VERSION,
            "precision": precision,
            "base_model": base_model,
            "causal": bool(model.causal),
            "transformer_config": model.config.to_dict(),
            "policy": policy.to_dict(),
            "layers": {n: {"quantize": d.quantize, "reason": d.reason} for n, d in plan.items()},
            "recipe": {n: asdict(q) for n, q in recipe.items()},
            "calibration": calibration or {},
            "modelopt_version": getattr(modelopt, "__version__", "unknown"),
            "dtype": str(model.dtype).removeprefix("torch."),
        }
        mto.save(model, str(tmp / MODELOPT_STATE))
        (tmp / QUANT_CONFIG).write_text(json.dumps(config, indent=2))
    return out


@contextmanager
def staged_folder(out: Path):
    """A temp folder beside ``out`` that becomes ``out`` when the block succeeds; on any failure it is removed, so no
    half-written output folder is ever left."""
    _check_output_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        tmp.chmod(0o755)
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_output_folder(out: Path) -> None:
    """A new or empty folder whose nearest existing ancestor is a folder this process can write in; checked before
    a calibration that can take minutes, not when the result is saved."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QuantizationError(f"output {out} already exists and is not an empty folder (accepted: a new or empty folder)")
    from engine.loading import unwritable_folder

    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise QuantizationError(f"output {out}: {parent} is a file, not a folder (accepted: a new or empty folder)")
    reason = unwritable_folder(parent)
    if reason is not None:
        raise QuantizationError(f"output {out}: cannot write in {parent} ({reason})")


def is_quantized_folder(path: str | Path) -> bool:
    return (Path(path) / QUANT_CONFIG).is_file()


def read_quant_config(folder: str | Path) -> dict:
    path = Path(folder) / QUANT_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QuantizationError(f"{path}: not a readable quantized-model config ({exc})") from exc
    if config.get("format_version") != FORMAT_VERSION:
        raise QuantizationError(f"{path}: format_version {config.get('format_version')!r}, expected {FORMAT_VERSION}")
    return config


def recipe_from_config(config: dict) -> dict[str, LayerQuant]:
    return {name: LayerQuant(**q) for name, q in config["recipe"].items()}


def load_quantized(folder: str | Path, device=None, dtype=None) -> tuple[SanaVideoTransformer, dict]:
    """Rebuild and restore a quantized transformer saved by ``save_quantized``: (model, its quant_config)."""
    _, mto = require_modelopt()
    folder = Path(folder)
    config = read_quant_config(folder)
    state = folder / MODELOPT_STATE
    if not state.is_file():
        raise QuantizationError(f"{folder}: {MODELOPT_STATE} is missing")
    dev = torch.device(device or "cpu")
    cfg = TransformerConfig.from_dict(config["transformer_config"])
    with torch.device(dev):
        model = SanaVideoTransformer(cfg, causal=config["causal"])
    pointwise_convs_to_linear(model)
    mto.restore(model, str(state), map_location=dev)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), config


def plain_copy(model: SanaVideoTransformer) -> SanaVideoTransformer:
    """A plain (ModelOpt-free) SanaVideoTransformer with the same weights as a quantized one."""
    with torch.device(model.device):
        plain = SanaVideoTransformer(model.config, causal=model.causal)
    pointwise_convs_to_linear(plain)
    state = {k: v for k, v in model.state_dict().items() if "_quantizer" not in k}
    plain.load_state_dict(state, strict=True)
    return plain.to(model.dtype).eval()
