"""The block's residual adds, LayerNorm and adaLN modulation in one pass over the tokens.

Before the Mix-FFN the block adds the gated self-attention and the cross-attention to the residual stream and
normalises the sum, ``x = x + gate * a + y; h = norm2(x) * (1 + scale) + shift``; the self-attention's input is
``norm1(x) * (1 + scale) + shift`` without the adds. torch.compile makes each a looped reduction that reads its
inputs twice; the kernel reads a token's row once (the whole row stays in registers) and writes the new residual
and the modulated row. The sum, the statistics and the modulation are in fp32 and only what is stored is rounded:
the sum once, as torch.compile's fused form of the model's ops has it (rounding after each add costs accuracy
over 20 blocks).

On the FP8 path the modulated row is the input of an FP8 GEMM (q|k|v, the Mix-FFN's expansion). With the row in
registers the kernel also quantizes it (``*_fp8``): the row rounded to its 16-bit dtype, its amax, the e4m3 row
and its scale, with ``engine.kernels.fp8.quantize_rowwise``'s arithmetic op for op (bit for bit on the same row; the
compiled kernel may contract a multiply-add differently from the plain one, so about one element in a million of
the row differs by a 16-bit ulp before quantization). The 16-bit row is never written, and the GEMM's own amax +
cast pass over it goes away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels import interpreting, resolve_impl
from engine.kernels.fp8 import E4M3, E4M3_MAX, quantize_rowwise

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def add_norm_modulate_reference(x: torch.Tensor, y: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor,
                                weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                                gate: torch.Tensor | None = None,
                                a: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y, a [B, N, C]; scale, shift, gate [B, 1, C]; weight, bias [C] or None (LayerNorm without affine).

    Returns (s, h): s = x + gate * a + y (the terms given), h = (layer_norm(s) * (1 + scale) + shift) in x's dtype.
    The model's own ops in its order (TransformerBlock.forward).
    """
    s = x if a is None else x + gate * a
    s = s if y is None else s + y
    # With fp32 gates (what the fast block passes) the sum is fp32 here and rounded once, as in the kernel.
    weight, bias = (None if t is None else t.to(s.dtype) for t in (weight, bias))
    n = F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
    return s.to(x.dtype), (n * (1 + scale) + shift).to(x.dtype)


def add_norm_modulate_fp8_reference(x, y, scale, shift, weight, bias, eps, gate=None, a=None):
    """``add_norm_modulate_reference``, then h quantized for an FP8 GEMM: (s, q [B*N, C] e4m3, scale [B*N, 1])."""
    s, h = add_norm_modulate_reference(x, y, scale, shift, weight, bias, eps, gate, a)
    q, q_scale = quantize_rowwise(h.reshape(-1, h.shape[-1]))
    return s, q, q_scale


