"""GPU probe: one bf16 fast step at 480p (CFG batch 2, 300 text tokens) with the norm kernels and without
(norm_kernels=False: torch.compile fuses the residual add + LayerNorm + modulation), timed back to back and
profiled; then the kernel alone against the compiled reference at the model's shape. Writes $OUT/norms_probe.json and
$OUT/profile_480p_{kernels,compiled}.txt.

    OUT=/tmp/out python benchmarks/results/norm-kernels-2026-11-27/probe/norms_probe.py
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
from engine.kernels import norms  # noqa: E402
from engine.model import SanaVideoTransformer  # noqa: E402
from engine.presets import TransformerConfig  # noqa: E402

OUT = os.environ["OUT"]
res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}


def save():
    json.dump(res, open(f"{OUT}/norms_probe.json", "w"), indent=1)


def timeit(fn, iters=5, warm=1):
    for _ in range(warm):
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
models = {name: optimize(copy.deepcopy(base), compile=True, norm_kernels=name == "kernels")
          for name in ("kernels", "compiled")}
with torch.inference_mode():
    outs = {}
    for name, m in models.items():
        for _ in range(2):
            outs[name] = m(x, text, t, mask).float()
    res["rel_diff_kernels_vs_compiled"] = ((outs["kernels"] - outs["compiled"]).norm() / outs["compiled"].norm()).item()
    for rnd in range(2):  # alternate, twice
        for name, m in models.items():
            res.setdefault(f"{name}_step_s", []).append(timeit(lambda: m(x, text, t, mask)))
    save()
    print(res, flush=True)
    for name, m in models.items():
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            m(x, text, t, mask)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=100)
        open(f"{OUT}/profile_480p_{name}.txt", "w").write(table)
    del models
    torch.cuda.empty_cache()
    # The kernel alone at the model's shape against the same math compiled.
    B, N, C = 2, 32760, 2240
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = torch.randn(B, N, C, device="cuda", dtype=torch.bfloat16, generator=g)
    ys = torch.randn(B, N, C, device="cuda", dtype=torch.bfloat16, generator=g)
    sc, sh = (torch.randn(B, 1, C, device="cuda", dtype=torch.bfloat16, generator=g) / 4 for _ in range(2))
    compiled = torch.compile(norms.add_norm_modulate_reference, dynamic=False)
    for label, y in (("add_norm", ys), ("norm", None)):
        k = timeit(lambda: norms.add_norm_modulate(xs, y, sc, sh, None, None, 1e-6, impl="triton"), iters=20, warm=3)
        c = timeit(lambda: compiled(xs, y, sc, sh, None, None, 1e-6), iters=20, warm=3)
        moved = (2 if y is None else 4) * B * N * C * 2
        res[f"alone_{label}"] = {"kernel_ms": k * 1e3, "compiled_ms": c * 1e3,
                                 "kernel_gb_s": moved / k / 1e9, "compiled_gb_s": moved / c / 1e9}
        save()
print(json.dumps(res, indent=1))
