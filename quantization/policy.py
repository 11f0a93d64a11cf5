"""Which layers are quantized: the layer policy and the per-layer plan it yields for one model.

Only linear layers are candidates: they are what FP8/NVFP4 GEMMs, ModelOpt's recipes and TensorRT's FP4 cover
(convert the Mix-FFN's 1x1 convs first with ``engine.model.pointwise_convs_to_linear``). By default the patch
embedding, the time and caption embeddings, the norms, the output projection and the first and last transformer
blocks stay in bf16: they are a small share of the compute and the most sensitive to rounding.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from quantization.errors import QuantizationError

PRECISIONS = ("nvfp4", "fp8")
# Module-name patterns (fnmatch) that stay in high precision whatever the block.
DEFAULT_KEEP = (
    "patch_embedding*",
    "time_embed*",
    "caption_projection*",
    "caption_norm*",
    "*norm*",
    "norm_out*",
    "proj_out*",
)
# FP8 and FP4 GEMMs (cuBLASLt, TensorRT) want both matrix dimensions in multiples of 16; NVFP4 blocks are 16 wide.
GEMM_MULTIPLE = 16
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")


@dataclass(frozen=True)
class LayerDecision:
    name: str
    quantize: bool
    reason: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class LayerPolicy:
    """``keep_first_blocks``/``keep_last_blocks``: transformer blocks left in bf16 at each end; ``keep``: name
    patterns left in bf16; ``extra_keep``: more patterns (e.g. ``"*.attn2.*"`` to keep cross-attention)."""

    keep_first_blocks: int = 1
    keep_last_blocks: int = 1
    keep: tuple[str, ...] = DEFAULT_KEEP
    extra_keep: tuple[str, ...] = ()

    def __post_init__(self):
        if self.keep_first_blocks < 0 or self.keep_last_blocks < 0:
            raise QuantizationError("keep_first_blocks/keep_last_blocks must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["keep"], out["extra_keep"] = list(self.keep), list(self.extra_keep)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerPolicy":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise QuantizationError(f"unknown layer policy fields: {', '.join(unknown)} (accepted: {', '.join(sorted(names))})")
        kw = dict(data)
        for key in ("keep", "extra_keep"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)

    def plan(self, model: nn.Module) -> dict[str, LayerDecision]:
        """A decision for every linear layer of ``model`` (a SanaVideoTransformer), in module order."""
        num_layers = model.config.num_layers
        first, last = self.keep_first_blocks, num_layers - self.keep_last_blocks
        out: dict[str, LayerDecision] = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and name.endswith(("conv_inverted", "conv_point")):
                raise QuantizationError(
                    f"{name} is still a 1x1 conv: call engine.model.pointwise_convs_to_linear(model) first so the "
                    "Mix-FFN projections are quantized"
                )
            if not isinstance(module, nn.Linear):
                continue
            decision = self._decide(name, module, first, last)
            out[name] = decision
        return out

    def _decide(self, name: str, module: nn.Linear, first: int, last: int) -> LayerDecision:
        dims = dict(in_features=module.in_features, out_features=module.out_features)
        for pattern in self.keep + self.extra_keep:
            if fnmatch.fnmatchcase(name, pattern):
                return LayerDecision(name, False, f"kept by pattern {pattern!r}", **dims)
        match = _BLOCK.match(name)
        if match is None:
            return LayerDecision(name, False, "outside the transformer blocks", **dims)
        block = int(match.group(1))
        if block < first:
            return LayerDecision(name, False, f"block {block} is among the first {first} kept blocks", **dims)
        if block >= last:
            return LayerDecision(name, False, f"block {block} is among the last {self.keep_last_blocks} kept blocks", **dims)
        if module.in_features % GEMM_MULTIPLE or module.out_features % GEMM_MULTIPLE:
            return LayerDecision(
                name, False, f"{module.in_features}x{module.out_features} is not a multiple of {GEMM_MULTIPLE}", **dims
            )
        return LayerDecision(name, True, "quantized", **dims)


def quantized_names(plan: dict[str, LayerDecision]) -> list[str]:
    return [name for name, d in plan.items() if d.quantize]


def check_precision(precision: str, accepted: tuple[str, ...] = PRECISIONS) -> str:
    value = str(precision).lower()
    if value not in accepted:
        raise QuantizationError(f"precision {precision!r} is not supported (accepted: {', '.join(accepted)})")
    return value


def modelopt_config(plan: dict[str, LayerDecision], precision: str) -> dict[str, Any]:
    """A ModelOpt ``mtq.quantize`` config that enables the weight and input quantizers of exactly the planned
    layers, with the quantizer settings of ModelOpt's own NVFP4/FP8 default recipes (max calibration)."""
    import modelopt.torch.quantization as mtq

    precision = check_precision(precision)
    base = mtq.NVFP4_DEFAULT_CFG if precision == "nvfp4" else mtq.FP8_DEFAULT_CFG
    entries = {e.get("quantizer_name"): e for e in base["quant_cfg"] if isinstance(e, dict)}
    weight_cfg = entries["*weight_quantizer"]["cfg"]
    input_cfg = entries["*input_quantizer"]["cfg"]
    quant_cfg: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    for name in quantized_names(plan):
        quant_cfg.append({"quantizer_name": f"{name}.weight_quantizer", "cfg": dict(weight_cfg)})
        quant_cfg.append({"quantizer_name": f"{name}.input_quantizer", "cfg": dict(input_cfg)})
    return {"quant_cfg": quant_cfg, "algorithm": base.get("algorithm", "max")}
