"""The fused linear-attention kernels equal the model's reference (engine.model) on the same inputs.

CPU: the kernels' PyTorch reference against the model's functions; the Triton kernels themselves under Triton's
CPU interpreter (fp32 and fp16: the interpreter has no bf16 matmul) in a subprocess, since the interpreter must be
chosen before Triton compiles anything. CUDA: the compiled kernels in bf16 (skipped without a GPU).
"""

import textwrap

import pytest
import torch

from engine.kernels import linear_attention as la
from engine.model import apply_rotary, linear_attention_apply, linear_attention_sums


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_inputs(B, N, heads, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, heads * d, generator=g).relu()
    k = torch.randn(B, N, heads * d, generator=g).relu()
    v = torch.randn(B, N, heads * d, generator=g)
    ang = torch.rand(N, d // 2, generator=g) * 6.28
    to = dict(device=device, dtype=dtype)
    return q.to(**to), k.to(**to), v.to(**to), ang.cos().to(device), ang.sin().to(device)


def model_reference(q, k, v, cos, sin, heads):
    """engine.model's formulation: interleaved [1, N, 1, d] tables, apply_rotary, einsum sums/apply."""
    full = (cos.repeat_interleave(2, -1)[None, :, None], sin.repeat_interleave(2, -1)[None, :, None])
    qh, kh, vh = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))
    S, z = linear_attention_sums(kh, apply_rotary(kh, *full), vh)
    return S, z, linear_attention_apply(qh, apply_rotary(qh, *full), S, z).flatten(2)


@pytest.mark.parametrize("shape", [(2, 37, 2, 24), (1, 50, 3, 112)])
def test_reference_equals_model(shape):
    B, N, heads, d = shape
    q, k, v, cos, sin = make_inputs(B, N, heads, d)
    S0, z0, out0 = model_reference(q, k, v, cos, sin, heads)
    S, z = la.linear_attention_sums(k, v, cos, sin, heads, impl="torch")
    out = la.linear_attention_apply(q, cos, sin, S, z, impl="torch")
    assert rel_err(S, S0) < 1e-6 and rel_err(z, z0) < 1e-6 and rel_err(out, out0) < 1e-6


def test_strided_views_accepted():
    """k and v sliced out of a fused q|k|v projection (row stride 3*heads*d) give the same result."""
    B, N, heads, d = 2, 20, 2, 8
    q, k, v, cos, sin = make_inputs(B, N, heads, d)
    qkv = torch.cat([q, k, v], dim=-1)
    _, k_view, v_view = qkv.chunk(3, dim=-1)
    S0, z0 = la.linear_attention_sums(k, v, cos, sin, heads, impl="torch")
    S1, z1 = la.linear_attention_sums(k_view, v_view, cos, sin, heads, impl="torch")
    assert torch.equal(S0, S1) and torch.equal(z0, z1)


def test_custom_ops_registered_with_shapes():
    q, k, v, cos, sin = make_inputs(2, 9, 2, 8)
    S, z = torch.ops.sana.linear_attention_sums(k, v, cos, sin, 2)
    out = torch.ops.sana.linear_attention_apply(q, cos, sin, S, z, 1e-15)
    assert S.shape == (2, 2, 8, 8) and z.shape == (2, 2, 8) and out.shape == q.shape and out.dtype == q.dtype



@pytest.mark.parametrize("shape", [(2, 37, 2, 24), (1, 50, 3, 112)])
def test_gemm_formulation_equals_reference(shape):
    """The fast path's default: rotation and normalisation as pointwise work, the products as batched GEMMs (on the
    CPU through einsum; on CUDA through strided cuBLAS calls, in test_gemm_formulation_on_gpu)."""
    B, N, heads, d = shape
    q, k, v, cos, sin = make_inputs(B, N, heads, d)
    qkv = torch.cat([q, k, v], dim=-1)
    q, k, v = qkv.chunk(3, dim=-1)  # slices of a fused projection, as the model passes them
    S0, z0 = la.sums_reference(k, v, cos, sin, heads)
    full = la.swap_tables(cos, sin)
    S, z = la.sums_gemm(k, v, *full, heads)
    out0 = la.apply_reference(q, cos, sin, S0, z0)
    out = la.apply_gemm(q, *full, S0, z0)
    assert rel_err(S, S0) < 1e-6 and rel_err(z, z0) < 1e-6 and rel_err(out, out0) < 1e-6
    # 16-bit inputs: one more rounding than the reference (x = rot(q) / den), within a 16-bit step.
    qh, kh, vh = (t.to(torch.float16) for t in (q, k, v))
    S16, z16 = la.sums_gemm(kh, vh, *full, heads)
    out16 = la.apply_gemm(qh, *full, S16, z16)
    assert out16.dtype == torch.float16 and rel_err(out16, la.apply_reference(qh, cos, sin, S16, z16)) < 2e-3

