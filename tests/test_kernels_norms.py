"""The residual add + LayerNorm + modulation kernel equals the block's own ops (TransformerBlock.forward).

CPU: the reference against the block's norms; the Triton kernel under the interpreter (subprocess) with a channel
count that is no power of two and a ragged last tile of rows. CUDA: the compiled kernel in bf16 at the model's
width, and the fast block with the kernels against the one without.

The FP8 forms (``*_fp8``) hand the next GEMM its input quantized: what ``quantize_rowwise`` makes of the 16-bit row
the plain form returns, bit for bit on the CPU and under the interpreter; on the GPU (its hardware e4m3 cast) up to
the odd element whose 16-bit value the two compiled kernels round differently.
"""

import textwrap

import pytest
import torch

from engine.kernels import norms
from engine.kernels.fp8 import E4M3, quantize_rowwise
from engine.model import TransformerBlock
from engine.presets import TINY_TRANSFORMER


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def modulation(B, C, g):
    return torch.randn(B, 1, C, generator=g) / 4, torch.randn(B, 1, C, generator=g) / 4


@pytest.mark.parametrize("affine", [False, True])
def test_reference_equals_the_blocks_norms(affine):
    import dataclasses

    torch.manual_seed(0)
    block = TransformerBlock(dataclasses.replace(TINY_TRANSFORMER, norm_elementwise_affine=affine)).eval()
    if affine:
        with torch.no_grad():
            block.norm2.weight.normal_()
            block.norm2.bias.normal_()
    g = torch.Generator().manual_seed(1)
    B, N, C = 2, 9, TINY_TRANSFORMER.num_attention_heads * TINY_TRANSFORMER.attention_head_dim
    x, y = torch.randn(B, N, C, generator=g), torch.randn(B, N, C, generator=g)
    scale, shift = modulation(B, C, g)
    s, h = norms.add_norm_modulate(x, y, scale, shift, block.norm2.weight, block.norm2.bias, block.norm2.eps,
                                   impl="torch")
    assert torch.equal(s, x + y)
    assert torch.equal(h, block.norm2(x + y) * (1 + scale) + shift)
    _, h1 = norms.add_norm_modulate(x, None, scale, shift, None, None, block.norm1.eps, impl="torch")
    assert torch.equal(h1, block.norm1(x) * (1 + scale) + shift)
    gate, a = torch.randn(B, 1, C, generator=g), torch.randn(B, N, C, generator=g)
    s2, h2 = norms.add_norm_modulate(x, y, scale, shift, block.norm2.weight, block.norm2.bias, block.norm2.eps,
                                     gate=gate, a=a, impl="torch")
    assert torch.equal(s2, x + gate * a + y)
    assert torch.equal(h2, block.norm2(x + gate * a + y) * (1 + scale) + shift)
    got_s, got_h = torch.ops.sana.add_norm_modulate(x, gate, a, y, scale, shift, block.norm2.weight,
                                                    block.norm2.bias, block.norm2.eps)
    assert torch.equal(got_s, s2) and torch.equal(got_h, h2)
    assert torch.equal(torch.ops.sana.norm_modulate(x, scale, shift, None, None, block.norm1.eps), h1)


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_fp8_forms_are_the_plain_forms_quantized_cpu():
    g = torch.Generator().manual_seed(2)
    B, N, C = 2, 5, 48
    x, y, a = ((torch.randn(B, N, C, generator=g) * 3).bfloat16() for _ in range(3))
    scale, shift = modulation(B, C, g)
    gate = torch.randn(B, 1, C, generator=g)
    w, b = torch.randn(C, generator=g).bfloat16(), torch.randn(C, generator=g).bfloat16()
    s, h = torch.ops.sana.add_norm_modulate(x, gate, a, y, scale, shift, w, b, 1e-6)
    s8, q, q_scale = torch.ops.sana.add_norm_modulate_fp8(x, gate, a, y, scale, shift, w, b, 1e-6)
    want_q, want_scale = quantize_rowwise(h.reshape(B * N, C))
    assert q.dtype == E4M3 and q.shape == (B * N, C) and q_scale.shape == (B * N, 1)
    assert torch.equal(s8, s) and same_bits(q, want_q) and torch.equal(q_scale, want_scale)
    h1 = torch.ops.sana.norm_modulate(x, scale, shift, None, None, 1e-6).reshape(B * N, C)
    q1, scale1 = torch.ops.sana.norm_modulate_fp8(x, scale, shift, None, None, 1e-6)
    want_q1, want_scale1 = quantize_rowwise(h1)
    assert same_bits(q1, want_q1) and torch.equal(scale1, want_scale1)
    assert rel_err(q1.float() * scale1, h1) < 0.05  # e4m3: 3 mantissa bits


def test_bad_shapes_are_refused():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"\[B, 1, C\]"):
        norms.add_norm_modulate(x, None, torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="gate and a go together"):
        norms.add_norm_modulate(x, None, torch.randn(2, 1, 8), torch.randn(2, 1, 8), gate=torch.randn(2, 1, 8))
    with pytest.raises(ValueError, match=r"\[B, 1, C\]"):
        norms.add_norm_modulate_fp8(x, None, torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="gate and a go together"):
        norms.add_norm_modulate_fp8(x, None, torch.randn(2, 1, 8), torch.randn(2, 1, 8), a=x)


