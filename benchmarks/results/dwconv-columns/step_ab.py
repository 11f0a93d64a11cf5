"""The 2B transformer's CFG step at 480p with the Mix-FFN kernel's two autotune lists, interleaved call by call in one
process: the earlier 2D tiles against the shipped list (column kernel). The compiled graphs call the kernel through
``torch.ops.sana.dwconv_glu``, which looks the tuner up at each call, so swapping it swaps the kernel only.

    python benchmarks/results/dwconv-columns/step_ab.py OUT.json --rounds 12          # CUDA
"""
import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.getcwd())
import triton  # noqa: E402

from benchmarks.common import build_pair, clone_as, environment, transformer_inputs  # noqa: E402
from engine.fast import optimize  # noqa: E402
from engine.kernels import mixffn  # noqa: E402
from engine.presets import TransformerConfig  # noqa: E402

EARLIER_TILES = [  # the autotune list before the column kernel
    triton.Config({"ROWS": 16, "BLOCK_W": 4, "BLOCK_C": 128}, num_warps=4),
    triton.Config({"ROWS": 32, "BLOCK_W": 4, "BLOCK_C": 64}, num_warps=2),
    triton.Config({"ROWS": 16, "BLOCK_W": 2, "BLOCK_C": 256}, num_warps=4),
    triton.Config({"ROWS": 16, "BLOCK_W": 8, "BLOCK_C": 128}, num_warps=4),
    triton.Config({"ROWS": 32, "BLOCK_W": 2, "BLOCK_C": 128, "PREFETCH": True}, num_warps=2),
    triton.Config({"ROWS": 32, "BLOCK_W": 2, "BLOCK_C": 256, "PREFETCH": True}, num_warps=4),
    triton.Config({"ROWS": 32, "BLOCK_W": 8, "BLOCK_C": 64, "PREFETCH": True}, num_warps=4),
    triton.Config({"ROWS": 16, "BLOCK_W": 2, "BLOCK_C": 128, "PREFETCH": True}, num_warps=2),
]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--rounds", type=int, default=12)
    args = p.parse_args()
    dev = "cuda"
    config = TransformerConfig()
    x, text, t, mask = transformer_inputs(config, 2, 21, 60, 104, 300, dev, torch.float32)
    _, ours32 = build_pair(config, dev)
    bf = torch.bfloat16
    xb, textb = x.to(bf), text.to(bf)
    tuners = {"earlier_tiles": triton.autotune(configs=EARLIER_TILES, key=["H", "W", "C"])(mixffn._dwconv_glu_kernel),
              "columns": mixffn._dwconv_glu_tuned}
    doc = {"environment": environment(), "rounds": args.rounds, "resolution": "480p", "cfg_batch": 2,
           "text_len": 300, "cases": {}}
    for precision in ("bf16", "fp8"):
        model = optimize(clone_as(ours32, bf), fp8=precision == "fp8", compile=True)
        times = {name: [] for name in tuners}
        outs = {}
        with torch.inference_mode():
            for name, tuner in tuners.items():  # compile + autotune both lists
                mixffn._dwconv_glu_tuned = tuner
                for _ in range(2):
                    outs[name] = model(xb, textb, t, mask)
                torch.cuda.synchronize()
            for _ in range(args.rounds):
                for name, tuner in tuners.items():
                    mixffn._dwconv_glu_tuned = tuner
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    model(xb, textb, t, mask)
                    e.record()
                    e.synchronize()
                    times[name].append(s.elapsed_time(e) / 1e3)
        mixffn._dwconv_glu_tuned = tuners["columns"]
        case = {name: {"median_s": statistics.median(v), "mean_s": statistics.mean(v), "times_s": [round(x, 5) for x in v]}
                for name, v in times.items()}
        case["identical_outputs"] = bool(torch.equal(outs["earlier_tiles"], outs["columns"]))
        case["speedup"] = round(case["earlier_tiles"]["median_s"] / case["columns"]["median_s"], 4)
        case["chosen"] = {n: {**tu.best_config.kwargs, "num_warps": tu.best_config.num_warps} for n, tu in tuners.items()
                          if tu.best_config is not None}
        doc["cases"][precision] = case
        print(precision, {n: case[n]["median_s"] for n in tuners}, case["speedup"], case["identical_outputs"], flush=True)
        del model
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
