"""ReLU linear attention with RoPE on the numerator: its PyTorch reference and two fast forms pinned to it.

The fast path's default is the GEMM form (``sums_gemm``, ``apply_gemm``, below the reference): pointwise work
for torch.compile to fuse, plus strided cuBLAS batched GEMMs. The fused Triton kernels:

``sums``: S = sum_n v_n rot(k_n)^T [B, heads, d, d] and z = sum_n k_n [B, heads, d] (fp32), in one pass over bf16
k and v: the rotation happens in registers, the products accumulate in fp32 on the tensor cores. The token axis is
split into chunks (enough programs to fill the GPU); per-chunk partials are summed afterwards, so the result does not
depend on scheduling (no atomics).
``apply``: out_n = (S rot(q_n)) / (z . q_n + eps), written in q's dtype, straight into the [B, N, heads*d] layout
the output projection reads.

Inputs are [B, N, heads*d] views with a contiguous last dimension (slices of a fused q|k|v projection work as they
are). ``cos``/``sin`` are per-pair tables [N, d/2]: ``cos[n, i]`` rotates pair (2i, 2i+1) of token n, exactly as
``engine.model.apply_rotary`` reads its interleaved tables (``cos[..., 0::2]``, ``sin[..., 1::2]``).
Rotation follows the reference: computed in fp32 and rounded to the input dtype before the products.
"""

from __future__ import annotations

import torch

from engine.kernels import interpreting, resolve_impl

EPS = 1e-15

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path needs no Triton
    triton = None


# ---------------------------------------------------------------------------------------------------------------------
# Reference (plain PyTorch)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` [B, N, heads, d] by per-pair tables [N, d/2]; fp32 math, x's dtype out."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[None, :, None, :].float(), sin[None, :, None, :].float()
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).to(x.dtype)


def sums_reference(k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int):
    """S [B, heads, d, d], z [B, heads, d] (fp32) of k, v [B, N, heads*d] (k already non-negative)."""
    k, v = k.unflatten(-1, (heads, -1)), v.unflatten(-1, (heads, -1))
    k_rot = rotate_pairs(k, cos, sin)
    S = torch.einsum("bnhc,bnhe->bhce", v.float(), k_rot.float())
    return S, k.float().sum(dim=1)


