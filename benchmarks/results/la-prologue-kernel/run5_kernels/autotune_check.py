import sys, os, torch
sys.path.insert(0, os.getcwd()); sys.path.insert(0, "benchmarks/results/dwconv-tiles")
from dwconv_tile_sweep import b, ib, time_ms, w, x
from engine.kernels import mixffn, linear_attention as la
auto = time_ms(lambda: mixffn.dwconv_glu(x, w, b, ib, True), iters=30)
print("dwconv autotuned", auto, {str(k): str(v) for k, v in mixffn._dwconv_glu_tuned.cache.items()})
print("timings", {str(k): v for k, v in getattr(mixffn._dwconv_glu_tuned, "configs_timings", {}).items()} if hasattr(mixffn._dwconv_glu_tuned, "configs_timings") else None)
pf = time_ms(lambda: mixffn._dwconv_glu_triton(x, w, b, ib, True, rows=32, block_w=2, block_c=128, num_warps=2, prefetch=True), iters=30)
print("dwconv explicit prefetch", pf)
B, N, H, D = 2, 32760, 20, 112
C = H * D
for width in (2, 3):
    qk = (torch.randn(B, N, width * C, device="cuda") * 2).bfloat16()
    xk = qk[..., C:2 * C]
    wn = (torch.rand(C, device="cuda") + 0.5).bfloat16()
    ang = torch.rand(N, D // 2, device="cuda") * 6.28
    cos, sin = ang.cos(), ang.sin()
    t = time_ms(lambda: la.norm_rotate(xk, wn, 1e-5, cos, sin, H, impl="triton"), iters=30)
    print("norm_rotate k, row stride", width, "C:", t, {str(k): str(v) for k, v in la._norm_rotate_tuned.cache.items()})
