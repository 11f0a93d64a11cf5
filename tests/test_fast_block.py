"""``engine.fast.optimize`` keeps the model's function: the FastBlock equals the reference TransformerBlock in clip
mode, in one-pass block-causal mode and when streaming with a BlockState (outputs and committed state alike).

CPU runs the fast structure with the kernels' PyTorch references (and once with the Triton kernels under the
interpreter); CUDA runs the compiled kernels, torch.compile and CUDA-graph replay (skipped without a GPU).
"""

import copy
import dataclasses
import textwrap

import pytest
import torch

from engine.fast import FastBlock, GraphedTransformer, optimize
from engine.kernels.fp8 import FP8Linear
from engine.model import SanaVideoTransformer, pointwise_convs_to_linear
from engine.presets import TINY_TRANSFORMER
from engine.state import BlockState, ReferenceBlockState
from engine.text import cut_padding


CONFIGS = {
    "tiny": dataclasses.replace(TINY_TRANSFORMER, num_layers=2),
    "biased-3-heads": dataclasses.replace(
        TINY_TRANSFORMER, num_attention_heads=3, attention_head_dim=36, num_cross_attention_heads=3,
        cross_attention_head_dim=36, cross_attention_dim=108, num_layers=2, caption_channels=40, attention_bias=True,
    ),
}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def models(config, causal=False, seed=0, **fast_kwargs):
    torch.manual_seed(seed)
    ref = SanaVideoTransformer(config, causal=causal).eval()
    fast = optimize(copy.deepcopy(ref), **{"compile": False, **fast_kwargs})
    return ref, fast


def inputs(config, frames=4, h=6, w=8, batch=2, seed=1, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, h, w, generator=g)
    text = torch.randn(batch, 7, config.caption_channels, generator=g)
    mask = torch.ones(batch, 7)
    mask[-1, 4:] = 0
    t = torch.linspace(900.0, 100.0, batch)
    return x.to(device, dtype), text.to(device, dtype), t.to(device), mask.to(device)


