"""FP8 (E4M3) and NVFP4 (E2M1 values, FP8 block scales, FP32 global scale) in plain PyTorch.

These are the reference definitions the ONNX Q/DQ graphs, the TensorRT engines and ModelOpt's simulation are
pinned to (tests/test_quant_formats.py compares them with ModelOpt's own NVFP4/FP8 code):

- FP8, per tensor: ``q = cast_e4m3(clip(x / s, -448, 448))``, ``x' = q * s`` with ``s = amax / 448``.
- NVFP4, blocks of 16 along the last axis: the block scale ``b = cast_e4m3(clamp(block_amax / 6 / g))`` with the
  global scale ``g = amax / (6 * 448)``; ``q = round_e2m1(x / (b * g))`` (nearest, ties to even), ``x' = q * b * g``.
  Weights take ``amax`` from the weight itself; activations take it from calibration (a static global scale)
  while the block scales are computed at run time (TensorRT's dynamic quantization).

FP4 codes are 4-bit sign-magnitude E2M1 (bit 3 the sign; magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6); two codes per
byte, the element with the even index in the low nibble (ONNX FLOAT4E2M1 and TensorRT use this packing).
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
NVFP4_BLOCK = 16
# Smallest positive E4M3 subnormal: block scales are clamped into [2**-9, 448] before the cast, so a tiny block
# never gets a zero scale (ModelOpt does the same).
FP8_MIN_SCALE = 2.0**-9

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Decision bounds between consecutive magnitudes; at a tie the even code (mantissa bit 0) wins, so the value
# exactly on 0.25, 1.25, 2.5 and 5 rounds down and on 0.75, 1.75, 3.5 rounds up.
E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_TIE_UP = (False, True, False, True, False, True, False)


def fp8_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """Per-tensor FP8 scale ``amax / 448`` (fp32 scalar tensor); a zero amax gives scale 1."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [...] -> float8_e4m3fn [...]: clip(x / scale) cast to E4M3 (round to nearest even)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fp8_fake_quant(x: torch.Tensor, amax: torch.Tensor | float) -> torch.Tensor:
    """Quantize-dequantize ``x`` with a per-tensor FP8 scale from ``amax``; returned in x's dtype."""
    s = fp8_scale(amax).to(x.device)
    return (fp8_quantize(x, s).float() * s).to(x.dtype)


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Round already-scaled values to E2M1 (saturating at +-6); uint8 codes (sign in bit 3)."""
    x = x.float()
    mag = x.abs()
    code = torch.zeros_like(mag, dtype=torch.uint8)
    for bound, tie_up in zip(E2M1_BOUNDS, E2M1_TIE_UP):
        code += ((mag >= bound) if tie_up else (mag > bound)).to(torch.uint8)
    return code | ((x < 0).to(torch.uint8) << 3)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes -> fp32 values."""
    table = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=codes.device)
    mag = table[(codes & 0x7).long()]
    return torch.where((codes & 0x8) > 0, -mag, mag)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes (K even) -> [..., K/2] bytes, even element in the low nibble."""
    return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_fp4``."""
    out = torch.stack([packed & 0xF, packed >> 4], dim=-1)
    return out.flatten(-2)


def nvfp4_global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """The per-tensor (second-level) scale ``amax / (6 * 448)``; a zero amax gives 1."""
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return torch.where(amax > 0, amax / (FP4_MAX * FP8_MAX), torch.ones_like(amax))


def nvfp4_block_scales(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> E4M3 block scales [..., K/16] relative to ``global_scale``."""
    if x.shape[-1] % NVFP4_BLOCK:
        raise ValueError(f"NVFP4 needs the last dimension to be a multiple of {NVFP4_BLOCK}, got {x.shape[-1]}")
    block_amax = x.float().unflatten(-1, (-1, NVFP4_BLOCK)).abs().amax(dim=-1)
    scale = block_amax / (FP4_MAX * global_scale.to(x.device))
    return scale.clamp(FP8_MIN_SCALE, FP8_MAX).to(torch.float8_e4m3fn)


def nvfp4_quantize(x: torch.Tensor, amax: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., K] -> (codes uint8 [..., K], block scales float8_e4m3fn [..., K/16], global scale fp32 scalar)."""
    g = nvfp4_global_scale(amax).to(x.device)
    b = nvfp4_block_scales(x, g)
    scaled = x.float().unflatten(-1, (-1, NVFP4_BLOCK)) / (b.float() * g).unsqueeze(-1)
    return e2m1_codes(scaled.flatten(-2)), b, g


def nvfp4_dequantize(codes: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Inverse of ``nvfp4_quantize`` (fp32)."""
    vals = e2m1_values(codes).unflatten(-1, (-1, NVFP4_BLOCK))
    return (vals * (block_scales.float() * global_scale).unsqueeze(-1)).flatten(-2)


def nvfp4_fake_quant(x: torch.Tensor, amax: torch.Tensor | float) -> torch.Tensor:
    """Quantize-dequantize ``x`` [..., K] to NVFP4 (``amax`` sets the global scale); returned in x's dtype."""
    return nvfp4_dequantize(*nvfp4_quantize(x, amax)).to(x.dtype)
