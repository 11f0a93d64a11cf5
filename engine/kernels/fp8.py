"""Scaled FP8 (e4m3) linear layers: weights quantized once per output channel, activations per token at run time.

``torch._scaled_mm`` runs the product on FP8 tensor cores (H100: about twice the bf16 rate) and applies both
scales in its epilogue; under ``torch.compile`` the activation's amax, scale and cast fuse into the kernel that
produces the activation. By default the tensor cores accumulate without the periodic promotion to fp32
(``use_fast_accum``): on an H100 the block's GEMMs at 480p take 14% less time that way, and their error against
the fp32 product is the quantization's either way (3.75e-2 on random operands;
benchmarks/results/fp8-fast-2026-11-27/). The reference path dequantizes and multiplies in fp32: same
quantization, exact products, so a test can pin the FP8 GEMM to it.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scale [M, 1]) with x ~= q * scale (each row's amax maps to 448)."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    # Times the reciprocal, which is what CUDA's division by a scalar computes (the CPU's divides): the same scale on
    # every device, and in the norm kernels that quantize their output (engine/kernels/norms.py).
    scale = amax * (1.0 / E4M3_MAX)
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def fp8_supported(in_features: int, out_features: int) -> bool:
    """``_scaled_mm`` needs both GEMM dimensions it tiles over to be multiples of 16."""
    return in_features % 16 == 0 and out_features % 16 == 0


class FP8Linear(nn.Module):
    """y = x W^T + b with W and x in e4m3 (rowwise scales), output and bias in ``out_dtype``.

    ``fast_accum``: the GEMM's FP8 accumulation without promotion to fp32 (faster; the reference path computes
    exact products either way).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype = torch.bfloat16,
                 impl: str = "scaled_mm", fast_accum: bool = True):
        super().__init__()
        if impl not in ("scaled_mm", "torch"):
            raise ValueError(f"impl must be scaled_mm or torch, not {impl!r}")
        self.out_features, self.in_features = weight.shape
        if not fp8_supported(self.in_features, self.out_features):
            raise ValueError(f"FP8 GEMM needs dimensions divisible by 16, got {tuple(weight.shape)}")
        q, scale = quantize_rowwise(weight.detach())
        self.register_buffer("weight_fp8", q)
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())  # [1, out]
        self.register_buffer("bias", None if bias is None else bias.detach().to(out_dtype).clone())
        self.out_dtype = out_dtype
        self.impl = impl
        self.fast_accum = fast_accum

    @classmethod
    def from_linear(cls, linear: nn.Linear, impl: str = "scaled_mm") -> "FP8Linear":
        return cls(linear.weight, linear.bias, out_dtype=linear.weight.dtype, impl=impl)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_fp8.float() * self.weight_scale.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        # _scaled_mm takes a row-major activation only; stream blocks can hand in a transposed view.
        xq, xs = quantize_rowwise(x.reshape(-1, self.in_features).contiguous())
        return self.quantized(xq, xs).reshape(*lead, self.out_features)

    def quantized(self, xq: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """The layer on an input quantized already, as ``quantize_rowwise`` gives it (e4m3 [M, K] row-major, fp32
        scales [M, 1]; a kernel that produced the activation may have quantized it on the way): [M, out]."""
        if self.impl == "torch":
            out = ((xq.float() * xs) @ self.dequantized_weight().t()).to(self.out_dtype)
        else:
            out = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=xs, scale_b=self.weight_scale,
                                   out_dtype=self.out_dtype, use_fast_accum=self.fast_accum)
        if self.bias is not None:
            out = out + self.bias
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, impl={self.impl}, "
                f"fast_accum={self.fast_accum}")