@pytest.mark.parametrize("attention", ["gemm", "gemm-compiled", "triton"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_clip_and_block_causal_equal_reference(name, attention):
    """Every linear-attention form (on the CPU the custom ops run their PyTorch references) against the model."""
    config = CONFIGS[name]
    ref, fast = models(config, attention=attention)
    assert all(isinstance(b, FastBlock) for b in fast.transformer_blocks)
    x, text, t, mask = inputs(config)
    with torch.no_grad():
        assert rel_err(fast(x, text, t, mask), ref(x, text, t, mask)) < 1e-5
        assert rel_err(fast(x, text, t, mask, block_frames=[1, 3]), ref(x, text, t, mask, block_frames=[1, 3])) < 1e-5


@pytest.mark.parametrize("norm_kernels", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_norms_as_kernels_or_compiled_equal_reference(causal, norm_kernels):
    """The residual adds + LayerNorm + modulation as custom ops (their references on the CPU) or as the model's ops
    (what torch.compile fuses), in clips and streams."""
    config = CONFIGS["biased-3-heads"]
    ref, fast = models(config, causal=causal, norm_kernels=norm_kernels)
    assert fast.fast_settings.norm_kernels == fast.transformer_blocks[0].core.norm_kernels == norm_kernels
    x, text, t, mask = inputs(config, frames=2)
    with torch.no_grad():
        assert rel_err(fast(x, text, t, mask), ref(x, text, t, mask)) < 1e-5
        if causal:
            s_ref, s_fast = BlockState.for_model(ref, 2, 6, 8), BlockState.for_model(fast, 2, 6, 8)
            ref(x, text, t, mask, state=s_ref, commit=True)
            fast(x, text, t, mask, state=s_fast, commit=True)
            assert rel_err(fast(x, text, t, mask, state=s_fast), ref(x, text, t, mask, state=s_ref)) < 1e-5


def test_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="accepted: gemm, gemm-compiled, triton"):
        models(CONFIGS["tiny"], attention="flash")


def test_converted_pointwise_convs_give_the_same_fast_model():
    """optimize() accepts a model whose Mix-FFN convs were already turned into Linear layers."""
    config = CONFIGS["tiny"]
    ref, fast = models(config)
    pointwise_convs_to_linear(ref)
    x, text, t, mask = inputs(config)
    with torch.no_grad():
        fast_from_linear = optimize(copy.deepcopy(ref), compile=False)
        assert rel_err(fast_from_linear(x, text, t, mask), fast(x, text, t, mask)) < 1e-6


@pytest.mark.parametrize("state_cls", ["BlockState", "ReferenceBlockState"])
def test_streaming_equals_reference(state_cls):
    config = CONFIGS["biased-3-heads"]
    ref, fast = models(config, causal=True)
    x, text, t, mask = inputs(config, frames=2)

    def new_state(model):
        if state_cls == "BlockState":
            return BlockState.for_model(model, 2, 6, 8)
        return ReferenceBlockState(config.num_layers)

    s_ref, s_fast = new_state(ref), new_state(fast)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _ in range(3):
            xb = torch.randn(2, 16, 2, 6, 8, generator=g)
            assert rel_err(fast(xb, text, t, mask, state=s_fast), ref(xb, text, t, mask, state=s_ref)) < 1e-5
            zero = torch.zeros_like(t)
            out_f = fast(xb, text, zero, mask, state=s_fast, commit=True)
            out_r = ref(xb, text, zero, mask, state=s_ref, commit=True)
            assert rel_err(out_f, out_r) < 1e-5
            assert s_fast.frames == s_ref.frames
    if state_cls == "BlockState":
        assert rel_err(s_fast.S, s_ref.S) < 1e-5 and rel_err(s_fast.z, s_ref.z) < 1e-5
        assert rel_err(s_fast.conv, s_ref.conv) < 1e-5


def test_blocks_share_one_compiled_graph():
    """Regional compilation: N identical blocks trace once per input signature, not N times."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    config = dataclasses.replace(TINY_TRANSFORMER, num_layers=4)
    ref, fast = models(config, causal=True, compile=True, compile_backend="eager")
    torch._dynamo.reset()
    counters.clear()
    x, text, t, mask = inputs(config, frames=2)
    with torch.no_grad():
        assert rel_err(fast(x, text, t, mask), ref(x, text, t, mask)) < 1e-5
        fast(x, text, t, mask)
        assert counters["stats"]["unique_graphs"] == 1
        state = BlockState.for_model(fast, 2, 6, 8)
        fast(x, text, t, mask, state=state)
        fast(x, text, t, mask, state=state, commit=True)
        assert counters["stats"]["unique_graphs"] == 2  # + the stream variant (commit happens outside)


def padded_text(config, lengths, total=40, seed=3):
    """Text [B, total, caption] whose sample i has lengths[i] real tokens, then padding (as the text encoder pads)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(len(lengths), total, config.caption_channels, generator=g)
    mask = torch.zeros(len(lengths), total)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return text, mask


def test_text_lengths_share_one_compiled_graph():
    """The text length is dynamic in the compiled blocks: prompts of other lengths (the pipeline cuts their padding)
    do not compile them again."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    config = dataclasses.replace(TINY_TRANSFORMER, num_layers=2)
    ref, fast = models(config, compile=True, compile_backend="eager")
    torch._dynamo.reset()
    counters.clear()
    x, _, t, _ = inputs(config)
    with torch.no_grad():
        for lengths in ([3, 9], [20, 2], [40, 33], [7, 7]):
            text, mask = padded_text(config, lengths)
            assert rel_err(fast(x, text, t, mask), ref(x, text, t, mask)) < 1e-5
    assert counters["stats"]["unique_graphs"] == 1


def test_rope_tables_stay_fp32_in_a_bf16_model():
    """A bf16 cast rounds the RoPE tables; the fast model rebuilds them in fp32 (closer to the fp32 reference)."""
    config = CONFIGS["tiny"]
    torch.manual_seed(0)
    ref32 = SanaVideoTransformer(config).eval()
    ref16 = copy.deepcopy(ref32).bfloat16()
    fast = optimize(copy.deepcopy(ref16), compile=False)
    assert ref16.rope.freqs_cos.dtype == torch.bfloat16
    assert fast.rope.freqs_cos.dtype == torch.float32
    assert torch.equal(fast.rope.freqs_cos, ref32.rope.freqs_cos)
    x, text, t, mask = inputs(config)
    with torch.no_grad():
        expected = ref32(x, text, t, mask)
        err_fast = rel_err(fast(x.bfloat16(), text.bfloat16(), t, mask), expected)
        err_ref = rel_err(ref16(x.bfloat16(), text.bfloat16(), t, mask), expected)
    assert err_fast < 0.05 and err_fast < 1.5 * err_ref


FP8_CONFIG = dataclasses.replace(TINY_TRANSFORMER, num_attention_heads=2, attention_head_dim=32,
                                 num_cross_attention_heads=2, cross_attention_head_dim=32, cross_attention_dim=64,
                                 num_layers=2)  # every GEMM dimension a multiple of 16


def test_fp8_linears_close_to_full_precision():
    ref, fast = models(FP8_CONFIG, fp8=True)
    core = fast.transformer_blocks[0].core
    assert isinstance(core.qkv, FP8Linear) and isinstance(core.ffn_in, FP8Linear)
    assert isinstance(core.temporal, FP8Linear) and not isinstance(core.cross_kv, FP8Linear)
    assert core.quantized_norms and fast.fast_settings.norm_kernels and fast.fast_settings.fp8_fast_accum
    x, text, t, mask = inputs(FP8_CONFIG)
    with torch.no_grad():
        try:
            got = fast(x, text, t, mask)
        except (RuntimeError, NotImplementedError) as exc:
            pytest.skip(f"torch._scaled_mm unavailable on CPU here: {exc}")
        assert rel_err(got, ref(x, text, t, mask)) < 0.1


def test_fp8_inputs_quantized_by_the_norm_kernels_are_the_layers_own_quantization():
    """With FP8 the norm kernels hand q|k|v and the Mix-FFN's expansion e4m3 rows + scales. That is the same
    quantization FP8Linear makes of the norms' 16-bit output (tests/test_kernels_norms.py pins it), so the model
    gives what the FP8 model without the norm kernels gives, up to fp32 rounding in the norms."""
    _, fast = models(FP8_CONFIG, fp8=True)
    _, compiled_norms = models(FP8_CONFIG, fp8=True, norm_kernels=False)
    assert not compiled_norms.transformer_blocks[0].core.quantized_norms
    assert fast.transformer_blocks[0].core.quantized_norms
    x, text, t, mask = inputs(FP8_CONFIG)
    calls = []
    original = FP8Linear.quantized

    def counting(self, xq, xs):
        calls.append(xq.dtype)
        return original(self, xq, xs)

    with torch.no_grad():
        try:
            FP8Linear.quantized = counting
            got = fast(x, text, t, mask)
            calls_fast = len(calls)
            want = compiled_norms(x, text, t, mask)
        except (RuntimeError, NotImplementedError) as exc:
            pytest.skip(f"torch._scaled_mm unavailable on CPU here: {exc}")
        finally:
            FP8Linear.quantized = original
    # Every FP8 GEMM goes through quantized(), 7 a layer either way (q|k|v, attn_out, cross_q, cross_out, ffn_in,
    # ffn_out, temporal).
    assert calls_fast == len(calls) - calls_fast == 7 * FP8_CONFIG.num_layers
    assert rel_err(got, want) < 1e-3


INTERPRETER_CHECK = textwrap.dedent("""
    import copy, dataclasses, torch
    from engine.fast import optimize
    from engine.model import SanaVideoTransformer
    from engine.presets import TINY_TRANSFORMER
    from engine.state import BlockState
    def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm()).item()
    config = dataclasses.replace(TINY_TRANSFORMER, num_layers=1)
    torch.manual_seed(0)
    ref = SanaVideoTransformer(config, causal=True).eval()
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(1, 16, 2, 4, 6, generator=g), torch.randn(1, 5, 32, generator=g)
    t, mask = torch.tensor([500.0]), torch.ones(1, 5)
    # "triton": the fused linear-attention kernels; "gemm": the norm + rotation prologue kernel (GEMMs as einsum).
    for attention in ("triton", "gemm"):
        fast = optimize(copy.deepcopy(ref), compile=False, attention=attention, norm_kernels=attention == "gemm")
        with torch.no_grad():
            assert rel(fast(x, text, t, mask), ref(x, text, t, mask)) < 1e-5, attention
            s_ref, s_fast = BlockState.for_model(ref, 1, 4, 6), BlockState.for_model(fast, 1, 4, 6)
            ref(x, text, t, mask, state=s_ref, commit=True)
            fast(x, text, t, mask, state=s_fast, commit=True)
            assert rel(fast(x, text, t, mask, state=s_fast), ref(x, text, t, mask, state=s_ref)) < 1e-5, attention
    print("ok")
""")


def test_fast_model_with_triton_kernels_in_interpreter(triton_interpreter):
    triton_interpreter(INTERPRETER_CHECK, timeout=900)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: Triton kernels, inductor and CUDA graphs")
@pytest.mark.parametrize("attention", ["gemm", "gemm-compiled", "triton"])
def test_compiled_kernels_and_graphs_on_gpu(attention):
    config = dataclasses.replace(TINY_TRANSFORMER, num_attention_heads=2, attention_head_dim=64,
                                 num_cross_attention_heads=2, cross_attention_head_dim=64, cross_attention_dim=128,
                                 num_layers=2)
    torch.manual_seed(0)
    ref = SanaVideoTransformer(config, causal=True).eval().cuda()
    fast = optimize(copy.deepcopy(ref).bfloat16(), compile=True, attention=attention,
                    norm_kernels=attention == "gemm")
    assert fast.fast_settings.attention == attention
    x, text, t, mask = inputs(config, frames=5, h=10, w=14, device="cuda")
    with torch.no_grad():
        expected = ref(x, text, t, mask)
        xb, textb = x.bfloat16(), text.bfloat16()
        got = fast(xb, textb, t, mask)
        assert rel_err(got, expected) < 2e-2
        graphed = GraphedTransformer(fast)
        assert rel_err(graphed(xb, textb, t, mask), got) < 1e-3
        assert rel_err(graphed(xb, textb, t, mask), got) < 1e-3  # replay
        # Texts of other lengths (the pipeline cuts their padding) through the same compiled blocks, and graphed.
        text64, mask64 = (a.cuda() for a in padded_text(config, [5, 12], total=64))
        cut, cut_mask = cut_padding(text64, mask64)
        assert cut.shape[1] == 16
        want = ref(x, text64, t, mask64)
        assert rel_err(fast(xb, cut.bfloat16(), t, cut_mask), want) < 2e-2
        assert rel_err(fast(xb, text64.bfloat16(), t, mask64), want) < 2e-2
        assert rel_err(graphed(xb, cut.bfloat16(), t, cut_mask), want) < 2e-2
        s_ref, s_fast = BlockState.for_model(ref, 2, 10, 14), BlockState.for_model(fast, 2, 10, 14)
        for _ in range(2):
            ref(x, text, t, mask, state=s_ref, commit=True)
            fast(xb, textb, t, mask, state=s_fast, commit=True)
        assert rel_err(fast(xb, textb, t, mask, state=s_fast), ref(x, text, t, mask, state=s_ref)) < 2e-2
        assert rel_err(s_fast.S, s_ref.S) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)")
def test_fp8_compiled_with_quantizing_norm_kernels_on_gpu():
    """The compiled FP8 model whose norm kernels quantize q|k|v's and the expansion's input, against the compiled
    FP8 model that quantizes in passes of its own (and both against fp32), in clips, graphed and streamed."""
    config = dataclasses.replace(TINY_TRANSFORMER, num_attention_heads=2, attention_head_dim=64,
                                 num_cross_attention_heads=2, cross_attention_head_dim=64, cross_attention_dim=128,
                                 num_layers=2)
    torch.manual_seed(0)
    ref = SanaVideoTransformer(config, causal=True).eval().cuda()
    fused = optimize(copy.deepcopy(ref).bfloat16(), fp8=True, compile=True)
    separate = optimize(copy.deepcopy(ref).bfloat16(), fp8=True, compile=True, norm_kernels=False)
    assert fused.transformer_blocks[0].core.quantized_norms and fused.fast_settings.fp8_fast_accum
    assert not separate.transformer_blocks[0].core.quantized_norms
    x, text, t, mask = inputs(config, frames=5, h=10, w=14, device="cuda")
    with torch.no_grad():
        expected = ref(x, text, t, mask)
        xb, textb = x.bfloat16(), text.bfloat16()
        got, other = fused(xb, textb, t, mask), separate(xb, textb, t, mask)
        err = rel_err(other, expected)
        # No worse than quantizing apart; the two differ where the 16-bit norms round differently (and FP8 rounds
        # those rows differently), less than either differs from fp32.
        assert err < 0.08 and rel_err(got, expected) < 1.2 * err
        assert rel_err(got, other) < err
        graphed = GraphedTransformer(fused)
        assert rel_err(graphed(xb, textb, t, mask), got) < 1e-3
        s_ref, s_fused = BlockState.for_model(ref, 2, 10, 14), BlockState.for_model(fused, 2, 10, 14)
        for _ in range(2):
            ref(x, text, t, mask, state=s_ref, commit=True)
            fused(xb, textb, t, mask, state=s_fused, commit=True)
        assert rel_err(fused(xb, textb, t, mask, state=s_fused), ref(x, text, t, mask, state=s_ref)) < 0.08
