"""The depthwise conv + GLU kernel with and without PREFETCH (the next input row's loads issued before this row's
arithmetic) on the best tiles of dwconv_tile_sweep.py, at the same 480p shape, bf16.

    python benchmarks/results/dwconv-tiles/dwconv_prefetch_probe.py OUT.json    # CUDA
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dwconv_tile_sweep import b, ib, moved, time_ms, w, x  # noqa: E402  (the sweep's inputs and timer)

from engine.kernels import mixffn  # noqa: E402

ref = mixffn.dwconv_glu(x, w, b, ib, True)
report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "command": " ".join(sys.orig_argv),
          "rows": []}
for rows, bw, bc, warps in ((32, 2, 128, 2), (32, 2, 256, 4), (32, 4, 128, 4), (32, 4, 64, 2), (16, 2, 128, 2),
                            (32, 2, 64, 1), (32, 2, 128, 4), (32, 8, 64, 4)):
    for prefetch in (False, True):
        def fn():
            return mixffn._dwconv_glu_triton(x, w, b, ib, True, rows=rows, block_w=bw, block_c=bc, num_warps=warps,
                                             prefetch=prefetch)
        same = torch.equal(fn(), ref)
        ms = time_ms(fn, iters=30)
        row = {"rows": rows, "block_w": bw, "block_c": bc, "warps": warps, "prefetch": prefetch, "ms": round(ms, 4),
               "GB_s": round(moved / ms / 1e6, 1), "same_as_autotuned": same}
        report["rows"].append(row)
        print(row, flush=True)
with open(sys.argv[1], "w") as f:
    json.dump(report, f, indent=1)
