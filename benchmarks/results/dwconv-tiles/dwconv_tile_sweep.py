"""Tile sweep of the Mix-FFN's fused depthwise conv + GLU kernel (engine/kernels/mixffn.py) at the 480p shape of the
2B model: I = 42 images (CFG batch 2 x 21 latent frames), 30 x 52 tokens, 2 x 5600 channels, bf16. Each tile is
timed with CUDA events beside the autotuned choice; the report gives ms and the bandwidth of the minimum traffic
(read the input once, write the output once).

    python benchmarks/results/dwconv-tiles/dwconv_tile_sweep.py OUT.json    # CUDA
"""
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from engine.kernels import mixffn  # noqa: E402

I, H, W, C = 42, 30, 52, 5600
dev, bf = "cuda", torch.bfloat16
torch.manual_seed(0)
x = torch.randn(I, H, W, 2 * C, device=dev, dtype=bf)
w = torch.randn(2 * C, 1, 3, 3, device=dev, dtype=bf) * 0.3
b = torch.randn(2 * C, device=dev, dtype=bf) * 0.1
ib = torch.randn(2 * C, device=dev, dtype=bf) * 0.1
moved = (x.numel() + x.numel() // 2) * 2


def time_ms(fn, iters=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters




def main():
    ref = mixffn.dwconv_glu(x, w, b, ib, True)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.orig_argv),
              "shape": [I, H, W, 2 * C], "tiles": []}
    auto = time_ms(lambda: mixffn.dwconv_glu(x, w, b, ib, True))
    report["autotuned_ms"] = round(auto, 4)
    report["autotuned_choice"] = {str(k): str(v) for k, v in mixffn._dwconv_glu_tuned.cache.items()}
    print("autotuned", auto, report["autotuned_choice"], flush=True)
    deadline = time.time() + float(os.environ.get("SWEEP_SECONDS", "300"))
    for rows, bw, bc, warps in itertools.product((4, 8, 16, 30), (2, 4, 8, 16), (64, 128, 256), (2, 4, 8)):
        if time.time() > deadline or bw * bc // (32 * warps) > 16 or bw * bc // (32 * warps) < 1:
            continue
        try:
            def fn():
                return mixffn._dwconv_glu_triton(x, w, b, ib, True, rows=rows, block_w=bw, block_c=bc, num_warps=warps)
            err = ((fn().float() - ref.float()).norm() / ref.float().norm()).item()
            ms = time_ms(fn)
        except Exception as exc:  # a tile that does not build or fit
            report["tiles"].append({"rows": rows, "block_w": bw, "block_c": bc, "warps": warps,
                                    "error": str(exc)[:200]})
            continue
        row = {"rows": rows, "block_w": bw, "block_c": bc, "warps": warps, "ms": round(ms, 4),
               "GB_s": round(moved / ms / 1e6, 1), "rel_diff_vs_autotuned": err}
        report["tiles"].append(row)
        print(row, flush=True)
    ok = [t for t in report["tiles"] if "ms" in t]
    report["best"] = sorted(ok, key=lambda t: t["ms"])[:8]
    print("best", json.dumps(report["best"], indent=1))
    with open(sys.argv[1], "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
