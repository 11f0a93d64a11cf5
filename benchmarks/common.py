"""Shared pieces of the benchmarks: environment record, timing, budgets, incremental JSON, model builders, FLOPs.

Every benchmark writes one JSON file, rewritten after every case, so a run stopped by its time limit still leaves
what it measured. A case that fails (out of memory, compile error) is recorded with its error and the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Datasheet dense peaks of an H100 SXM (TFLOP/s): the denominators of MFU.
H100_PEAK_TFLOPS = {"bf16": 989.4, "fp8": 1978.9}

# Measured anchors (one H100 80GB, random weights, bf16, CFG batch 2): see shared design notes.
ANCHORS = {
    "480p": {"diffusers_eager_s": 1.018, "diffusers_compiled_s": 0.564},
    "720p": {"diffusers_eager_s": 2.391},
}


def now() -> float:
    return time.perf_counter()


class Budget:
    """Wall-clock budget: ``left()`` seconds remain until ``deadline`` (epoch seconds)."""

    def __init__(self, seconds: float | None = None, deadline: float | None = None):
        if deadline is None:
            deadline = time.time() + (seconds if seconds is not None else 1e9)
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


def stage_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's parser with the options ``benchmarks.run_all`` gives every stage (--out, --budget-s, --deadline,
    --smoke); the benchmark adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock seconds for this benchmark")
    p.add_argument("--deadline", type=float, default=None, help="absolute epoch seconds to stop starting cases")
    p.add_argument("--smoke", action="store_true", help="tiny models on CPU: checks the code path, not speed")
    return p


def stage_setup(args: argparse.Namespace) -> tuple[str, Budget]:
    """(device, budget) of a benchmark run: the CPU for --smoke, else CUDA (exits with a message without it)."""
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: run with --smoke on CPU")
    return ("cpu" if args.smoke else "cuda"), Budget(seconds=args.budget_s, deadline=args.deadline)


def environment(command: list[str] | None = None) -> dict:
    """GPU, driver and library versions plus the exact command (recorded in every result file)."""
    info = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(command or getattr(sys, "orig_argv", sys.argv)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
    }
    for name in ("diffusers", "transformers", "triton", "numpy"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing library is recorded, not fatal
            info[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count, compute_capability=f"{props.major}.{props.minor}")
        try:
            import subprocess

            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
            info["nvidia_smi"] = out.strip()
            info["driver"] = out.split(",")[0].strip() if out else None
        except Exception as exc:  # noqa: BLE001
            info["driver"] = f"unknown ({exc})"
    else:
        info["gpu"] = None
    return info


class Results:
    """A JSON document {"environment", "config", "cases": [...], "summary"} rewritten after every change."""

    def __init__(self, path: Path | str, config: dict, command: list[str] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.doc = {"environment": environment(command), "config": config, "cases": [], "summary": {}}
        self.flush()

    def add(self, case: dict) -> dict:
        self.doc["cases"].append(case)
        self.flush()
        return case

    def case(self, name: str) -> dict | None:
        for c in self.doc["cases"]:
            if c.get("name") == name:
                return c
        return None

    def set_summary(self, **values) -> None:
        self.doc["summary"].update(values)
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, default=_jsonable))
        tmp.replace(self.path)


def _jsonable(obj):
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if isinstance(obj, float):
        return obj
    return repr(obj)


def run_case(results: Results, name: str, fn, budget: Budget | None = None, needs_s: float = 0.0, **meta) -> dict:
    """Run ``fn() -> dict`` as one case; record its result, or its failure, or that the budget had no room."""
    case = {"name": name, **meta}
    if budget is not None and not budget.allows(needs_s):
        case.update(status="skipped", reason=f"budget: {budget.left():.0f}s left, case needs ~{needs_s:.0f}s")
        print(f"[skip] {name}: {case['reason']}", flush=True)
        return results.add(case)
    t0 = now()
    try:
        case.update(fn() or {})
        case["status"] = case.get("status", "ok")
    except Exception as exc:  # noqa: BLE001 - one failing case must not end the run
        case.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000],
                    traceback=traceback.format_exc()[-4000:])
        print(f"[fail] {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    case["wall_s"] = round(now() - t0, 2)
    free_memory()
    if case["status"] == "ok":
        brief = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in case.items()
                 if k in ("s_per_step", "first_call_s", "wall_s") or k.startswith("rel_err")}
        print(f"[ok]   {name}: {brief}", flush=True)
    return results.add(case)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, iters: int, warmup: int, device) -> dict:
    """Median/min/max seconds of ``fn()`` over ``iters`` calls after ``warmup`` calls (CUDA events on GPU).

    Returns also the first warm-up call's seconds (compile time shows there) and the last output.
    """
    cuda = torch.device(device).type == "cuda"
    first_s, out = None, None
    for i in range(warmup):
        t0 = now()
        out = fn()
        sync(device)
        if i == 0:
            first_s = now() - t0
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = now()
            out = fn()
            times.append(now() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "iters": iters,
            "first_call_s": first_s, "times_s": [round(t, 5) for t in times], "output": out}


@contextlib.contextmanager
def peak_memory(device):
    """Yields a dict filled on exit with the peak bytes allocated above what was allocated on entry (GiB)."""
    stats: dict = {}
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    yield stats
    if cuda:
        torch.cuda.synchronize()
        stats["peak_extra_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
        stats["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32 (b is the reference); NaN anywhere gives inf."""
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def weights_gib(model: torch.nn.Module) -> float:
    n = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return round(n / 2**30, 3)