if triton is not None:
    _FP8_MAX = tl.constexpr(E4M3_MAX)
    _FP8_INV_MAX = tl.constexpr(1.0 / E4M3_MAX)

    @triton.jit
    def _add_norm_modulate_kernel(x_ptr, y_ptr, g_ptr, a_ptr, sc_ptr, sh_ptr, w_ptr, b_ptr, s_ptr, h_ptr,
                                  qs_ptr, M, N, C, eps,
                                  HAS_Y: tl.constexpr, HAS_A: tl.constexpr, AFFINE: tl.constexpr,
                                  ROWS: tl.constexpr, BLOCK_C: tl.constexpr, QUANT: tl.constexpr = False):
        """h_ptr gets the modulated row; with QUANT its e4m3 quantization instead (fp32 under the interpreter, whose
        fp8 cast is not the hardware's: the wrapper casts), and qs_ptr the rows' scales."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_C)
        row_ok = rows < M
        col_ok = cols < C
        ok = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * C + cols[None, :]
        mod = (rows // N)[:, None] * C + cols[None, :]  # the sample's modulation row
        v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_A:
            gate = tl.load(g_ptr + mod, mask=ok, other=0.0).to(tl.float32)
            v = v + gate * tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_Y:
            v = v + tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_Y or HAS_A:
            # The residual is stored rounded; the norm reads the unrounded fp32 sum.
            tl.store(s_ptr + offs, v.to(s_ptr.dtype.element_ty), mask=ok)
        mean = tl.sum(v, axis=1) / C
        d = tl.where(ok, v - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
        n = d * rstd[:, None]
        if AFFINE:
            n = n * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            n = n + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        scale = tl.load(sc_ptr + mod, mask=ok, other=0.0).to(tl.float32)
        shift = tl.load(sh_ptr + mod, mask=ok, other=0.0).to(tl.float32)
        h = n * (1.0 + scale) + shift
        if QUANT:
            # quantize_rowwise of the row as the 16-bit path stores it, op for op (an IEEE division, as torch's).
            h = h.to(x_ptr.dtype.element_ty).to(tl.float32)
            amax = tl.maximum(tl.max(tl.where(ok, tl.abs(h), 0.0), axis=1), 1e-12)
            q_scale = amax * _FP8_INV_MAX
            q = tl.math.div_rn(h, tl.broadcast_to(q_scale[:, None], h.shape))
            q = tl.minimum(tl.maximum(q, -_FP8_MAX), _FP8_MAX)
            tl.store(h_ptr + offs, q.to(h_ptr.dtype.element_ty), mask=ok)
            tl.store(qs_ptr + rows, q_scale, mask=row_ok)
        else:
            tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=ok)

    _ROW_TILES = [triton.Config({"ROWS": r}, num_warps=w) for r, w in ((1, 4), (1, 8), (2, 8), (4, 8), (4, 16))]
    _add_norm_modulate_tuned = triton.autotune(configs=_ROW_TILES, key=["C", "HAS_Y", "HAS_A", "AFFINE", "QUANT"])(
        _add_norm_modulate_kernel)


def _add_norm_modulate_triton(x, y, scale, shift, weight, bias, eps: float, gate=None, a=None,
                              rows: int | None = None, num_warps: int = 4, quant: bool = False):
    """``rows`` given: that tile; else autotuned on the GPU (2 rows under the interpreter).

    Returns (s, h), or with ``quant`` (s, q, q_scale) as ``add_norm_modulate_fp8``."""
    B, N, C = x.shape
    x = x.contiguous()
    y = None if y is None else y.contiguous()
    a = None if a is None else a.contiguous()
    sc, sh = scale.reshape(B, C).contiguous(), shift.reshape(B, C).contiguous()
    g = gate.reshape(B, C).contiguous() if a is not None else sc
    s = torch.empty_like(x) if (y is not None or a is not None) else x
    if quant:
        h = torch.empty(B * N, C, device=x.device, dtype=torch.float32 if interpreting() else E4M3)
        q_scale = torch.empty(B * N, 1, device=x.device, dtype=torch.float32)
    else:
        h = torch.empty_like(x)
        q_scale = sc
    affine = weight is not None
    args = (x, y if y is not None else x, g, a if a is not None else x, sc, sh, weight if affine else sc,
            bias if bias is not None else sc, s, h, q_scale, B * N, N, C, eps)
    flags = dict(HAS_Y=y is not None, HAS_A=a is not None, AFFINE=affine, BLOCK_C=triton.next_power_of_2(C),
                 QUANT=quant)
    if rows is None and not interpreting():
        _add_norm_modulate_tuned[lambda meta: (triton.cdiv(B * N, meta["ROWS"]),)](*args, **flags)
    else:
        rows = rows or 2
        _add_norm_modulate_kernel[(triton.cdiv(B * N, rows),)](*args, **flags, ROWS=rows, num_warps=num_warps)
    if quant:
        return s, h.to(E4M3), q_scale  # (a no-op on the GPU; the values are clamped to e4m3's range already)
    return s, h


def add_norm_modulate(x: torch.Tensor, y: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor,
                      weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-6,
                      gate: torch.Tensor | None = None, a: torch.Tensor | None = None,
                      impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(s, layer_norm(s) * (1 + scale) + shift) with s = x + gate * a + y (the terms given): x, y, a [B, N, C],
    scale/shift/gate [B, 1, C] -> two [B, N, C].

    The kernel sums, normalises and modulates in fp32 and rounds what it stores once (the reference rounds after
    every op in 16-bit dtypes).
    """
    if x.dim() != 3 or scale.shape[-1] != x.shape[-1] or scale.numel() != x.shape[0] * x.shape[-1]:
        raise ValueError(f"x must be [B, N, C] and scale/shift [B, 1, C], got {tuple(x.shape)}, {tuple(scale.shape)}")
    if (gate is None) != (a is None):
        raise ValueError("gate and a go together")
    if resolve_impl(impl, x) == "triton":
        return _add_norm_modulate_triton(x, y, scale, shift, weight, bias, eps, gate, a)
    return add_norm_modulate_reference(x, y, scale, shift, weight, bias, eps, gate, a)


