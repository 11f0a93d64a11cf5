"""Every Triton kernel configuration the GPU may pick compiles for Hopper (sm_90) on a machine without a GPU.

Triton's compiler and the ptxas it ships build the kernels ahead of time for a named target, so a type error, an
unsupported op or bad inline assembly shows here rather than on the GPU. The report of ptxas (registers, spills) is
printed for whoever tunes the tiles; only a failed build fails the test.
"""

import os
import subprocess
import tempfile

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from engine.kernels import linear_attention as la  # noqa: E402
from engine.kernels import mixffn  # noqa: E402
from engine.kernels import norms  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
HOPPER = GPUTarget("cuda", 90, 32)

LA_SIGNATURE = {
    "sums": {"k_ptr": "*bf16", "v_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "s_ptr": "*fp32",
             "z_ptr": "*fp32", "N": "i32", "BH": "i32", "stride_kb": "i32", "stride_kn": "i32", "stride_vb": "i32",
             "stride_vn": "i32", "stride_rn": "i32", "stride_rd": "i32"},
    "apply": {"q_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "s_ptr": "*fp32", "z_ptr": "*fp32",
              "o_ptr": "*bf16", "N": "i32", "eps": "fp32", "stride_qb": "i32", "stride_qn": "i32", "stride_ob": "i32",
              "stride_on": "i32", "stride_rn": "i32", "stride_rd": "i32"},
}
NORM_SIGNATURE = {"x_ptr": "*bf16", "w_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "z_ptr": "*fp32",
                  "r_ptr": "*bf16", "a_ptr": "*bf16", "N": "i32", "norm_eps": "fp32", "eps": "fp32", "stride_xb": "i32",
                  "stride_xn": "i32", "stride_ob": "i32", "stride_on": "i32", "stride_rn": "i32", "stride_zb": "i32"}
DW_SIGNATURE = {"x_ptr": "*bf16", "w_ptr": "*fp32", "b_ptr": "*fp32", "ib_ptr": "*bf16", "o_ptr": "*bf16", "H": "i32",
                "W": "i32", "C": "i32", "stride_xi": "i32", "stride_xh": "i32", "stride_xw": "i32", "stride_oi": "i32",
                "stride_oh": "i32", "stride_ow": "i32"}


def build(fn, signature, constexprs, num_warps, num_stages=2):
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=HOPPER,
                            options={"num_warps": num_warps, "num_stages": num_stages})
    report = ""
    if os.path.exists(PTXAS):
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(kernel.asm["ptx"])
        proc = subprocess.run([PTXAS, "-v", "-arch=sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True)
        os.unlink(f.name)
        assert proc.returncode == 0, proc.stderr[-2000:]
        report = " | ".join(line.split("info    : ")[-1].strip() for line in proc.stderr.splitlines()
                            if "registers" in line or "spill" in line)
    print(f"{fn.__name__} {constexprs} warps={num_warps} stages={num_stages}: {report}")
    return kernel


@pytest.mark.parametrize("which", ["sums", "apply"])
@pytest.mark.parametrize("config", range(len(la._TILES)))
def test_linear_attention_builds_for_sm90(which, config):
    c = la._TILES[config]
    fn = la._sums_kernel if which == "sums" else la._apply_kernel
    constexprs = {"HEADS": 20, "D": 112, "BLOCK_D": 128, "TOKENS_PER_CHUNK": 1024, "PRECISION": "tf32", **c.kwargs}
    kernel = build(fn, LA_SIGNATURE[which], constexprs, c.num_warps, c.num_stages)
    assert "mma" in kernel.asm["ptx"]  # the products run on the tensor cores


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("config", range(len(la._NORM_TILES)))
def test_norm_rotate_builds_for_sm90(scale, config):
    c = la._NORM_TILES[config]
    constexprs = {"HEADS": 20, "D": 112, "BLOCK_D": 128, "ROUND_NORM": True, "SCALE": scale, **c.kwargs}
    kernel = build(la._norm_rotate_kernel, NORM_SIGNATURE, constexprs, c.num_warps)
    assert "sqrt.rn.f32" in kernel.asm["ptx"]  # the RMS statistic's square root correctly rounded, as torch's


@pytest.mark.parametrize("config", range(len(mixffn._TILES)))
def test_dwconv_glu_builds_for_sm90(config):
    c = mixffn._TILES[config]
    constexprs = {"ACT": True, "HAS_IN_BIAS": True, "FAST": True, "PREFETCH": False, "COLUMNS": False} | c.kwargs
    kernel = build(mixffn._dwconv_glu_kernel, DW_SIGNATURE, constexprs, c.num_warps)
    assert "tanh.approx.f32" in kernel.asm["ptx"]  # one special-function op per SiLU


ADD_NORM_SIGNATURE = {"x_ptr": "*bf16", "y_ptr": "*bf16", "g_ptr": "*fp32", "a_ptr": "*bf16", "sc_ptr": "*fp32",
                      "sh_ptr": "*fp32", "w_ptr": "*bf16", "b_ptr": "*bf16", "s_ptr": "*bf16", "h_ptr": "*bf16",
                      "qs_ptr": "*fp32", "M": "i32", "N": "i32", "C": "i32", "eps": "fp32"}


@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("config", range(len(norms._ROW_TILES)))
def test_add_norm_modulate_builds_for_sm90(quant, config):
    c = norms._ROW_TILES[config]
    signature = dict(ADD_NORM_SIGNATURE, h_ptr="*fp8e4nv" if quant else "*bf16")
    constexprs = {"HAS_Y": True, "HAS_A": True, "AFFINE": True, "BLOCK_C": 4096, "QUANT": quant, **c.kwargs}
    ptx = build(norms._add_norm_modulate_kernel, signature, constexprs, c.num_warps).asm["ptx"]
    if quant:  # the e4m3 cast rounds to nearest even and saturates; the division by the scale is IEEE, as torch's
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx and "div.rn.f32" in ptx
