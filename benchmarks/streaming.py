"""Streaming run: the block-causal (LongLive) model at 480p through the real pipeline (VideoPipeline.generate in
stream mode): blocks of 10 latent frames, 4 denoising steps + 1 commit forward each, Wan VAE decode of every
block with its cache kept (on a side CUDA stream, overlapping the next block's denoising), frames copied to the host
as the server would. Side by side in the same run: the decode in line, and diffusers' decoder in line.

Reports generated frames/s (whole run and steady state), time to the first frames (text encoding included), per-block
latency p50/p99 split into transformer and the rest (VAE decode, host copy), and GPU memory after every block
(flat: the state is allocated once).

    python -m benchmarks.streaming --blocks 20 --out benchmarks/results
    python -m benchmarks.streaming --smoke --out /tmp/bench
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.common import (
    Budget,
    Results,
    TimedModule,
    build_pipeline,
    free_memory,
    now,
    percentile,
    run_case,
    stage_parser,
    stage_setup,
)

PROMPT = "a red ball bouncing slowly on a wooden table in the sun, motion score: 30."


def stream_once(pipe, blocks: int, block_latent: int, budget: Budget | None, reserve_s: float = 0.0) -> dict:
    """Generate ``blocks`` blocks; per-block timings and memory. Stops early when the budget runs out."""
    from engine.types import GenerationParams

    latent = blocks * block_latent
    frames = (latent - 1) * 4 + 1
    timer = pipe.transformer
    cuda = pipe.device.type == "cuda"
    rows = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t_start = t_prev = now()
    stopped_early = False
    gen = pipe.generate(GenerationParams(prompt=PROMPT, frames=frames, seed=0))
    for chunk in gen:
        t = now()
        # Transformer calls that finished by now (not waiting: the pipeline queues the next block's forwards ahead).
        dit = timer.take(wait=False) if isinstance(timer, TimedModule) else []
        row = {"block": chunk.index, "frames": chunk.num_frames, "t_s": round(t - t_start, 4),
               "latency_s": round(t - t_prev, 4), "transformer_s": round(sum(dit), 4), "forwards": len(dit)}
        if cuda:
            row["allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 4)
            row["reserved_gib"] = round(torch.cuda.memory_reserved() / 2**30, 4)
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 4)
            torch.cuda.reset_peak_memory_stats()
        rows.append(row)
        t_prev = t
        if budget is not None and not budget.allows(reserve_s + 2 * row["latency_s"]):
            stopped_early = True
            gen.close()
            break
    if rows and isinstance(timer, TimedModule):  # calls still unaccounted (a stopped run's queued forwards)
        rest = timer.take()
        rows[-1]["transformer_s"] = round(rows[-1]["transformer_s"] + sum(rest), 4)
        rows[-1]["forwards"] += len(rest)
    return summarize_blocks(rows, blocks, stopped_early, pipe.last_state_bytes)


def summarize_blocks(rows: list[dict], blocks_requested: int, stopped_early: bool, state_bytes: int) -> dict:
    out = {"blocks_requested": blocks_requested, "blocks_done": len(rows), "stopped_early": stopped_early,
           "state_mib": round(state_bytes / 2**20, 2), "blocks": rows}
    if not rows:
        return out
    total_frames = sum(r["frames"] for r in rows)
    out["frames"] = total_frames
    out["first_frames_s"] = rows[0]["t_s"]
    out["total_s"] = rows[-1]["t_s"]
    out["fps"] = round(total_frames / rows[-1]["t_s"], 2)
    later = rows[1:]
    if later:
        steady_t = rows[-1]["t_s"] - rows[0]["t_s"]
        out["steady_fps"] = round(sum(r["frames"] for r in later) / steady_t, 2)
        lat = [r["latency_s"] for r in later]
        out["block_latency_p50_s"] = round(percentile(lat, 0.5), 4)
        out["block_latency_p99_s"] = round(percentile(lat, 0.99), 4)
        dit = [r["transformer_s"] for r in later]
        # Transformer GPU time per block (its forwards are counted when a chunk arrives, so a single block's share
        # can land in the next row) and the rest of the block time (decode not hidden behind the denoising).
        per_block = sum(dit) / len(later)
        out["transformer_per_block_mean_s"] = round(per_block, 4)
        out["rest_per_block_mean_s"] = round(steady_t / len(later) - per_block, 4)
        if "allocated_gib" in rows[1]:
            a2, an = rows[1]["allocated_gib"], rows[-1]["allocated_gib"]
            p2, pn = rows[1]["peak_gib"], rows[-1]["peak_gib"]
            out["memory_block2_gib"], out["memory_last_gib"] = a2, an
            out["memory_drift"] = round(abs(an - a2) / a2, 5) if a2 else None
            out["peak_drift"] = round(abs(pn - p2) / p2, 5) if p2 else None
    return out


def main(argv=None) -> int:
    p = stage_parser(__doc__)
    p.add_argument("--blocks", type=int, default=20)
    p.add_argument("--reference-blocks", type=int, default=3, help="blocks of the unoptimized model (0: skip)")
    p.add_argument("--sequential-blocks", type=int, default=8,
                   help="blocks of the same stream with the decode in line instead of overlapped (0: skip)")
    p.add_argument("--diffusers-vae-blocks", type=int, default=6,
                   help="blocks of the fast transformer with diffusers' VAE decoder, for comparison (0: skip)")
    p.add_argument("--fp8", action="store_true", help="also stream with the FP8 transformer")
    p.add_argument("--no-cudnn-benchmark", action="store_true")
    args = p.parse_args(argv)
    device, budget = stage_setup(args)

    from engine.fast import optimize

    smoke = args.smoke
    dtype = torch.float32 if smoke else torch.bfloat16
    blocks = 3 if smoke else args.blocks
    if not smoke and not args.no_cudnn_benchmark:
        torch.backends.cudnn.benchmark = True  # the VAE's convs: one algorithm search per shape, in the warm-up
    backend = "eager" if smoke else "inductor"

    pipe = build_pipeline(causal=True, device=device, dtype=dtype, smoke=smoke)
    block_latent = pipe.preset.block_latent_frames
    results = Results(Path(args.out) / f"streaming_{'smoke' if smoke else '480p'}.json", config={
        "model": "block-causal (LongLive layout), random weights", "height": pipe.preset.height,
        "width": pipe.preset.width, "block_latent_frames": block_latent,
        "steps_per_block": len(pipe.preset.stream_timesteps), "commit_forward": True,
        "guidance_scale": pipe.preset.stream_guidance_scale, "blocks": blocks, "dtype": str(dtype),
        "vae": "AutoencoderKLWan() defaults, random, decode of every block with the cache kept (fast cases: "
               "engine.vae.FastWanDecoder on the same weights)",
        "text_encoder": "Gemma2Config() defaults, random, word-level tokenizer",
        "cudnn_benchmark": torch.backends.cudnn.benchmark, "smoke": smoke,
        "targets": {"fps": ">= 40", "first_frames_s": "<= 1.5", "memory_drift": "<= 0.01 (block 2 to last)"},
    })
    print(f"== streaming: {blocks} blocks of {block_latent} latent frames, budget {budget.left():.0f}s", flush=True)
    reference = pipe.transformer

    def fast_case(fp8: bool, fast_vae: bool = True, n_blocks: int = blocks, overlap: bool = True):
        def run():
            model = optimize(_clone(reference), fp8=fp8, compile=True, compile_backend=backend)
            pipe.transformer = TimedModule(model)
            pipe.fast_vae, pipe.overlap_decode = fast_vae, overlap
            try:  # a failed case must not leave its model in the pipeline for the next one
                t0 = now()
                stream_once(pipe, 2, block_latent, None)  # compile + cudnn algorithm search, outside the numbers
                warm = now() - t0
                row = stream_once(pipe, n_blocks, block_latent, budget, reserve_s=5)
            finally:
                pipe.transformer, pipe.fast_vae, pipe.overlap_decode = reference, False, True
            row["warmup_s"] = round(warm, 2)
            row["vae"] = "engine.vae.FastWanDecoder" if fast_vae else "diffusers AutoencoderKLWan.decoder"
            row["decode"] = "side CUDA stream, overlapping the next block" if overlap and not smoke else "in line"
            return row
        return run

    run_case(results, "fast_bf16", fast_case(False), budget, needs_s=40)
    if not smoke and args.sequential_blocks:
        run_case(results, "fast_bf16_sequential_decode", fast_case(False, True, args.sequential_blocks, False), budget,
                 needs_s=25, note="the same stream with every decode in line (the pipeline's overlap_decode=False)")
    if not smoke and args.diffusers_vae_blocks:
        run_case(results, "fast_bf16_diffusers_vae", fast_case(False, False, args.diffusers_vae_blocks, False),
                 budget, needs_s=25, note="decoded in line by diffusers' Wan decoder (the reference)")
    if args.fp8:
        run_case(results, "fast_fp8", fast_case(True), budget, needs_s=40)
    if args.reference_blocks:
        def run_reference():
            pipe.transformer = TimedModule(reference)
            try:
                return stream_once(pipe, args.reference_blocks, block_latent, budget)
            finally:
                pipe.transformer = reference
        run_case(results, "reference_eager", run_reference, budget, needs_s=12)
    free_memory()

    fast = results.case("fast_bf16") or {}
    targets = {}
    if fast.get("status") == "ok":
        if "fps" in fast:
            targets["fps"] = {"target": ">= 40", "measured": fast["fps"], "steady": fast.get("steady_fps"),
                              "met": fast["fps"] >= 40}
            targets["first_frames_s"] = {"target": "<= 1.5", "measured": fast["first_frames_s"],
                                         "met": fast["first_frames_s"] <= 1.5}
        if fast.get("memory_drift") is not None:
            targets["memory_flat"] = {"target": "<= 0.01", "measured": fast["memory_drift"],
                                      "blocks": fast["blocks_done"], "met": fast["memory_drift"] <= 0.01}
    results.set_summary(targets=targets)
    print_report(results)
    return 0


def _clone(model):
    import copy

    return copy.deepcopy(model)


def print_report(results: Results) -> None:
    print(f"\n== {results.path.name} on {results.doc['environment'].get('gpu')} ==")
    keys = ["blocks_done", "fps", "steady_fps", "first_frames_s", "block_latency_p50_s", "block_latency_p99_s",
            "transformer_per_block_mean_s", "rest_per_block_mean_s", "memory_block2_gib", "memory_last_gib",
            "memory_drift", "warmup_s"]
    for c in results.doc["cases"]:
        print(f"{c['name']:18s} {c.get('status')}: " + ", ".join(f"{k}={c[k]}" for k in keys if k in c))
    for k, v in results.doc["summary"].get("targets", {}).items():
        print(f"target {k}: {v}")


if __name__ == "__main__":
    raise SystemExit(main())