# ---------------------------------------------------------------------------------------------------------------------
# Models with identical weights


def build_pair(config, device, seed: int = 0, causal: bool = False):
    """(diffusers SanaVideoTransformer3DModel, our SanaVideoTransformer) in fp32 on ``device`` with the same random
    weights (diffusers' own init, loaded into ours through the shared state-dict keys). ``causal`` builds only ours."""
    from diffusers import SanaVideoTransformer3DModel

    from engine.model import SanaVideoTransformer

    torch.manual_seed(seed)
    with torch.device(device):
        reference = SanaVideoTransformer3DModel(**config.to_dict()).eval()
        ours = SanaVideoTransformer(config, causal=causal).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    ours.rope.to(device)
    if causal:
        del reference
        return None, ours
    return reference, ours


def clone_as(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return copy.deepcopy(model).to(dtype)


def compile_diffusers_blocks(model, mode: str | None = None, backend: str = "inductor") -> None:
    """Regional compilation of diffusers' transformer: each block compiled (they share one graph per shape), as
    ``ModelMixin.compile_repeated_blocks`` does for models that declare their repeated block."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for block in model.transformer_blocks:
        block.compile(dynamic=False, mode=mode, backend=backend)


def transformer_inputs(config, batch: int, latent_frames: int, latent_h: int, latent_w: int, text_len: int, device,
                       dtype, seed: int = 1):
    """Random latents [B, 16, F, H, W], text [B, L, caption], timesteps [B] and a mask with padding (CFG-like:
    the first sample short, the second longer)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(batch, config.in_channels, latent_frames, latent_h, latent_w, generator=g)
    text = torch.randn(batch, text_len, config.caption_channels, generator=g)
    t = torch.full((batch,), 700.0)
    mask = torch.zeros(batch, text_len)
    for i in range(batch):
        mask[i, : max(1, text_len // (4 if i == 0 else 1) - 7 * i)] = 1
    return x.to(device, dtype), text.to(device, dtype), t.to(device), mask.to(device)


def transformer_flops(config, batch: int, frames: int, height: int, width: int, text_len: int) -> dict:
    """Matmul FLOPs of one forward (2 per multiply-add) at post-patch grid (frames, height, width)."""
    C = config.inner_dim
    hidden = int(config.mlp_ratio * C)
    d = config.attention_head_dim
    heads = config.num_attention_heads
    n = frames * height * width
    tokens = batch * n
    per_token = (
        4 * C * C            # q, k, v, out of the self-attention
        + 2 * C * C          # cross-attention q, out
        + C * 2 * hidden     # Mix-FFN expansion
        + hidden * C         # Mix-FFN projection
        + 3 * C * C          # temporal (3, 1) conv
        + 2 * heads * d * d  # linear attention: S accumulation and application
    )  # the depthwise 3x3 conv is no matmul (memory-bound): left out
    linear = 2 * tokens * per_token * config.num_layers
    cross = 2 * 2 * tokens * text_len * C * config.num_layers  # QK^T and PV against the text
    text_kv = 2 * batch * text_len * 2 * C * C * config.num_layers
    total = linear + cross + text_kv
    return {"matmul_flop": total, "tokens_per_sample": n}


# ---------------------------------------------------------------------------------------------------------------------
# Whole pipelines with random weights (no downloads): real-size components, or the tiny preset for smoke runs


def build_pipeline(causal: bool, device, dtype, smoke: bool, seed: int = 0):
    """A VideoPipeline of the 480p preset (clip or LongLive stream) with random weights built on ``device``:
    the 2B transformer, a default-size Wan VAE (AutoencoderKLWan()), a Gemma-2 2B-size text encoder (Gemma2Config
    defaults) behind a word-level tokenizer. ``smoke``: the tiny presets' components instead."""
    from engine.model import SanaVideoTransformer
    from engine.pipeline import VideoPipeline, default_scheduler_config
    from engine.presets import PRESETS, TransformerConfig
    from engine.text import TextEncoder, build_text_encoder, build_word_tokenizer
    from engine.vae import build_vae

    if smoke:
        preset = PRESETS["tiny-causal" if causal else "tiny"]
        t_cfg, vae_cfg, text_cfg = preset.transformer, preset.vae, preset.text_encoder
    else:
        preset = PRESETS["sana-video-480p-longlive" if causal else "sana-video-480p"]
        t_cfg, vae_cfg, text_cfg = TransformerConfig(), {}, {}
        preset = dataclasses.replace(preset, vocab=PRESETS["tiny"].vocab)
    tokenizer = build_word_tokenizer(preset.vocab or PRESETS["tiny"].vocab)
    with torch.device(device):
        torch.manual_seed(seed)
        transformer = SanaVideoTransformer(t_cfg, causal=causal).eval()
        vae = build_vae(vae_cfg, seed=seed + 100)
        encoder = build_text_encoder(text_cfg, len(tokenizer), seed=seed + 200)
    transformer.rope.to(device)
    text = TextEncoder(tokenizer, encoder, preset.max_sequence_length, preset.use_instruction)
    return VideoPipeline._assemble(preset.name, preset, transformer, vae, text, default_scheduler_config(preset),
                                   torch.device(device), dtype)


class TimedModule:
    """Proxy that records CUDA events around every call of a module (``pending()`` -> seconds of finished calls)."""

    def __init__(self, module):
        self._module = module
        self._events: list = []

    def __getattr__(self, name):
        return getattr(self._module, name)

    def __call__(self, *args, **kwargs):
        if not torch.cuda.is_available():
            t0 = now()
            out = self._module(*args, **kwargs)
            self._events.append(now() - t0)
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self._module(*args, **kwargs)
        end.record()
        self._events.append((start, end))
        return out

    def take(self, wait: bool = True) -> list[float]:
        """Seconds of every call since the last take (``wait``: synchronizes; else only the calls that finished,
        the rest stay for the next take, so a caller that streams does not hold the GPU queue back)."""
        out, left = [], []
        for e in self._events:
            if isinstance(e, float):
                out.append(e)
            elif left or not (wait or e[1].query()):
                left.append(e)
            else:
                e[1].synchronize()
                out.append(e[0].elapsed_time(e[1]) / 1000.0)
        self._events = left
        return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)
