"""Worker warm-up on the GPU: the 480p clip and LongLive stream pipelines (random weights, bf16, fast path "auto"),
``workers.tasks.warm_up`` timed, then the first real request timed, against the same request on a pipeline that
was not warmed (its first request pays compilation and the cuDNN algorithm search).

    OUT=. python benchmarks/results/h100-2026-11-27/warmup_probe.py [clip,stream]
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from benchmarks.common import build_pipeline, environment  # noqa: E402
from engine.fast import apply_fast_path  # noqa: E402
from engine.types import GenerationParams  # noqa: E402
from workers.tasks import warm_up  # noqa: E402

torch.backends.cudnn.benchmark = True
out = {"environment": environment(), "cases": {}}


def first_request(pipe, causal):
    params = GenerationParams(prompt="a red ball", steps=2) if not causal else GenerationParams(prompt="a red ball",
                                                                                               frames=157)
    params = pipe.resolve(params)
    torch.cuda.synchronize()
    t0 = time.monotonic()
    first = None
    frames = 0
    for chunk in pipe.generate(params):
        frames += chunk.num_frames
        first = first or time.monotonic() - t0
    return {"frames": frames, "first_frames_s": round(first, 3), "total_s": round(time.monotonic() - t0, 3),
            "steps": params.steps, "mode": params.mode}


modes = (sys.argv[1] if len(sys.argv) > 1 else "clip,stream").split(",")
for causal in [m == "stream" for m in modes]:
    name = "stream" if causal else "clip"
    for warmed in (True, False):
        torch._dynamo.reset()  # every case compiles from scratch (the on-disk caches stay: as a restarted worker)
        pipe = build_pipeline(causal=causal, device="cuda", dtype=torch.bfloat16, smoke=False)
        mode = apply_fast_path(pipe, "auto")
        row = {"fast_path": mode, "fast_vae": pipe.fast_vae}
        if warmed:
            row["warm_up"] = warm_up(pipe)
        row["first_request"] = first_request(pipe, causal)
        row["second_request"] = first_request(pipe, causal)
        out["cases"][f"{name}_{'warmed' if warmed else 'cold'}"] = row
        out.setdefault("argv", sys.argv)
        print(name, "warmed" if warmed else "cold", row, flush=True)
        del pipe
        torch.cuda.empty_cache()
        with open(os.path.join(os.environ.get("OUT", "."), "warmup_probe.json"), "w") as f:
            json.dump(out, f, indent=2, default=str)
