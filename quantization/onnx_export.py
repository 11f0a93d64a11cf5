"""ONNX export of the bidirectional clip step, at static shapes, in bf16 (or fp32) with optional FP8 or NVFP4
Q/DQ on the quantized linear layers.

The graph is what TensorRT's strongly typed builder needs (precision comes from the graph itself):
- the linear attention is the model's own PyTorch reference (einsum, ReLU, RoPE, fp32 sums): plain ONNX ops;
- FP8 layers: the input goes through QuantizeLinear/DequantizeLinear (static per-tensor scale from calibration,
  FLOAT8E4M3FN zero point) and the weight is stored in FP8 behind a DequantizeLinear, scales in the graph dtype;
- NVFP4 layers: the weight is stored as FLOAT4E2M1 with FP8 block scales (blocks of 16 along the input
  features) behind two DequantizeLinear (block scales times the FP32 global scale), and the input is quantized
  at run time by TensorRT's ``trt::TRT_FP4DynamicQuantize`` (the only non-standard op; TensorRT's ONNX parser
  turns it into its dynamic-quantize layer). The FP4 results are dequantized in FP32 and cast to the graph dtype,
  as ModelOpt's own NVFP4 exporter does. Opset 23 (FLOAT4E2M1) for NVFP4, 20 otherwise.

How: the layers to quantize are swapped for ``QDQLinear`` whose forward is the exact PyTorch reference of the
Q/DQ arithmetic (quantization/formats.py) and whose export emits marker nodes; a pass over the ONNX graph then
replaces each marker by the Q/DQ nodes and quantized initializers above. ``lower_for_onnxruntime`` rewrites what
ONNX Runtime's CPU provider cannot run (bf16 matmuls, FP4 tensors, the TensorRT op) into plain FP32 ops with the
same arithmetic, so the graph can be checked against PyTorch on any machine.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from quantization import formats
from quantization.quantize import LayerQuant

INPUT_NAMES = ("hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask")
OUTPUT_NAME = "velocity"
MARKER_DOMAIN = "sana.export"
TRT_DOMAIN = "trt"
OPSET = 20
OPSET_FP4 = 23
# Beyond this the weights go to one external-data file beside the .onnx (protobuf's 2 GiB limit).
EXTERNAL_DATA_BYTES = 1 << 30


@dataclass(frozen=True)
class StepShapes:
    """Static input shapes of one resolution bucket: batch (2 with classifier-free guidance), latent frames,
    latent height/width, text tokens."""

    batch: int
    latent_frames: int
    latent_height: int
    latent_width: int
    text_len: int
    in_channels: int = 16
    caption_channels: int = 2304

    @classmethod
    def for_video(cls, config, height: int, width: int, frames: int, text_len: int, batch: int = 2) -> "StepShapes":
        """Shapes for a ``height`` x ``width`` pixel video of ``frames`` frames (Wan VAE: 8x space, 4x time)."""
        return cls(batch, (frames - 1) // 4 + 1, height // 8, width // 8, text_len, config.in_channels, config.caption_channels)

    def inputs(self) -> dict[str, tuple[int, ...]]:
        return {
            "hidden_states": (self.batch, self.in_channels, self.latent_frames, self.latent_height, self.latent_width),
            "encoder_hidden_states": (self.batch, self.text_len, self.caption_channels),
            "timestep": (self.batch,),
            "encoder_attention_mask": (self.batch, self.text_len),
        }

    def example_inputs(self, dtype: torch.dtype, device="cpu", seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random inputs of these shapes: latents and text in ``dtype``, timesteps fp32, mask in ``dtype`` (1 keep,
        0 pad; the second half of each prompt padded on the first batch row)."""
        gen = torch.Generator("cpu").manual_seed(seed)
        shapes = self.inputs()
        x = torch.randn(shapes["hidden_states"], generator=gen)
        text = torch.randn(shapes["encoder_hidden_states"], generator=gen)
        t = torch.linspace(900.0, 100.0, self.batch)
        mask = torch.ones(shapes["encoder_attention_mask"])
        mask[0, max(1, self.text_len // 2):] = 0
        return tuple(v.to(device) for v in (x.to(dtype), text.to(dtype), t, mask.to(dtype)))


class ClipStep(nn.Module):
    """One denoising forward of the bidirectional model with plain tensor inputs (what the engine runs)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask):
        return self.transformer(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask)


# ---------------------------------------------------------------------------------------------------------------------
# Q/DQ reference modules


def _scale_in(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A scale as the graph stores it (in ``dtype``), back in fp32 for the arithmetic."""
    return value.to(dtype).float()


def fake_quant(x: torch.Tensor, fmt: str, amax: float, kind: str) -> torch.Tensor:
    """The exact arithmetic of the exported Q/DQ nodes: FP8 with its scale rounded to x's dtype (the graph
    stores it so), NVFP4 with FP32 scales and the result cast to x's dtype."""
    if fmt == "fp8":
        s = _scale_in(formats.fp8_scale(amax), x.dtype).to(x.device)
        return (formats.fp8_quantize(x, s).float() * s).to(x.dtype)
    if fmt == "nvfp4":
        return formats.nvfp4_fake_quant(x.float(), amax).to(x.dtype)
    raise ValueError(f"unknown format {fmt!r} for {kind}")


class _Marker(torch.autograd.Function):
    """Eager: the Q/DQ reference. Export: a marker node that ``_materialize`` replaces by real Q/DQ nodes."""

    @staticmethod
    def forward(ctx, x, layer: str, kind: str, fmt: str, amax: float):
        return fake_quant(x, fmt, amax, kind)

    @staticmethod
    def symbolic(g, x, layer: str, kind: str, fmt: str, amax: float):
        return g.op(f"{MARKER_DOMAIN}::QDQ", x, layer_s=layer, kind_s=kind).setType(x.type())


class QDQLinear(nn.Linear):
    """A linear layer whose input and weight pass through FP8 or NVFP4 quantize-dequantize.

    The input is flattened to 2D [tokens, in_features] first: TensorRT's dynamic FP4 quantization takes 2D/3D
    tensors, and the Mix-FFN's projections see 4D channels-last inputs. (An nn.Linear, so the model's own
    "pointwise convs are Linear" checks still hold; it shares the original's parameters.)
    """

    def __init__(self, linear: nn.Linear, layer: str, quant: LayerQuant):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.layer = layer
        self.quant = quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        q = self.quant
        xq = _Marker.apply(x2, self.layer, "input", q.format, q.input_amax)
        wq = _Marker.apply(self.weight, self.layer, "weight", q.format, q.weight_amax)
        return F.linear(xq, wq, self.bias).reshape(*lead, -1)


def build_export_model(transformer: nn.Module, recipe: dict[str, LayerQuant] | None = None,
                       dtype: torch.dtype = torch.bfloat16) -> ClipStep:
    """A ClipStep over a copy of ``transformer`` (a plain SanaVideoTransformer with Linear pointwise convs) in
    ``dtype``, the ``recipe`` layers swapped for QDQLinear. Its eager forward is the reference of the graph."""
    model = copy.deepcopy(transformer).to(dtype).eval()
    for name, quant in (recipe or {}).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"recipe layer {name} is a {type(linear).__name__}, expected nn.Linear")
        if quant.format == "nvfp4" and linear.in_features % formats.NVFP4_BLOCK:
            raise ValueError(f"{name}: NVFP4 needs in_features multiple of {formats.NVFP4_BLOCK}, got {linear.in_features}")
        setattr(parent, child, QDQLinear(linear, name, quant))
    return ClipStep(model)


def precision_of(recipe: dict[str, LayerQuant] | None, dtype: torch.dtype) -> str:
    formats_used = {q.format for q in (recipe or {}).values()}
    if "nvfp4" in formats_used:
        return "nvfp4"
    if "fp8" in formats_used:
        return "fp8"
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


# ---------------------------------------------------------------------------------------------------------------------
# Export


@dataclass(frozen=True)
class ExportedGraph:
    path: Path
    precision: str
    opset: int
    inputs: dict[str, tuple[tuple[int, ...], str]]
    output: tuple[tuple[int, ...], str]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["path"] = str(self.path)
        out["inputs"] = {k: {"shape": list(s), "dtype": d} for k, (s, d) in self.inputs.items()}
        out["output"] = {"name": OUTPUT_NAME, "shape": list(self.output[0]), "dtype": self.output[1]}
        return out


def export_onnx(transformer: nn.Module, path: str | Path, shapes: StepShapes, *,
                recipe: dict[str, LayerQuant] | None = None, dtype: torch.dtype = torch.bfloat16) -> ExportedGraph:
    """Export the clip step of ``transformer`` (plain, bidirectional) to ``path`` at the static ``shapes``.

    ``recipe`` (from quantization.quantize) names the layers to quantize and their calibrated ranges. Weights go
    to ``<path>.data`` when the model is large. The file appears only once complete.
    """
    import onnx

    if getattr(transformer, "causal", False):
        raise ValueError("ONNX export covers the bidirectional clip step; block-causal models run in PyTorch")
    device = next(transformer.parameters()).device
    model = build_export_model(transformer, recipe, dtype)
    args = shapes.example_inputs(dtype, device)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".export."))
    try:
        raw = tmp / "raw.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, args, str(raw), dynamo=False, opset_version=OPSET, input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME], do_constant_folding=True, custom_opsets={MARKER_DOMAIN: 1},
            )
        proto = onnx.load(str(raw), load_external_data=True)
        _materialize(proto, recipe or {}, dtype)
        size = sum(len(t.raw_data) for t in proto.graph.initializer)
        final = tmp / path.name
        if size > EXTERNAL_DATA_BYTES:
            onnx.save(proto, str(final), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=path.name + ".data", size_threshold=1024)
        else:
            onnx.save(proto, str(final))
        for produced in tmp.iterdir():
            if produced.name.startswith(path.name):
                produced.replace(path.parent / produced.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    out_shape = tuple(args[0].shape[:1]) + (transformer.config.out_channels or transformer.config.in_channels,) + tuple(args[0].shape[2:])
    inputs = {k: (tuple(v.shape), "float32" if k == "timestep" else name) for k, v in zip(INPUT_NAMES, args)}
    return ExportedGraph(path, precision_of(recipe, dtype), _opset_of(proto), inputs, (out_shape, name))


def _opset_of(proto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _onnx_dtype(dtype: torch.dtype) -> int:
    from onnx import TensorProto

    return {torch.bfloat16: TensorProto.BFLOAT16, torch.float16: TensorProto.FLOAT16, torch.float32: TensorProto.FLOAT}[dtype]


def _tensor(name: str, value: torch.Tensor):
    """A TensorProto from a torch tensor of any dtype we use (fp32/bf16/fp16, float8_e4m3fn, packed fp4 as uint8
    with ``dims`` set by the caller)."""
    from onnx import TensorProto, helper

    kinds = {torch.float32: TensorProto.FLOAT, torch.bfloat16: TensorProto.BFLOAT16, torch.float16: TensorProto.FLOAT16,
             torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN}
    value = value.detach().cpu().contiguous()
    raw = value.reshape(-1).view(torch.uint8).numpy().tobytes()
    return helper.make_tensor(name, kinds[value.dtype], list(value.shape), raw, raw=True)


def _fp4_tensor(name: str, codes: torch.Tensor):
    from onnx import TensorProto, helper

    packed = formats.pack_fp4(codes.to(torch.uint8)).cpu().contiguous()
    return helper.make_tensor(name, TensorProto.FLOAT4E2M1, list(codes.shape), packed.numpy().tobytes(), raw=True)


def _materialize(proto, recipe: dict[str, LayerQuant], dtype: torch.dtype) -> None:
    """Replace every QDQ marker of ``proto`` by the Q/DQ nodes and quantized initializers it stands for."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    graph_dtype = _onnx_dtype(dtype)
    new_nodes, drop_inits, uses_fp4, uses_trt = [], set(), False, False
    for node in graph.node:
        if node.domain != MARKER_DOMAIN:
            new_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        layer, kind = attrs["layer"].decode(), attrs["kind"].decode()
        q = recipe[layer]
        src, dst = node.input[0], node.output[0]
        p = f"{layer}.{kind}"
        if kind == "weight":
            if src not in inits:
                raise RuntimeError(f"{layer}: weight is not an initializer in the exported graph")
            w = torch.from_numpy(numpy_helper.to_array(inits[src]).astype(np.float32)) if inits[src].data_type != TensorProto.BFLOAT16 \
                else _bf16_to_float(inits[src])
            drop_inits.add(src)
            if q.format == "fp8":
                s = formats.fp8_scale(q.weight_amax).to(dtype)
                graph.initializer.extend([_tensor(f"{p}_fp8", formats.fp8_quantize(w, s.float())), _tensor(f"{p}_scale", s)])
                new_nodes.append(helper.make_node("DequantizeLinear", [f"{p}_fp8", f"{p}_scale"], [dst], name=f"{p}_dq"))
            else:
                codes, block, g = formats.nvfp4_quantize(w, q.weight_amax)
                graph.initializer.extend([_fp4_tensor(f"{p}_fp4", codes), _tensor(f"{p}_block_scale", block),
                                          _tensor(f"{p}_global_scale", g.float())])
                uses_fp4 = True
                new_nodes += [
                    helper.make_node("DequantizeLinear", [f"{p}_block_scale", f"{p}_global_scale"], [f"{p}_scale"],
                                     name=f"{p}_scale_dq"),
                    helper.make_node("DequantizeLinear", [f"{p}_fp4", f"{p}_scale"], [f"{p}_f32"], name=f"{p}_dq",
                                     axis=-1, block_size=formats.NVFP4_BLOCK),
                    helper.make_node("Cast", [f"{p}_f32"], [dst], name=f"{p}_cast", to=graph_dtype),
                ]
        else:
            if q.format == "fp8":
                s = formats.fp8_scale(q.input_amax).to(dtype)
                zero = helper.make_tensor(f"{p}_zero", TensorProto.FLOAT8E4M3FN, [], [0.0])
                graph.initializer.extend([_tensor(f"{p}_scale", s), zero])
                new_nodes += [
                    helper.make_node("QuantizeLinear", [src, f"{p}_scale", f"{p}_zero"], [f"{p}_fp8"], name=f"{p}_q"),
                    helper.make_node("DequantizeLinear", [f"{p}_fp8", f"{p}_scale"], [dst], name=f"{p}_dq"),
                ]
            else:
                g = formats.nvfp4_global_scale(q.input_amax).float()
                graph.initializer.append(_tensor(f"{p}_global_scale", g))
                uses_fp4 = uses_trt = True
                new_nodes += [
                    helper.make_node("TRT_FP4DynamicQuantize", [src, f"{p}_global_scale"], [f"{p}_fp4", f"{p}_block_scale"],
                                     name=f"{p}_dynq", domain=TRT_DOMAIN, axis=-1, block_size=formats.NVFP4_BLOCK,
                                     scale_type=TensorProto.FLOAT8E4M3FN),
                    helper.make_node("DequantizeLinear", [f"{p}_block_scale", f"{p}_global_scale"], [f"{p}_scale"],
                                     name=f"{p}_scale_dq"),
                    helper.make_node("DequantizeLinear", [f"{p}_fp4", f"{p}_scale"], [f"{p}_f32"], name=f"{p}_dq",
                                     axis=-1, block_size=formats.NVFP4_BLOCK),
                    helper.make_node("Cast", [f"{p}_f32"], [dst], name=f"{p}_cast", to=graph_dtype),
                ]
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [t for t in graph.initializer if t.name not in drop_inits]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    # Shapes of the replaced values are recomputed by consumers; stale entries would only confuse checkers.
    del graph.value_info[:]
    opsets = [o for o in proto.opset_import if o.domain not in (MARKER_DOMAIN,)]
    del proto.opset_import[:]
    proto.opset_import.extend(opsets)
    if uses_fp4:
        for o in proto.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = max(o.version, OPSET_FP4)
        proto.ir_version = max(proto.ir_version, 11)
    if uses_trt and not any(o.domain == TRT_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(TRT_DOMAIN, 1))


def _bf16_to_float(t) -> torch.Tensor:
    from onnx import numpy_helper

    arr = numpy_helper.to_array(t)
    return torch.from_numpy(np.ascontiguousarray(arr).view(np.uint16).astype(np.int32) << 16).view(torch.float32).clone() \
        if arr.dtype == np.uint16 else torch.from_numpy(np.asarray(arr, dtype=np.float32))


# ---------------------------------------------------------------------------------------------------------------------
# ONNX Runtime (CPU) lowering


def lower_for_onnxruntime(proto):
    """A copy of ``proto`` that ONNX Runtime's CPU provider runs, with the same arithmetic up to float rounding:

    - every bf16/fp16 tensor becomes fp32 (ORT has no bf16 matmul on CPU; bf16 values are exact in fp32, only
      intermediate rounding differs);
    - FP4 weights behind DequantizeLinear become a lookup of the E2M1 values times the block scales;
    - ``trt::TRT_FP4DynamicQuantize`` with its two DequantizeLinear becomes the same block quantization in plain
      ops (block amax, FP8 block scale through a Cast to FLOAT8E4M3FN, E2M1 rounding by comparisons).
    FP8 QuantizeLinear/DequantizeLinear stay as they are (ORT runs them).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = copy.deepcopy(proto)
    graph = proto.graph
    low = (TensorProto.BFLOAT16, TensorProto.FLOAT16)

    def to_f32(t):
        if t.data_type == TensorProto.BFLOAT16:
            arr = _bf16_to_float(t).numpy().reshape(tuple(t.dims))
        elif t.data_type == TensorProto.FLOAT16:
            arr = numpy_helper.to_array(t).astype(np.float32)
        else:
            return t
        out = numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), t.name)
        return out

    for i, t in enumerate(list(graph.initializer)):
        if t.data_type in low:
            graph.initializer[i].CopyFrom(to_f32(t))
    for vi in list(graph.input) + list(graph.output):
        if vi.type.tensor_type.elem_type in low:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    del graph.value_info[:]
    for node in graph.node:
        for a in node.attribute:
            if node.op_type in ("Cast",) and a.name == "to" and a.i in low:
                a.i = TensorProto.FLOAT
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in low:
                a.t.CopyFrom(to_f32(a.t))

    inits = {t.name: t for t in graph.initializer}
    new_nodes, drop = [], set()
    consumed_by_dynq = {n.output[0]: n for n in graph.node if n.domain == TRT_DOMAIN and n.op_type == "TRT_FP4DynamicQuantize"}
    for node in graph.node:
        if node.domain == TRT_DOMAIN:
            continue  # replaced together with its data DequantizeLinear below
        if node.op_type == "DequantizeLinear" and node.input[0] in consumed_by_dynq:
            dynq = consumed_by_dynq[node.input[0]]
            new_nodes += _fp4_dynamic_plain(dynq.input[0], dynq.input[1], node.output[0], dynq.name)
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].data_type == TensorProto.FLOAT4E2M1:
            t = inits[node.input[0]]
            codes = formats.unpack_fp4(torch.from_numpy(np.frombuffer(t.raw_data, dtype=np.uint8).copy()))
            codes = codes[: int(np.prod(t.dims))].reshape(tuple(t.dims))
            values = formats.e2m1_values(codes).numpy()
            graph.initializer.append(numpy_helper.from_array(values, t.name + "_values"))
            drop.add(t.name)
            p = node.name or node.output[0]
            shape_blocks = list(t.dims[:-1]) + [t.dims[-1] // formats.NVFP4_BLOCK, formats.NVFP4_BLOCK]
            graph.initializer.extend([
                numpy_helper.from_array(np.array(shape_blocks, np.int64), p + "_blocks"),
                numpy_helper.from_array(np.array(list(t.dims), np.int64), p + "_shape"),
                numpy_helper.from_array(np.array([-1], np.int64), p + "_last"),
            ])
            new_nodes += [
                helper.make_node("Reshape", [t.name + "_values", p + "_blocks"], [p + "_vb"]),
                helper.make_node("Unsqueeze", [node.input[1], p + "_last"], [p + "_sb"]),
                helper.make_node("Mul", [p + "_vb", p + "_sb"], [p + "_wb"]),
                helper.make_node("Reshape", [p + "_wb", p + "_shape"], [node.output[0]]),
            ]
            continue
        new_nodes.append(node)
    # Block-scale DequantizeLinear of a dynamic quantizer reads its FP8 output, which no longer exists.
    dyn_scale_outputs = {n.output[1] for n in consumed_by_dynq.values()}
    new_nodes = [n for n in new_nodes if not (n.op_type == "DequantizeLinear" and n.input[0] in dyn_scale_outputs)]
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.initializer.extend(_fp4_constants())
    opsets = [o for o in proto.opset_import if o.domain != TRT_DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(opsets)
    return proto


_C = "nvfp4_lowering"


def _fp4_constants():
    from onnx import numpy_helper

    arr = lambda v, dt=np.float32: np.array(v, dtype=dt)  # noqa: E731
    out = [
        numpy_helper.from_array(arr(formats.FP4_MAX), f"{_C}.fp4_max"),
        numpy_helper.from_array(arr(formats.FP8_MIN_SCALE), f"{_C}.scale_min"),
        numpy_helper.from_array(arr(formats.FP8_MAX), f"{_C}.scale_max"),
        numpy_helper.from_array(arr([-1], np.int64), f"{_C}.last"),
        numpy_helper.from_array(arr([0, -1, formats.NVFP4_BLOCK], np.int64), f"{_C}.blocks"),
    ]
    steps = np.diff(np.array(formats.E2M1_MAGNITUDES, np.float32))
    for i, (b, step) in enumerate(zip(formats.E2M1_BOUNDS, steps)):
        out.append(numpy_helper.from_array(arr(b), f"{_C}.bound{i}"))
        out.append(numpy_helper.from_array(arr(step), f"{_C}.step{i}"))
    return out


def _fp4_dynamic_plain(x: str, global_scale: str, out: str, name: str):
    """Plain-op NVFP4 dynamic block quantize-dequantize of 2D ``x`` [T, K] into fp32 ``out``."""
    from onnx import TensorProto, helper

    p = f"{name}.plain"
    nodes = [
        helper.make_node("Cast", [x], [p + "_x"], to=TensorProto.FLOAT),
        helper.make_node("Shape", [p + "_x"], [p + "_shape"]),
        helper.make_node("Reshape", [p + "_x", f"{_C}.blocks"], [p + "_xb"]),
        helper.make_node("Abs", [p + "_xb"], [p + "_abs"]),
        helper.make_node("ReduceMax", [p + "_abs", f"{_C}.last"], [p + "_amax"], keepdims=1),
        helper.make_node("Mul", [global_scale, f"{_C}.fp4_max"], [p + "_den"]),
        helper.make_node("Div", [p + "_amax", p + "_den"], [p + "_bs"]),
        helper.make_node("Clip", [p + "_bs", f"{_C}.scale_min", f"{_C}.scale_max"], [p + "_bsc"]),
        helper.make_node("Cast", [p + "_bsc"], [p + "_bs8"], to=TensorProto.FLOAT8E4M3FN),
        helper.make_node("Cast", [p + "_bs8"], [p + "_bsr"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [p + "_bsr", global_scale], [p + "_scale"]),
        helper.make_node("Div", [p + "_xb", p + "_scale"], [p + "_y"]),
        helper.make_node("Abs", [p + "_y"], [p + "_mag"]),
        helper.make_node("Sign", [p + "_y"], [p + "_sign"]),
    ]
    acc = None
    for i, tie_up in enumerate(formats.E2M1_TIE_UP):
        cmp = "GreaterOrEqual" if tie_up else "Greater"
        nodes += [
            helper.make_node(cmp, [p + "_mag", f"{_C}.bound{i}"], [f"{p}_c{i}"]),
            helper.make_node("Cast", [f"{p}_c{i}"], [f"{p}_cf{i}"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{p}_cf{i}", f"{_C}.step{i}"], [f"{p}_s{i}"]),
        ]
        if acc is None:
            acc = f"{p}_s{i}"
        else:
            nodes.append(helper.make_node("Add", [acc, f"{p}_s{i}"], [f"{p}_a{i}"]))
            acc = f"{p}_a{i}"
    nodes += [
        helper.make_node("Mul", [acc, p + "_sign"], [p + "_q"]),
        helper.make_node("Mul", [p + "_q", p + "_scale"], [p + "_deq"]),
        helper.make_node("Reshape", [p + "_deq", p + "_shape"], [out]),
    ]
    return nodes


def run_onnxruntime(path_or_proto, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Run a graph (lowered with ``lower_for_onnxruntime``) on ONNX Runtime's CPU provider; fp32 inputs."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path_or_proto)) if isinstance(path_or_proto, (str, Path)) else path_or_proto
    lowered = lower_for_onnxruntime(proto)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(lowered.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {k: np.asarray(v, dtype=np.float32) for k, v in inputs.items()}
    return session.run([OUTPUT_NAME], feeds)[0]
