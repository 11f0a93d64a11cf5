"""Bytes of one stream's Wan VAE decoder cache (two frames per causal conv), on the CPU: AutoencoderKLWan()
defaults in bf16, two blocks decoded at two small latent sizes; the cache grows with the area, so it is scaled to
480p latents (60x104).

    OUT=$OUT python benchmarks/results/long-stream-2026-11-27/vae_cache_probe.py
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from benchmarks.common import environment  # noqa: E402
from engine.vae import StreamingDecoder, build_vae  # noqa: E402

vae = build_vae({}, seed=0).to(torch.bfloat16)


def cache_bytes(h: int, w: int) -> int:
    dec = StreamingDecoder(vae, fast=False)
    with torch.no_grad():
        dec.decode_block(torch.randn(1, 16, 1, h, w, dtype=torch.bfloat16))
        dec.decode_block(torch.randn(1, 16, 2, h, w, dtype=torch.bfloat16))
    return sum(t.numel() * t.element_size() for t in dec.cache if isinstance(t, torch.Tensor))


sizes = {"4x6": cache_bytes(4, 6), "8x12": cache_bytes(8, 12)}
doc = {"environment": environment(), "cache_bytes": sizes, "ratio_8x12_over_4x6": sizes["8x12"] / sizes["4x6"],
       "scaled_to_60x104_mib": round(sizes["8x12"] * (60 * 104) / (8 * 12) / 2**20, 1)}
print(json.dumps({k: v for k, v in doc.items() if k != "environment"}))
with open(os.path.join(os.environ.get("OUT", "."), "vae_cache_cpu.json"), "w") as f:
    json.dump(doc, f, indent=1)
