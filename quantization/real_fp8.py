"""Real FP8 GEMMs in PyTorch (``torch._scaled_mm``) with the calibrated scales: what "FP8 real" means in the quality
report on H100, next to ModelOpt's simulation. Same scales and rounding as the Q/DQ graph (per-tensor E4M3 for
the input, static from calibration, and for the weight), with an FP32-accumulating FP8 tensor-core GEMM.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from quantization import formats
from quantization.quantize import LayerQuant

_ROWS = 16  # _scaled_mm wants both dimensions of the left operand in multiples of 16


class FP8Linear(nn.Linear):
    """nn.Linear holding its weight in float8_e4m3fn; inputs are cast with a static scale and multiplied in FP8."""

    def __init__(self, linear: nn.Linear, quant: LayerQuant):
        nn.Module.__init__(self)
        if quant.format != "fp8":
            raise ValueError(f"FP8Linear takes fp8 layers, got {quant.format}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.register_buffer("weight_scale", formats.fp8_scale(quant.weight_amax).to(w.device))
        self.register_buffer("input_scale", formats.fp8_scale(quant.input_amax).to(w.device))
        self.register_buffer("weight_fp8", formats.fp8_quantize(w, self.weight_scale))
        self.weight = None
        self.bias = linear.bias
        self.out_dtype = w.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        rows = x2.shape[0]
        pad = (-rows) % _ROWS
        xq = formats.fp8_quantize(F.pad(x2, (0, 0, 0, pad)) if pad else x2, self.input_scale)
        out = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=self.input_scale, scale_b=self.weight_scale,
                               bias=None, out_dtype=self.out_dtype)[:rows]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, -1).to(x.dtype)


def to_real_fp8(model: nn.Module, recipe: dict[str, LayerQuant]) -> nn.Module:
    """A copy of the plain ``model`` with every fp8 ``recipe`` layer swapped for FP8Linear."""
    model = copy.deepcopy(model)
    for name, quant in recipe.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FP8Linear(getattr(parent, child), quant))
    return model.eval()
