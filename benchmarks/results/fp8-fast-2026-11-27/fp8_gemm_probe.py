"""The block's GEMMs at 480p (CFG batch 2: 65,520 tokens) in bf16 and in scaled FP8 (e4m3) with torch._scaled_mm:
rowwise scales (per token x per output channel, what engine/kernels/fp8.py uses) or one scale per tensor, each
with and without ``use_fast_accum`` (the tensor cores' FP8 accumulation without the periodic promotion to fp32).
Error: relative Frobenius error against the fp32 product of the same (unquantized) operands.

    python benchmarks/results/fp8-fast-2026-11-27/fp8_gemm_probe.py OUT.json      # CUDA
"""
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())
from engine.kernels.fp8 import E4M3, E4M3_MAX, quantize_rowwise  # noqa: E402


def bench(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / iters)
    return best


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(out_path):
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "driver": subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True).stdout.strip(),
              "command": " ".join(sys.orig_argv), "rows": []}
    M = 65520
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, K, N in (("qkv / temporal", 2240, 6720), ("attn_out / cross", 2240, 2240), ("ffn_in", 2240, 11200),
                       ("ffn_out", 5600, 2240)):
        x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
        w = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).bfloat16()
        exact = x.float() @ w.float().t()
        flop = 2 * M * K * N
        xq, xs = quantize_rowwise(x)
        wq, ws = quantize_rowwise(w)
        ws = ws.reshape(1, -1).contiguous()
        xt = (x.abs().amax().float() / E4M3_MAX)
        wt_ = (w.abs().amax().float() / E4M3_MAX)
        xq_t = (x.float() / xt).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
        wq_t = (w.float() / wt_).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
        cases = {"bf16 linear": lambda: F.linear(x, w)}
        for fast in (False, True):
            cases[f"fp8 rowwise fast_accum={fast}"] = (
                lambda fast=fast: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=torch.bfloat16,
                                                   use_fast_accum=fast))
            cases[f"fp8 tensorwise fast_accum={fast}"] = (
                lambda fast=fast: torch._scaled_mm(xq_t, wq_t.t(), scale_a=xt, scale_b=wt_, out_dtype=torch.bfloat16,
                                                   use_fast_accum=fast))
        for label, fn in cases.items():
            try:
                out = fn()
                ms = bench(fn)
            except Exception as e:
                row = {"gemm": name, "case": label, "error": repr(e)[:400]}
            else:
                row = {"gemm": name, "M": M, "K": K, "N": N, "case": label, "ms": round(ms, 4),
                       "TFLOP_s": round(flop / ms / 1e9, 1), "rel_err_vs_fp32": round(rel(out, exact), 6)}
            report["rows"].append(row)
            print(row, flush=True)
    report["date_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
