"""Mix-FFN conv -> Linear conversion and the layer policy (which layers NVFP4/FP8 cover)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from engine.loading import build_transformer, load_transformer
from engine.model import pointwise_convs_to_linear
from engine.presets import TINY_TRANSFORMER
from quantization.errors import QuantizationError
from quantization.policy import LayerPolicy, modelopt_config, quantized_names


def _inputs(model, frames=3, size=8, text=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, frames, size, size, generator=g)
    ctx = torch.randn(2, text, cfg.caption_channels, generator=g)
    mask = torch.ones(2, text)
    mask[0, text // 2:] = 0
    return x, ctx, torch.tensor([900.0, 250.0]), mask


def test_pointwise_convs_to_linear_is_numerically_equivalent_on_tiny():
    model = load_transformer("tiny")
    args = _inputs(model)
    with torch.no_grad():
        before = model(*args)
    pointwise_convs_to_linear(model)
    for block in model.transformer_blocks:
        assert isinstance(block.ff.conv_inverted, nn.Linear) and isinstance(block.ff.conv_point, nn.Linear)
        assert isinstance(block.ff.conv_depth, nn.Conv2d)  # the depthwise conv is no GEMM and stays a conv
    with torch.no_grad():
        after = model(*args)
    assert before.abs().max() > 0.1
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    # Stream (block-causal) mode goes through the same projections.
    causal = load_transformer("tiny-causal")
    with torch.no_grad():
        ref = causal(*args, block_frames=[1, 2])
        pointwise_convs_to_linear(causal)
        torch.testing.assert_close(causal(*args, block_frames=[1, 2]), ref, rtol=1e-5, atol=1e-5)


def _four_block_model():
    # Tiny widths, four blocks so that the default policy has middle blocks to quantize.
    cfg = dataclasses.replace(TINY_TRANSFORMER, num_layers=4)
    return pointwise_convs_to_linear(build_transformer(cfg, causal=False, seed=0))


def test_default_policy_keeps_embeddings_output_and_end_blocks():
    model = _four_block_model()
    plan = LayerPolicy().plan(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert list(plan) == linears
    quantized = quantized_names(plan)
    assert quantized and all(n.startswith(("transformer_blocks.1.", "transformer_blocks.2.")) for n in quantized)
    for prefix in ("transformer_blocks.1.", "transformer_blocks.2."):
        for layer in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                      "attn2.to_v", "attn2.to_out.0", "ff.conv_inverted"):
            assert plan[prefix + layer].quantize, prefix + layer
        # The tiny FFN hidden width (120) is no multiple of 16: no FP8/FP4 GEMM takes it.
        assert not plan[prefix + "ff.conv_point"].quantize
        assert "multiple of 16" in plan[prefix + "ff.conv_point"].reason
    for name in ("proj_out", "time_embed.linear", "caption_projection.linear_1", "transformer_blocks.0.attn1.to_q",
                 "transformer_blocks.3.ff.conv_inverted"):
        assert not plan[name].quantize, name
    assert "first 1" in plan["transformer_blocks.0.attn1.to_q"].reason
    assert "last 1" in plan["transformer_blocks.3.attn1.to_q"].reason
    assert "pattern" in plan["proj_out"].reason


def test_policy_is_configurable_and_round_trips():
    model = _four_block_model()
    policy = LayerPolicy(keep_first_blocks=0, keep_last_blocks=2, extra_keep=("*.attn2.*",))
    quantized = quantized_names(policy.plan(model))
    assert any(n.startswith("transformer_blocks.0.") for n in quantized)
    assert not any(n.startswith(("transformer_blocks.2.", "transformer_blocks.3.")) for n in quantized)
    assert not any(".attn2." in n for n in quantized)
    assert LayerPolicy.from_dict(policy.to_dict()) == policy
    with pytest.raises(QuantizationError, match="unknown layer policy fields: keep_blocks"):
        LayerPolicy.from_dict({"keep_blocks": 2})
    with pytest.raises(QuantizationError):
        LayerPolicy(keep_first_blocks=-1)


def test_policy_refuses_unconverted_pointwise_convs():
    with pytest.raises(QuantizationError, match="pointwise_convs_to_linear"):
        LayerPolicy().plan(load_transformer("tiny"))


def test_modelopt_config_enables_exactly_the_planned_quantizers():
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt (the quant extra) is not installed")
    plan = LayerPolicy().plan(_four_block_model())
    for precision, bits in (("nvfp4", (2, 1)), ("fp8", (4, 3))):
        cfg = modelopt_config(plan, precision)
        entries = cfg["quant_cfg"]
        assert entries[0] == {"quantizer_name": "*", "enable": False}
        named = {e["quantizer_name"]: e["cfg"] for e in entries[1:]}
        expected = {f"{n}.{q}" for n in quantized_names(plan) for q in ("weight_quantizer", "input_quantizer")}
        assert set(named) == expected
        assert all(tuple(c["num_bits"]) == bits for c in named.values())
        if precision == "nvfp4":
            assert all(c["block_sizes"][-1] == 16 for c in named.values())
    with pytest.raises(QuantizationError, match="accepted: nvfp4, fp8"):
        modelopt_config(plan, "int8")
