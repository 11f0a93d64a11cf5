"""Quantization quality report: per-layer relative error, error of the final latents against bf16, PSNR of the
decoded frames against bf16, for FP8 (ModelOpt simulation and real FP8 GEMMs) and NVFP4 (ModelOpt simulation,
which needs CUDA, and the Q/DQ reference of the exported graph).

    python -m quantization.report --out benchmarks/results/quant_h100.json --budget 200
    python -m quantization.report --smoke --out /tmp/quant_smoke.json       # CPU check of the script itself

Each case (model x precision) is measured with the same seeds and eval prompts as its bf16 baseline; the eval
prompts are held out of calibration. Failures are recorded in the JSON per case, the JSON is rewritten after every
case, and cases that would start past the time budget are recorded as skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

RESULT_VERSION = 1


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def psnr(a, b) -> float:
    """PSNR in dB of uint8 frames ``a`` against ``b``; None when identical (infinite, which JSON cannot hold)."""
    mse = float(((torch.as_tensor(a).float() - torch.as_tensor(b).float()) ** 2).mean())
    return None if mse == 0 else 10 * math.log10(255.0**2 / mse)


def generate(pipe, transformer, prompts, settings) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Run the pipeline with ``transformer`` over ``prompts``: (final latents [n, C, F, h, w] as the VAE receives
    them, decoded frames uint8 [n, F, H, W, 3], seconds per transformer forward)."""
    from engine.types import GenerationParams

    captured, calls, seconds = [], [0], [0.0]
    hook = pipe.vae.post_quant_conv.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach().float().cpu()))

    def timed(module, args, kwargs):
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        timed.t0 = time.perf_counter()

    def done(module, args, kwargs, out):
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        seconds[0] += time.perf_counter() - timed.t0
        calls[0] += 1

    h1 = transformer.register_forward_pre_hook(timed, with_kwargs=True)
    h2 = transformer.register_forward_hook(done, with_kwargs=True)
    original = pipe.transformer
    pipe.transformer = transformer
    latents, frames = [], []
    try:
        for i, prompt in enumerate(prompts):
            captured.clear()
            params = GenerationParams(prompt=prompt, seed=1000 + i, steps=settings.steps, frames=settings.frames,
                                      height=settings.height, width=settings.width)
            chunks = [c.frames for c in pipe.generate(params)]
            latents.append(torch.cat(captured, dim=2))
            frames.append(torch.from_numpy(__import__("numpy").concatenate(chunks)))
    finally:
        pipe.transformer = original
        for h in (hook, h1, h2):
            h.remove()
    return torch.cat(latents), torch.stack(frames), seconds[0] / max(1, calls[0])


class LayerErrors:
    """Forward hooks on quantized linear layers: relative error of each layer's quantized output against the
    same layer without quantization, on the same input, accumulated over every forward of a run."""

    def __init__(self, model, names, reference):
        self.err = {n: 0.0 for n in names}
        self.ref = {n: 0.0 for n in names}
        self.handles = []
        for name in names:
            module = model.get_submodule(name)
            self.handles.append(module.register_forward_hook(self._hook(name, reference(name, module))))

    def _hook(self, name, exact):
        def hook(module, args, out):
            want = exact(args[0])
            self.err[name] += float((out.float() - want.float()).pow(2).sum())
            self.ref[name] += float(want.float().pow(2).sum())
        return hook

    def result(self) -> dict[str, float]:
        for h in self.handles:
            h.remove()
        return {n: math.sqrt(self.err[n] / self.ref[n]) if self.ref[n] > 0 else 0.0 for n in self.err}


