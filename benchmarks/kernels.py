"""Kernel checks and micro-benchmarks at the 2B model's 480p shapes (one CFG step's worth of one layer).

First the device's two ceilings (copy bandwidth, bf16 and FP8 matmul rate), then each fused kernel against its
PyTorch reference on the same random bf16 inputs: relative error (the reference computed in fp32), median time,
and achieved GB/s over the bytes the kernel must move (each input read once, each output written once).

    python -m benchmarks.kernels --out benchmarks/results
    python -m benchmarks.kernels --smoke --out /tmp/bench    # small shapes on CPU (references only)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import Results, rel_err, run_case, stage_parser, stage_setup, time_calls


def bench(fn, device, iters=20, warmup=3) -> float:
    return time_calls(fn, iters=iters, warmup=warmup, device=device)["median_s"]


def main(argv=None) -> int:
    p = stage_parser(__doc__)
    args = p.parse_args(argv)
    device, budget = stage_setup(args)

    from engine.kernels import linear_attention as la
    from engine.kernels import mixffn
    from engine.kernels.fp8 import FP8Linear

    smoke = args.smoke
    # One layer of a 480p CFG step: B=2, 21x30x52 tokens, 20 heads x 112, Mix-FFN hidden 5600.
    B, Fr, H, W, heads, d, hidden = (2, 2, 4, 6, 2, 24, 60) if smoke else (2, 21, 30, 52, 20, 112, 5600)
    N, C = Fr * H * W, heads * d
    dt = torch.float32 if smoke else torch.bfloat16
    impl = "torch" if smoke else "triton"
    iters = 2 if smoke else 20
    results = Results(Path(args.out) / f"kernels_{'smoke' if smoke else '480p'}.json", config={
        "batch": B, "grid": [Fr, H, W], "tokens": B * N, "heads": heads, "head_dim": d, "ffn_hidden": hidden,
        "dtype": str(dt), "timing": "median of CUDA-event timed calls after warm-up", "smoke": smoke})
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, positive=False):
        x = torch.randn(*shape, generator=g)
        return (x.relu() if positive else x).to(device, dt)

    def ceilings():
        n = 1 << 28 if not smoke else 1 << 16  # 512 MiB of bf16
        a = torch.randn(n, device=device, dtype=torch.bfloat16)
        b = torch.empty_like(a)
        s = bench(lambda: b.copy_(a), device, iters=iters)
        out = {"copy_gbps": round(2 * a.numel() * 2 / s / 1e9, 1)}
        m = 8192 if not smoke else 256
        x, y = torch.randn(m, m, device=device).to(torch.bfloat16), torch.randn(m, m, device=device).to(torch.bfloat16)
        s = bench(lambda: x @ y, device, iters=iters)
        out["bf16_matmul_tflops"] = round(2 * m**3 / s / 1e12, 1)
        if not smoke:
            xq, yq = x.to(torch.float8_e4m3fn), y.t().contiguous().to(torch.float8_e4m3fn)
            one = torch.ones((), device=device)
            s = bench(lambda: torch._scaled_mm(xq, yq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                      device, iters=iters)
            out["fp8_matmul_tflops"] = round(2 * m**3 / s / 1e12, 1)
        return out

    run_case(results, "ceilings", ceilings, budget, 5)

    q, k, v = rnd(B, N, C, positive=True), rnd(B, N, C, positive=True), rnd(B, N, C)
    ang = torch.rand(N, d // 2, generator=g) * 6.28
    cos, sin = ang.cos().to(device), ang.sin().to(device)

    def attention():
        S_ref, z_ref = la.sums_reference(k.float(), v.float(), cos, sin, heads)
        S, z = la.linear_attention_sums(k, v, cos, sin, heads, impl=impl)
        o_ref = la.apply_reference(q.float(), cos, sin, S_ref, z_ref)
        o = la.linear_attention_apply(q, cos, sin, S_ref, z_ref, impl=impl)
        row = {"sums_rel_err": rel_err(S, S_ref), "z_rel_err": rel_err(z, z_ref), "apply_rel_err": rel_err(o, o_ref)}
        t_sums = bench(lambda: la.linear_attention_sums(k, v, cos, sin, heads, impl=impl), device, iters=iters)
        t_apply = bench(lambda: la.linear_attention_apply(q, cos, sin, S, z, impl=impl), device, iters=iters)
        # The model's reference on bf16 inputs: fp32 upcasts, einsums.
        t_ref = bench(lambda: la.apply_reference(q, cos, sin, *la.sums_reference(k, v, cos, sin, heads)), device,
                      iters=max(2, iters // 4))
        esize = q.element_size()
        row.update(sums_s=t_sums, apply_s=t_apply, reference_s=t_ref, speedup=round(t_ref / (t_sums + t_apply), 2),
                   sums_gbps=round(2 * B * N * C * esize / t_sums / 1e9, 1),
                   apply_gbps=round(2 * B * N * C * esize / t_apply / 1e9, 1))
        return row

    run_case(results, "linear_attention", attention, budget, 8)

    qk = rnd(B, N, 2 * C)  # q|k as slices of one projection's output, before their norm
    norm_w = (torch.rand(C, generator=g) + 0.5).to(device, dt)
    z_tot = torch.rand(B, heads, d, generator=g).to(device) * N

    def norm_rotate():
        """The GEMM attention's prologue (RMS norm + ReLU + rotation; for q the denominator) against its reference."""
        row = {}
        for name, x, z in (("k", qk[..., C:], None), ("q", qk[..., :C], z_tot)):
            ref = la.norm_rotate_reference(x.float(), norm_w.float(), 1e-5, cos, sin, heads, z)[0]
            out = la.norm_rotate(x, norm_w, 1e-5, cos, sin, heads, z, impl=impl)[0]
            t = bench(lambda: la.norm_rotate(x, norm_w, 1e-5, cos, sin, heads, z, impl=impl), device, iters=iters)
            t_ref = bench(lambda: la.norm_rotate_reference(x, norm_w, 1e-5, cos, sin, heads, z), device,
                          iters=max(2, iters // 4))
            moved = (2 if z is not None else 3) * B * N * C * x.element_size()  # read x; write rot (and k)
            row.update({f"{name}_rel_err": rel_err(out, ref), f"{name}_s": t, f"{name}_reference_s": t_ref,
                        f"{name}_speedup": round(t_ref / t, 2), f"{name}_gbps": round(moved / t / 1e9, 1)})
        return row

    run_case(results, "norm_rotate", norm_rotate, budget, 6)

    e = rnd(B * Fr, H, W, 2 * hidden)
    w_dw = (torch.randn(2 * hidden, 1, 3, 3, generator=g) / 3).to(device, dt)
    b_dw, b_in = rnd(2 * hidden), rnd(2 * hidden)

    def mix_ffn():
        ref = mixffn.dwconv_glu_reference(e.float(), w_dw.float(), b_dw.float(), b_in.float(), True)
        out = mixffn.dwconv_glu(e, w_dw, b_dw, b_in, True, impl=impl)
        row = {"rel_err": rel_err(out, ref)}
        t = bench(lambda: mixffn.dwconv_glu(e, w_dw, b_dw, b_in, True, impl=impl), device, iters=iters)
        t_ref = bench(lambda: mixffn.dwconv_glu_reference(e, w_dw, b_dw, b_in, True), device, iters=iters)
        act = F.silu(e + b_in)
        t_noact = bench(lambda: mixffn.dwconv_glu(act, w_dw, b_dw, None, False, impl=impl), device, iters=iters)
        moved = (e.numel() + e.numel() // 2) * e.element_size()
        row.update(fused_s=t, reference_s=t_ref, speedup=round(t_ref / t, 2), fused_gbps=round(moved / t / 1e9, 1),
                   without_activation_s=t_noact)
        return row

    run_case(results, "dwconv_glu", mix_ffn, budget, 8)

    def fp8_linear():
        rows = {}
        for name, (fin, fout) in {"ffn_in": (C, 2 * hidden), "ffn_out": (hidden, C), "qkv": (C, 3 * C)}.items():
            x = rnd(B * N, fin)
            lin = torch.nn.Linear(fin, fout, device=device, dtype=dt)
            ref = F.linear(x.float(), lin.weight.float(), lin.bias.float())
            t_bf = bench(lambda: lin(x), device, iters=iters)
            row = {"bf16_s": t_bf, "bf16_tflops": round(2 * x.shape[0] * fin * fout / t_bf / 1e12, 1),
                   "bf16_rel_err": rel_err(lin(x), ref)}
            if not smoke:
                q8 = FP8Linear.from_linear(lin)
                t8 = bench(lambda: q8(x), device, iters=iters)
                row.update(fp8_eager_s=t8, fp8_rel_err=rel_err(q8(x), ref),
                           fp8_gemm_only_tflops=_fp8_gemm_tflops(q8, x, device, iters))
            rows[name] = row
        return rows

    run_case(results, "linear_bf16_vs_fp8", fp8_linear, budget, 8)

    def step_gemms():
        """Every GEMM of one CFG step at its shape, alone, as the fast path runs them (bf16 F.linear; FP8
        _scaled_mm with per-token scales and fast accumulation), times the layers: the floor a step cannot beat
        without fusing other work into the GEMMs. The text's k|v (a few hundred rows) and the linear attention's
        batched products (bandwidth-bound) are left out."""
        from engine.kernels.fp8 import quantize_rowwise

        layers = 2 if smoke else 20
        M = B * N
        shapes = {"qkv": (C, 3 * C, False), "attn_out": (C, C, True), "cross_q": (C, C, True),
                  "cross_out": (C, C, True), "ffn_in": (C, 2 * hidden, False), "ffn_out": (hidden, C, False),
                  "temporal": (C, 3 * C, False)}
        row = {"layers": layers, "rows": M}
        tot_bf, tot_fp8, flop = 0.0, 0.0, 0
        for name, (fin, fout, has_bias) in shapes.items():
            x = rnd(M, fin)
            w = rnd(fout, fin)
            bias = rnd(fout) if has_bias else None
            t = bench(lambda: F.linear(x, w, bias), device, iters=iters)
            tot_bf += t
            flop += 2 * M * fin * fout
            row[f"{name}_bf16_s"] = t
            if not smoke:  # the input quantized already (the norm kernels hand q|k|v and ffn_in theirs)
                xq, xs = quantize_rowwise(x)
                q8 = FP8Linear(w, bias)
                t8 = bench(lambda: q8.quantized(xq, xs), device, iters=iters)
                tot_fp8 += t8
                row[f"{name}_fp8_s"] = t8
        row.update(step_bf16_s=tot_bf * layers, bf16_tflops=round(flop / tot_bf / 1e12, 1),
                   matmul_flop_per_step=flop * layers)
        if not smoke:
            row.update(step_fp8_s=tot_fp8 * layers, fp8_tflops=round(flop / tot_fp8 / 1e12, 1))
        return row

    run_case(results, "step_gemms", step_gemms, budget, 6)

    def cross_attention():
        """The text cross-attention as the block runs it (padding mask as an additive bias), per SDPA backend, and
        unmasked flash attention over the same keys for scale (what dropping padded keys could give)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        L = 300 if not smoke else 12
        qh = rnd(B, heads, N, d)
        kh, vh = rnd(B, heads, L, d), rnd(B, heads, L, d)
        bias = torch.zeros(B, 1, 1, L, device=device, dtype=dt)
        bias[0, ..., L // 4:] = -10000.0
        flop = 4 * B * heads * N * L * d
        row = {}
        backends = {"default": None, "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                    "math": SDPBackend.MATH}
        for name, backend in backends.items():
            def call(backend=backend, mask=bias):
                if backend is None:
                    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
            try:
                t = bench(call, device, iters=max(2, iters // 2))
                row[f"{name}_masked_s"] = t
                row[f"{name}_masked_tflops"] = round(flop / t / 1e12, 1)
            except Exception as exc:  # noqa: BLE001 - a backend may not support this shape or mask
                row[f"{name}_masked_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        try:
            t = bench(lambda: F.scaled_dot_product_attention(qh, kh, vh), device, iters=max(2, iters // 2))
            row.update(unmasked_default_s=t, unmasked_default_tflops=round(flop / t / 1e12, 1))
        except Exception as exc:  # noqa: BLE001
            row["unmasked_error"] = str(exc)[:200]
        return row

    run_case(results, "cross_attention_sdpa", cross_attention, budget, 8)

    print(f"\n== {results.path.name} on {results.doc['environment'].get('gpu')} ==")
    for c in results.doc["cases"]:
        print(c["name"], {k: v for k, v in c.items() if k not in ("name", "traceback")})
    return 0


def _fp8_gemm_tflops(layer, x, device, iters) -> float:
    from engine.kernels.fp8 import quantize_rowwise

    xq, xs = quantize_rowwise(x)
    s = bench(lambda: torch._scaled_mm(xq, layer.weight_fp8.t(), scale_a=xs, scale_b=layer.weight_scale,
                                       out_dtype=torch.bfloat16), device, iters=iters)
    return round(2 * x.shape[0] * layer.in_features * layer.out_features / s / 1e12, 1)


if __name__ == "__main__":
    raise SystemExit(main())
