"""The block's residual adds, LayerNorm and adaLN modulation in one pass over the tokens.

Before the Mix-FFN the block adds the gated self-attention and the cross-attention to the residual stream and
normalises the sum, ``x = x + gate * a + y; h = norm2(x) * (1 + scale) + shift``; the self-attention's input is
``norm1(x) * (1 + scale) + shift`` without the adds. torch.compile makes each a looped reduction that reads its
inputs twice; the kernel reads a token's row once (the whole row stays in registers) and writes the new residual
and the modulated row. The sum, the statistics and the modulation are in fp32 and only what is stored is rounded:
the sum once, as torch.compile's fused form of the model's ops has it (rounding after each add costs accuracy
over 20 blocks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels import interpreting, resolve_impl

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


if triton is not None:

    @triton.jit
    def _add_norm_modulate_kernel(x_ptr, y_ptr, g_ptr, a_ptr, sc_ptr, sh_ptr, w_ptr, b_ptr, s_ptr, h_ptr,
                                  M, N, C, eps,
                                  HAS_Y: tl.constexpr, HAS_A: tl.constexpr, AFFINE: tl.constexpr,
                                  ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
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
        tl.store(h_ptr + offs, (n * (1.0 + scale) + shift).to(h_ptr.dtype.element_ty), mask=ok)

    _ROW_TILES = [triton.Config({"ROWS": r}, num_warps=w) for r, w in ((1, 4), (1, 8), (2, 8), (4, 8), (4, 16))]
    _add_norm_modulate_tuned = triton.autotune(configs=_ROW_TILES, key=["C", "HAS_Y", "HAS_A", "AFFINE"])(
        _add_norm_modulate_kernel)


def _add_norm_modulate_triton(x, y, scale, shift, weight, bias, eps: float, gate=None, a=None,
                              rows: int | None = None, num_warps: int = 4):
    """``rows`` given: that tile; else autotuned on the GPU (2 rows under the interpreter)."""
    B, N, C = x.shape
    x = x.contiguous()
    y = None if y is None else y.contiguous()
    a = None if a is None else a.contiguous()
    sc, sh = scale.reshape(B, C).contiguous(), shift.reshape(B, C).contiguous()
    g = gate.reshape(B, C).contiguous() if a is not None else sc
    s = torch.empty_like(x) if (y is not None or a is not None) else x
    h = torch.empty_like(x)
    affine = weight is not None
    args = (x, y if y is not None else x, g, a if a is not None else x, sc, sh, weight if affine else sc,
            bias if bias is not None else sc, s, h, B * N, N, C, eps)
    flags = dict(HAS_Y=y is not None, HAS_A=a is not None, AFFINE=affine, BLOCK_C=triton.next_power_of_2(C))
    if rows is None and not interpreting():
        _add_norm_modulate_tuned[lambda meta: (triton.cdiv(B * N, meta["ROWS"]),)](*args, **flags)
    else:
        rows = rows or 2
        _add_norm_modulate_kernel[(triton.cdiv(B * N, rows),)](*args, **flags, ROWS=rows, num_warps=num_warps)
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