def _summary(errors: dict[str, float]) -> dict:
    if not errors:
        return {}
    values = sorted(errors.values())
    by_kind: dict[str, list[float]] = {}
    for name, e in errors.items():
        kind = ".".join(name.split(".")[2:])  # attn1.to_q, ff.conv_inverted, ...
        by_kind.setdefault(kind, []).append(e)
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:8]
    return {"layers": len(values), "mean": sum(values) / len(values), "median": values[len(values) // 2],
            "max": values[-1], "by_kind_mean": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
            "worst": [{"layer": n, "rel_error": e} for n, e in worst]}


@dataclasses.dataclass
class Settings:
    steps: int | None
    frames: int | None
    height: int | None
    width: int | None


def _disable_modelopt_cuda_extensions() -> None:
    # ModelOpt JIT-compiles a CUDA extension for FP8 fake quantization on first use (minutes with nvcc); its eager
    # path computes the same E4M3 cast, so use that.
    from modelopt.torch.quantization import extensions

    extensions.get_cuda_ext_fp8.extension = None


def policy_for(num_layers: int):
    """The default policy, except on models too shallow to keep a block at each end and still quantize one."""
    from quantization.policy import LayerPolicy

    if num_layers > 2:
        return LayerPolicy()
    return LayerPolicy(keep_first_blocks=num_layers - 1, keep_last_blocks=0)


def _swap(pipe, transformer, fn):
    original = pipe.transformer
    pipe.transformer = transformer
    try:
        return fn()
    finally:
        pipe.transformer = original


def run_case(model_name, pipe, precision, settings, calib_prompts, eval_prompts, baseline, policy, accuracy=None):
    """One model x precision: returns the case record. ``baseline``: bf16 (latents, frames, s/forward, accuracy);
    ``accuracy(pipe)``: task accuracies of the pipeline as it stands (trained models only)."""
    from quantization.calibration import CalibrationSettings, forward_loop
    from quantization.onnx_export import build_export_model
    from quantization.quantize import plain_copy, quantize_transformer

    dev = pipe.device
    record: dict = {"model": model_name, "precision": precision, "device": str(dev), "dtype": str(pipe.dtype),
                    "calibration_prompts": list(calib_prompts), "eval_prompts": list(eval_prompts),
                    "settings": dataclasses.asdict(settings)}
    base_latents, base_frames, base_step, base_accuracy = baseline
    record["baseline_seconds_per_forward"] = base_step
    if base_accuracy is not None:
        record["baseline_accuracy"] = base_accuracy
    t0 = time.perf_counter()
    transformer = pipe.transformer
    import copy

    qmodel = copy.deepcopy(transformer)
    calib = CalibrationSettings(tuple(calib_prompts), settings.steps, settings.frames, settings.height, settings.width)
    policy = policy or policy_for(transformer.config.num_layers)
    record["policy"] = policy.to_dict()
    plan, recipe = quantize_transformer(qmodel, precision, forward_loop(pipe, calib), policy)
    record["calibration_seconds"] = time.perf_counter() - t0
    record["quantized_layers"] = len(recipe)
    record["kept_layers"] = sum(1 for d in plan.values() if not d.quantize)
    plain = plain_copy(qmodel)

    def exact(name, module):
        w = plain.get_submodule(name)
        return lambda x: F.linear(x, w.weight, w.bias)

    simulate = precision == "fp8" or dev.type == "cuda"
    sim_latents = None
    if simulate:
        hooks = LayerErrors(qmodel, list(recipe), exact)
        latents, frames, step = generate(pipe, qmodel, eval_prompts, settings)
        sim_latents = latents
        layer_errors = hooks.result()
        record["simulated"] = {"simulator": "modelopt", "latents_rel_error": _rel(latents, base_latents),
                               "psnr_db": psnr(frames, base_frames), "seconds_per_forward": step}
        if accuracy is not None:
            record["simulated"]["accuracy"] = _swap(pipe, qmodel, lambda: accuracy(pipe))
        record["layers"] = layer_errors
        record["layer_summary"] = _summary(layer_errors)
    else:
        record["simulated"] = {"skipped": "ModelOpt's NVFP4 simulation of activations needs CUDA"}

    # The Q/DQ arithmetic of the exported ONNX graph (what TensorRT runs), in PyTorch.
    ref_model = build_export_model(plain, recipe, pipe.dtype).transformer
    hooks = LayerErrors(ref_model, list(recipe), exact) if not simulate else None
    latents, frames, step = generate(pipe, ref_model, eval_prompts, settings)
    record["qdq_reference"] = {"latents_rel_error": _rel(latents, base_latents), "psnr_db": psnr(frames, base_frames)}
    if hooks is not None:
        layer_errors = hooks.result()
        record["layers"] = layer_errors
        record["layer_summary"] = _summary(layer_errors)
    # Scored where nothing else scores the arithmetic TensorRT runs: no simulation, or (on a CPU) no real FP8 GEMMs.
    if accuracy is not None and (not simulate or (precision == "fp8" and dev.type != "cuda")):
        record["qdq_reference"]["accuracy"] = _swap(pipe, ref_model, lambda: accuracy(pipe))
    if sim_latents is not None:
        # How far the graph's arithmetic is from ModelOpt's simulation (both against the same bf16 run).
        record["qdq_reference"]["vs_simulated_latents_rel_error"] = _rel(latents, sim_latents)

    if precision == "fp8":
        from quantization.real_fp8 import to_real_fp8

        try:
            real = to_real_fp8(plain, recipe)
            latents, frames, step = generate(pipe, real, eval_prompts, settings)
            record["fp8_real"] = {"gemm": "torch._scaled_mm", "latents_rel_error": _rel(latents, base_latents),
                                  "psnr_db": psnr(frames, base_frames), "seconds_per_forward": step}
            if accuracy is not None and dev.type == "cuda":
                record["fp8_real"]["accuracy"] = _swap(pipe, real, lambda: accuracy(pipe))
            elif accuracy is not None:  # same arithmetic as the Q/DQ reference (tests/test_quant_formats.py), scored
                record["fp8_real"]["accuracy_skipped"] = ("torch._scaled_mm on a CPU is an emulation, over 1000x "
                                                          "slower than an fp32 matmul (benchmarks/results/demo/"
                                                          "scaled_mm_cpu_probe.json); see qdq_reference.accuracy")
        except Exception as exc:  # e.g. no FP8 GEMM on this GPU / build
            record["fp8_real"] = {"error": f"{type(exc).__name__}: {exc}"}
    return record  # the copies are freed with this frame


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--budget", type=float, default=200.0, help="seconds; cases that would start later are skipped")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, few steps: checks the script itself")
    parser.add_argument("--models", default="tiny,demo,2b-width", help="comma list among tiny, demo, 2b-width")
    parser.add_argument("--demo", default="engine/weights/demo", help="trained demo pipeline folder (or preset name)")
    parser.add_argument("--demo-seeds", type=int, default=2, help="seeds per held-out prompt scored for colour/motion "
                        "accuracy (24 prompts; 2 gives the 48 clips of `training.evaluate --seeds 2`)")
    args = parser.parse_args(argv)
    if args.demo_seeds < 1:
        parser.error(f"--demo-seeds {args.demo_seeds}: expected at least 1")
    started = time.perf_counter()
    result: dict = {"version": RESULT_VERSION, "what": "quantization quality against bf16", "smoke": args.smoke,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_s": args.budget,
                    "python": platform.python_version(), "machine": platform.machine(),
                    "command": " ".join(["python -m quantization.report", *(sys.argv[1:] if argv is None else argv)]),
                    "cases": [], "notes": []}
    _write(args.out, result)
    try:
        import diffusers
        import modelopt

        from engine.pipeline import VideoPipeline
        from engine.presets import TransformerConfig, get_preset
        from quantization.calibration import DEFAULT_PROMPTS, TINY_PROMPTS
    except Exception as exc:
        result["error"] = f"import failed: {type(exc).__name__}: {exc}"
        _write(args.out, result)
        return 1
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    result.update(torch=torch.__version__, diffusers=diffusers.__version__, modelopt=modelopt.__version__,
                  device=torch.cuda.get_device_name() if cuda else "cpu",
                  capability=list(torch.cuda.get_device_capability()) if cuda else None, dtype=str(dtype))
    if cuda:
        _disable_modelopt_cuda_extensions()
        result["notes"].append("FP8 simulation uses ModelOpt's eager E4M3 cast (its CUDA extension is not compiled)")
    result["notes"].append("random-weight models exaggerate quantization error; trained weights (demo preset) are the meaningful rows")

    def tiny_pipe():
        return VideoPipeline.from_pretrained("tiny", device=device, dtype=dtype)

    def wide_pipe():
        # The 2B model's transformer widths and depth (random weights) behind the tiny text encoder and VAE.
        pipe = VideoPipeline.from_pretrained("tiny", device=device, dtype=dtype)
        from engine.model import SanaVideoTransformer

        cfg = dataclasses.replace(TransformerConfig(), caption_channels=pipe.text_encoder.model.config.hidden_size)
        torch.manual_seed(0)
        with torch.device(device):
            pipe.transformer = SanaVideoTransformer(cfg).to(dtype).eval()
        return pipe

    cases = []
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    if "tiny" in wanted:
        s = Settings(2, 9, None, None) if args.smoke else Settings(None, None, None, None)
        prompts = TINY_PROMPTS
        cases.append(("tiny", tiny_pipe, s, prompts[:1] if args.smoke else prompts[:-2], prompts[-1:] if args.smoke else prompts[-2:], None))
    accuracies = {}
    if "demo" in wanted and not args.smoke:
        source = args.demo if (get_preset(args.demo) is not None or Path(args.demo).is_dir()) else None
        if source is not None:
            from training import data as demo_data
            from training.evaluate import evaluate_pipeline, held_out_clips

            def demo_pipe(source=source):
                return VideoPipeline.from_pretrained(source, device=device, dtype=dtype)

            train = [c.prompt for c in demo_data.sample_cases(8, torch.Generator().manual_seed(0), "train")]
            held_out, seeds = held_out_clips(seeds_per_case=args.demo_seeds)

            def demo_accuracy(pipe, cases=held_out, seeds=seeds):
                r = evaluate_pipeline(pipe, cases, seeds, batch=24)
                return {"colour_accuracy": r["colour_accuracy"], "motion_accuracy": r["motion_accuracy"], "clips": r["clips"]}

            accuracies["demo"] = demo_accuracy
            cases.append(("demo", demo_pipe, Settings(None, None, None, None), train, list(dict.fromkeys(c.prompt for c in held_out))[:2], None))
        else:
            result["notes"].append(f"no trained demo model at {args.demo}: trained-weight rows not measured")
    if "2b-width" in wanted and not args.smoke and cuda:
        cases.append(("2b-width", wide_pipe, Settings(4, 17, 256, 256), DEFAULT_PROMPTS[:2], DEFAULT_PROMPTS[-1:], None))

    for name, make_pipe, settings, calib, evals, policy in cases:
        pipe = baseline = None
        for precision in ("fp8", "nvfp4"):
            elapsed = time.perf_counter() - started
            if elapsed > args.budget:
                result["cases"].append({"model": name, "precision": precision, "status": "skipped",
                                        "reason": f"time budget {args.budget:.0f}s spent ({elapsed:.0f}s)"})
                _write(args.out, result)
                continue
            t0 = time.perf_counter()
            try:
                accuracy = accuracies.get(name)
                if pipe is None:
                    pipe = make_pipe()
                    baseline = generate(pipe, pipe.transformer, evals, settings) + (accuracy(pipe) if accuracy else None,)
                record = run_case(name, pipe, precision, settings, calib, evals, baseline, policy, accuracy)
                record["status"] = "ok"
            except Exception as exc:
                record = {"model": name, "precision": precision, "status": "error",
                          "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
            record["seconds"] = round(time.perf_counter() - t0, 1)
            result["cases"].append(record)
            result["elapsed_s"] = round(time.perf_counter() - started, 1)
            _write(args.out, result)
            print(f"{name} {precision}: {record['status']} in {record['seconds']}s", file=sys.stderr, flush=True)
            if cuda:
                torch.cuda.empty_cache()
        del pipe, baseline
        if cuda:
            torch.cuda.empty_cache()
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    _write(args.out, result)
    return 0 if all(c["status"] != "error" for c in result["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
