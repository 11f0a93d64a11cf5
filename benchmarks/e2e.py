"""End-to-end clip latency by stage through the real pipeline (VideoPipeline.generate, clip mode): a 5 s 480p clip
(81 frames, 832x480), text encoding (Gemma-2 2B size, random) + 50 CFG steps (DPM-Solver) + Wan VAE decode, with the
fast transformer in bf16 and in FP8. A case named ``<precision>_full_text`` (``--cases bf16_full_text,bf16``)
runs with ``pipe.cut_text_padding`` off: the cross-attention reads the prompts' padding to 300 tokens too.

Stage boundaries come from the pipeline's progress callbacks (the GPU is synchronized at each): text encoding and
setup until the first step's end minus one step, the denoising loop, then decoding and the host copy of the frames.
A warm-up generation (2 steps) compiles and captures first; it is reported apart. When the budget cannot hold all
steps, fewer run and the clip time is extrapolated (marked).

    python -m benchmarks.e2e --out benchmarks/results
    python -m benchmarks.e2e --smoke --out /tmp/bench
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import torch

from benchmarks.common import Results, build_pipeline, now, run_case, stage_parser, stage_setup, sync

PROMPT = "a red ball bouncing slowly on a wooden table in the sun"
TARGETS = {"bf16": 20.0, "fp8": 12.0}


def graphs_help(out_dir: Path) -> bool:
    """True when the 480p transformer benchmark of this run found CUDA-graph replay faster than plain compiled."""
    path = out_dir / "transformer_480p.json"
    if not path.exists():
        return False
    cases = {c["name"]: c for c in json.loads(path.read_text())["cases"]}
    g, c = cases.get("ours_fast_cudagraph", {}), cases.get("ours_fast_compiled", {})
    return g.get("status") == "ok" and c.get("status") == "ok" and g["s_per_step"] < c["s_per_step"]


def generate_timed(pipe, params, device) -> dict:
    """One generation; timestamps (synchronized) of every progress event."""
    steps_t, chunks_t = [], []

    def on_progress(p):
        sync(device)
        (chunks_t if p.frames_done > 0 else steps_t).append(now())

    sync(device)
    t0 = now()
    frames = sum(chunk.num_frames for chunk in pipe.generate(params, on_progress=on_progress))
    t_end = now()
    steps = len(steps_t)
    step_s = (steps_t[-1] - steps_t[0]) / (steps - 1) if steps > 1 else steps_t[0] - t0
    return {"frames": frames, "steps": steps, "total_s": t_end - t0, "step_s": step_s,
            "text_and_setup_s": steps_t[0] - t0 - step_s, "denoise_s": steps_t[-1] - steps_t[0] + step_s,
            "decode_s": t_end - steps_t[-1]}


def main(argv=None) -> int:
    p = stage_parser(__doc__)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cases", default="bf16,fp8")
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"])
    args = p.parse_args(argv)
    device, budget = stage_setup(args)

    from engine.fast import GraphedTransformer, optimize
    from engine.types import GenerationParams

    smoke = args.smoke
    dtype = torch.float32 if smoke else torch.bfloat16
    out_dir = Path(args.out)
    if not smoke:
        torch.backends.cudnn.benchmark = True
    use_graphs = not smoke and (args.cuda_graphs == "on" or (args.cuda_graphs == "auto" and graphs_help(out_dir)))
    pipe = build_pipeline(causal=False, device=device, dtype=dtype, smoke=smoke)
    steps = 2 if smoke else args.steps
    params = GenerationParams(prompt=PROMPT, steps=steps, seed=0)  # preset defaults: 480x832, 81 frames, CFG 6
    resolved = pipe.resolve(params)
    results = Results(out_dir / f"e2e_{'smoke' if smoke else '480p'}.json", config={
        "width": resolved.width, "height": resolved.height, "frames": resolved.frames, "fps": resolved.fps,
        "steps": steps, "guidance_scale": resolved.guidance_scale, "scheduler": "DPMSolverMultistep (flow, shift)",
        "text_encoder": "Gemma2Config() defaults (2B size), random, word-level tokenizer, instruction prefix",
        "vae": "AutoencoderKLWan() defaults, random, bf16", "cuda_graphs": use_graphs,
        "cudnn_benchmark": torch.backends.cudnn.benchmark, "smoke": smoke,
        "targets_s": {"bf16": "<= 20", "fp8": "<= 12", "paper": 60},
    })
    print(f"== e2e: {resolved.width}x{resolved.height}, {resolved.frames} frames, {steps} steps, "
          f"graphs={use_graphs}, budget {budget.left():.0f}s", flush=True)
    reference = pipe.transformer

    def case(fp8: bool, cut_text: bool):
        def run():
            model = optimize(copy.deepcopy(reference), fp8=fp8, compile=True,
                             compile_backend="eager" if smoke else "inductor")
            pipe.cut_text_padding = cut_text
            pipe.transformer = GraphedTransformer(model) if use_graphs else model
            pipe.fast_vae = True
            t0 = now()
            warm = generate_timed(pipe, dict_replace(params, steps=2), device)
            warm_s = now() - t0
            texts = []
            for _ in range(3):
                sync(device)
                t1 = now()
                text, _ = pipe._encode_prompt(resolved, cfg=True)
                sync(device)
                texts.append(now() - t1)
            # Steps that fit the budget (the rest extrapolated from the measured step time).
            room = budget.left() - 2 * warm["decode_s"] - 10
            n = steps if smoke else max(2, min(steps, int(room / max(warm["step_s"], 1e-3))))
            row = generate_timed(pipe, dict_replace(params, steps=n), device)
            row.update(warmup_s=round(warm_s, 2), text_encoding_s=statistics.median(texts), steps_run=n,
                       text_tokens=text.shape[1])
            if n < steps:
                row["extrapolated"] = True
                row["total_s_measured"] = row["total_s"]
                row["total_s"] = row["total_s"] + (steps - n) * row["step_s"]
                row["denoise_s"] = steps * row["step_s"]
            row["clip_s"] = row["total_s"]
            pipe.transformer, pipe.fast_vae, pipe.cut_text_padding = reference, False, True
            del model
            return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        return run

    for name in args.cases.split(","):
        precision = name.removesuffix("_full_text")
        if precision not in TARGETS:
            raise SystemExit(f"unknown case {name!r} (accepted: bf16, fp8, each optionally with _full_text)")
        run_case(results, name, case(precision == "fp8", cut_text=not name.endswith("_full_text")), budget, needs_s=35)

    targets = {}
    for name, limit in TARGETS.items():
        c = results.case(name)
        if c and c.get("status") == "ok":
            targets[f"clip_{name}_s"] = {"target": f"<= {limit}", "measured": c["clip_s"], "met": c["clip_s"] <= limit,
                                         "extrapolated": c.get("extrapolated", False)}
    results.set_summary(targets=targets)
    print(f"\n== {results.path.name} on {results.doc['environment'].get('gpu')} ==")
    for c in results.doc["cases"]:
        keys = ["clip_s", "text_encoding_s", "text_and_setup_s", "denoise_s", "step_s", "decode_s", "steps_run",
                "extrapolated", "warmup_s", "text_tokens"]
        print(f"{c['name']:14s} {c.get('status')}: " + ", ".join(f"{k}={c[k]}" for k in keys if k in c))
    for k, v in targets.items():
        print(f"target {k}: {v}")
    return 0


def dict_replace(params, **changes):
    import dataclasses

    return dataclasses.replace(params, **changes)


if __name__ == "__main__":
    raise SystemExit(main())
