"""The FP8/NVFP4 reference arithmetic (quantization/formats.py), pinned to ModelOpt's own implementation."""

from __future__ import annotations

import pytest
import torch

from quantization import formats


def test_e2m1_rounding_nearest_with_ties_to_even_and_saturation():
    x = torch.tensor([0.0, 0.2, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, 100.0, -0.75, -5.1])
    expected = torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 6.0, -1.0, -6.0])
    assert torch.equal(formats.e2m1_values(formats.e2m1_codes(x)), expected)


def test_fp4_packing_round_trips_with_the_even_element_in_the_low_nibble():
    codes = torch.randint(0, 16, (3, 32), dtype=torch.uint8)
    packed = formats.pack_fp4(codes)
    assert packed.shape == (3, 16)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)
    assert torch.equal(formats.unpack_fp4(packed), codes)


def test_nvfp4_reference_error_and_scales():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    codes, block, g = formats.nvfp4_quantize(w, w.abs().max())
    assert block.dtype == torch.float8_e4m3fn and block.shape == (64, 8)
    assert g.item() == pytest.approx(w.abs().max().item() / (6 * 448))
    deq = formats.nvfp4_dequantize(codes, block, g)
    rel = ((deq - w).norm() / w.norm()).item()
    assert 0.02 < rel < 0.15  # 4-bit values with 16-element scales
    with pytest.raises(ValueError, match="multiple of 16"):
        formats.nvfp4_quantize(torch.randn(4, 24), 1.0)


def test_nvfp4_reference_equals_modelopt_nvfp4_tensor():
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt (the quant extra) is not installed")
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    torch.manual_seed(1)
    w = torch.randn(32, 96) * torch.logspace(-3, 1, 96)  # blocks of very different magnitudes
    codes, block, g = formats.nvfp4_quantize(w, w.abs().max())
    qt, m_block, m_g = NVFP4QTensor.quantize(w.clone(), 16)
    assert torch.equal(formats.pack_fp4(codes), qt._quantized_data)
    assert torch.equal(block.view(torch.uint8), m_block.view(torch.uint8))
    torch.testing.assert_close(g, m_g.float())
    ours = formats.nvfp4_dequantize(codes, block, g)
    theirs = qt.dequantize(torch.float32, scale=m_block, double_scale=m_g, block_sizes={-1: 16})
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_fp8_reference_equals_modelopt_fake_quant():
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt (the quant extra) is not installed")
    from modelopt.torch.quantization.nn import TensorQuantizer
    from modelopt.torch.quantization.config import QuantizerAttributeConfig

    torch.manual_seed(2)
    x = torch.randn(16, 64) * 3
    amax = torch.tensor(5.0)
    quantizer = TensorQuantizer(QuantizerAttributeConfig(num_bits=(4, 3), axis=None), amax=amax)
    torch.testing.assert_close(formats.fp8_fake_quant(x, amax), quantizer(x), rtol=0, atol=0)
    assert not torch.equal(formats.fp8_fake_quant(x, amax), x)


def test_real_fp8_linear_equals_the_fp8_qdq_reference():
    from torch import nn

    from quantization.onnx_export import QDQLinear
    from quantization.quantize import LayerQuant
    from quantization.real_fp8 import FP8Linear

    torch.manual_seed(3)
    linear = nn.Linear(64, 32)
    quant = LayerQuant("fp8", input_amax=2.5, weight_amax=float(linear.weight.abs().max()))
    x = torch.randn(2, 5, 64) * 1.5  # 10 rows: padded to 16 for the FP8 GEMM
    with torch.no_grad():
        want = QDQLinear(linear, "layer", quant)(x)
        got = FP8Linear(linear, quant)(x)
        plain = linear(x)
    assert got.shape == (2, 5, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3