def add_norm_modulate_fp8(x: torch.Tensor, y: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor,
                          weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-6,
                          gate: torch.Tensor | None = None, a: torch.Tensor | None = None,
                          impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``add_norm_modulate`` with h handed on as an FP8 GEMM's input: (s [B, N, C], q [B*N, C] e4m3, q_scale
    [B*N, 1] fp32), h ~= q * q_scale, ``quantize_rowwise`` of the 16-bit h."""
    if x.dim() != 3 or scale.shape[-1] != x.shape[-1] or scale.numel() != x.shape[0] * x.shape[-1]:
        raise ValueError(f"x must be [B, N, C] and scale/shift [B, 1, C], got {tuple(x.shape)}, {tuple(scale.shape)}")
    if (gate is None) != (a is None):
        raise ValueError("gate and a go together")
    if resolve_impl(impl, x) == "triton":
        return _add_norm_modulate_triton(x, y, scale, shift, weight, bias, eps, gate, a, quant=True)
    return add_norm_modulate_fp8_reference(x, y, scale, shift, weight, bias, eps, gate, a)


@torch.library.custom_op("sana::add_norm_modulate", mutates_args=())
def _add_norm_modulate_op(x: torch.Tensor, gate: torch.Tensor, a: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                          shift: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """s = x + gate * a + y and its modulated norm."""
    s, h = add_norm_modulate(x, y, scale, shift, weight, bias, eps, gate, a)
    return s.contiguous(), h.contiguous()


@_add_norm_modulate_op.register_fake
def _(x, gate, a, y, scale, shift, weight, bias, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.custom_op("sana::norm_modulate", mutates_args=())
def _norm_modulate_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor | None,
                      bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``add_norm_modulate`` without the add: h only."""
    return add_norm_modulate(x, None, scale, shift, weight, bias, eps)[1].contiguous()


@_norm_modulate_op.register_fake
def _(x, scale, shift, weight, bias, eps):
    return x.new_empty(x.shape)


@torch.library.custom_op("sana::add_norm_modulate_fp8", mutates_args=())
def _add_norm_modulate_fp8_op(x: torch.Tensor, gate: torch.Tensor, a: torch.Tensor, y: torch.Tensor,
                              scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor | None,
                              bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sana::add_norm_modulate`` with h quantized for the next FP8 GEMM: (s, q, q_scale)."""
    s, q, q_scale = add_norm_modulate_fp8(x, y, scale, shift, weight, bias, eps, gate, a)
    return s.contiguous(), q.contiguous(), q_scale.contiguous()


@_add_norm_modulate_fp8_op.register_fake
def _(x, gate, a, y, scale, shift, weight, bias, eps):
    M, C = x.shape[0] * x.shape[1], x.shape[-1]
    return x.new_empty(x.shape), x.new_empty(M, C, dtype=E4M3), x.new_empty(M, 1, dtype=torch.float32)


@torch.library.custom_op("sana::norm_modulate_fp8", mutates_args=())
def _norm_modulate_fp8_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor | None,
                          bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``sana::norm_modulate`` with h quantized for the next FP8 GEMM: (q, q_scale)."""
    _, q, q_scale = add_norm_modulate_fp8(x, None, scale, shift, weight, bias, eps)
    return q.contiguous(), q_scale.contiguous()


@_norm_modulate_fp8_op.register_fake
def _(x, scale, shift, weight, bias, eps):
    M, C = x.shape[0] * x.shape[1], x.shape[-1]
    return x.new_empty(M, C, dtype=E4M3), x.new_empty(M, 1, dtype=torch.float32)
