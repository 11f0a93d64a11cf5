"""The pointwise prologues of the GEMM linear attention, compiled alone on the 480p shape (B=2, N=32,760, 20 heads,
d=112; q, k slices of a bf16 q|k|v projection; RMS norm across heads + ReLU as the model does): how much each
formulation of the RoPE rotation and of z costs beside the plain norm + ReLU pass.

    python benchmarks/results/la-cublas-probe/prologue_probe.py OUT.json     # CUDA
"""
import json
import sys

import torch
from diffusers.models.normalization import RMSNorm
from triton.testing import do_bench

B, N, H, D = 2, 32760, 20, 112
HD = H * D
dev = "cuda"
torch.manual_seed(0)
qkv = torch.randn(B, N, 3 * HD, device=dev, dtype=torch.bfloat16)
q, k, v = qkv.chunk(3, dim=-1)
norm = RMSNorm(HD, eps=1e-5).to(dev, torch.bfloat16)
ang = torch.arange(N, device=dev, dtype=torch.float32)[:, None] * torch.logspace(0, -3, D // 2, device=dev)[None]
cos, sin = ang.cos(), ang.sin()
cos_full = cos.repeat_interleave(2, -1)  # [N, d]: c0 c0 c1 c1 ...
sin_signed = torch.stack([-sin, sin], -1).flatten(-2)  # [N, d]: -s0 s0 -s1 s1 ...
z = torch.rand(B, H, D, device=dev) * N


def rot_stack(x):  # as engine.kernels.linear_attention.rotate_pairs_fp32
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)


def rot_flip(x):  # x * cos + (pairs swapped) * (-sin, sin)
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return xf * cos_full[None, :, None, :] + swapped * sin_signed[None, :, None, :]


def k_plain(k):
    return torch.relu(norm(k))


def k_stack_z(k):
    kh = torch.relu(norm(k)).unflatten(-1, (H, -1))
    return rot_stack(kh).to(k.dtype).flatten(2), kh.float().sum(1)


def k_flip_z(k):
    kh = torch.relu(norm(k)).unflatten(-1, (H, -1))
    return rot_flip(kh).to(k.dtype).flatten(2), kh.float().sum(1)


def k_flip(k):
    kh = torch.relu(norm(k)).unflatten(-1, (H, -1))
    return rot_flip(kh).to(k.dtype).flatten(2)


def k_flip_and_k(k):
    kr = torch.relu(norm(k))
    return rot_flip(kr.unflatten(-1, (H, -1))).to(k.dtype).flatten(2), kr


def q_plain(q):
    return torch.relu(norm(q))


def q_stack(q):
    qh = torch.relu(norm(q)).unflatten(-1, (H, -1))
    den = (qh.float() * z[:, None]).sum(-1, keepdim=True) + 1e-15
    return (rot_stack(qh.to(q.dtype)).to(q.dtype).float() / den).to(q.dtype).flatten(2)


def q_flip(q):
    qh = torch.relu(norm(q)).unflatten(-1, (H, -1))
    den = (qh.float() * z[:, None]).sum(-1, keepdim=True) + 1e-15
    return (rot_flip(qh) / den).to(q.dtype).flatten(2)


rows = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.orig_argv),
        "shape": [B, N, H, D], "ms": {}}
ref_rot = rot_stack(torch.relu(norm(k)).unflatten(-1, (H, -1))).to(torch.bfloat16).flatten(2)
for name, fn, x in (("k_plain", k_plain, k), ("k_stack_z", k_stack_z, k), ("k_flip_z", k_flip_z, k),
                    ("k_flip", k_flip, k), ("k_flip_and_k", k_flip_and_k, k), ("q_plain", q_plain, q),
                    ("q_stack", q_stack, q), ("q_flip", q_flip, q)):
    f = torch.compile(fn, dynamic=False)
    with torch.inference_mode():
        got = f(x)
        ms = do_bench(lambda: f(x), warmup=10, rep=50)
    rows["ms"][name] = round(ms, 4)
    if name.startswith("k_") and name != "k_plain":
        r = got[0] if isinstance(got, tuple) else got
        rows.setdefault("rot_k_max_abs_diff_vs_stack", {})[name] = float((r.float() - ref_rot.float()).abs().max())
    print(name, rows["ms"][name], flush=True)
with torch.inference_mode():
    kr = torch.relu(norm(k))
    rows["ms"]["z_eager_sum"] = round(do_bench(lambda: kr.float().sum(1), warmup=10, rep=50), 4)
    ones = torch.ones(1, N, device=dev, dtype=torch.bfloat16)
    rows["ms"]["z_gemv"] = round(do_bench(lambda: [torch.mm(ones, kr[b], out_dtype=torch.float32) for b in range(B)],
                                          warmup=10, rep=50), 4)
print(rows)
with open(sys.argv[1], "w") as f:
    json.dump(rows, f, indent=1)
