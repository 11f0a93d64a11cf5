"""ONNX export of the clip step (static shapes; bf16, FP8 and NVFP4 Q/DQ) checked against PyTorch with ONNX Runtime
on CPU for the tiny preset."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="onnx is not installed")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

from onnx import TensorProto  # noqa: E402

from engine.loading import load_transformer  # noqa: E402
from engine.model import pointwise_convs_to_linear  # noqa: E402
from quantization.onnx_export import (  # noqa: E402
    INPUT_NAMES,
    StepShapes,
    build_export_model,
    export_onnx,
    lower_for_onnxruntime,
    run_onnxruntime,
)
from quantization.policy import LayerPolicy, quantized_names  # noqa: E402
from quantization.quantize import LayerQuant  # noqa: E402

SHAPES = StepShapes(batch=2, latent_frames=2, latent_height=4, latent_width=4, text_len=8, in_channels=16,
                    caption_channels=32)
STANDARD_DOMAINS = {"", "ai.onnx"}


@pytest.fixture(scope="module")
def model():
    return pointwise_convs_to_linear(load_transformer("tiny"))


@pytest.fixture(scope="module")
def layers(model):
    return quantized_names(LayerPolicy(keep_first_blocks=0, keep_last_blocks=0).plan(model))


def _recipe(layers, fmt):
    # Ranges below the data's so that clipping is exercised too.
    return {n: LayerQuant(fmt, input_amax=2.0, weight_amax=0.15) for n in layers}


@pytest.fixture(scope="module")
def exported(model, layers, tmp_path_factory):
    """Each (format, dtype) graph exported once: (ExportedGraph, recipe)."""
    root, cache = tmp_path_factory.mktemp("onnx"), {}

    def get(fmt, dtype):
        key = (fmt, dtype)
        if key not in cache:
            recipe = _recipe(layers, fmt) if fmt else None
            # oneDNN's first bf16 depthwise conv on CPU is very slow to set up; the reference kernels are not.
            with torch.backends.mkldnn.flags(enabled=False):
                cache[key] = export_onnx(model, root / f"{fmt}-{dtype}.onnx", SHAPES, recipe=recipe, dtype=dtype), recipe
        return cache[key]

    return get


def _check(model, path, recipe, dtype, seed=0):
    """(onnxruntime output, PyTorch reference output, unquantized output), all fp32."""
    args = SHAPES.example_inputs(dtype, seed=seed)
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False):
        ref = build_export_model(model, recipe, dtype)(*args).float()
        plain = build_export_model(model, None, torch.float32)(*[a.float() for a in args])
    out = run_onnxruntime(path, {k: a.float().numpy() for k, a in zip(INPUT_NAMES, args)})
    return torch.from_numpy(out), ref, plain


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_bf16_graph_is_bf16_and_matches_pytorch(model, exported):
    info, _ = exported(None, torch.bfloat16)
    proto = onnx.load(str(info.path))
    assert info.precision == "bf16"
    weights = [t for t in proto.graph.initializer if t.name.endswith(".weight")]
    assert weights and all(t.data_type == TensorProto.BFLOAT16 for t in weights)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in proto.graph.input}
    assert types["hidden_states"] == TensorProto.BFLOAT16 and types["timestep"] == TensorProto.FLOAT
    out, ref, plain = _check(model, info.path, None, torch.bfloat16)
    # ORT computes in fp32 what PyTorch computes in bf16: only intermediate rounding differs.
    assert _rel(out, ref) < 2e-2 and _rel(out, plain) < 2e-2


def test_fp8_qdq_graph_matches_pytorch_and_uses_plain_ops_at_static_shapes(model, layers, exported):
    info, recipe = exported("fp8", torch.float32)
    proto = onnx.load(str(info.path))
    onnx.checker.check_model(proto)
    ops = Counter(n.op_type for n in proto.graph.node)
    assert {n.domain for n in proto.graph.node} <= STANDARD_DOMAINS
    assert ops["Einsum"] == 3 * model.config.num_layers  # linear attention: S, numerator, denominator
    assert "Relu" in ops and "Softmax" in ops
    for vi in proto.graph.input:  # every dimension static
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        assert tuple(dims) == SHAPES.inputs()[vi.name] and all(d > 0 for d in dims)
    assert info.output[0] == (2, 16, 2, 4, 4)
    assert info.precision == "fp8" and info.opset == 20
    assert ops["QuantizeLinear"] == len(layers) and ops["DequantizeLinear"] == 2 * len(layers)
    fp8 = [t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT8E4M3FN and t.dims]
    assert len(fp8) == len(layers)  # the weights, stored in FP8
    names = {t.name for t in proto.graph.initializer}
    assert not any(f"transformer.{n}.weight" in names for n in layers)  # no high-precision copy left behind
    out, ref, plain = _check(model, info.path, recipe, torch.float32)
    assert _rel(ref, plain) > 1e-3  # the Q/DQ does something
    # Everything else in the graph (embeddings, RoPE, attention, Mix-FFN, unpatchify) is exact in fp32.
    assert _rel(out, ref) < 1e-5


def test_nvfp4_graph_matches_the_pytorch_reference(model, layers, exported):
    info, recipe = exported("nvfp4", torch.float32)
    proto = onnx.load(str(info.path))
    onnx.checker.check_model(proto)
    ops = Counter((n.domain, n.op_type) for n in proto.graph.node)
    assert info.precision == "nvfp4" and info.opset == 23
    assert ops[("trt", "TRT_FP4DynamicQuantize")] == len(layers)
    assert {d for d, _ in ops} == {"", "trt"}
    fp4 = [t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT4E2M1]
    assert len(fp4) == len(layers)
    scales = [t for t in proto.graph.initializer if t.name.endswith("weight_block_scale")]
    assert all(t.data_type == TensorProto.FLOAT8E4M3FN and t.dims[-1] * 16 == f.dims[-1] for t, f in zip(scales, fp4))
    out, ref, plain = _check(model, info.path, recipe, torch.float32)
    assert _rel(ref, plain) > 1e-2
    assert _rel(out, ref) < 1e-4


def test_nvfp4_bf16_graph_dequantizes_in_fp32_and_casts_to_bf16(model, layers, exported):
    info, recipe = exported("nvfp4", torch.bfloat16)
    proto = onnx.load(str(info.path))
    casts = [n for n in proto.graph.node if n.op_type == "Cast" and n.name.endswith("_cast")]
    assert len(casts) == 2 * len(layers)
    assert all(a.i == TensorProto.BFLOAT16 for n in casts for a in n.attribute if a.name == "to")
    out, ref, plain = _check(model, info.path, recipe, torch.bfloat16)
    # FP4 rounding amplifies bf16-vs-fp32 differences; the graph still tracks the reference far closer than the
    # quantization error itself.
    assert _rel(out, ref) < 0.6 * _rel(ref, plain)
    # What ORT ran holds only standard ops and types its CPU provider has kernels for.
    lowered = lower_for_onnxruntime(proto)
    assert {n.domain for n in lowered.graph.node} <= STANDARD_DOMAINS
    kinds = {t.data_type for t in lowered.graph.initializer}
    assert TensorProto.BFLOAT16 not in kinds and TensorProto.FLOAT4E2M1 not in kinds


def test_export_refuses_block_causal_models(tmp_path):
    with pytest.raises(ValueError, match="bidirectional"):
        export_onnx(load_transformer("tiny-causal"), tmp_path / "t.onnx", SHAPES)
    assert not list(tmp_path.iterdir())
