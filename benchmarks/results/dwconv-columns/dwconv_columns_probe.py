"""The Mix-FFN's depthwise conv + GLU kernel: four output columns per program as separate vectors (``COLUMNS``)
against the shifted 2D tiles, each configuration timed on its own, then the autotuned choice of the shipped list.

The 2D-tile kernel costs the same on an H100 and an H200 (1.89 and 1.92 ms at 480p, `../h200-2026-11-27/`,
`../la-prologue-kernel/run5_kernels/`) although the H200 has 40% more bandwidth: it is not bound by DRAM. It loads
and activates each input element three times (once per column shift) under elementwise masks. The column form loads
six columns for four outputs (1.5 times) with per-column scalar masks, and with PREFETCH has twelve row loads in
flight while a row's arithmetic runs.

    python benchmarks/results/dwconv-columns/dwconv_columns_probe.py OUT.json          # CUDA
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from benchmarks.common import environment, time_calls  # noqa: E402
from engine.kernels import mixffn  # noqa: E402

# The earlier autotune list (2D tiles) and the column kernel, without and with PREFETCH: (rows, block_w, block_c,
# warps, prefetch, columns).
CONFIGS = [(16, 4, 128, 4, False, False), (32, 4, 64, 2, False, False), (16, 2, 256, 4, False, False),
           (16, 8, 128, 4, False, False), (32, 2, 128, 2, True, False), (32, 2, 256, 4, True, False),
           (32, 8, 64, 4, True, False), (16, 2, 128, 2, True, False)]
CONFIGS += [(rows, 4, c, warps, prefetch, True) for prefetch in (False, True)
            for rows, c, warps in ((32, 64, 1), (32, 128, 2), (32, 256, 4), (64, 64, 1))]
SHAPES = {"480p": (42, 30, 52, 5600), "720p": (42, 45, 80, 5600), "480p_stream_block": (20, 30, 52, 5600)}


def main(out_path):
    dev = "cuda"
    g = torch.Generator().manual_seed(0)
    doc = {"environment": environment(), "shapes": {}}
    for name, (I, H, W, C) in SHAPES.items():
        x = torch.randn(I, H, W, 2 * C, generator=g).to(dev, torch.bfloat16)
        w = (torch.randn(2 * C, 1, 3, 3, generator=g) / 3).to(dev, torch.bfloat16)
        b, ib = torch.randn(2 * C, generator=g).to(dev, torch.bfloat16), torch.randn(2 * C, generator=g).to(dev, torch.bfloat16)
        moved = (x.numel() + x.numel() // 2) * 2
        ref = mixffn.dwconv_glu_reference(x.float(), w.float(), b.float(), ib.float(), True)
        base = mixffn._dwconv_glu_triton(x, w, b, ib, True, rows=32, block_w=2, block_c=128, num_warps=2,
                                         prefetch=True)
        rows = []
        for rows_, block_w, block_c, warps, prefetch, columns in CONFIGS:
            args = dict(rows=rows_, block_w=block_w, block_c=block_c, num_warps=warps, prefetch=prefetch,
                        columns=columns)
            fn = lambda: mixffn._dwconv_glu_triton(x, w, b, ib, True, **args)  # noqa: E731
            t = time_calls(fn, iters=20, warmup=3, device=dev)
            out = t.pop("output")
            rows.append({**args, "median_ms": round(t["median_s"] * 1e3, 4), "gbps": round(moved / t["median_s"] / 1e9, 1),
                         "identical_to_shipped_tile": bool(torch.equal(out, base)),
                         "rel_err_vs_fp32": ((out.float() - ref).norm() / ref.norm()).item()})
            print(name, rows[-1], flush=True)
        t = time_calls(lambda: mixffn.dwconv_glu(x, w, b, ib, True, impl="triton"), iters=20, warmup=3, device=dev)
        t.pop("output")
        best = mixffn._dwconv_glu_tuned.best_config
        doc["shapes"][name] = {"shape_IHWC": [I, H, W, C], "bytes_moved": moved, "configs": rows,
                               "autotuned_ms": round(t["median_s"] * 1e3, 4),
                               "autotuned_choice": {**best.kwargs, "num_warps": best.num_warps}}
        print(name, "autotuned", doc["shapes"][name]["autotuned_ms"], doc["shapes"][name]["autotuned_choice"], flush=True)
        del x, ref, base
        torch.cuda.empty_cache()
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