def apply_reference(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, S: torch.Tensor, z: torch.Tensor,
                    eps: float = EPS) -> torch.Tensor:
    """out [B, N, heads*d] in q's dtype from q [B, N, heads*d] (non-negative) and S, z of ``sums``."""
    heads = S.shape[1]
    q = q.unflatten(-1, (heads, -1))
    q_rot = rotate_pairs(q, cos, sin)
    num = torch.einsum("bhce,bnhe->bnhc", S, q_rot.float())
    den = torch.einsum("bhe,bnhe->bnh", z, q.float()) + eps
    return (num / den.unsqueeze(-1)).flatten(2).to(q.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# GEMM formulation (the fast path's default): the rotation, z and the denominator are pointwise work that
# torch.compile fuses into the pass producing q and k (RMS norm + ReLU); what is left is two batched GEMMs per batch
# entry on the tensor cores through cuBLAS, reading and writing the [B, N, heads*d] layout in place.
#   sums:  S_b = v_b^T @ rot(k_b)  ([heads, d, N] @ [heads, N, d], fp32 out)
#   apply: out_b = x_b @ S_b^T with x = rot(q) / (z . q + eps)  (the denominator is one scalar per token and head,
#          so it can scale q before the product; S is rounded to q's dtype)
# z = sum_n k_n is a GEMV against ones. Measured on an H200 at 480p (benchmarks/results/la-cublas-probe/): the
# GEMMs take 0.25 + 0.21 ms against 1.03 + 1.12 ms for the Triton kernels.


def swap_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair tables [N, d/2] as the full fp32 tables [N, d] of ``rotate_swapped``: (c0, c0, c1, c1, ...) and
    (-s0, s0, -s1, s1, ...). Made once per forward and shared by every layer: built inside each layer's compiled
    pass instead, they cost that pass more than the rotation itself."""
    c = cos.float().repeat_interleave(2, dim=-1)
    s = torch.stack([-sin.float(), sin.float()], dim=-1).flatten(-2)
    return c.contiguous(), s.contiguous()


def rotate_swapped(x: torch.Tensor, cos_full: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``rotate_pairs`` of ``x`` [B, N, heads, d], in fp32 (not rounded), written as x * cos_full + swap(x) *
    sin_signed (tables of ``swap_tables``), swap exchanging the lanes of each pair: the same products, in a form that
    torch.compile fuses into its pointwise pass at about half the cost of the stack form
    (benchmarks/results/la-cublas-probe/prologue_probe_h200.json)."""
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return xf * cos_full[None, :, None, :] + swapped * sin_signed[None, :, None, :]


def gemm_operand(xh: torch.Tensor, cos_full: torch.Tensor, sin_signed: torch.Tensor, z: torch.Tensor | None = None,
                 eps: float = EPS) -> torch.Tensor:
    """The GEMMs' operand from xh [B, N, heads, d]: rot(x) (k's, ``z`` None) or rot(x) / (z . x + eps) (q's, z
    [B, heads, d]), rounded to x's dtype, as [B, N, heads*d]. Tables from ``swap_tables``."""
    rot = rotate_swapped(xh, cos_full, sin_signed)
    if z is not None:
        rot = rot / ((xh.float() * z[:, None]).sum(-1, keepdim=True) + eps)
    return rot.to(xh.dtype).flatten(2)


def sums_gemm(k: torch.Tensor, v: torch.Tensor, cos_full: torch.Tensor, sin_signed: torch.Tensor, heads: int):
    """``sums_reference`` as pointwise work plus batched GEMMs: S [B, heads, d, d], z [B, heads, d] (fp32).
    Tables from ``swap_tables``."""
    rot_k = gemm_operand(k.unflatten(-1, (heads, -1)), cos_full, sin_signed)
    return torch.ops.sana.head_outer_sums(v, rot_k, k, heads)


def apply_gemm(q: torch.Tensor, cos_full: torch.Tensor, sin_signed: torch.Tensor, S: torch.Tensor, z: torch.Tensor,
               eps: float = EPS) -> torch.Tensor:
    """``apply_reference`` as pointwise work plus one batched GEMM: out [B, N, heads*d] in q's dtype. Tables from
    ``swap_tables``."""
    heads = S.shape[1]
    x = gemm_operand(q.unflatten(-1, (heads, -1)), cos_full, sin_signed, z, eps)
    return torch.ops.sana.head_products(x, S.to(q.dtype), heads)


@torch.library.custom_op("sana::head_outer_sums", mutates_args=())
def _head_outer_sums(v: torch.Tensor, r: torch.Tensor, k: torch.Tensor,
                     heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S[b, h] = v[b, :, h]^T @ r[b, :, h] (fp32 [B, heads, d, d]) and z[b, h] = sum_n k[b, n, h] (fp32
    [B, heads, d]) of v, r, k [B, N, heads*d], read in place (z as a GEMV against ones: a reduction over N that
    the compiler would otherwise fuse badly)."""
    B, N, HD = v.shape
    d = HD // heads
    if not v.is_cuda:
        S = torch.einsum("bnhc,bnhe->bhce", v.float().unflatten(-1, (heads, d)), r.float().unflatten(-1, (heads, d)))
        return S, k.float().sum(dim=1).unflatten(-1, (heads, d))
    S = torch.empty(B, heads, d, d, device=v.device, dtype=torch.float32)
    z = torch.empty(B, HD, device=v.device, dtype=torch.float32)
    wide = {} if v.dtype == torch.float32 else {"out_dtype": torch.float32}  # 16-bit inputs, fp32 accumulation
    ones = torch.ones(1, N, device=v.device, dtype=k.dtype)
    for b in range(B):
        vt = v[b].unflatten(-1, (heads, d)).permute(1, 2, 0)  # [heads, d, N], strides (d, 1, row): no copy
        rb = r[b].unflatten(-1, (heads, d)).transpose(0, 1)  # [heads, N, d]
        S[b] = torch.bmm(vt, rb, **wide)
        z[b] = torch.mm(ones, k[b], **wide)[0]
    return S, z.unflatten(-1, (heads, d))


@_head_outer_sums.register_fake
def _(v, r, k, heads):
    B, _, HD = v.shape
    d = HD // heads
    return v.new_empty(B, heads, d, d, dtype=torch.float32), v.new_empty(B, heads, d, dtype=torch.float32)


@torch.library.custom_op("sana::head_products", mutates_args=())
def _head_products(x: torch.Tensor, S: torch.Tensor, heads: int) -> torch.Tensor:
    """out[b, n, h] = S[b, h] @ x[b, n, h] ([B, N, heads*d] in x's dtype) of x [B, N, heads*d], S [B, heads, d, d]."""
    B, N, HD = x.shape
    d = HD // heads
    if not x.is_cuda:
        return torch.einsum("bhce,bnhe->bnhc", S.float(), x.float().unflatten(-1, (heads, d))).flatten(2).to(x.dtype)
    out = torch.empty(B, N, HD, device=x.device, dtype=x.dtype)
    S = S.to(x.dtype)
    for b in range(B):  # each head's [N, d] output block is written in place into the token-major layout
        torch.bmm(x[b].unflatten(-1, (heads, d)).transpose(0, 1), S[b].transpose(-1, -2),
                  out=out[b].unflatten(-1, (heads, d)).transpose(0, 1))
    return out


@_head_products.register_fake
def _(x, S, heads):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


# The GEMM form's prologue as one kernel (``attention="gemm"``): RMS norm across heads (diffusers' ``RMSNorm``, its
# dtypes and roundings) + ReLU + the rotation, reading each token's row once. For k it writes rot(k) and k (z's
# input); for q, x = rot(q) / (z . q + eps), the operand of ``head_products``. torch.compile's code for the same
# pass reads every element seven times (benchmarks/results/la-cublas-probe/README.md, section 6).


def norm_rotate_reference(x: torch.Tensor, weight: torch.Tensor, norm_eps: float, cos: torch.Tensor,
                          sin: torch.Tensor, heads: int, z: torch.Tensor | None = None,
                          eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotated, activated) of x [B, N, heads*d]: a = relu(RMSNorm(x)), rotated = rot(a) (z None) or
    rot(a) / (z . a + eps) (z [B, heads, d]), both [B, N, heads*d] in the norm's output dtype. Per-pair tables
    [N, d/2]. The reference of ``norm_rotate``: the model's own ops in its order."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    a = x * torch.rsqrt(variance + norm_eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        a = a.to(weight.dtype)
    a = torch.relu(a * weight)
    return gemm_operand(a.unflatten(-1, (heads, -1)), *swap_tables(cos, sin), z, eps), a


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels

if triton is not None:

    @triton.jit
    def _load_pairs(base, offs_n, stride_n, offs_j, mask, cos_ptr, sin_ptr, stride_rn, stride_rd):
        """Even and odd lanes of x (pair j: lanes 2j, 2j+1) as fp32 [BLOCK_N, BLOCK_P] each, and their RoPE rotation
        rounded to the input dtype (as the reference). One load of [BLOCK_N, BLOCK_P, 2] split in registers: the
        two lanes of a pair sit in one thread, each table entry is read once."""
        offs_t = tl.arange(0, 2)
        ptrs = base + offs_n[:, None, None] * stride_n + 2 * offs_j[None, :, None] + offs_t[None, None, :]
        x_even, x_odd = tl.split(tl.load(ptrs, mask=mask[:, :, None], other=0.0))
        table = offs_n[:, None] * stride_rn + offs_j[None, :] * stride_rd
        c = tl.load(cos_ptr + table, mask=mask, other=0.0)
        s = tl.load(sin_ptr + table, mask=mask, other=0.0)
        xe, xo = x_even.to(tl.float32), x_odd.to(tl.float32)
        return xe, xo, (xe * c - xo * s).to(x_even.dtype), (xe * s + xo * c).to(x_even.dtype)

    @triton.jit
    def _sums_kernel(k_ptr, v_ptr, cos_ptr, sin_ptr, s_ptr, z_ptr,
                     N, BH,
                     stride_kb, stride_kn, stride_vb, stride_vn, stride_rn, stride_rd,
                     HEADS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                     TOKENS_PER_CHUNK: tl.constexpr, PRECISION: tl.constexpr):
        pid_bh = tl.program_id(0)
        chunk = tl.program_id(1)
        b = (pid_bh // HEADS).to(tl.int64)  # batch offsets can pass 2^31 elements
        h = pid_bh % HEADS
        BLOCK_P: tl.constexpr = BLOCK_D // 2
        offs_d = tl.arange(0, BLOCK_D)
        offs_j = tl.arange(0, BLOCK_P)
        mask_d = offs_d < D
        mask_j = offs_j < D // 2
        k_base = k_ptr + b * stride_kb + h * D
        v_base = v_ptr + b * stride_vb + h * D
        # acc_even[j, c] = sum_n rot(k)[n, 2j] v[n, c]; acc_odd the same for lane 2j+1.
        acc_even = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
        acc_odd = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
        z_even = tl.zeros((BLOCK_P,), dtype=tl.float32)
        z_odd = tl.zeros((BLOCK_P,), dtype=tl.float32)
        start = chunk * TOKENS_PER_CHUNK  # a multiple of BLOCK_N: only the last chunk needs the N bound
        for i in range(0, TOKENS_PER_CHUNK, BLOCK_N):
            offs_n = start + i + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            ke, ko, re, ro = _load_pairs(k_base, offs_n, stride_kn, offs_j, mask_n[:, None] & mask_j[None, :],
                                         cos_ptr, sin_ptr, stride_rn, stride_rd)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :],
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            acc_even = tl.dot(tl.trans(re.to(v.dtype)), v, acc_even, input_precision=PRECISION)
            acc_odd = tl.dot(tl.trans(ro.to(v.dtype)), v, acc_odd, input_precision=PRECISION)
            z_even += tl.sum(ke, axis=0)
            z_odd += tl.sum(ko, axis=0)
        # S[c, e] row-major: S[c, 2j] = acc_even[j, c].
        out = s_ptr + (chunk * BH + pid_bh) * D * D + offs_d[None, :] * D + 2 * offs_j[:, None]
        mask_s = mask_j[:, None] & mask_d[None, :]
        tl.store(out, acc_even, mask=mask_s)
        tl.store(out + 1, acc_odd, mask=mask_s)
        z_out = z_ptr + (chunk * BH + pid_bh) * D + 2 * offs_j
        tl.store(z_out, z_even, mask=mask_j)
        tl.store(z_out + 1, z_odd, mask=mask_j)

    @triton.jit
    def _apply_kernel(q_ptr, cos_ptr, sin_ptr, s_ptr, z_ptr, o_ptr,
                      N, eps,
                      stride_qb, stride_qn, stride_ob, stride_on, stride_rn, stride_rd,
                      HEADS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                      TOKENS_PER_CHUNK: tl.constexpr, PRECISION: tl.constexpr):
        pid_bh = tl.program_id(0)
        chunk = tl.program_id(1)
        b = (pid_bh // HEADS).to(tl.int64)  # batch offsets can pass 2^31 elements
        h = pid_bh % HEADS
        BLOCK_P: tl.constexpr = BLOCK_D // 2
        offs_d = tl.arange(0, BLOCK_D)
        offs_j = tl.arange(0, BLOCK_P)
        mask_d = offs_d < D
        mask_j = offs_j < D // 2
        # S^T split by lane parity, st_even[j, c] = S[c, 2j]: loaded once per program, reused for every token.
        s_base = s_ptr + pid_bh * D * D + offs_d[None, :] * D + 2 * offs_j[:, None]
        mask_s = mask_j[:, None] & mask_d[None, :]
        st_even = tl.load(s_base, mask=mask_s, other=0.0)
        st_odd = tl.load(s_base + 1, mask=mask_s, other=0.0)
        z_even = tl.load(z_ptr + pid_bh * D + 2 * offs_j, mask=mask_j, other=0.0)
        z_odd = tl.load(z_ptr + pid_bh * D + 2 * offs_j + 1, mask=mask_j, other=0.0)
        q_base = q_ptr + b * stride_qb + h * D
        o_base = o_ptr + b * stride_ob + h * D
        start = chunk * TOKENS_PER_CHUNK  # a multiple of BLOCK_N: only the last chunk needs the N bound
        for i in range(0, TOKENS_PER_CHUNK, BLOCK_N):
            offs_n = start + i + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            qe, qo, re, ro = _load_pairs(q_base, offs_n, stride_qn, offs_j, mask_n[:, None] & mask_j[None, :],
                                         cos_ptr, sin_ptr, stride_rn, stride_rd)
            # tf32 products for 16-bit inputs: the rounded rotation is exact in tf32, S loses only its last
            # mantissa bits. fp32 inputs (reference checks) ask for full fp32 products.
            num = tl.dot(re.to(tl.float32), st_even, input_precision=PRECISION)
            num = tl.dot(ro.to(tl.float32), st_odd, num, input_precision=PRECISION)
            den = tl.sum(qe * z_even[None, :] + qo * z_odd[None, :], axis=1) + eps
            out = num / den[:, None]
            tl.store(o_base + offs_n[:, None] * stride_on + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
                     mask=mask_n[:, None] & mask_d[None, :])

    # Token-block sizes, warps and pipeline depths to try once per shape on the GPU. The [d, d] fp32 accumulator
    # (S, as two [d/2, d] halves) takes 64 registers a thread at 8 warps, 128 at 4. Measured on an H200 at 480p
    # (benchmarks/results/h200-2026-11-27/linear_attention_probe.json): sums fastest with small tiles and deep
    # pipelines (16 tokens, 4 warps, 4 stages), apply with large ones (128 tokens, 8 warps).
    _TILES = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=st)
              for bn, w, st in ((64, 8, 2), (64, 8, 3), (128, 8, 2), (128, 8, 3), (32, 8, 3), (32, 4, 3), (32, 4, 4),
                                (64, 4, 3), (16, 4, 4), (16, 4, 3), (16, 2, 4))]
    _sums_tuned = triton.autotune(configs=_TILES, key=["N", "BH", "HEADS", "D", "TOKENS_PER_CHUNK"])(_sums_kernel)
    _apply_tuned = triton.autotune(configs=_TILES, key=["N", "HEADS", "D", "TOKENS_PER_CHUNK"])(_apply_kernel)

    @triton.jit
    def _norm_rotate_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, z_ptr, r_ptr, a_ptr,
                            N, norm_eps, eps,
                            stride_xb, stride_xn, stride_ob, stride_on, stride_rn, stride_zb,
                            HEADS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                            ROWS: tl.constexpr, ROUND_NORM: tl.constexpr, SCALE: tl.constexpr):
        """ROWS tokens of one batch entry per program, a head at a time as a [ROWS, d] tile: one pass for the RMS
        statistic of each row, one for the norm, ReLU, rotation (and for q the denominator) of each head. The
        rotation tables are read once per token for every head; the second read of the rows comes from cache."""
        b = tl.program_id(1).to(tl.int64)  # batch offsets can pass 2^31 elements
        offs_n = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        offs_d = tl.arange(0, BLOCK_D)
        offs_j = tl.arange(0, BLOCK_D // 2)
        mask_n = offs_n < N
        mask = mask_n[:, None] & (offs_d < D)[None, :]
        x_rows = x_ptr + b * stride_xb + offs_n[:, None] * stride_xn + offs_d[None, :]
        sq = tl.zeros((ROWS,), tl.float32)
        for h in range(HEADS):
            xf = tl.load(x_rows + h * D, mask=mask, other=0.0).to(tl.float32)
            sq += tl.sum(xf * xf, axis=1)
        inv = 1.0 / tl.sqrt_rn(sq / (HEADS * D) + norm_eps)
        mask_p = mask_n[:, None] & (offs_j < D // 2)[None, :]
        table = offs_n[:, None] * stride_rn + offs_j[None, :]
        c = tl.load(cos_ptr + table, mask=mask_p, other=0.0)
        s = tl.load(sin_ptr + table, mask=mask_p, other=0.0)
        out_rows = b * stride_ob + offs_n[:, None] * stride_on + offs_d[None, :]
        for h in range(HEADS):
            x = tl.load(x_rows + h * D, mask=mask, other=0.0)
            w = tl.load(w_ptr + h * D + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
            a = x.to(tl.float32) * inv[:, None]
            if ROUND_NORM:  # diffusers casts the normalised row to the weight's 16-bit dtype before the product
                a = a.to(x.dtype).to(tl.float32)
            a = tl.maximum((a * w[None, :]).to(x.dtype), 0.0)
            af = a.to(tl.float32)
            a_even, a_odd = tl.split(tl.reshape(af, (ROWS, BLOCK_D // 2, 2)))
            r_even = a_even * c - a_odd * s
            r_odd = a_even * s + a_odd * c
            rot = tl.reshape(tl.join(r_even, r_odd), (ROWS, BLOCK_D))
            if SCALE:
                z = tl.load(z_ptr + b * stride_zb + h * D + offs_d, mask=offs_d < D, other=0.0)
                rot = rot / (tl.sum(af * z[None, :], axis=1) + eps)[:, None]
            tl.store(r_ptr + out_rows + h * D, rot.to(r_ptr.dtype.element_ty), mask=mask)
            if not SCALE:
                tl.store(a_ptr + out_rows + h * D, a, mask=mask)

    # Rows a program and warps, tried once per shape on the GPU.
    _NORM_TILES = [triton.Config({"ROWS": r}, num_warps=w)
                   for r, w in ((4, 2), (4, 4), (8, 4), (8, 8), (16, 8), (32, 8))]
    _norm_rotate_tuned = triton.autotune(configs=_NORM_TILES, key=["N", "HEADS", "D", "SCALE"])(_norm_rotate_kernel)

CHUNK_MULTIPLE = 128  # every tile size above divides a chunk


def _chunks(n_tokens: int, programs_per_chunk: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(number of chunks, tokens per chunk): about 4 programs per SM, each chunk a multiple of ``block_n``."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    max_chunks = triton.cdiv(n_tokens, block_n)
    chunks = max(1, min(max_chunks, triton.cdiv(4 * sms, programs_per_chunk)))
    per_chunk = triton.cdiv(triton.cdiv(n_tokens, chunks), block_n) * block_n
    return triton.cdiv(n_tokens, per_chunk), per_chunk


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _check(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, N, heads*d], got {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _tables(cos: torch.Tensor, sin: torch.Tensor, n: int, d: int):
    if cos.shape != (n, d // 2) or sin.shape != (n, d // 2):
        raise ValueError(f"rope tables must be [N, d/2] = [{n}, {d // 2}], got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if cos.stride() != sin.stride():
        sin = sin.contiguous()
        cos = cos.contiguous()
    return cos.float() if cos.dtype != torch.float32 else cos, sin.float() if sin.dtype != torch.float32 else sin


def _sums_triton(k, v, cos, sin, heads: int, block_n: int | None = None):
    """``block_n`` given: that tile; else autotuned on the GPU (64 under the interpreter)."""
    B, N, HD = k.shape
    D = HD // heads
    k, v = _check(k, "k"), _check(v, "v")
    cos, sin = _tables(cos, sin, N, D)
    BH = B * heads
    tuned = block_n is None and not interpreting()
    chunks, per_chunk = _chunks(N, BH, CHUNK_MULTIPLE if tuned else (block_n or 64), k.device)
    S_part = torch.empty(chunks, B, heads, D, D, device=k.device, dtype=torch.float32)
    z_part = torch.empty(chunks, B, heads, D, device=k.device, dtype=torch.float32)
    args = (k, v, cos, sin, S_part, z_part, N, BH,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), cos.stride(1))
    meta = dict(HEADS=heads, D=D, BLOCK_D=max(32, triton.next_power_of_2(D)), TOKENS_PER_CHUNK=per_chunk,
                PRECISION=_precision(k))
    if tuned:
        _sums_tuned[(BH, chunks)](*args, **meta)
    else:
        _sums_kernel[(BH, chunks)](*args, **meta, BLOCK_N=block_n or 64, num_warps=8, num_stages=2)
    if chunks == 1:
        return S_part[0], z_part[0]
    return S_part.sum(0), z_part.sum(0)


def _apply_triton(q, cos, sin, S, z, eps: float, block_n: int | None = None):
    B, N, HD = q.shape
    heads, D = S.shape[1], S.shape[-1]
    q = _check(q, "q")
    cos, sin = _tables(cos, sin, N, D)
    S, z = S.float().contiguous(), z.float().contiguous()
    out = torch.empty(B, N, HD, device=q.device, dtype=q.dtype)
    BH = B * heads
    tuned = block_n is None and not interpreting()
    chunks, per_chunk = _chunks(N, BH, CHUNK_MULTIPLE if tuned else (block_n or 64), q.device)
    args = (q, cos, sin, S, z, out, N, eps,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), cos.stride(0), cos.stride(1))
    meta = dict(HEADS=heads, D=D, BLOCK_D=max(32, triton.next_power_of_2(D)), TOKENS_PER_CHUNK=per_chunk,
                PRECISION=_precision(q))
    if tuned:
        _apply_tuned[(BH, chunks)](*args, **meta)
    else:
        _apply_kernel[(BH, chunks)](*args, **meta, BLOCK_N=block_n or 64, num_warps=8, num_stages=2)
    return out


def _norm_rotate_triton(x, weight, norm_eps: float, cos, sin, heads: int, z, eps: float, rows: int | None = None,
                        num_warps: int = 4):
    """``rows`` given: that tile; else autotuned on the GPU (4 rows under the interpreter)."""
    B, N, HD = x.shape
    d = HD // heads
    x = _check(x, "x")
    cos, sin = _tables(cos, sin, N, d)
    if cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    rot = torch.empty(B, N, HD, device=x.device, dtype=x.dtype)
    act = torch.empty_like(rot) if z is None else rot.new_empty(0)
    zc = z.float().contiguous() if z is not None else cos  # not read without SCALE
    args = (x, weight.contiguous(), cos, sin, zc, rot, act, N, norm_eps, eps,
            x.stride(0), x.stride(1), rot.stride(0), rot.stride(1), cos.stride(0), HD if z is not None else 0)
    meta = dict(HEADS=heads, D=d, BLOCK_D=max(2, triton.next_power_of_2(d)),
                ROUND_NORM=weight.dtype in (torch.float16, torch.bfloat16), SCALE=z is not None)
    if rows is None and not interpreting():
        _norm_rotate_tuned[lambda m: (triton.cdiv(N, m["ROWS"]), B)](*args, **meta)
    else:
        rows = rows or 4
        _norm_rotate_kernel[(triton.cdiv(N, rows), B)](*args, **meta, ROWS=rows, num_warps=num_warps)
    return rot, act


# ---------------------------------------------------------------------------------------------------------------------
# Public API


def linear_attention_sums(k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                          impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """S = sum_n v_n rot(k_n)^T [B, heads, d, d] and z = sum_n k_n [B, heads, d], fp32.

    k, v: [B, N, heads*d] (k non-negative: ReLU already applied); cos, sin: per-pair RoPE tables [N, d/2].
    """
    if resolve_impl(impl, k, v) == "triton":
        return _sums_triton(k, v, cos, sin, heads)
    return sums_reference(k, v, cos, sin, heads)


def linear_attention_apply(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, S: torch.Tensor, z: torch.Tensor,
                           eps: float = EPS, impl: str = "auto") -> torch.Tensor:
    """out_n = (S rot(q_n)) / (z . q_n + eps): [B, N, heads*d] in q's dtype, q [B, N, heads*d] non-negative."""
    if resolve_impl(impl, q) == "triton":
        return _apply_triton(q, cos, sin, S, z, eps)
    return apply_reference(q, cos, sin, S, z, eps)


# Custom ops: one opaque node each under torch.compile (and safe inside CUDA-graph capture: no host syncs).


@torch.library.custom_op("sana::linear_attention_sums", mutates_args=())
def _sums_op(k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    S, z = linear_attention_sums(k, v, cos, sin, heads)
    return S.contiguous(), z.contiguous()


@_sums_op.register_fake
def _(k, v, cos, sin, heads):
    B, _, HD = k.shape
    D = HD // heads
    return k.new_empty(B, heads, D, D, dtype=torch.float32), k.new_empty(B, heads, D, dtype=torch.float32)


@torch.library.custom_op("sana::linear_attention_apply", mutates_args=())
def _apply_op(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, S: torch.Tensor, z: torch.Tensor,
              eps: float) -> torch.Tensor:
    return linear_attention_apply(q, cos, sin, S, z, eps)


@_apply_op.register_fake
def _(q, cos, sin, S, z, eps):
    return torch.empty(q.shape, device=q.device, dtype=q.dtype)


def norm_rotate(x: torch.Tensor, weight: torch.Tensor, norm_eps: float, cos: torch.Tensor, sin: torch.Tensor,
                heads: int, z: torch.Tensor | None = None, eps: float = EPS,
                impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The GEMM form's prologue: ``(rot(a), a)`` with a = relu(RMSNorm(x)) for k (``z`` None), or
    ``(rot(a) / (z . a + eps), empty)`` for q (z [B, heads, d], fp32). x [B, N, heads*d] (a row-strided view is read
    in place), ``weight`` the norm's [heads*d] weight in x's dtype, per-pair tables [N, d/2]."""
    if x.dim() != 3 or x.shape[-1] % heads or weight.shape != (x.shape[-1],):
        raise ValueError(f"x must be [B, N, heads*d] with a [heads*d] weight, got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    if resolve_impl(impl, x) == "triton" and weight.dtype == x.dtype:
        return _norm_rotate_triton(x, weight, norm_eps, cos, sin, heads, z, eps)
    rot, act = norm_rotate_reference(x, weight, norm_eps, cos, sin, heads, z, eps)
    return rot, (act if z is None else act.new_empty(0))


@torch.library.custom_op("sana::norm_rotate", mutates_args=())
def _norm_rotate_op(x: torch.Tensor, weight: torch.Tensor, norm_eps: float, cos: torch.Tensor, sin: torch.Tensor,
                    heads: int, z: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return norm_rotate(x, weight, norm_eps, cos, sin, heads, z, eps)


@_norm_rotate_op.register_fake
def _(x, weight, norm_eps, cos, sin, heads, z, eps):
    dtype = torch.promote_types(x.dtype, weight.dtype) if weight.dtype not in (torch.float16, torch.bfloat16) \
        else weight.dtype
    rot = x.new_empty(x.shape, dtype=dtype)
    return rot, (x.new_empty(x.shape, dtype=dtype) if z is None else x.new_empty(0, dtype=dtype))
