"""The Mix-FFN's depthwise conv + GLU kernel (engine/kernels/mixffn.py) with its grid in another order: column tiles
fastest, so the programs that share halo columns run at the same time and the second read of a halo column hits
L2 instead of DRAM. The kernel body is the shipped one; only the mapping of program ids changes (``COL_FIRST``).

With the shipped order (images x strips fastest, then column tiles), a program's neighbours in columns run only after
every image has passed: with 2-column tiles each program reads 4 columns for 2 outputs, so about twice the input
comes from DRAM.

    python benchmarks/results/dwconv-tiles/dwconv_order_probe.py OUT.json          # CUDA
"""
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from engine.kernels import mixffn  # noqa: E402
from engine.kernels.mixffn import _activate, _load_row, _silu  # noqa: E402,F401


@triton.jit
def _dw_order_kernel(x_ptr, w_ptr, b_ptr, ib_ptr, o_ptr,
                       H, W, C,
                       stride_xi, stride_xh, stride_xw, stride_oi, stride_oh, stride_ow,
                       ACT: tl.constexpr, HAS_IN_BIAS: tl.constexpr, FAST: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
                       PREFETCH: tl.constexpr = False, COL_FIRST: tl.constexpr = False):
    n_strips = tl.cdiv(H, ROWS)
    if COL_FIRST:  # neighbouring column tiles run together: their shared halo columns come from L2
        pid = tl.program_id(1)
        col_tile = tl.program_id(0)
    else:
        pid = tl.program_id(0)
        col_tile = tl.program_id(1)
    img = (pid // n_strips).to(tl.int64)  # image offsets can pass 2^31 elements
    y0 = (pid % n_strips) * ROWS
    offs_w = col_tile * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask_cw = mask_c[None, :] & (offs_w < W)[:, None]
    ca = offs_c          # first half: the value
    cg = offs_c + C      # second half: the gate
    # Depthwise weights, stored [9, 2C] (tap-major): w[ky*3 + kx, channel].
    wa0 = tl.load(w_ptr + 0 * 2 * C + ca, mask=mask_c, other=0.0)
    wa1 = tl.load(w_ptr + 1 * 2 * C + ca, mask=mask_c, other=0.0)
    wa2 = tl.load(w_ptr + 2 * 2 * C + ca, mask=mask_c, other=0.0)
    wa3 = tl.load(w_ptr + 3 * 2 * C + ca, mask=mask_c, other=0.0)
    wa4 = tl.load(w_ptr + 4 * 2 * C + ca, mask=mask_c, other=0.0)
    wa5 = tl.load(w_ptr + 5 * 2 * C + ca, mask=mask_c, other=0.0)
    wa6 = tl.load(w_ptr + 6 * 2 * C + ca, mask=mask_c, other=0.0)
    wa7 = tl.load(w_ptr + 7 * 2 * C + ca, mask=mask_c, other=0.0)
    wa8 = tl.load(w_ptr + 8 * 2 * C + ca, mask=mask_c, other=0.0)
    wg0 = tl.load(w_ptr + 0 * 2 * C + cg, mask=mask_c, other=0.0)
    wg1 = tl.load(w_ptr + 1 * 2 * C + cg, mask=mask_c, other=0.0)
    wg2 = tl.load(w_ptr + 2 * 2 * C + cg, mask=mask_c, other=0.0)
    wg3 = tl.load(w_ptr + 3 * 2 * C + cg, mask=mask_c, other=0.0)
    wg4 = tl.load(w_ptr + 4 * 2 * C + cg, mask=mask_c, other=0.0)
    wg5 = tl.load(w_ptr + 5 * 2 * C + cg, mask=mask_c, other=0.0)
    wg6 = tl.load(w_ptr + 6 * 2 * C + cg, mask=mask_c, other=0.0)
    wg7 = tl.load(w_ptr + 7 * 2 * C + cg, mask=mask_c, other=0.0)
    wg8 = tl.load(w_ptr + 8 * 2 * C + cg, mask=mask_c, other=0.0)
    ba = tl.load(b_ptr + ca, mask=mask_c, other=0.0)
    bg = tl.load(b_ptr + cg, mask=mask_c, other=0.0)
    iba = tl.zeros((BLOCK_C,), tl.float32)
    ibg = tl.zeros((BLOCK_C,), tl.float32)
    if HAS_IN_BIAS:
        iba = tl.load(ib_ptr + ca, mask=mask_c, other=0.0).to(tl.float32)
        ibg = tl.load(ib_ptr + cg, mask=mask_c, other=0.0).to(tl.float32)

    # Pending outputs: row r-1 (gets its bottom taps from input row r), row r (middle), row r+1 (top).
    a_up = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)
    a_mid = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)
    g_up = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)
    g_mid = tl.zeros((BLOCK_W, BLOCK_C), tl.float32)
    x_img = x_ptr + img * stride_xi
    o_img = o_ptr + img * stride_oi
    if PREFETCH:  # loads of the next row issued before this row's arithmetic, to overlap their latency
        nl, nc, nr, ngl, ngc, ngr = _load_row(x_img, y0 - 1, H, offs_w, mask_cw, W, stride_xh, stride_xw, ca, cg)
    for i in range(ROWS + 2):
        r = y0 - 1 + i
        if PREFETCH:
            xl, xc, xr, xgl, xgc, xgr = nl, nc, nr, ngl, ngc, ngr
            nl, nc, nr, ngl, ngc, ngr = _load_row(x_img, r + 1, H, offs_w, mask_cw, W, stride_xh, stride_xw, ca,
                                                  cg)
        else:
            xl, xc, xr, xgl, xgc, xgr = _load_row(x_img, r, H, offs_w, mask_cw, W, stride_xh, stride_xw, ca, cg)
        al = _activate(xl, r, H, offs_w, -1, mask_cw, W, iba, ACT, HAS_IN_BIAS, FAST)
        ac = _activate(xc, r, H, offs_w, 0, mask_cw, W, iba, ACT, HAS_IN_BIAS, FAST)
        ar = _activate(xr, r, H, offs_w, 1, mask_cw, W, iba, ACT, HAS_IN_BIAS, FAST)
        gl = _activate(xgl, r, H, offs_w, -1, mask_cw, W, ibg, ACT, HAS_IN_BIAS, FAST)
        gc = _activate(xgc, r, H, offs_w, 0, mask_cw, W, ibg, ACT, HAS_IN_BIAS, FAST)
        gr = _activate(xgr, r, H, offs_w, 1, mask_cw, W, ibg, ACT, HAS_IN_BIAS, FAST)
        # Output row r-1 is complete once input row r added its bottom taps (ky = 2).
        a_done = a_up + wa6[None, :] * al + wa7[None, :] * ac + wa8[None, :] * ar + ba[None, :]
        g_done = g_up + wg6[None, :] * gl + wg7[None, :] * gc + wg8[None, :] * gr + bg[None, :]
        out = a_done * _silu(g_done, FAST)
        y = r - 1
        store_ok = (i >= 2) & (y < H)
        tl.store(o_img + y * stride_oh + offs_w[:, None] * stride_ow + offs_c[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=mask_cw & store_ok)
        a_up = a_mid + wa3[None, :] * al + wa4[None, :] * ac + wa5[None, :] * ar
        g_up = g_mid + wg3[None, :] * gl + wg4[None, :] * gc + wg5[None, :] * gr
        a_mid = wa0[None, :] * al + wa1[None, :] * ac + wa2[None, :] * ar
        g_mid = wg0[None, :] * gl + wg1[None, :] * gc + wg2[None, :] * gr




def launch(x, weight, bias, in_bias, rows, block_w, block_c, warps, prefetch, col_first):
    I, H, W, C2 = x.shape
    C = C2 // 2
    w = weight.reshape(C2, 9).t().float().contiguous()
    b = bias.float().contiguous()
    out = torch.empty(I, H, W, C, device=x.device, dtype=x.dtype)
    strips, cols, chans = I * triton.cdiv(H, rows), triton.cdiv(W, block_w), triton.cdiv(C, block_c)
    grid = (cols, strips, chans) if col_first else (strips, cols, chans)
    _dw_order_kernel[grid](x, w, b, in_bias, out, H, W, C, x.stride(0), x.stride(1), x.stride(2), out.stride(0),
                           out.stride(1), out.stride(2), ACT=True, HAS_IN_BIAS=True, FAST=True, ROWS=rows,
                           BLOCK_W=block_w, BLOCK_C=block_c, PREFETCH=prefetch, COL_FIRST=col_first,
                           num_warps=warps)
    return out


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
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "driver": subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True).stdout.strip(),
              "command": " ".join(sys.orig_argv), "rows": []}
    g = torch.Generator().manual_seed(0)
    C = 5600
    w = (torch.randn(2 * C, 1, 3, 3, generator=g) / 3).cuda().bfloat16()
    b, ib = torch.randn(2 * C, generator=g).cuda().bfloat16(), torch.randn(2 * C, generator=g).cuda().bfloat16()
    for label, (I, H, W) in (("480p", (42, 30, 52)), ("720p", (42, 45, 80)), ("480p stream block", (20, 30, 52))):
        x = torch.randn(I, H, W, 2 * C, device="cuda", dtype=torch.bfloat16)
        moved = x.numel() * 2 + x.numel()  # bytes: input read once, output (half the channels) written once
        shipped = mixffn.dwconv_glu(x, w, b, ib, True, impl="triton")
        ms = bench(lambda: mixffn.dwconv_glu(x, w, b, ib, True, impl="triton"))
        row = {"shape": label, "variant": "shipped (autotuned)", "ms": round(ms, 4), "GB_s": round(moved / ms / 1e6, 1)}
        report["rows"].append(row)
        print(row, flush=True)
        whole = H if H <= 32 else 32
        for col_first in (False, True):
            for rows, bw, bc, warps in ((whole, 2, 128, 2), (whole, 2, 256, 4), (whole, 4, 64, 2), (whole, 4, 128, 4),
                                        (whole, 8, 64, 4), (whole, 2, 64, 1), (16, 2, 128, 2), (16, 4, 128, 4)):
                def fn():
                    return launch(x, w, b, ib, rows, bw, bc, warps, True, col_first)
                out = fn()
                ms = bench(fn)
                row = {"shape": label, "col_first": col_first, "rows": rows, "block_w": bw, "block_c": bc,
                       "warps": warps, "prefetch": True, "ms": round(ms, 4), "GB_s": round(moved / ms / 1e6, 1),
                       "same_as_shipped": torch.equal(out, shipped)}
                report["rows"].append(row)
                print(row, flush=True)
        x = shipped = None
        torch.cuda.empty_cache()
    report["date_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
