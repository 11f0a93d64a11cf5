"""The Mix-FFN's depthwise conv + GLU kernel: each input element activated once, against three times (the shipped
kernel), and SiLU's tanh two lanes at a time. Plus the block's GEMMs in the two weight layouts.

Variants, all at the 2B model's shapes, bf16 (42 images of 30 x 52 tokens at 480p, 45 x 80 at 720p; 2 x 5600
channels):
- ``shipped``: engine/kernels/mixffn.py, autotuned (loads each input row at three column shifts and activates each).
- ``once``: a tile of BLOCK_W columns (two of them halo) is loaded once per row and activated once; the left and
  right neighbours come from ``tl.gather`` along the columns (in registers or shared memory, as Triton lowers it).
- ``f16x2``: either, with SiLU's tanh as ``tanh.approx.f16x2`` (two lanes per special-function op).

    python benchmarks/results/dwconv-tiles/dwconv_once_probe.py OUT.json          # CUDA
    TRITON_INTERPRET=1 python benchmarks/results/dwconv-tiles/dwconv_once_probe.py --check   # CPU: correctness only
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from engine.kernels import mixffn  # noqa: E402


@triton.jit
def _silu(x, MODE: tl.constexpr):
    if MODE == 2:  # tanh in f16, two lanes per op
        t = tl.inline_asm_elementwise("tanh.approx.f16x2 $0, $1;", "=r,r", [(0.5 * x).to(tl.float16)],
                                      dtype=tl.float16, is_pure=True, pack=2).to(tl.float32)
        return 0.5 * x * (1.0 + t)
    elif MODE == 1:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [0.5 * x], dtype=tl.float32,
                                      is_pure=True, pack=1)
        return 0.5 * x * (1.0 + t)
    else:
        return x / (1.0 + tl.exp(-x))


@triton.jit
def _once_kernel(x_ptr, w_ptr, b_ptr, ib_ptr, o_ptr, H, W, C,
                 stride_xi, stride_xh, stride_xw, stride_oi, stride_oh, stride_ow, zero,
                 ACT: tl.constexpr, HAS_IN_BIAS: tl.constexpr, MODE: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, PREFETCH: tl.constexpr,
                 WLOOP: tl.constexpr = False):
    n_strips = tl.cdiv(H, ROWS)
    pid = tl.program_id(0)
    img = (pid // n_strips).to(tl.int64)
    y0 = (pid % n_strips) * ROWS
    lane = tl.arange(0, BLOCK_W)
    offs_w = tl.program_id(1) * (BLOCK_W - 2) - 1 + lane     # one halo column each side
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    col_ok = (offs_w >= 0) & (offs_w < W)
    ca = offs_c
    cg = offs_c + C
    store_cols = col_ok & (lane >= 1) & (lane <= BLOCK_W - 2)
    idx_l = tl.broadcast_to(tl.maximum(lane - 1, 0)[:, None], (BLOCK_W, BLOCK_C))
    idx_r = tl.broadcast_to(tl.minimum(lane + 1, BLOCK_W - 1)[:, None], (BLOCK_W, BLOCK_C))
    ba = tl.load(b_ptr + ca, mask=mask_c, other=0.0)
    bg = tl.load(b_ptr + cg, mask=mask_c, other=0.0)
    iba = tl.zeros((BLOCK_C,), tl.float32)
    ibg = tl.zeros((BLOCK_C,), tl.float32)
    if HAS_IN_BIAS:
        iba = tl.load(ib_ptr + ca, mask=mask_c, other=0.0).to(tl.float32)
        ibg = tl.load(ib_ptr + cg, mask=mask_c, other=0.0).to(tl.float32)

    a_up = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)
    a_mid = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)
    g_up = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)
    g_mid = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)
    x_img = x_ptr + img * stride_xi
    o_img = o_ptr + img * stride_oi
    cols = x_img + offs_w[:, None] * stride_xw
    r = y0 - 1
    ok = ((lane * 0 + r >= 0) & (lane * 0 + r < H) & col_ok)[:, None] & mask_c[None, :]
    na = tl.load(cols + r * stride_xh + ca[None, :], mask=ok, other=0.0)
    ng = tl.load(cols + r * stride_xh + cg[None, :], mask=ok, other=0.0)
    for i in range(ROWS + 2):
        r = y0 - 1 + i
        ok = ((lane * 0 + r >= 0) & (lane * 0 + r < H) & col_ok)[:, None] & mask_c[None, :]
        if PREFETCH:
            xa, xg = na, ng
            ok_n = ((lane * 0 + r + 1 >= 0) & (lane * 0 + r + 1 < H) & col_ok)[:, None] & mask_c[None, :]
            na = tl.load(cols + (r + 1) * stride_xh + ca[None, :], mask=ok_n, other=0.0)
            ng = tl.load(cols + (r + 1) * stride_xh + cg[None, :], mask=ok_n, other=0.0)
        else:
            xa = tl.load(cols + r * stride_xh + ca[None, :], mask=ok, other=0.0)
            xg = tl.load(cols + r * stride_xh + cg[None, :], mask=ok, other=0.0)
        ac = xa.to(tl.float32)
        gc = xg.to(tl.float32)
        if HAS_IN_BIAS:
            ac = ac + iba[None, :]
            gc = gc + ibg[None, :]
        if ACT:
            ac = _silu(ac, MODE)
            gc = _silu(gc, MODE)
        ac = tl.where(ok, ac, 0.0)
        gc = tl.where(ok, gc, 0.0)
        wp = w_ptr
        if WLOOP:
            wp = w_ptr + i * zero  # zero is 0 at run time: not loop-invariant, so the weights load per row (L1)
        wa0 = tl.load(wp + 0 * 2 * C + ca, mask=mask_c, other=0.0)
        wa1 = tl.load(wp + 1 * 2 * C + ca, mask=mask_c, other=0.0)
        wa2 = tl.load(wp + 2 * 2 * C + ca, mask=mask_c, other=0.0)
        wa3 = tl.load(wp + 3 * 2 * C + ca, mask=mask_c, other=0.0)
        wa4 = tl.load(wp + 4 * 2 * C + ca, mask=mask_c, other=0.0)
        wa5 = tl.load(wp + 5 * 2 * C + ca, mask=mask_c, other=0.0)
        wa6 = tl.load(wp + 6 * 2 * C + ca, mask=mask_c, other=0.0)
        wa7 = tl.load(wp + 7 * 2 * C + ca, mask=mask_c, other=0.0)
        wa8 = tl.load(wp + 8 * 2 * C + ca, mask=mask_c, other=0.0)
        wg0 = tl.load(wp + 0 * 2 * C + cg, mask=mask_c, other=0.0)
        wg1 = tl.load(wp + 1 * 2 * C + cg, mask=mask_c, other=0.0)
        wg2 = tl.load(wp + 2 * 2 * C + cg, mask=mask_c, other=0.0)
        wg3 = tl.load(wp + 3 * 2 * C + cg, mask=mask_c, other=0.0)
        wg4 = tl.load(wp + 4 * 2 * C + cg, mask=mask_c, other=0.0)
        wg5 = tl.load(wp + 5 * 2 * C + cg, mask=mask_c, other=0.0)
        wg6 = tl.load(wp + 6 * 2 * C + cg, mask=mask_c, other=0.0)
        wg7 = tl.load(wp + 7 * 2 * C + cg, mask=mask_c, other=0.0)
        wg8 = tl.load(wp + 8 * 2 * C + cg, mask=mask_c, other=0.0)
        al = tl.gather(ac, idx_l, 0)
        ar = tl.gather(ac, idx_r, 0)
        gl = tl.gather(gc, idx_l, 0)
        gr = tl.gather(gc, idx_r, 0)
        a_done = a_up + wa6[None, :] * al + wa7[None, :] * ac + wa8[None, :] * ar + ba[None, :]
        g_done = g_up + wg6[None, :] * gl + wg7[None, :] * gc + wg8[None, :] * gr + bg[None, :]
        out = a_done * _silu(g_done, MODE)
        y = r - 1
        store_ok = (lane * 0 + i >= 2) & (lane * 0 + y < H) & store_cols
        tl.store(o_img + y * stride_oh + offs_w[:, None] * stride_ow + offs_c[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=store_ok[:, None] & mask_c[None, :])
        a_up = a_mid + wa3[None, :] * al + wa4[None, :] * ac + wa5[None, :] * ar
        g_up = g_mid + wg3[None, :] * gl + wg4[None, :] * gc + wg5[None, :] * gr
        a_mid = wa0[None, :] * al + wa1[None, :] * ac + wa2[None, :] * ar
        g_mid = wg0[None, :] * gl + wg1[None, :] * gc + wg2[None, :] * gr


def once(x, weight, bias, in_bias, act=True, rows=32, block_w=16, block_c=64, warps=4, mode=1, prefetch=False, wloop=False):
    I, H, W, C2 = x.shape
    C = C2 // 2
    w = weight.reshape(C2, 9).t().float().contiguous()
    b = bias.float().contiguous()
    out = torch.empty(I, H, W, C, device=x.device, dtype=x.dtype)
    grid = (I * triton.cdiv(H, rows), triton.cdiv(W, block_w - 2), triton.cdiv(C, block_c))
    _once_kernel[grid](x, w, b, in_bias if in_bias is not None else b, out, H, W, C,
                       x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2), 0,
                       ACT=act, HAS_IN_BIAS=in_bias is not None, MODE=mode, ROWS=rows, BLOCK_W=block_w,
                       BLOCK_C=block_c, PREFETCH=prefetch, WLOOP=wloop, num_warps=warps)
    return out


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check():
    g = torch.Generator().manual_seed(0)
    for (I, H, W, C) in ((2, 7, 9, 24), (1, 5, 20, 40), (2, 3, 3, 8)):
        x = torch.randn(I, H, W, 2 * C, generator=g)
        w = torch.randn(2 * C, 1, 3, 3, generator=g) / 3
        b, ib = torch.randn(2 * C, generator=g), torch.randn(2 * C, generator=g)
        for in_bias, act in ((ib, True), (None, True), (None, False)):
            ref = mixffn.dwconv_glu_reference(x, w, b, in_bias, act)
            for rows, bw, bc, pf in ((3, 8, 16, False), (4, 4, 32, True), (8, 16, 16, True)):
                out = once(x, w, b, in_bias, act, rows=rows, block_w=bw, block_c=bc, warps=1, mode=0, prefetch=pf)
                assert rel(out, ref) < 1e-5, (I, H, W, C, rows, bw, bc, pf, rel(out, ref))
    print("interpreter check ok")


def bench(fn, iters=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / iters)
    return best


def main(out_path):
    import subprocess
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "driver": subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True).stdout.strip(),
              "command": " ".join(sys.orig_argv), "dwconv": [], "gemm": []}
    g = torch.Generator().manual_seed(0)
    C = 5600
    w = (torch.randn(2 * C, 1, 3, 3, generator=g) / 3).cuda().bfloat16()
    b, ib = torch.randn(2 * C, generator=g).cuda().bfloat16(), torch.randn(2 * C, generator=g).cuda().bfloat16()
    for label, (I, H, W) in (("480p", (42, 30, 52)), ("720p", (42, 45, 80))):
        x = torch.randn(I, H, W, 2 * C, device="cuda", dtype=torch.bfloat16)
        moved = x.numel() * 2 + x.numel()  # bytes: input read once, output (half the channels) written once
        ref = mixffn.dwconv_glu_reference(x.float(), w.float(), b.float(), ib.float(), True)
        shipped = mixffn.dwconv_glu(x, w, b, ib, True, impl="triton")
        ms = bench(lambda: mixffn.dwconv_glu(x, w, b, ib, True, impl="triton"))
        row = {"shape": label, "variant": "shipped (autotuned)", "ms": round(ms, 4),
               "GB_s": round(moved / ms / 1e6, 1), "rel_err_vs_fp32": rel(shipped, ref)}
        report["dwconv"].append(row)
        print(row, flush=True)
        rows = H if H <= 32 else (H + 1) // 2
        tiles = ((16, 16, 4), (16, 16, 2), (16, 32, 4), (8, 64, 4), (16, 64, 8), (32, 32, 8), (64, 16, 8), (32, 16, 4))
        configs = [(mode, wloop, tile, True) for mode in (1, 2) for wloop in (False, True) for tile in tiles]
        configs += [(2, True, tile, False) for tile in tiles[:3]]
        for mode, wloop, (bw, bc, warps), pf in configs:
            def fn():
                return once(x, w, b, ib, True, rows=rows, block_w=bw, block_c=bc, warps=warps, mode=mode,
                            prefetch=pf, wloop=wloop)
            try:
                out = fn()
                ms = bench(fn)
            except Exception as e:  # a tile that does not build (registers, shared memory)
                row = {"shape": label, "variant": "once", "error": repr(e)[:300]}
                report["dwconv"].append(row)
                print(row, flush=True)
                continue
            row = {"shape": label, "variant": "once", "tanh": "f16x2" if mode == 2 else "f32", "rows": rows,
                   "block_w": bw, "block_c": bc, "warps": warps, "prefetch": pf, "weights_per_row": wloop,
                   "ms": round(ms, 4), "GB_s": round(moved / ms / 1e6, 1), "rel_err_vs_fp32": rel(out, ref),
                   "rel_vs_shipped": rel(out, shipped)}
            report["dwconv"].append(row)
            print(row, flush=True)
        del x, ref, shipped
        torch.cuda.empty_cache()
    # GEMMs of one block at 480p (CFG batch 2: 65,520 tokens): F.linear (weight [N, K]) against x @ W^T stored [K, N].
    M = 65520
    for name, K, N in (("qkv / temporal", 2240, 6720), ("attn_out / cross", 2240, 2240), ("ffn_in", 2240, 11200),
                       ("ffn_out", 5600, 2240)):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        wt = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        wkn = wt.t().contiguous()
        flop = 2 * M * K * N
        for layout, fn in (("linear [N,K]", lambda: F.linear(x, wt)), ("mm [K,N]", lambda: x @ wkn)):
            ms = bench(fn, iters=20)
            row = {"gemm": name, "M": M, "K": K, "N": N, "layout": layout, "ms": round(ms, 4),
                   "TFLOP_s": round(flop / ms / 1e9, 1)}
            report["gemm"].append(row)
            print(row, flush=True)
    report["date_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        check()
    else:
        main(sys.argv[1])
