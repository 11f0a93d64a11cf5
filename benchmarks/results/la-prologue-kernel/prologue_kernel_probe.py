"""The GEMM attention's prologue alone at the 480p shapes (CFG batch 2, 32,760 tokens, 20 heads, d=112, bf16): the
``sana::norm_rotate`` Triton kernel against the same math fused by torch.compile (the ``gemm-compiled`` form), for
k (writes rot(k) and k) and for q (writes rot(q) / (z . q + eps)), each reading a slice of a fused q|k|v projection.

    python benchmarks/results/la-prologue-kernel/prologue_kernel_probe.py OUT.json    # CUDA
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from diffusers.models.normalization import RMSNorm

sys.path.insert(0, os.getcwd())
from engine.kernels import linear_attention as la  # noqa: E402

B, N, HEADS, D = 2, 32760, 20, 112
dev, bf = "cuda", torch.bfloat16
torch.manual_seed(0)
q, k, _ = (torch.randn(B, N, 3 * HEADS * D, device=dev) * 2).to(bf).chunk(3, dim=-1)
norm = RMSNorm(HEADS * D, eps=1e-5).to(dev, bf)
ang = torch.rand(N, D // 2, device=dev) * 6.28
cos, sin = ang.cos(), ang.sin()
full = la.swap_tables(cos, sin)
z = torch.rand(B, HEADS, D, device=dev) * N


@torch.compile(dynamic=False)
def compiled_k(k):
    a = F.relu(norm(k))
    return la.rotate_swapped(a.unflatten(-1, (HEADS, -1)), *full).to(a.dtype).flatten(2), a


@torch.compile(dynamic=False)
def compiled_q(q):
    a = F.relu(norm(q)).unflatten(-1, (HEADS, -1))
    den = (a.float() * z[:, None]).sum(-1, keepdim=True) + la.EPS
    return (la.rotate_swapped(a, *full) / den).to(a.dtype).flatten(2)


def kernel_k(k):
    return la.norm_rotate(k, norm.weight, norm.eps, cos, sin, HEADS, impl="triton")


def kernel_q(q):
    return la.norm_rotate(q, norm.weight, norm.eps, cos, sin, HEADS, z, impl="triton")[0]


def time_ms(fn, x, iters=50):
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn(x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


row_bytes = B * N * HEADS * D * 2
report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.orig_argv),
          "shape": [B, N, HEADS, D], "cases": {}}
with torch.inference_mode():
    for name, fn, x, writes in (("k_compiled", compiled_k, k, 2), ("k_kernel", kernel_k, k, 2),
                                ("q_compiled", compiled_q, q, 1), ("q_kernel", kernel_q, q, 1)):
        ms = time_ms(fn, x)
        report["cases"][name] = {"ms": round(ms, 4), "min_traffic_GB_s": round((1 + writes) * row_bytes / ms / 1e6, 1)}
        print(name, report["cases"][name], flush=True)
    rk, ak = kernel_k(k)
    rk0, ak0 = compiled_k(k)
    report["rel_err_kernel_vs_compiled"] = {"rot_k": rel(rk, rk0), "k": rel(ak, ak0), "q": rel(kernel_q(q),
                                                                                              compiled_q(q))}
    best = la._norm_rotate_tuned.cache
    report["autotuned"] = {str(key): str(cfg) for key, cfg in best.items()}
print(json.dumps(report, indent=1))
with open(sys.argv[1], "w") as f:
    json.dump(report, f, indent=1)