INTERPRETER_CHECK = textwrap.dedent("""
    import torch
    from engine.kernels import norms
    from engine.kernels.fp8 import quantize_rowwise
    def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm()).item()
    g = torch.Generator().manual_seed(0)
    B, N, C = 3, 7, 40  # 21 rows over tiles of 4: a ragged last tile; 40 channels in a block of 64
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        x = (torch.randn(B, N, C, generator=g) * 3 + 1).to(dtype)
        y, a = torch.randn(B, N, C, generator=g).to(dtype), torch.randn(B, N, C, generator=g).to(dtype)
        scale, shift, gate = ((torch.randn(B, 1, C, generator=g) / 4).to(dtype) for _ in range(3))
        w, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
        for rows in (1, 4):
            for has_y, has_a, affine in ((True, True, True), (True, False, False), (False, True, False),
                                         (False, False, False)):
                kw = dict(gate=gate if has_a else None, a=a if has_a else None)
                args = (y if has_y else None, scale, shift, w if affine else None, b if affine else None, 1e-6)
                s, h = norms._add_norm_modulate_triton(x, *args, **kw, rows=rows, num_warps=1)
                f32 = {k: None if v is None else v.float() for k, v in kw.items()}
                ref_s, ref_h = norms.add_norm_modulate_reference(x.float(), None if not has_y else y.float(),
                                                                  scale.float(), shift.float(), *args[3:], **f32)
                assert h.dtype == dtype and rel(h, ref_h) < tol, (dtype, rows, has_y, has_a, affine, rel(h, ref_h))
                if has_y or has_a:
                    assert rel(s, ref_s) < tol and torch.equal(s, ref_s.to(dtype)), (dtype, rows, has_y, has_a)
                # The FP8 form: quantize_rowwise of the kernel's own 16-bit row, bit for bit (the e4m3 cast itself
                # is torch's here: the interpreter's is not the hardware's).
                s8, q, q_scale = norms._add_norm_modulate_triton(x, *args, **kw, rows=rows, num_warps=1, quant=True)
                want_q, want_scale = quantize_rowwise(h.reshape(B * N, C))
                assert torch.equal(s8, s) and torch.equal(q_scale, want_scale), (dtype, rows, has_y, has_a)
                assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)), (dtype, rows, has_y, has_a)
    print("ok")
""")


def test_triton_kernel_in_interpreter(triton_interpreter):
    triton_interpreter(INTERPRETER_CHECK, timeout=600)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled Triton kernel runs on the GPU")
@pytest.mark.parametrize("shape", [(2, 4096, 2240), (2, 300, 160), (3, 5, 40)])
def test_triton_kernel_on_gpu(shape):
    B, N, C = shape
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(B, N, C, generator=g) * 3 + 1).cuda().bfloat16()
    y = torch.randn(B, N, C, generator=g).cuda().bfloat16()
    scale, shift = (t.cuda().bfloat16() for t in modulation(B, C, g))
    w, b = torch.randn(C, generator=g).cuda(), torch.randn(C, generator=g).cuda()
    gate, a = (torch.randn(B, 1, C, generator=g) / 4).cuda(), torch.randn(B, N, C, generator=g).cuda().bfloat16()
    for has_y, has_a, weight, bias in ((True, True, w, b), (True, False, None, None), (False, False, None, None)):
        kw = dict(gate=gate if has_a else None, a=a if has_a else None)
        s, h = norms.add_norm_modulate(x, y if has_y else None, scale, shift, weight, bias, 1e-6, **kw,
                                       impl="triton")
        f32 = {k: None if v is None else v.float() for k, v in kw.items()}
        # The kernel sums in fp32 and normalises the unrounded sum.
        ref_s, ref_h = norms.add_norm_modulate_reference(x.float(), y.float() if has_y else None, scale.float(),
                                                         shift.float(), weight, bias, 1e-6, **f32)
        assert h.dtype == torch.bfloat16 and rel_err(h, ref_h) < 1e-2
        if has_y or has_a:  # one rounding of the fp32 sum (an FMA may move the odd element by one ulp)
            assert rel_err(s, ref_s) < 3e-3 and (s.float() - ref_s.bfloat16().float()).abs().max() <= 0.25
        # The FP8 form, autotuned: h quantized (its tile may differ from the plain form's, and with it the order of
        # the statistics' sums: h may differ by an ulp here and there).
        args = (x, y if has_y else None, scale, shift, weight, bias, 1e-6)
        s8, q, q_scale = norms.add_norm_modulate_fp8(*args, **kw, impl="triton")
        assert torch.equal(s8, s) and rel_err(q.float() * q_scale, h.reshape(B * N, C)) < 0.05
        # With the plain form's tile: quantize_rowwise of its h, the hardware e4m3 cast against torch's. The two
        # compiled kernels may contract a multiply-add differently, so a row element can differ by one 16-bit ulp
        # before the quantization (14 of 18.4M elements at the model's width: fp8-fast-2026-11-27/).
        _, h1 = norms._add_norm_modulate_triton(*args, **kw, rows=2, num_warps=8)
        _, q, q_scale = norms._add_norm_modulate_triton(*args, **kw, rows=2, num_warps=8, quant=True)
        want_q, want_scale = quantize_rowwise(h1.reshape(B * N, C))
        assert (q_scale != want_scale).sum().item() <= 1 and rel_err(q_scale, want_scale) < 1e-3 and q.dtype == E4M3
        differing = (q.view(torch.uint8) != want_q.view(torch.uint8)).sum().item()
        assert differing <= max(2, q.numel() // 100_000), differing
        assert rel_err(q.float(), want_q.float()) < 1e-3
