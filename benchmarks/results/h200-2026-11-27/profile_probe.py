"""GPU probe 2: profiles of one bf16 and one FP8 fast step (480p, CFG batch 2) with the current kernels, then the VAE
block decode with the decoder under torch.compile. Writes $OUT/probe2.json, $OUT/profile_bf16.txt, profile_fp8.txt."""
import json, os, sys, time, traceback
import torch
sys.path.insert(0, os.getcwd())
OUT = os.environ["OUT"]
res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
def save(): json.dump(res, open(f"{OUT}/probe2.json", "w"), indent=1)
def timeit(fn, iters=5, warm=1):
    for _ in range(warm): fn()
    torch.cuda.synchronize(); ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) / 1e3)
    ts.sort(); return ts[len(ts) // 2]
from benchmarks.common import transformer_inputs
from engine.fast import optimize
from engine.model import SanaVideoTransformer
from engine.presets import TransformerConfig
from torch.profiler import ProfilerActivity, profile
cfg = TransformerConfig()
with torch.device("cuda"):
    torch.manual_seed(0); base = SanaVideoTransformer(cfg).eval()
base.rope.to("cuda"); base = base.to(torch.bfloat16)
x, text, t, mask = transformer_inputs(cfg, 2, 21, 60, 104, 300, "cuda", torch.bfloat16)
import copy
for name, fp8 in (("bf16", False), ("fp8", True)):
    try:
        m = optimize(copy.deepcopy(base), fp8=fp8, compile=True)
        with torch.inference_mode():
            for _ in range(2): m(x, text, t, mask)
            res[f"{name}_step_s"] = timeit(lambda: m(x, text, t, mask))
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                m(x, text, t, mask); torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=100)
        open(f"{OUT}/profile_{name}.txt", "w").write(table)
        print(name, res[f"{name}_step_s"]); print(table[:6000], flush=True)
        del m; torch.cuda.empty_cache()
    except Exception:
        res[f"{name}_error"] = traceback.format_exc()[-2000:]
    save()
del base; torch.cuda.empty_cache()
try:
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = 64
    from engine.vae import StreamingDecoder, build_vae
    vae = build_vae({}, seed=0).to("cuda", torch.bfloat16)
    lat = torch.randn(1, 16, 31, 60, 104, device="cuda", dtype=torch.bfloat16)
    vres = {}
    for name in ("default", "compiled_decoder"):
        if name == "compiled_decoder":
            vae.decoder.compile(dynamic=False)
        dec = StreamingDecoder(vae)
        times = []
        with torch.inference_mode():
            dec.decode_block(lat[:, :, :1]); torch.cuda.synchronize()
            for i in range(3):
                t0 = time.perf_counter(); dec.decode_block(lat[:, :, 1 + 10 * i: 11 + 10 * i]); torch.cuda.synchronize(); times.append(time.perf_counter() - t0)
        vres[name] = times; print("vae", name, times, flush=True); res["vae_block10"] = vres; save()
except Exception:
    res["vae_error"] = traceback.format_exc()[-2000:]
save()
