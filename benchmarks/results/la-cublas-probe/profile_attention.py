"""Profiles of one bf16 fast step at 480p (CFG batch 2, random weights) with the linear attention as pointwise
work + cuBLAS GEMMs ("gemm") and as the fused Triton kernels ("triton"): the top kernels of each, by GPU time.

    python benchmarks/results/la-cublas-probe/profile_attention.py OUT_DIR [gemm,gemm-compiled,triton]   # CUDA
"""
import copy
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.getcwd())
from benchmarks.common import transformer_inputs  # noqa: E402
from engine.fast import optimize  # noqa: E402
from engine.model import SanaVideoTransformer  # noqa: E402
from engine.presets import TransformerConfig  # noqa: E402

out_dir = sys.argv[1]
cfg = TransformerConfig()
with torch.device("cuda"):
    torch.manual_seed(0)
    base = SanaVideoTransformer(cfg).eval()
base = base.to(torch.bfloat16)
x, text, t, mask = transformer_inputs(cfg, 2, 21, 60, 104, 300, "cuda", torch.bfloat16)
summary = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.orig_argv)}
for attention in (sys.argv[2].split(",") if len(sys.argv) > 2 else ("gemm", "triton")):
    model = optimize(copy.deepcopy(base), compile=True, attention=attention)
    with torch.inference_mode():
        for _ in range(2):
            model(x, text, t, mask)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(x, text, t, mask)
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=110)
    with open(os.path.join(out_dir, f"profile_480p_{attention}.txt"), "w") as f:
        f.write(table)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    summary[attention] = {"gpu_ms_total": round(sum(e.self_device_time_total for e in events) / 1e3, 2)}
    print(attention, summary[attention], flush=True)
    print(table[:6000], flush=True)
    del model
    torch.cuda.empty_cache()
with open(os.path.join(out_dir, "profile_attention.json"), "w") as f:
    json.dump(summary, f, indent=1)
