"""The linear-attention ``apply`` kernel with S as the register operand: a probe beside the shipped kernel.

The shipped ``_apply_kernel`` multiplies rotated q tiles [tokens, d/2] by the two halves of S^T [d/2, d] kept in
registers; on Hopper the second operand of a tensor-core product has to sit in shared memory, so a loop-invariant S^T
in registers may be copied there every iteration. Here the product is transposed, out^T = S_half @ rot(q)^T: the
loop-invariant S is the first operand (registers), the streamed q tile the second.
- ``swap_tf32``: S in fp32, tf32 products (as shipped).
- ``swap_bf16x2``: S split once into bf16 high and low parts (16 mantissa bits together, more than tf32's 10), bf16
  products at twice the tf32 rate; rot(q) is bf16 already, exactly as the reference rounds it.

    python benchmarks/results/la-apply-probe/la_apply_probe.py OUT.json          # CUDA: times and errors, 480p shape
    TRITON_INTERPRET=1 python benchmarks/results/la-apply-probe/la_apply_probe.py --check   # CPU: fp32 equality
"""
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.getcwd())
from engine.kernels import linear_attention as la  # noqa: E402


@triton.jit
def _apply_swapped(q_ptr, cos_ptr, sin_ptr, s_ptr, z_ptr, o_ptr, N, eps,
                   stride_qb, stride_qn, stride_ob, stride_on, stride_rn, stride_rd,
                   HEADS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   TOKENS_PER_CHUNK: tl.constexpr, PRECISION: tl.constexpr, SPLIT_BF16: tl.constexpr):
    pid_bh = tl.program_id(0)
    chunk = tl.program_id(1)
    b = (pid_bh // HEADS).to(tl.int64)
    h = pid_bh % HEADS
    BLOCK_P: tl.constexpr = BLOCK_D // 2
    offs_d = tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, BLOCK_P)
    mask_d = offs_d < D
    mask_j = offs_j < D // 2
    # s_even[c, j] = S[c, 2j], s_odd[c, j] = S[c, 2j + 1]: [d, d/2] each, loaded once.
    s_base = s_ptr + pid_bh * D * D + offs_d[:, None] * D + 2 * offs_j[None, :]
    mask_s = mask_d[:, None] & mask_j[None, :]
    s_even = tl.load(s_base, mask=mask_s, other=0.0)
    s_odd = tl.load(s_base + 1, mask=mask_s, other=0.0)
    if SPLIT_BF16:
        se_hi = s_even.to(tl.bfloat16)
        se_lo = (s_even - se_hi.to(tl.float32)).to(tl.bfloat16)
        so_hi = s_odd.to(tl.bfloat16)
        so_lo = (s_odd - so_hi.to(tl.float32)).to(tl.bfloat16)
    z_even = tl.load(z_ptr + pid_bh * D + 2 * offs_j, mask=mask_j, other=0.0)
    z_odd = tl.load(z_ptr + pid_bh * D + 2 * offs_j + 1, mask=mask_j, other=0.0)
    q_base = q_ptr + b * stride_qb + h * D
    o_base = o_ptr + b * stride_ob + h * D
    start = chunk * TOKENS_PER_CHUNK
    for i in range(0, TOKENS_PER_CHUNK, BLOCK_N):
        offs_n = start + i + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        qe, qo, re, ro = la._load_pairs(q_base, offs_n, stride_qn, offs_j, mask_n[:, None] & mask_j[None, :],
                                        cos_ptr, sin_ptr, stride_rn, stride_rd)
        if SPLIT_BF16:
            ret, rot = tl.trans(re.to(tl.bfloat16)), tl.trans(ro.to(tl.bfloat16))
            num_t = tl.dot(se_hi, ret)
            num_t = tl.dot(se_lo, ret, num_t)
            num_t = tl.dot(so_hi, rot, num_t)
            num_t = tl.dot(so_lo, rot, num_t)
        else:
            num_t = tl.dot(s_even, tl.trans(re.to(tl.float32)), input_precision=PRECISION)
            num_t = tl.dot(s_odd, tl.trans(ro.to(tl.float32)), num_t, input_precision=PRECISION)
        den = tl.sum(qe * z_even[None, :] + qo * z_odd[None, :], axis=1) + eps
        out_t = num_t / den[None, :]
        tl.store(o_base + offs_n[None, :] * stride_on + offs_d[:, None], out_t.to(o_ptr.dtype.element_ty),
                 mask=mask_d[:, None] & mask_n[None, :])


