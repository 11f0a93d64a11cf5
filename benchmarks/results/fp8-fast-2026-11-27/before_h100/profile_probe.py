"""Profiles of one bf16 and one FP8 fast step at 480p (CFG batch 2, the transformer benchmark's inputs), with the
defaults of the day (norm kernels on the bf16 path, GEMM linear attention), and the kernels' share of the step.

    OUT=DIR python benchmarks/results/fp8-fast-2026-11-27/before_h100/profile_probe.py
Writes DIR/profile.json, DIR/profile_bf16.txt and DIR/profile_fp8.txt.
"""
import copy
import json
import os
import sys
import traceback

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.getcwd())
from benchmarks.common import transformer_inputs  # noqa: E402
from engine.fast import optimize  # noqa: E402
from engine.model import SanaVideoTransformer  # noqa: E402
from engine.presets import TransformerConfig  # noqa: E402

OUT = os.environ["OUT"]
res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "command": " ".join(sys.orig_argv)}


def timeit(fn, iters=5):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return sorted(ts)[len(ts) // 2]


cfg = TransformerConfig()
with torch.device("cuda"):
    torch.manual_seed(0)
    base = SanaVideoTransformer(cfg).eval()
base.rope.to("cuda")
base = base.to(torch.bfloat16)
x, text, t, mask = transformer_inputs(cfg, 2, 21, 60, 104, 300, "cuda", torch.bfloat16)
for name, fp8 in (("bf16", False), ("fp8", True)):
    try:
        m = optimize(copy.deepcopy(base), fp8=fp8, compile=True)
        with torch.inference_mode():
            for _ in range(2):
                m(x, text, t, mask)
            res[f"{name}_step_s"] = timeit(lambda: m(x, text, t, mask))
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                m(x, text, t, mask)
                torch.cuda.synchronize()
        events = prof.key_averages()
        total = sum(e.self_device_time_total for e in events)
        res[f"{name}_kernels"] = sorted(
            ({"name": e.key[:160], "ms": round(e.self_device_time_total / 1e3, 3), "calls": e.count,
              "share": round(e.self_device_time_total / total, 4)} for e in events if e.self_device_time_total > 0),
            key=lambda r: -r["ms"])[:40]
        table = events.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=110)
        open(f"{OUT}/profile_{name}.txt", "w").write(table)
        print(name, res[f"{name}_step_s"], flush=True)
        m = None
        torch.cuda.empty_cache()
    except Exception:
        res[f"{name}_error"] = traceback.format_exc()[-2000:]
        print(res[f"{name}_error"], flush=True)
json.dump(res, open(f"{OUT}/profile.json", "w"), indent=1)
