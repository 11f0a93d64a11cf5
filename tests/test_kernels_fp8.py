"""Scaled FP8 linear: the ``torch._scaled_mm`` path equals the dequantize-then-multiply reference, and the FP8
error against the full-precision layer stays where e4m3 puts it."""

import pytest
import torch
from torch import nn

from engine.kernels.fp8 import E4M3, FP8Linear, fp8_supported, quantize_rowwise


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_quantize_rowwise_round_trip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different scales
    q, scale = quantize_rowwise(x)
    assert q.dtype == E4M3 and scale.shape == (64, 1)
    assert (q.float().abs().amax(dim=1) == 448).all()  # every row uses the full range
    assert rel_err(q.float() * scale, x) < 0.05  # 3 mantissa bits: ~2-3% RMS
    zeros = torch.zeros(2, 16)
    qz, _ = quantize_rowwise(zeros)
    assert torch.isfinite(qz.float()).all() and (qz.float() == 0).all()


def _layer(fin, fout, device, dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Linear(fin, fout, device=device, dtype=dtype)


@pytest.mark.parametrize("bias", [True, False])
def test_scaled_mm_equals_reference_cpu(bias):
    """On CPU, torch._scaled_mm runs too: the two paths compute the same quantized product."""
    lin = _layer(64, 48, "cpu")
    if not bias:
        lin.bias = None
    x = torch.randn(3, 5, 64)
    fast = FP8Linear(lin.weight, lin.bias, out_dtype=torch.float32, impl="scaled_mm")
    ref = FP8Linear(lin.weight, lin.bias, out_dtype=torch.float32, impl="torch")
    try:
        got = fast(x)
    except (RuntimeError, NotImplementedError) as exc:  # builds without a CPU _scaled_mm
        pytest.skip(f"torch._scaled_mm unavailable on CPU here: {exc}")
    assert got.shape == (3, 5, 48)
    assert rel_err(got, ref(x)) < 1e-5
    assert rel_err(got, lin(x)) < 0.08


def test_rejects_dimensions_the_gemm_cannot_tile():
    assert fp8_supported(2240, 11200) and not fp8_supported(24, 60)
    with pytest.raises(ValueError):
        FP8Linear(torch.randn(60, 24), None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)")
@pytest.mark.parametrize("fast_accum", [True, False])
def test_scaled_mm_on_gpu(fast_accum):
    lin = _layer(2240, 5600, "cuda", torch.bfloat16)
    x = torch.randn(4096, 2240, device="cuda", dtype=torch.bfloat16)
    fast = FP8Linear(lin.weight, lin.bias, out_dtype=torch.bfloat16, fast_accum=fast_accum)
    ref = FP8Linear.from_linear(lin, impl="torch")
    got = fast(x)
    assert got.dtype == torch.bfloat16 and fast.fast_accum == fast_accum
    # Same quantization: the differences are the accumulation (FP8 tensor-core accumulator or fp32) and bf16 output.
    assert rel_err(got, ref(x)) < 5e-3
    assert rel_err(got, lin(x)) < 0.08
