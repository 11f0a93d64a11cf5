"""Compile one fast block (GEMM attention, bf16, 480p shapes) and run it once, so that TORCH_LOGS=output_code shows
the Triton code inductor generates for the pointwise passes around the attention GEMMs.

    TORCH_LOGS=output_code python benchmarks/results/la-cublas-probe/dump_block_code.py 2> OUT/output_code.txt
"""
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from benchmarks.common import transformer_inputs  # noqa: E402
from engine.fast import optimize  # noqa: E402
from engine.model import SanaVideoTransformer  # noqa: E402
from engine.presets import TransformerConfig  # noqa: E402

cfg = dataclasses.replace(TransformerConfig(), num_layers=1)
with torch.device("cuda"):
    torch.manual_seed(0)
    model = SanaVideoTransformer(cfg).eval()
model = optimize(model.to(torch.bfloat16), compile=True)
x, text, t, mask = transformer_inputs(cfg, 2, 21, 60, 104, 300, "cuda", torch.bfloat16)
with torch.inference_mode():
    model(x, text, t, mask)
torch.cuda.synchronize()
print("done", file=sys.stderr)
