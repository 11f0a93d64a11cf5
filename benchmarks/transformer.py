"""Transformer step side by side: diffusers' SanaVideoTransformer3DModel (eager, compiled) against ours (reference,
fast eager, fast compiled, CUDA graphs, FP8) on identical random weights, one CFG step (batch 2).

Reports s/step, speedup over diffusers + torch.compile measured in the same run, achieved TFLOP/s and MFU, peak
memory, and the relative error of every output against the fp32 reference (ours in fp32, TF32 off; diffusers fp32
is checked against it too), and FP8 against bf16.

    python -m benchmarks.transformer --resolution 480p --out benchmarks/results
    python -m benchmarks.transformer --smoke --out /tmp/bench      # tiny model on CPU, same code path
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from benchmarks.common import (
    ANCHORS,
    H100_PEAK_TFLOPS,
    Results,
    build_pair,
    clone_as,
    compile_diffusers_blocks,
    free_memory,
    peak_memory,
    rel_err,
    run_case,
    stage_parser,
    stage_setup,
    time_calls,
    transformer_flops,
    transformer_inputs,
    weights_gib,
)

# (latent frames, latent height, latent width): 81 frames, 8x spatial VAE.
RESOLUTIONS = {"480p": (21, 60, 104), "720p": (21, 90, 160), "smoke": (5, 8, 12)}
DEFAULT_CASES = {  # run in this order; errors against fp32 are filled in whenever the reference has run
    "480p": ["fp32_reference", "diffusers_fp32", "diffusers_eager", "diffusers_compiled", "ours_fast_compiled",
             "ours_fast_compiled_prologue_compiled", "ours_fast_compiled_norms_compiled",
             "ours_fast_compiled_triton_attention", "ours_fp8_compiled", "ours_fp8_compiled_norms_compiled",
             "ours_fp8_compiled_exact_accum", "ours_reference_eager", "ours_fast_eager", "ours_fast_cudagraph",
             "ours_fp8_cudagraph"],
    "720p": ["diffusers_eager", "diffusers_compiled", "ours_fast_compiled", "ours_fast_compiled_prologue_compiled",
             "ours_fast_compiled_triton_attention", "ours_fp8_compiled", "fp32_reference"],
}
# The bf16 fast models and their linear-attention form (engine.fast.optimize's ``attention``).
ATTENTION_OF = {"fast": "gemm", "fast_gemm_compiled": "gemm-compiled", "fast_triton": "triton"}
# The FP8 models: the default, and each with one of its parts as it was before (engine.fast.optimize's arguments):
# the norms compiled (the GEMMs quantize their inputs in passes of their own), the FP8 GEMMs' fp32 accumulation.
FP8_VARIANTS = {"fp8": {}, "fp8_norms_compiled": {"norm_kernels": False},
                "fp8_exact_accum": {"fp8_fast_accum": False},
                "fp8_norms_compiled_exact_accum": {"norm_kernels": False, "fp8_fast_accum": False}}
# Rough seconds each case needs (compile included) on an H100, to skip what the budget cannot hold.
NEEDS_S = {"fp32_reference": 15, "diffusers_fp32": 10, "diffusers_eager": 8, "diffusers_compiled": 50,
           "ours_fast_compiled": 40, "ours_fast_compiled_prologue_compiled": 40,
           "ours_fast_compiled_triton_attention": 40, "ours_fast_compiled_norms_compiled": 40,
           "ours_fp8_compiled": 40, "ours_fp8_compiled_norms_compiled": 40, "ours_fp8_compiled_exact_accum": 40,
           "ours_fp8_compiled_norms_compiled_exact_accum": 40,
           "ours_reference_eager": 8, "ours_fast_eager": 8, "ours_fast_cudagraph": 10, "ours_fp8_cudagraph": 10}


def main(argv=None) -> int:
    p = stage_parser(__doc__)
    p.add_argument("--resolution", default="480p", choices=["480p", "720p"])
    p.add_argument("--cases", default=None, help="comma-separated subset (default: all for the resolution)")
    p.add_argument("--iters", type=int, default=4, help="timed calls per case (median reported)")
    args = p.parse_args(argv)
    device, budget = stage_setup(args)

    from engine.fast import GraphedTransformer, optimize
    from engine.presets import TINY_TRANSFORMER, TransformerConfig

    smoke = args.smoke
    config = dataclasses.replace(TINY_TRANSFORMER, num_layers=2) if smoke else TransformerConfig()
    frames, lat_h, lat_w = RESOLUTIONS["smoke" if smoke else args.resolution]
    text_len = 12 if smoke else 300
    batch = 2
    iters, warmup = (1, 1) if smoke else (args.iters, 1)
    backend = "eager" if smoke else "inductor"  # smoke: dynamo tracing without code generation
    cases = args.cases.split(",") if args.cases else DEFAULT_CASES[args.resolution]
    _, p_h, p_w = config.patch_size
    grid = (frames, lat_h // p_h, lat_w // p_w)
    flops = transformer_flops(config, batch, *grid, text_len)
    name = f"transformer_{'smoke' if smoke else args.resolution}"
    results = Results(Path(args.out) / f"{name}.json", config={
        "resolution": args.resolution, "latents": [batch, config.in_channels, frames, lat_h, lat_w],
        "tokens_per_sample": flops["tokens_per_sample"], "text_len": text_len, "cfg_batch": batch,
        "dtype": "bfloat16", "iters": iters, "warmup": warmup, "matmul_flop_per_step": flops["matmul_flop"],
        "weights": "random (diffusers init, seed 0), identical in every model", "smoke": smoke,
        "compile": "regional: every transformer block compiled (dynamic=False), blocks share one graph",
        "transformer_config": config.to_dict(), "anchors": ANCHORS.get(args.resolution),
    })
    print(f"== {name}: tokens/sample {flops['tokens_per_sample']}, {flops['matmul_flop'] / 1e12:.1f} TFLOP/step, "
          f"budget {budget.left():.0f}s", flush=True)

    x, text, t, mask = transformer_inputs(config, batch, frames, lat_h, lat_w, text_len, device, torch.float32)
    diffusers32, ours32 = build_pair(config, device)
    bf = torch.bfloat16
    xb, textb = x.to(bf), text.to(bf)
    models: dict = {}

    def model(name):
        """Models made on first use: diffusers and ours in bf16 (converted copies), fast, FP8 (each compiled)."""
        if name not in models:
            if name == "diffusers":
                models[name] = clone_as(diffusers32, bf)
            elif name == "ours":
                models[name] = clone_as(ours32, bf)
            elif name in ATTENTION_OF:
                models[name] = optimize(clone_as(ours32, bf), compile=True, compile_backend=backend,
                                        attention=ATTENTION_OF[name])
            elif name == "fast_norms_compiled":
                models[name] = optimize(clone_as(ours32, bf), compile=True, compile_backend=backend, norm_kernels=False)
            elif name in FP8_VARIANTS:
                models[name] = optimize(clone_as(ours32, bf), fp8=True, compile=True, compile_backend=backend,
                                        **FP8_VARIANTS[name])
            elif name == "fast_eager":
                models[name] = optimize(clone_as(ours32, bf), compile=False)
        return models[name]

    outputs: dict[str, torch.Tensor] = {}
    ERR_REFS = {name: ("ours_fast_compiled",) for name in NEEDS_S if name.startswith("ours_fp8")}

    def timed(name, fn, owner, precision="bf16", note=None):
        def run():
            with torch.inference_mode(), peak_memory(device) as mem:
                timing = time_calls(fn, iters=iters, warmup=2 if "compiled" in name else warmup, device=device)
            outputs[name] = timing.pop("output").detach().float()
            step = timing["median_s"]
            tflops = flops["matmul_flop"] / step / 1e12
            row = {"s_per_step": step, **timing, **mem, "weights_gib": weights_gib(model(owner)),
                   "tflops": round(tflops, 1), "mfu": round(tflops / H100_PEAK_TFLOPS[precision], 3),
                   "mfu_basis": f"H100 SXM dense {precision} {H100_PEAK_TFLOPS[precision]} TFLOP/s"}
            for ref in ("fp32_reference", *ERR_REFS.get(name, ())):
                if ref in outputs:
                    row[f"rel_err_vs_{ref}"] = rel_err(outputs[name], outputs[ref])
            if note:
                row["note"] = note
            return row
        return run

    def fp32_reference():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.inference_mode():
                timing = time_calls(lambda: ours32(x, text, t, mask), iters=1, warmup=0, device=device)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        outputs["fp32_reference"] = timing.pop("output").float()
        # Cases that ran before the reference get their errors now.
        for c in results.doc["cases"]:
            if c["name"] in outputs and "rel_err_vs_fp32_reference" not in c and c["name"] != "fp32_reference":
                c["rel_err_vs_fp32_reference"] = rel_err(outputs[c["name"]], outputs["fp32_reference"])
        return {"s_per_step": timing["median_s"], "note": "ours, fp32, TF32 off"}

    def diffusers_fp32():
        # Same weights in diffusers' fp32 model: the two implementations agree on the GPU too.
        with torch.inference_mode():
            out = diffusers32(x, text, t, encoder_attention_mask=mask, return_dict=False)[0]
        row = {}
        if "fp32_reference" in outputs:
            row["rel_err_vs_fp32_reference"] = rel_err(out, outputs["fp32_reference"])
        return row

    def diffusers_call():
        return model("diffusers")(xb, textb, t, encoder_attention_mask=mask, return_dict=False)[0]

    def diffusers_compiled():
        compile_diffusers_blocks(model("diffusers"), backend=backend)
        return timed("diffusers_compiled", diffusers_call, "diffusers")()

    def graphed(owner, name, precision):
        def run():
            g = GraphedTransformer(model(owner))  # its graph pool goes with it when the case ends
            return timed(name, lambda: g(xb, textb, t, mask), owner, precision)()
        return run

    CASES = {
        "fp32_reference": fp32_reference,
        "diffusers_fp32": diffusers_fp32,
        "diffusers_eager": timed("diffusers_eager", diffusers_call, "diffusers"),
        "diffusers_compiled": diffusers_compiled,
        "ours_fast_compiled": timed("ours_fast_compiled", lambda: model("fast")(xb, textb, t, mask), "fast"),
        "ours_fast_compiled_prologue_compiled": timed(
            "ours_fast_compiled_prologue_compiled", lambda: model("fast_gemm_compiled")(xb, textb, t, mask),
            "fast_gemm_compiled", note="the attention's norm + ReLU + rotation fused by torch.compile instead of the "
            "prologue kernel"),
        "ours_fast_compiled_norms_compiled": timed(
            "ours_fast_compiled_norms_compiled", lambda: model("fast_norms_compiled")(xb, textb, t, mask),
            "fast_norms_compiled", note="the residual adds + LayerNorm + modulation fused by torch.compile instead "
            "of the norm kernels"),
        "ours_fast_compiled_triton_attention": timed(
            "ours_fast_compiled_triton_attention", lambda: model("fast_triton")(xb, textb, t, mask), "fast_triton",
            note="the linear attention as the two fused Triton kernels instead of pointwise work + cuBLAS GEMMs"),
        "ours_fp8_compiled": timed("ours_fp8_compiled", lambda: model("fp8")(xb, textb, t, mask), "fp8", "fp8"),
        "ours_fp8_compiled_norms_compiled": timed(
            "ours_fp8_compiled_norms_compiled", lambda: model("fp8_norms_compiled")(xb, textb, t, mask),
            "fp8_norms_compiled", "fp8", note="the norms fused by torch.compile, each FP8 GEMM quantizing its input "
            "in a pass of its own, instead of the norm kernels quantizing q|k|v's and the expansion's input"),
        "ours_fp8_compiled_exact_accum": timed(
            "ours_fp8_compiled_exact_accum", lambda: model("fp8_exact_accum")(xb, textb, t, mask),
            "fp8_exact_accum", "fp8", note="the FP8 GEMMs accumulating with promotion to fp32 (use_fast_accum off)"),
        "ours_fp8_compiled_norms_compiled_exact_accum": timed(
            "ours_fp8_compiled_norms_compiled_exact_accum",
            lambda: model("fp8_norms_compiled_exact_accum")(xb, textb, t, mask), "fp8_norms_compiled_exact_accum",
            "fp8", note="both of the above: the FP8 model before the norm kernels and fast accumulation"),
        "ours_reference_eager": timed("ours_reference_eager", lambda: model("ours")(xb, textb, t, mask), "ours"),
        "ours_fast_eager": timed("ours_fast_eager", lambda: model("fast_eager")(xb, textb, t, mask), "fast_eager",
                                 note="Triton kernels, no torch.compile"),
        "ours_fast_cudagraph": graphed("fast", "ours_fast_cudagraph", "bf16"),
        "ours_fp8_cudagraph": graphed("fp8", "ours_fp8_cudagraph", "fp8"),
    }
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    for i, name in enumerate(cases):
        if smoke and name.endswith("cudagraph"):
            continue  # CUDA graphs need CUDA
        run_case(results, name, CASES[name], budget, NEEDS_S[name])
        later = cases[i + 1:]
        # Free what no later case needs (fp32 diffusers after its check; diffusers after its cases).
        if diffusers32 is not None and not any(c in later for c in ("diffusers_fp32", "diffusers_eager",
                                                                     "diffusers_compiled")):
            diffusers32 = None
            models.pop("diffusers", None)
            free_memory()
    results.flush()

    summarize(results, args.resolution if not smoke else "smoke")
    print_report(results)
    return 0


def summarize(results: Results, resolution: str) -> None:
    """Speedups against diffusers compiled (else eager) measured in this run, and the issue's targets."""
    def step(name):
        c = results.case(name)
        return c.get("s_per_step") if c and c.get("status") == "ok" else None

    base_c, base_e = step("diffusers_compiled"), step("diffusers_eager")
    for c in results.doc["cases"]:
        s = c.get("s_per_step")
        if c.get("status") == "ok" and s and c["name"] != "fp32_reference":
            if base_c:
                c["speedup_vs_diffusers_compiled"] = round(base_c / s, 3)
            if base_e:
                c["speedup_vs_diffusers_eager"] = round(base_e / s, 3)
    best_bf16 = min((v for v in (step("ours_fast_compiled"), step("ours_fast_cudagraph")) if v), default=None)
    best_fp8 = min((v for v in (step("ours_fp8_compiled"), step("ours_fp8_cudagraph")) if v), default=None)
    targets = {}
    if base_c and best_bf16:
        targets["bf16_speedup_vs_diffusers_compiled"] = {"target": ">= 1.6", "measured": round(base_c / best_bf16, 3),
                                                         "met": base_c / best_bf16 >= 1.6}
    if base_c and best_fp8:
        targets["fp8_speedup_vs_diffusers_compiled"] = {"target": ">= 2.5", "measured": round(base_c / best_fp8, 3),
                                                        "met": base_c / best_fp8 >= 2.5}
    fast = results.case("ours_fast_compiled")
    if fast and "rel_err_vs_fp32_reference" in fast:
        e = fast["rel_err_vs_fp32_reference"]
        targets["bf16_rel_err_vs_fp32"] = {"target": "<= 0.01", "measured": e, "met": e <= 0.01}
    fp8 = results.case("ours_fp8_compiled")
    if fp8 and "rel_err_vs_ours_fast_compiled" in fp8:
        targets["fp8_rel_err_vs_bf16"] = {"target": "reported", "measured": fp8["rel_err_vs_ours_fast_compiled"]}
    results.set_summary(resolution=resolution, best_bf16_s_per_step=best_bf16, best_fp8_s_per_step=best_fp8,
                        diffusers_compiled_s_per_step=base_c, diffusers_eager_s_per_step=base_e, targets=targets)


def print_report(results: Results) -> None:
    doc = results.doc
    print(f"\n== {results.path.name} on {doc['environment'].get('gpu')} ==")
    print(f"{'case':38s} {'status':8s} {'s/step':>8s} {'x comp':>7s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak+GiB':>8s} "
          f"{'err/fp32':>9s}")
    for c in doc["cases"]:
        s = c.get("s_per_step")
        s = "" if s is None else f"{s:.4f}"
        print(f"{c['name']:38s} {c.get('status', ''):8s} {s:>8} "
              f"{c.get('speedup_vs_diffusers_compiled', ''):>7} {c.get('tflops', ''):>8} {c.get('mfu', ''):>6} "
              f"{c.get('peak_extra_gib', ''):>8} "
              f"{'' if 'rel_err_vs_fp32_reference' not in c else format(c['rel_err_vs_fp32_reference'], '.2e'):>9}")
    for k, v in doc["summary"].get("targets", {}).items():
        print(f"target {k}: {v}")


if __name__ == "__main__":
    raise SystemExit(main())
