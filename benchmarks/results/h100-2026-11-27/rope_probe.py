"""A/B of the fast transformer step at 480p (bf16, CFG batch 2): RoPE pair tables made contiguous once per forward
(engine.fast.RopePairs, the shipped code) against the strided views the blocks used before. Same model, same
inputs, one process; the B case re-binds RopePairs.__call__ (its graphs compile afresh for the new strides).

    OUT=. python benchmarks/results/h100-2026-11-27/rope_probe.py
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from benchmarks.common import environment, rel_err, time_calls, transformer_inputs  # noqa: E402
from engine import fast  # noqa: E402
from engine.model import SanaVideoTransformer  # noqa: E402
from engine.presets import TransformerConfig  # noqa: E402

torch.manual_seed(0)
config = TransformerConfig()
with torch.device("cuda"):
    model = SanaVideoTransformer(config).eval().to(torch.bfloat16)
model.rope.to("cuda")
fast.optimize(model, compile=True)
x, text, t, mask = transformer_inputs(config, 2, 21, 60, 104, 300, "cuda", torch.bfloat16)
out = {"environment": environment(), "cases": {}}


def step():
    with torch.inference_mode():
        return model(x, text, t, mask)


contiguous_call = fast.RopePairs.__call__


def strided_call(self, rope):
    return rope[0][0, :, 0, 0::2], rope[1][0, :, 0, 1::2]


outputs = {}
for name, call in (("contiguous", contiguous_call), ("strided", strided_call), ("contiguous_again", contiguous_call)):
    fast.RopePairs.__call__ = call
    r = time_calls(step, iters=8, warmup=2, device="cuda")
    outputs[name] = r.pop("output")
    out["cases"][name] = r
    print(name, round(r["median_s"], 4), "first", round(r["first_call_s"], 1), flush=True)
out["rel_err_contiguous_vs_strided"] = rel_err(outputs["contiguous"], outputs["strided"])
print(out["rel_err_contiguous_vs_strided"])
with open(os.path.join(os.environ.get("OUT", "."), "rope_probe.json"), "w") as f:
    json.dump(out, f, indent=2, default=str)