def norm_case(B, N, heads, d, dtype=torch.float32, device="cpu", seed=0):
    """A fused q|k|v projection's q and k slices, an RMSNorm of the model's kind, per-pair tables and a z."""
    from diffusers.models.normalization import RMSNorm

    g = torch.Generator().manual_seed(seed)
    q, k, _ = (torch.randn(B, N, 3 * heads * d, generator=g) * 2 + 0.3).to(device, dtype).chunk(3, dim=-1)
    norm = RMSNorm(heads * d, eps=1e-5).to(device, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(heads * d, generator=g) + 0.5)
    ang = torch.rand(N, d // 2, generator=g) * 6.28
    z = (torch.rand(B, heads, d, generator=g) * N).to(device)
    return q, k, norm, ang.cos().to(device), ang.sin().to(device), z


@pytest.mark.parametrize("shape", [(2, 37, 2, 24), (1, 50, 20, 112)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_rotate_reference_equals_model(shape, dtype):
    """The prologue's reference is the model's own ops: RMSNorm then ReLU, the rotation as apply_rotary, and for q
    the division by the denominator that apply_gemm makes."""
    B, N, heads, d = shape
    q, k, norm, cos, sin, z = norm_case(B, N, heads, d, dtype)
    full = (cos.repeat_interleave(2, -1)[None, :, None], sin.repeat_interleave(2, -1)[None, :, None])
    with torch.no_grad():
        a = torch.relu(norm(k))
        rot, act = la.norm_rotate(k, norm.weight, norm.eps, cos, sin, heads, impl="torch")
        assert torch.equal(act, a) and rot.dtype == dtype
        expected = apply_rotary(a.unflatten(-1, (heads, -1)).float(), *full).flatten(2)
        assert rel_err(rot, expected) < (1e-6 if dtype == torch.float32 else 4e-3)
        aq = torch.relu(norm(q)).unflatten(-1, (heads, -1)).float()
        den = (aq * z[:, None]).sum(-1, keepdim=True) + la.EPS
        x, empty = la.norm_rotate(q, norm.weight, norm.eps, cos, sin, heads, z, impl="torch")
        assert empty.numel() == 0
        assert rel_err(x, (apply_rotary(aq, *full) / den).flatten(2)) < (1e-6 if dtype == torch.float32 else 4e-3)


def test_norm_rotate_custom_op_shapes():
    q, k, norm, cos, sin, z = norm_case(2, 9, 2, 8)
    with torch.no_grad():
        rot, act = torch.ops.sana.norm_rotate(k, norm.weight, norm.eps, cos, sin, 2, None, la.EPS)
        x, empty = torch.ops.sana.norm_rotate(q, norm.weight, norm.eps, cos, sin, 2, z, la.EPS)
    assert rot.shape == act.shape == x.shape == k.shape and empty.numel() == 0
    with pytest.raises(ValueError, match="heads"):
        la.norm_rotate(k, norm.weight[:-1], norm.eps, cos, sin, 2)


INTERPRETER_CHECK = textwrap.dedent("""
    import torch
    from engine.kernels import linear_attention as la
    def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm()).item()
    g = torch.Generator().manual_seed(0)
    worst = {}
    # 37 tokens: several chunks of 8 with a ragged last one; d=24 pads to 32 lanes; fp16 checks 16-bit rounding.
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        for B, N, H, D in ((2, 37, 2, 24), (1, 19, 1, 10)):
            q, k = (torch.randn(B, N, H * D, generator=g).relu().to(dtype) for _ in range(2))
            v = torch.randn(B, N, H * D, generator=g).to(dtype)
            ang = torch.rand(N, D // 2, generator=g) * 6.28
            cos, sin = ang.cos(), ang.sin()
            S0, z0 = la.sums_reference(k, v, cos, sin, H)
            S1, z1 = la._sums_triton(k, v, cos, sin, H, block_n=8)
            out0 = la.apply_reference(q, cos, sin, S0, z0)
            out1 = la._apply_triton(q, cos, sin, S0, z0, 1e-15, block_n=8)
            errs = (rel(S1, S0), rel(z1, z0), rel(out1, out0))
            assert max(errs) < tol, (dtype, B, N, H, D, errs)
            assert out1.dtype == dtype and torch.isfinite(out1).all()
            # The GEMM form's prologue kernel on q and k slices of a fused projection (row stride 3 * H * D).
            qkv = (torch.randn(B, N, 3 * H * D, generator=g) * 2 + 0.3).to(dtype)
            w = (torch.rand(H * D, generator=g) + 0.5).to(dtype)
            for x, zz in ((qkv[..., H * D:2 * H * D], None), (qkv[..., :H * D], z0)):
                rot0, act0 = la.norm_rotate(x, w, 1e-5, cos, sin, H, zz, impl="torch")
                rot1, act1 = la._norm_rotate_triton(x, w, 1e-5, cos, sin, H, zz, 1e-15, rows=2)
                assert rel(rot1, rot0) < tol and rot1.dtype == dtype, (dtype, B, N, H, D, rel(rot1, rot0))
                assert act1.shape == act0.shape and (zz is not None or rel(act1, act0) < tol)
    print("ok")
""")


def test_triton_kernels_in_interpreter(triton_interpreter):
    triton_interpreter(INTERPRETER_CHECK, timeout=600)


def gpu_case(shape, fused=False):
    """bf16 inputs on CUDA (``fused``: as slices of one q|k|v projection) and the fp32 reference's S, z and output."""
    B, N, heads, d = shape
    q, k, v, cos, sin = make_inputs(B, N, heads, d, dtype=torch.bfloat16, device="cuda")
    if fused:
        q, k, v = torch.cat([q, k, v], dim=-1).chunk(3, dim=-1)
    S0, z0 = la.sums_reference(k.float(), v.float(), cos, sin, heads)
    return q, k, v, cos, sin, S0, z0, la.apply_reference(q.float(), cos, sin, S0, z0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled Triton kernels run on the GPU")
@pytest.mark.parametrize("shape", [(2, 1000, 2, 112), (1, 4097, 20, 112), (2, 300, 3, 24)])
def test_triton_kernels_on_gpu(shape):
    heads = shape[2]
    q, k, v, cos, sin, S0, z0, out0 = gpu_case(shape)
    S, z = la.linear_attention_sums(k, v, cos, sin, heads, impl="triton")
    out = la.linear_attention_apply(q, cos, sin, S0, z0, impl="triton")
    # bf16 inputs: the rotation is rounded to bf16 before the products (as the model's reference does).
    assert rel_err(S, S0) < 5e-3 and rel_err(z, z0) < 1e-5 and rel_err(out, out0) < 1e-2
    # fp32 inputs: full-precision products.
    S32, _ = la.linear_attention_sums(k.float(), v.float(), cos, sin, heads, impl="triton")
    assert rel_err(S32, S0) < 1e-5
    out32 = la.linear_attention_apply(q.float(), cos, sin, S0, z0, impl="triton")
    assert rel_err(out32, out0) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the strided cuBLAS batched GEMMs")
@pytest.mark.parametrize("shape", [(2, 1000, 2, 112), (1, 4097, 20, 112), (2, 300, 3, 24)])
def test_gemm_formulation_on_gpu(shape):
    heads = shape[2]
    q, k, v, cos, sin, S0, z0, out0 = gpu_case(shape, fused=True)
    full = la.swap_tables(cos, sin)
    S, z = la.sums_gemm(k, v, *full, heads)
    out = la.apply_gemm(q, *full, S0, z0)
    # bf16: the rotations rounded as the reference rounds them; S rounded to bf16 for the apply product.
    assert rel_err(S, S0) < 5e-3 and rel_err(z, z0) < 1e-5 and rel_err(out, out0) < 1e-2
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    S32, z32 = la.sums_gemm(k.float(), v.float(), *full, heads)
    assert rel_err(S32, S0) < 1e-5 and rel_err(z32, z0) < 1e-6
    assert rel_err(la.apply_gemm(q.float(), *full, S0, z0), out0) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled Triton kernel")
@pytest.mark.parametrize("shape", [(2, 1000, 2, 112), (2, 4097, 20, 112), (2, 300, 3, 24)])
def test_norm_rotate_kernel_on_gpu(shape):
    B, N, heads, d = shape
    q, k, norm, cos, sin, z = norm_case(B, N, heads, d, torch.bfloat16, "cuda")
    with torch.no_grad():
        for x, zz in ((k, None), (q, z)):
            rot0, act0 = la.norm_rotate(x, norm.weight, norm.eps, cos, sin, heads, zz, impl="torch")
            rot, act = la.norm_rotate(x, norm.weight, norm.eps, cos, sin, heads, zz, impl="triton")
            # The same ops in the same dtypes: at most a bf16 step apart where an fp32 sum rounds differently.
            assert rot.dtype == torch.bfloat16 and rel_err(rot, rot0) < 2e-3
            if zz is None:
                assert rel_err(act, act0) < 2e-3
        # fp32 weights and inputs: no rounding in the prologue.
        rot32, _ = la.norm_rotate(k.float(), norm.weight.float(), norm.eps, cos, sin, heads, impl="triton")
        ref32, _ = la.norm_rotate(k.float(), norm.weight.float(), norm.eps, cos, sin, heads, impl="torch")
        assert rel_err(rot32, ref32) < 1e-5
