"""Where the fast Wan decoder's time goes, and whether its causal 3x3x3 convolutions run faster as 2-D convolutions.

One steady stream block (10 latent frames -> 40 video frames at 480x832, the cache warm) through
engine.vae.FastWanDecoder, bf16, cuDNN benchmark mode:
1. a torch.profiler table of its kernels (CUDA time by kernel name);
2. every distinct conv3d call of the block, timed three ways on the same input and weights:
   - conv3d: what the decoder runs (cuDNN, channels-last, time padding already in the input);
   - stacked: the three time taps stacked on the channels ([T, H, W, 3C], one copy) and one conv2d with a
     [Cout, 3C, 3, 3] weight (the copy is timed too);
   - taps: three conv2d over shifted frame views, summed.
   Each against conv3d's output (relative error), with TFLOP/s.

    OUT=$OUT python benchmarks/results/long-stream-2026-11-27/conv_probe.py
"""

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())
from benchmarks.common import environment  # noqa: E402
from engine.vae import StreamingDecoder, build_vae  # noqa: E402

torch.backends.cudnn.benchmark = True
dev, dt = "cuda", torch.bfloat16
vae = build_vae({}, seed=100).to(dev, dt)
lat = torch.randn(1, 16, 30, 60, 104, device=dev)
dec = StreamingDecoder(vae, fast=True)
with torch.inference_mode():
    dec.decode_block(lat[:, :, :10])
    dec.decode_block(lat[:, :, 10:20])  # compile the steady shapes
torch.cuda.synchronize()

calls = []
real = F.conv3d


def spy(x, w, b=None, stride=1, padding=0, *a):
    calls.append((tuple(x.shape), tuple(w.shape), b is not None, stride, padding))
    return real(x, w, b, stride, padding, *a)


block = lat[:, :, 20:30]
F.conv3d = spy
with torch.inference_mode():
    dec.decode_block(block)
F.conv3d = real
torch.cuda.synchronize()

# 1. profile
from torch.profiler import ProfilerActivity, profile  # noqa: E402

with torch.inference_mode():
    dec2 = StreamingDecoder(vae, fast=True)
    dec2.decode_block(lat[:, :, :10])
    dec2.decode_block(lat[:, :, 10:20])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec2.decode_block(block)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
print(table)
kernels = sorted(((e.key, e.device_time_total / 1e3, e.count) for e in prof.key_averages()), key=lambda r: -r[1])
total_ms = sum(k[1] for k in kernels)


def bench(fn, n=5):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


rows = []
seen = {}
for c in calls:
    seen[c] = seen.get(c, 0) + 1
for (xs, ws, has_b, stride, padding), count in seen.items():
    b_, cin, tp, h, w = xs
    cout, _, kt, kh, kw = ws
    if kt != 3:
        rows.append({"x": xs, "w": ws, "count": count, "note": "not a 3-tap time conv"})
        continue
    t = tp - 2
    x = torch.randn(b_, tp, h, w, cin, device=dev, dtype=dt)  # NDHWC storage
    x5 = x.permute(0, 4, 1, 2, 3)
    wt = (torch.randn(ws, device=dev, dtype=dt) / (cin * 27) ** 0.5).contiguous(memory_format=torch.channels_last_3d)
    bias = torch.randn(cout, device=dev, dtype=dt) if has_b else None
    pad2 = tuple(padding[1:]) if isinstance(padding, (tuple, list)) else (padding, padding)
    w_stack = wt.permute(0, 2, 1, 3, 4).reshape(cout, 3 * cin, kh, kw).contiguous(memory_format=torch.channels_last)
    w_taps = [wt[:, :, i].contiguous(memory_format=torch.channels_last) for i in range(3)]

    def conv3d():
        return real(x5, wt, bias, stride, padding)

    def stacked():
        xs3 = torch.cat([x[0, i : i + t] for i in range(3)], dim=-1)  # [T, H, W, 3C]
        return F.conv2d(xs3.permute(0, 3, 1, 2), w_stack, bias, 1, pad2)

    def taps():
        y = F.conv2d(x[0, 0:t].permute(0, 3, 1, 2), w_taps[0], bias, 1, pad2)
        for i in (1, 2):
            y = y + F.conv2d(x[0, i : i + t].permute(0, 3, 1, 2), w_taps[i], None, 1, pad2)
        return y

    with torch.inference_mode():
        ref = conv3d().permute(0, 2, 1, 3, 4)[0].float()  # [T, C, H, W]
        err = {}
        for name, fn in (("stacked", stacked), ("taps", taps)):
            y = fn().float()
            err[name] = ((y - ref).norm() / ref.norm()).item()
        times = {name: bench(fn) for name, fn in (("conv3d", conv3d), ("stacked", stacked), ("taps", taps))}
    flop = 2 * cout * cin * kt * kh * kw * t * h * w
    row = {"x": xs, "w": ws, "count": count, "tflop": round(flop / 1e12, 3),
           **{f"{k}_ms": round(v * 1e3, 3) for k, v in times.items()},
           **{f"{k}_tflops": round(flop / v / 1e12, 1) for k, v in times.items()},
           **{f"{k}_rel_err": float(f"{v:.2e}") for k, v in err.items()}}
    rows.append(row)
    print(row, flush=True)
    del x, x5, wt

tot = {k: sum(r.get(f"{k}_ms", 0) * r["count"] for r in rows) for k in ("conv3d", "stacked", "taps")}
best = sum(min(r.get(f"{k}_ms", 1e9) for k in ("conv3d", "stacked", "taps")) * r["count"] for r in rows if "conv3d_ms" in r)
doc = {"environment": environment(), "block": "10 latent frames -> 40 video frames at 480x832, steady state",
       "profile_wall_s": round(wall, 4), "profile_cuda_ms": round(total_ms, 2),
       "kernels_top": [{"name": k, "cuda_ms": round(ms, 2), "calls": n} for k, ms, n in kernels[:30]],
       "convs": rows, "conv3d_total_ms": round(tot["conv3d"], 2), "stacked_total_ms": round(tot["stacked"], 2),
       "taps_total_ms": round(tot["taps"], 2), "best_per_shape_total_ms": round(best, 2)}
print(json.dumps({k: v for k, v in doc.items() if k.endswith("_ms") or k.endswith("_s")}, indent=1))
out = os.environ.get("OUT", ".")
with open(os.path.join(out, "conv_probe.json"), "w") as f:
    json.dump(doc, f, indent=1)
