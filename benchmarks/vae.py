"""Wan VAE decode of one stream block at 480p: diffusers' decoder (the reference) against engine.vae.FastWanDecoder,
on the same weights and the same latents, side by side in one run.

A block is ``--block-latent`` latent frames (10: 40 video frames, what a LongLive stream block decodes). The
decoder's cache is warmed by a first block, so the timed blocks are the steady state of a stream. Reports seconds
per block, video frames/s of decoding alone, peak memory above the weights, and the fast decoder's relative error
against the reference (bf16 both; also against an fp32 decode of the same latents).

    python -m benchmarks.vae --out benchmarks/results
    python -m benchmarks.vae --smoke --out /tmp/bench    # tiny VAE on CPU: the code path, not speed
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from benchmarks.common import Results, now, peak_memory, rel_err, run_case, stage_parser, stage_setup, sync


def decode_stream(vae, latents: torch.Tensor, block: int, fast: bool, device) -> tuple[torch.Tensor, list[float]]:
    """Decode ``latents`` block by block with one StreamingDecoder; pixels and seconds of every block."""
    from engine.vae import StreamingDecoder

    dec = StreamingDecoder(vae, fast=fast)
    outs, times = [], []
    with torch.inference_mode():
        for s in range(0, latents.shape[2], block):
            sync(device)
            t0 = now()
            outs.append(dec.decode_block(latents[:, :, s : s + block]))
            sync(device)
            times.append(now() - t0)
    return torch.cat(outs, 2), times


def main(argv=None) -> int:
    p = stage_parser(__doc__)
    p.add_argument("--block-latent", type=int, default=10)
    p.add_argument("--blocks", type=int, default=4, help="blocks decoded (the first warms the cache, untimed)")
    args = p.parse_args(argv)
    device, budget = stage_setup(args)

    from engine.vae import build_vae

    smoke = args.smoke
    if not smoke:
        torch.backends.cudnn.benchmark = True
    dtype = torch.float32 if smoke else torch.bfloat16
    h, w = (8, 8) if smoke else (60, 104)
    block = 2 if smoke else args.block_latent
    n_latent = block * args.blocks
    cfg = {"base_dim": 8, "z_dim": 16} if smoke else {}
    with torch.device(device):
        vae32 = build_vae(cfg, seed=100)
    vae = copy.deepcopy(vae32).to(dtype)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, vae.config.z_dim, n_latent, h, w, generator=g).to(device)
    results = Results(Path(args.out) / f"vae_{'smoke' if smoke else '480p'}.json", config={
        "vae": "AutoencoderKLWan(" + ", ".join(f"{k}={v}" for k, v in cfg.items()) + ") random weights",
        "dtype": str(dtype), "latent": [n_latent, h, w], "block_latent_frames": block,
        "video_frames_per_block": 4 * block, "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "timing": "blocks after the first (steady state), synchronized wall clock", "smoke": smoke})
    print(f"== vae: {args.blocks} blocks of {block} latent frames at {8 * h}x{8 * w}", flush=True)
    outputs = {}

    def case(fast: bool):
        def run():
            t0 = now()
            decode_stream(vae, latents[:, :, : 2 * block], block, fast, device)  # compile, algorithm search
            warm = now() - t0
            with peak_memory(device) as mem:
                pixels, times = decode_stream(vae, latents, block, fast, device)
            steady = times[1:]
            s_block = sorted(steady)[len(steady) // 2]
            outputs[fast] = pixels
            return {"s_per_block": round(s_block, 4), "first_block_s": round(times[0], 4),
                    "times_s": [round(t, 4) for t in times], "decode_fps": round(4 * block / s_block, 1),
                    "warmup_s": round(warm, 2), **mem}
        return run

    run_case(results, "diffusers", case(False), budget, needs_s=20)
    run_case(results, "fast", case(True), budget, needs_s=60)
    if False in outputs and True in outputs:
        ref32, _ = decode_stream(vae32, latents, block, False, device)
        errs = {"rel_err_fast_vs_diffusers": rel_err(outputs[True], outputs[False]),
                "rel_err_fast_vs_fp32": rel_err(outputs[True], ref32),
                "rel_err_diffusers_vs_fp32": rel_err(outputs[False], ref32),
                "max_abs_fast_vs_diffusers": (outputs[True].float() - outputs[False].float()).abs().max().item()}
        a, b = results.case("diffusers"), results.case("fast")
        results.set_summary(speedup=round(a["s_per_block"] / b["s_per_block"], 3), **errs)
    print(f"\n== {results.path.name} on {results.doc['environment'].get('gpu')} ==")
    for c in results.doc["cases"]:
        print(c["name"], {k: c[k] for k in ("status", "s_per_block", "decode_fps", "warmup_s", "peak_extra_gib")
                          if k in c})
    print("summary", results.doc["summary"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
