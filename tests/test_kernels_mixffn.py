"""The fused bias + SiLU + depthwise 3x3 + GLU kernel equals the model's Mix-FFN middle (GLUMBTempConv.spatial).

CPU: the reference against the model module; the Triton kernel under the interpreter (subprocess) with tiles small
enough that strips, column tiles and channel tiles all have ragged edges. CUDA: the compiled kernel in bf16.
"""

import textwrap

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import mixffn
from engine.model import GLUMBTempConv


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_reference_equals_model_module():
    """1x1 expansion as a GEMM without bias, then the reference with the bias folded in == GLUMBTempConv.spatial."""
    torch.manual_seed(0)
    ff = GLUMBTempConv(dim=16, expand_ratio=2.5).eval()
    B, Fr, H, W, C = 2, 3, 5, 7, 16
    x = torch.randn(B, Fr, H, W, C)
    with torch.no_grad():
        expected = ff.spatial(x)  # [B, C, F, H*W]
        e = F.linear(x, ff.conv_inverted.weight.flatten(1)).reshape(B * Fr, H, W, -1)
        g = mixffn.dwconv_glu(e, ff.conv_depth.weight, ff.conv_depth.bias, ff.conv_inverted.bias, impl="torch")
        got = F.linear(g, ff.conv_point.weight.flatten(1)).reshape(B, Fr, H * W, C).permute(0, 3, 1, 2)
    assert rel_err(got, expected) < 1e-6


def test_custom_op_shape():
    x = torch.randn(2, 4, 5, 12)
    w, b = torch.randn(12, 1, 3, 3), torch.randn(12)
    out = torch.ops.sana.dwconv_glu(x, w, b, None, True)
    assert out.shape == (2, 4, 5, 6)
    assert rel_err(out, mixffn.dwconv_glu_reference(x, w, b, None, True)) < 1e-6


INTERPRETER_CHECK = textwrap.dedent("""
    import torch
    from engine.kernels import mixffn
    def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm()).item()
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        # H=7 over strips of 3 rows, W=6 over tiles of 4 columns, C=20 over tiles of 16 channels: ragged everywhere.
        I, H, W, C = 2, 7, 6, 20
        x = torch.randn(I, H, W, 2 * C, generator=g).to(dtype)
        w = torch.randn(2 * C, 1, 3, 3, generator=g) / 3
        b, ib = torch.randn(2 * C, generator=g), torch.randn(2 * C, generator=g)
        variants = ((ib, True), (None, False)) if dtype == torch.float32 else ((ib, True),)
        for in_bias, act in variants:
            ref = mixffn.dwconv_glu_reference(x.float(), w, b, in_bias, act)
            # Shifted 2D tiles, with the next row's loads issued before this row's arithmetic or not; then four
            # columns as separate vectors (W=6: the second column tile is half outside), whole-height strips too.
            for variant in (dict(prefetch=False), dict(prefetch=True), dict(columns=True),
                            dict(columns=True, prefetch=True), dict(columns=True, rows=16, prefetch=True)):
                out = mixffn._dwconv_glu_triton(x, w, b, in_bias, act, **{"rows": 3, **variant}, block_w=4,
                                                block_c=16, num_warps=1)
                assert out.dtype == dtype and torch.isfinite(out).all()
                assert rel(out, ref) < tol, (dtype, in_bias is None, act, variant, rel(out, ref))
    print("ok")
""")


def test_triton_kernel_in_interpreter(triton_interpreter):
    triton_interpreter(INTERPRETER_CHECK, timeout=600)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled Triton kernel runs on the GPU")
@pytest.mark.parametrize("shape", [(4, 30, 52, 5600), (2, 45, 80, 200), (3, 5, 7, 24)])
def test_triton_kernel_on_gpu(shape):
    I, H, W, C = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(I, H, W, 2 * C, generator=g).cuda().bfloat16()
    w = (torch.randn(2 * C, 1, 3, 3, generator=g) / 3).cuda().bfloat16()
    b, ib = torch.randn(2 * C, generator=g).cuda().bfloat16(), torch.randn(2 * C, generator=g).cuda().bfloat16()
    ref = mixffn.dwconv_glu_reference(x.float(), w.float(), b.float(), ib.float(), True)
    out = mixffn.dwconv_glu(x, w, b, ib, True, impl="triton")  # tanh.approx SiLU on the GPU
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2
    x32 = x.float()
    out32 = mixffn.dwconv_glu(x32, w.float(), b.float(), None, False, impl="triton")
    assert rel_err(out32, mixffn.dwconv_glu_reference(x32, w.float(), b.float(), None, False)) < 1e-3
