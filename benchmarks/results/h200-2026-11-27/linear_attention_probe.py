"""GPU probe: linear-attention kernels (previous vs new, every tile config), VAE block decode variants, a profile of
one fast transformer step. Writes $OUT/probe.json and $OUT/profile.txt."""
import importlib.util, json, os, sys, time, traceback
import torch
sys.path.insert(0, os.getcwd())
OUT = os.environ["OUT"]
res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
def save():
    json.dump(res, open(f"{OUT}/probe.json", "w"), indent=1)

def timeit(fn, iters=20, warm=3):
    for _ in range(warm): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) / 1e3)
    ts.sort(); return ts[len(ts) // 2]

def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm()).item()

# 1. linear attention
try:
    import triton
    from engine.kernels import linear_attention as new
    spec = importlib.util.spec_from_file_location("old_la", ".run/perf/old_la.py"); old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
    B, N, H, D = 2, 32760, 20, 112
    HD = H * D
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, N, 3 * HD, device="cuda", dtype=torch.bfloat16, generator=g)
    q = qkv[..., :HD].relu().contiguous(); k = qkv[..., HD:2 * HD].relu().contiguous(); v = qkv[..., 2 * HD:]
    ang = torch.rand(N, D // 2, device="cuda", generator=g) * 6.28
    cos, sin = ang.cos(), ang.sin()
    S0, z0 = new.sums_reference(k.float(), v.float(), cos, sin, H)
    out0 = new.apply_reference(q.float(), cos, sin, S0, z0)
    la = {"shape": [B, N, H, D], "bytes_sums": 2 * B * N * HD * 2, "bytes_apply": 2 * B * N * HD * 2}
    for name, mod in (("old", old), ("new", new)):
        S, z = mod._sums_triton(k, v, cos, sin, H); o = mod._apply_triton(q, cos, sin, S0, z0, 1e-15)
        la[name] = {"sums_s": timeit(lambda: mod._sums_triton(k, v, cos, sin, H)),
                    "apply_s": timeit(lambda: mod._apply_triton(q, cos, sin, S0, z0, 1e-15)),
                    "sums_err": rel(S, S0), "z_err": rel(z, z0), "apply_err": rel(o, out0),
                    "sums_best": str(mod._sums_tuned.best_config), "apply_best": str(mod._apply_tuned.best_config)}
        print(name, la[name], flush=True)
    la["reference_s"] = timeit(lambda: new.apply_reference(q, cos, sin, *new.sums_reference(k, v, cos, sin, H)), iters=5)
    # every config of the new kernels alone
    per = {}
    for cfg in new._TILES:
        bn, w, st = cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages
        chunks, per_chunk = new._chunks(N, B * H, 128, k.device)
        meta = dict(HEADS=H, D=D, BLOCK_D=128, TOKENS_PER_CHUNK=per_chunk, PRECISION="tf32", BLOCK_N=bn, num_warps=w, num_stages=st)
        Sp = torch.empty(chunks, B, H, D, D, device="cuda"); zp = torch.empty(chunks, B, H, D, device="cuda")
        o = torch.empty_like(q)
        try:
            ts = timeit(lambda: new._sums_kernel[(B * H, chunks)](k, v, cos, sin, Sp, zp, N, B * H, k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), cos.stride(1), **meta))
            ta = timeit(lambda: new._apply_kernel[(B * H, chunks)](q, cos, sin, S0, z0, o, N, 1e-15, q.stride(0), q.stride(1), o.stride(0), o.stride(1), cos.stride(0), cos.stride(1), **meta))
            per[f"bn{bn}_w{w}_s{st}"] = {"sums_s": ts, "apply_s": ta}
        except Exception as e:
            per[f"bn{bn}_w{w}_s{st}"] = {"error": repr(e)[:300]}
        print(per, flush=True)
    la["new_configs"] = per; la["chunks"] = new._chunks(N, B * H, 128, k.device)
    res["linear_attention"] = la
except Exception:
    res["linear_attention_error"] = traceback.format_exc()[-2000:]
save()

# 2. VAE block decode variants (480p, blocks of 10 latent frames)
try:
    from engine.vae import StreamingDecoder, build_vae
    vae = build_vae({}, seed=0).to("cuda", torch.bfloat16)
    lat = torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16)
    vres = {}
    def run_variant(name, setup):
        setup()
        dec = StreamingDecoder(vae)
        dec.decode_block(lat[:, :, :1]); torch.cuda.synchronize()
        times = []
        for i in range(2):
            t0 = time.perf_counter(); dec.decode_block(lat[:, :, 1 + 10 * i: 11 + 10 * i]); torch.cuda.synchronize(); times.append(time.perf_counter() - t0)
        vres[name] = times; print("vae", name, times, flush=True)
    run_variant("default", lambda: None)
    run_variant("cudnn_benchmark", lambda: setattr(torch.backends.cudnn, "benchmark", True))
    run_variant("cudnn_benchmark_channels_last_3d", lambda: vae.to(memory_format=torch.channels_last_3d))
    res["vae_block10"] = vres
    del vae
    torch.backends.cudnn.benchmark = False
except Exception:
    res["vae_error"] = traceback.format_exc()[-2000:]
save()
torch.cuda.empty_cache()

# 3. profile of one fast step (480p, CFG batch 2)
try:
    from benchmarks.common import transformer_inputs
    from engine.fast import optimize
    from engine.model import SanaVideoTransformer
    from engine.presets import TransformerConfig
    cfg = TransformerConfig()
    with torch.device("cuda"):
        torch.manual_seed(0); m = SanaVideoTransformer(cfg).eval()
    m.rope.to("cuda"); m = optimize(m.to(torch.bfloat16), compile=True)
    x, text, t, mask = transformer_inputs(cfg, 2, 21, 60, 104, 300, "cuda", torch.bfloat16)
    with torch.inference_mode():
        for _ in range(3): m(x, text, t, mask)
        torch.cuda.synchronize()
        res["fast_step_s"] = timeit(lambda: m(x, text, t, mask), iters=5, warm=1)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            m(x, text, t, mask); torch.cuda.synchronize()
    open(f"{OUT}/profile.txt", "w").write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70), flush=True)
except Exception:
    res["profile_error"] = traceback.format_exc()[-2000:]
save()
