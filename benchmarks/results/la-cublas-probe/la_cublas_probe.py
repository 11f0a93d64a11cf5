"""Linear attention as cuBLAS batched GEMMs with the RoPE rotation in a pointwise prologue: a probe beside the
shipped Triton kernels, on the 480p shape (B=2, N=32,760, 20 heads, d=112, bf16 q, k, v as slices of a fused
projection).

The shipped ``sums`` and ``apply`` kernels move about 1.2 GB per layer and take about 2.2 ms on an H200 (about 11% of
its bandwidth). In the model, q and k already come out of a compiled pointwise pass (RMS norm + ReLU); that pass can
write rot(k), and for q, rot(q) / (z . q + eps) (the denominator is one scalar per token and head, so it can be
applied before the product). What is left is two plain batched GEMMs per batch entry, read in place with strides:
- sums: S_b = v_b^T @ rot(k_b), [heads, d, N] @ [heads, N, d], bf16 in, fp32 out (``torch.bmm(..., out_dtype=)``);
- apply: out_b = x_b @ S_b^T, [heads, N, d] @ [heads, d, d], written straight into the [N, heads*d] layout.
``apply`` variants: S^T in bf16 (one GEMM), or split into bf16 high and low parts (K = 2d, x written twice).

    python benchmarks/results/la-cublas-probe/la_cublas_probe.py OUT.json     # CUDA
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from engine.kernels import linear_attention as la  # noqa: E402


def inputs(B, N, heads, d, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(B, N, 3 * heads * d, generator=g)
    qkv[..., : 2 * heads * d] = qkv[..., : 2 * heads * d].relu()  # q, k non-negative (ReLU); v signed
    qkv = qkv.to(dtype).to(device)
    q, k, v = qkv.split(heads * d, dim=-1)
    pos = torch.arange(N, dtype=torch.float32)[:, None] * torch.logspace(0, -3, d // 2)[None]
    return q, k, v, pos.cos().to(device), pos.sin().to(device)


def rotate(x, cos, sin, heads):
    """rot(x) [B, N, heads*d] in x's dtype: fp32 math, rounded as the reference rounds it."""
    B, N, HD = x.shape
    xx = x.view(B, N, heads, HD // heads // 2, 2).float()
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    e, o = xx[..., 0], xx[..., 1]
    return torch.stack([e * c - o * s, e * s + o * c], -1).to(x.dtype).view(B, N, HD)


def k_prologue(k, cos, sin, heads: int):
    B, N, HD = k.shape
    return rotate(k, cos, sin, heads), k.float().sum(1).view(B, heads, HD // heads)


def q_prologue(q, cos, sin, z, heads: int, eps: float, copies: int):
    B, N, HD = q.shape
    d = HD // heads
    den = (q.view(B, N, heads, d).float() * z[:, None]).sum(-1, keepdim=True) + eps
    x = (rotate(q, cos, sin, heads).view(B, N, heads, d).float() / den).to(q.dtype)
    if copies == 2:
        x = torch.cat([x, x], dim=-1)  # [B, N, heads, 2d]: against [S_hi; S_lo]
    return x


def sums_bmm(v, rot_k, heads: int):
    B, N, HD = v.shape
    d = HD // heads
    S = torch.empty(B, heads, d, d, device=v.device, dtype=torch.float32)
    for b in range(B):
        vt = v[b].view(N, heads, d).permute(1, 2, 0)  # [heads, d, N], strides (d, 1, HD): no copy
        rk = rot_k[b].view(N, heads, d).transpose(0, 1)  # [heads, N, d]
        S[b] = torch.bmm(vt, rk, out_dtype=torch.float32)
    return S


def apply_bmm(x, St, out):
    """x [B, N, heads, d*copies], St [B, heads, d*copies, d] bf16 -> out [B, N, heads*d] (written in place)."""
    B, N, heads, _ = x.shape
    d = St.shape[-1]
    for b in range(B):
        torch.bmm(x[b].transpose(0, 1), St[b], out=out[b].view(N, heads, d).transpose(0, 1))
    return out


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main(out_path: str) -> None:
    from triton.testing import do_bench

    B, N, heads, d = 2, 32760, 20, 112
    eps = la.EPS
    q, k, v, cos, sin = inputs(B, N, heads, d, torch.bfloat16, "cuda")
    S_ref, z_ref = la.sums_reference(k, v, cos, sin, heads)  # fp32 math on the bf16 inputs
    out_ref = la.apply_reference(q.float(), cos, sin, S_ref, z_ref)
    qkv_bytes = q.numel() * q.element_size()
    rows = {"shape": [B, N, heads, d], "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "command": " ".join(sys.orig_argv), "note": "GB/s counts one read of the inputs and one write of the "
            "outputs of the shipped kernel (sums: k, v; apply: q, out)", "cases": {}}

    def record(name, fn, ref, moved):
        t0 = time.time()
        got = fn()
        ms = do_bench(fn, warmup=10, rep=50)
        err = None if ref is None else rel(got[0] if isinstance(got, tuple) else got, ref)
        rows["cases"][name] = {"ms": round(ms, 4), "GB_s": round(moved / ms / 1e6, 1), "rel_err_vs_fp32": err,
                               "first_call_s": round(time.time() - t0, 2)}
        print(name, rows["cases"][name], flush=True)
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)

    kp = torch.compile(k_prologue, dynamic=False)
    qp = torch.compile(q_prologue, dynamic=False)
    moved = 2 * qkv_bytes
    record("sums_shipped", lambda: la._sums_triton(k, v, cos, sin, heads), S_ref, moved)
    rot_k, z = kp(k, cos, sin, heads)
    record("sums_k_prologue_only", lambda: kp(k, cos, sin, heads), None, moved)
    record("sums_bmm_only", lambda: sums_bmm(v, rot_k, heads), S_ref, moved)
    record("sums_prologue_plus_bmm", lambda: sums_bmm(v, kp(k, cos, sin, heads)[0], heads), S_ref, moved)
    print("z error", rel(z, z_ref))

    out = torch.empty_like(q)
    record("apply_shipped", lambda: la._apply_triton(q, cos, sin, S_ref, z_ref, eps), out_ref, moved)
    St = S_ref.transpose(-1, -2).to(torch.bfloat16).contiguous()
    hi = S_ref.to(torch.bfloat16)
    lo = (S_ref - hi.float()).to(torch.bfloat16)
    St2 = torch.cat([hi, lo], dim=-1).transpose(-1, -2).contiguous()  # [B, heads, 2d, d]
    x1 = qp(q, cos, sin, z_ref, heads, eps, 1)
    x2 = qp(q, cos, sin, z_ref, heads, eps, 2)
    record("apply_q_prologue_only", lambda: qp(q, cos, sin, z_ref, heads, eps, 1), None, moved)
    record("apply_bmm_bf16_only", lambda: apply_bmm(x1, St, out), out_ref, moved)
    record("apply_prologue_plus_bmm_bf16", lambda: apply_bmm(qp(q, cos, sin, z_ref, heads, eps, 1), St, out),
           out_ref, moved)
    record("apply_bmm_hilo_only", lambda: apply_bmm(x2, St2, out), out_ref, moved)
    record("apply_prologue_plus_bmm_hilo", lambda: apply_bmm(qp(q, cos, sin, z_ref, heads, eps, 2), St2, out),
           out_ref, moved)
    # The strided write into the [N, heads*d] layout against a contiguous [heads, N, d] result (a copy, if torch
    # makes one for the strided output, shows as the difference).
    record("apply_bmm_bf16_contiguous_out", lambda: [torch.bmm(x1[b].transpose(0, 1), St[b]) for b in range(B)][0],
           None, moved)


if __name__ == "__main__":
    main(sys.argv[1])