def apply_swapped(q, cos, sin, S, z, eps=la.EPS, block_n=64, warps=8, stages=2, split=False):
    B, N, HD = q.shape
    heads, D = S.shape[1], S.shape[-1]
    cos, sin = la._tables(cos, sin, N, D)
    S, z = S.float().contiguous(), z.float().contiguous()
    out = torch.empty(B, N, HD, device=q.device, dtype=q.dtype)
    chunks, per_chunk = la._chunks(N, B * heads, 128, q.device)
    _apply_swapped[(B * heads, chunks)](
        q, cos, sin, S, z, out, N, eps, q.stride(0), q.stride(1), out.stride(0), out.stride(1), cos.stride(0),
        cos.stride(1), HEADS=heads, D=D, BLOCK_D=max(32, triton.next_power_of_2(D)), BLOCK_N=block_n,
        TOKENS_PER_CHUNK=per_chunk, PRECISION=la._precision(q), SPLIT_BF16=split, num_warps=warps, num_stages=stages)
    return out


def inputs(B, N, heads, d, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(B, N, 3 * heads * d, generator=g).relu().to(dtype).to(device)
    q, k, v = qkv.split(heads * d, dim=-1)  # slices of a fused projection, as the model passes them
    pos = torch.arange(N, dtype=torch.float32)[:, None] * torch.logspace(0, -3, d // 2)[None]
    cos, sin = pos.cos().to(device), pos.sin().to(device)
    S, z = la.sums_reference(k, v, cos, sin, heads)
    return q, cos, sin, S, z


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def check() -> None:
    q, cos, sin, S, z = inputs(1, 100, 2, 24, torch.float32, "cpu")
    ref = la.apply_reference(q, cos, sin, S, z)
    got = apply_swapped(q, cos, sin, S, z, block_n=16)
    print("interpreter, fp32, swapped vs reference:", rel(got, ref))
    assert rel(got, ref) < 1e-5


def bench(out_path: str) -> None:
    from triton.testing import do_bench

    B, N, heads, d = 2, 32760, 20, 112
    q, cos, sin, S, z = inputs(B, N, heads, d, torch.bfloat16, "cuda")
    ref = la.apply_reference(q.float(), cos, sin, S, z)  # fp32 math on the same bf16 q
    moved = 2 * q.numel() * q.element_size()  # q read, out written
    rows = {"shape": [B, N, heads, d], "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "command": " ".join(sys.orig_argv), "bytes": moved, "cases": {}}

    def record(name, fn):
        t0 = time.time()
        out = fn()
        ms = do_bench(fn, warmup=10, rep=40)
        rows["cases"][name] = {"ms": round(ms, 4), "GB_s": round(moved / ms / 1e6, 1),
                               "rel_err_vs_fp32": rel(out, ref), "first_call_s": round(time.time() - t0, 2)}
        print(name, rows["cases"][name], flush=True)
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)

    record("shipped_autotuned", lambda: la._apply_triton(q, cos, sin, S, z, la.EPS))
    record("shipped_bn128_w8_s2", lambda: la._apply_triton(q, cos, sin, S, z, la.EPS, block_n=128))
    for split in (False, True):
        for bn, w, st in ((64, 8, 2), (128, 8, 2), (64, 4, 3), (128, 4, 3), (32, 4, 3)):
            name = f"swap_{'bf16x2' if split else 'tf32'}_bn{bn}_w{w}_s{st}"
            try:
                record(name, lambda: apply_swapped(q, cos, sin, S, z, block_n=bn, warps=w, stages=st, split=split))
            except Exception as exc:  # a config that does not fit (registers, shared memory) is recorded as such
                rows["cases"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                print(name, "failed", rows["cases"][name]["error"], flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        check()
    else:
        bench(sys.argv[1])
