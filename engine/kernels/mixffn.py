"""The Mix-FFN's middle, fused: bias + SiLU of the expanded activations, depthwise 3x3 conv (+ bias) and GLU gate.

On channels-last tokens [I, H, W, 2C] (I = B*F images, the output of the 1x1 expansion as a GEMM, without its
bias) the reference is four passes over a tensor five times wider than the model (silu, depthwise conv, chunk,
gate); the kernel is one: it reads the GEMM output once (the 3x3 neighbourhood comes from cache) and writes the
gated [I, H, W, C] the 1x1 projection reads.

Each program owns a strip of rows x a few columns x a tile of channels and walks the strip's input rows once,
keeping pending output rows per half in registers: an input row adds its three vertical taps to the outputs above,
at and below it. Two forms share that walk:
- columns (the usual choice): four output columns, each input column a separate vector, so a row's six columns are
  loaded and activated once each (1.5 times per output) under per-column scalar masks;
- 2D tiles: a [columns, channels] tile loaded at three column shifts, each input element activated three times.
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


def dwconv_glu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         in_bias: torch.Tensor | None = None, activate_input: bool = True) -> torch.Tensor:
    """x [I, H, W, 2C] -> [I, H, W, C]: a * silu(g) with (a, g) = dwconv3x3(silu(x + in_bias)) split on channels.

    ``weight`` is the depthwise conv's [2C, 1, 3, 3], ``bias`` its [2C]; ``in_bias`` [2C] is the 1x1 expansion's
    bias when the GEMM ran without it. The model's own order and dtypes (GLUMBTempConv.spatial).
    """
    h = x.permute(0, 3, 1, 2)
    if in_bias is not None:
        h = h + in_bias.to(h.dtype)[:, None, None]
    if activate_input:
        h = F.silu(h)
    h = F.conv2d(h, weight.to(h.dtype), None if bias is None else bias.to(h.dtype), padding=1, groups=h.shape[1])
    a, g = h.chunk(2, dim=1)
    return (a * F.silu(g)).permute(0, 2, 3, 1)


if triton is not None:

    @triton.jit
    def _silu(x, FAST: tl.constexpr):
        if FAST:
            # x * sigmoid(x) = 0.5 x (1 + tanh(x / 2)): one special-function op instead of exp + reciprocal.
            t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [0.5 * x], dtype=tl.float32,
                                          is_pure=True, pack=1)
            return 0.5 * x * (1.0 + t)
        else:
            return x / (1.0 + tl.exp(-x))

    @triton.jit
    def _in_image(r, H, offs_w, shift, mask_cw, W):
        """Where input row r at columns offs_w + shift lies inside the image (the conv's zero padding outside)."""
        rows_r = offs_w * 0 + r  # a block, not a scalar: the Triton interpreter turns a scalar & block into int32
        cols = offs_w + shift
        ok = (rows_r >= 0) & (rows_r < H) & (cols >= 0) & (cols < W)
        return ok[:, None] & mask_cw

    @triton.jit
    def _load_row(x_img, r, H, offs_w, mask_cw, W, stride_h, stride_w, ca, cg):
        """Input row r as it is stored, at the three column shifts of both halves (zero outside the image)."""
        x_row = x_img + r * stride_h
        m_l = _in_image(r, H, offs_w, -1, mask_cw, W)
        m_c = _in_image(r, H, offs_w, 0, mask_cw, W)
        m_r = _in_image(r, H, offs_w, 1, mask_cw, W)
        left = x_row + (offs_w[:, None] - 1) * stride_w
        centre = x_row + offs_w[:, None] * stride_w
        right = x_row + (offs_w[:, None] + 1) * stride_w
        return (tl.load(left + ca[None, :], mask=m_l, other=0.0), tl.load(centre + ca[None, :], mask=m_c, other=0.0),
                tl.load(right + ca[None, :], mask=m_r, other=0.0), tl.load(left + cg[None, :], mask=m_l, other=0.0),
                tl.load(centre + cg[None, :], mask=m_c, other=0.0), tl.load(right + cg[None, :], mask=m_r, other=0.0))

    @triton.jit
    def _activate(v, r, H, offs_w, shift, mask_cw, W, in_b, ACT: tl.constexpr, HAS_IN_BIAS: tl.constexpr,
                  FAST: tl.constexpr):
        """A loaded tile activated (bias + SiLU), zero outside the image (the conv's zero padding)."""
        v = v.to(tl.float32)
        if HAS_IN_BIAS:
            v = v + in_b[None, :]
        if ACT:
            v = _silu(v, FAST)
        return tl.where(_in_image(r, H, offs_w, shift, mask_cw, W), v, 0.0)

    @triton.jit
    def _channel_constants(w_ptr, b_ptr, ib_ptr, C, ca, cg, mask_c, BLOCK_C: tl.constexpr, HAS_IN_BIAS: tl.constexpr):
        """A channel tile's depthwise weights (stored [9, 2C], tap-major: w[ky*3 + kx, channel]) for the value (ca)
        and gate (cg) halves, the conv's bias, and the expansion's bias (zero without it)."""
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
        return wa0, wa1, wa2, wa3, wa4, wa5, wa6, wa7, wa8, wg0, wg1, wg2, wg3, wg4, wg5, wg6, wg7, wg8, ba, bg, iba, ibg

    @triton.jit
    def _column_mask(col, W, row_ok, mask_c):
        return mask_c & row_ok & (col >= 0) & (col < W)

    @triton.jit
    def _load_column(p, col, W, row_ok, ca, cg, mask_c):
        """Input column ``col`` of a row (``p`` points at it) as stored, value and gate halves (zero outside)."""
        m = _column_mask(col, W, row_ok, mask_c)
        return tl.load(p + ca, mask=m, other=0.0), tl.load(p + cg, mask=m, other=0.0)

    @triton.jit
    def _row_columns(x_row, x0, W, row_ok, stride_w, ca, cg, mask_c):
        """Input row r's six columns x0-1 .. x0+4 as stored, value and gate halves (zero outside the image)."""
        p = x_row + (x0 - 1) * stride_w
        a0, g0 = _load_column(p, x0 - 1, W, row_ok, ca, cg, mask_c)
        p += stride_w
        a1, g1 = _load_column(p, x0, W, row_ok, ca, cg, mask_c)
        p += stride_w
        a2, g2 = _load_column(p, x0 + 1, W, row_ok, ca, cg, mask_c)
        p += stride_w
        a3, g3 = _load_column(p, x0 + 2, W, row_ok, ca, cg, mask_c)
        p += stride_w
        a4, g4 = _load_column(p, x0 + 3, W, row_ok, ca, cg, mask_c)
        p += stride_w
        a5, g5 = _load_column(p, x0 + 4, W, row_ok, ca, cg, mask_c)
        return a0, g0, a1, g1, a2, g2, a3, g3, a4, g4, a5, g5

    @triton.jit
    def _column(a, g, col, W, row_ok, mask_c, iba, ibg, ACT: tl.constexpr, HAS_IN_BIAS: tl.constexpr,
                FAST: tl.constexpr):
        """One loaded input column, both halves, activated once (zero outside the image: the conv's padding)."""
        a = a.to(tl.float32)
        g = g.to(tl.float32)
        if HAS_IN_BIAS:
            a = a + iba
            g = g + ibg
        if ACT:
            a = _silu(a, FAST)
            g = _silu(g, FAST)
        if HAS_IN_BIAS or ACT:
            m = _column_mask(col, W, row_ok, mask_c)
            a = tl.where(m, a, 0.0)
            g = tl.where(m, g, 0.0)
        return a, g

    @triton.jit
    def _output_column(up, mid, left, centre, right, w0, w1, w2, w3, w4, w5, w6, w7, w8, bias):
        """One output column's half as an input row passes: (the row above, finished; new pending rows)."""
        done = up + w6 * left + w7 * centre + w8 * right + bias
        return done, mid + w3 * left + w4 * centre + w5 * right, w0 * left + w1 * centre + w2 * right

    @triton.jit
    def _store_column(o_row, col, W, stride_w, ok, ca, mask_c, a_done, g_done, FAST: tl.constexpr):
        m = mask_c & ok & (col < W)
        out = a_done * _silu(g_done, FAST)
        tl.store(o_row + col * stride_w + ca, out.to(o_row.dtype.element_ty), mask=m)

    @triton.jit
    def _dwconv_glu_columns(x_ptr, w_ptr, b_ptr, ib_ptr, o_ptr, H, W, C,
                            stride_xi, stride_xh, stride_xw, stride_oi, stride_oh, stride_ow,
                            ACT: tl.constexpr, HAS_IN_BIAS: tl.constexpr, FAST: tl.constexpr,
                            ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
                            PREFETCH: tl.constexpr):
        """Four output columns per program, each input column a separate [BLOCK_C] vector: six columns are loaded
        and activated once per row for four outputs (1.5 loads per output, against 3 for shifted 2D tiles), and
        every mask is a per-column scalar test, not an elementwise one. The strip ends at the image's last row."""
        tl.static_assert(BLOCK_W == 4, "the column form is written out for four output columns")
        n_strips = tl.cdiv(H, ROWS)
        pid = tl.program_id(0)
        img = (pid // n_strips).to(tl.int64)
        y0 = (pid % n_strips) * ROWS
        x0 = tl.program_id(1) * BLOCK_W
        offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        ca = offs_c
        cg = offs_c + C
        wa0, wa1, wa2, wa3, wa4, wa5, wa6, wa7, wa8, wg0, wg1, wg2, wg3, wg4, wg5, wg6, wg7, wg8, ba, bg, iba, ibg = \
            _channel_constants(w_ptr, b_ptr, ib_ptr, C, ca, cg, mask_c, BLOCK_C, HAS_IN_BIAS)
        zero = tl.zeros((BLOCK_C,), tl.float32)
        au0, am0, gu0, gm0 = zero, zero, zero, zero
        au1, am1, gu1, gm1 = zero, zero, zero, zero
        au2, am2, gu2, gm2 = zero, zero, zero, zero
        au3, am3, gu3, gm3 = zero, zero, zero, zero
        x_img = x_ptr + img * stride_xi
        o_img = o_ptr + img * stride_oi
        if PREFETCH:  # the next row's loads issued before this row's arithmetic, to overlap their latency
            n0, n1, n2, n3, n4, n5, n6, n7, n8, n9, n10, n11 = _row_columns(
                x_img + (y0 - 1) * stride_xh, x0, W, y0 >= 1, stride_xw, ca, cg, mask_c)
        for i in range(tl.minimum(ROWS, H - y0) + 2):
            r = y0 - 1 + i
            row_ok = (r >= 0) & (r < H)
            if PREFETCH:
                l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, l11 = n0, n1, n2, n3, n4, n5, n6, n7, n8, n9, n10, n11
                n0, n1, n2, n3, n4, n5, n6, n7, n8, n9, n10, n11 = _row_columns(
                    x_img + (r + 1) * stride_xh, x0, W, r + 1 < H, stride_xw, ca, cg, mask_c)
            else:
                l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, l11 = _row_columns(
                    x_img + r * stride_xh, x0, W, row_ok, stride_xw, ca, cg, mask_c)
            a0, g0 = _column(l0, l1, x0 - 1, W, row_ok, mask_c, iba, ibg, ACT, HAS_IN_BIAS, FAST)
            a1, g1 = _column(l2, l3, x0, W, row_ok, mask_c, iba, ibg, ACT, HAS_IN_BIAS, FAST)
            a2, g2 = _column(l4, l5, x0 + 1, W, row_ok, mask_c, iba, ibg, ACT, HAS_IN_BIAS, FAST)
            a3, g3 = _column(l6, l7, x0 + 2, W, row_ok, mask_c, iba, ibg, ACT, HAS_IN_BIAS, FAST)
            a4, g4 = _column(l8, l9, x0 + 3, W, row_ok, mask_c, iba, ibg, ACT, HAS_IN_BIAS, FAST)
            a5, g5 = _column(l10, l11, x0 + 4, W, row_ok, mask_c, iba, ibg, ACT, HAS_IN_BIAS, FAST)
            # Output row r-1 is complete once input row r added its bottom taps.
            ad0, au0, am0 = _output_column(au0, am0, a0, a1, a2, wa0, wa1, wa2, wa3, wa4, wa5, wa6, wa7, wa8, ba)
            gd0, gu0, gm0 = _output_column(gu0, gm0, g0, g1, g2, wg0, wg1, wg2, wg3, wg4, wg5, wg6, wg7, wg8, bg)
            ad1, au1, am1 = _output_column(au1, am1, a1, a2, a3, wa0, wa1, wa2, wa3, wa4, wa5, wa6, wa7, wa8, ba)
            gd1, gu1, gm1 = _output_column(gu1, gm1, g1, g2, g3, wg0, wg1, wg2, wg3, wg4, wg5, wg6, wg7, wg8, bg)
            ad2, au2, am2 = _output_column(au2, am2, a2, a3, a4, wa0, wa1, wa2, wa3, wa4, wa5, wa6, wa7, wa8, ba)
            gd2, gu2, gm2 = _output_column(gu2, gm2, g2, g3, g4, wg0, wg1, wg2, wg3, wg4, wg5, wg6, wg7, wg8, bg)
            ad3, au3, am3 = _output_column(au3, am3, a3, a4, a5, wa0, wa1, wa2, wa3, wa4, wa5, wa6, wa7, wa8, ba)
            gd3, gu3, gm3 = _output_column(gu3, gm3, g3, g4, g5, wg0, wg1, wg2, wg3, wg4, wg5, wg6, wg7, wg8, bg)
            o_row = o_img + (r - 1) * stride_oh
            ok = i >= 2
            _store_column(o_row, x0, W, stride_ow, ok, ca, mask_c, ad0, gd0, FAST)
            _store_column(o_row, x0 + 1, W, stride_ow, ok, ca, mask_c, ad1, gd1, FAST)
            _store_column(o_row, x0 + 2, W, stride_ow, ok, ca, mask_c, ad2, gd2, FAST)
            _store_column(o_row, x0 + 3, W, stride_ow, ok, ca, mask_c, ad3, gd3, FAST)

    @triton.jit
    def _dwconv_glu_kernel(x_ptr, w_ptr, b_ptr, ib_ptr, o_ptr,
                           H, W, C,
                           stride_xi, stride_xh, stride_xw, stride_oi, stride_oh, stride_ow,
                           ACT: tl.constexpr, HAS_IN_BIAS: tl.constexpr, FAST: tl.constexpr,
                           ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
                           PREFETCH: tl.constexpr = False, COLUMNS: tl.constexpr = False):
        if COLUMNS:
            _dwconv_glu_columns(x_ptr, w_ptr, b_ptr, ib_ptr, o_ptr, H, W, C,
                                stride_xi, stride_xh, stride_xw, stride_oi, stride_oh, stride_ow,
                                ACT, HAS_IN_BIAS, FAST, ROWS, BLOCK_W, BLOCK_C, PREFETCH)
        else:
            _dwconv_glu_tiles(x_ptr, w_ptr, b_ptr, ib_ptr, o_ptr, H, W, C,
                              stride_xi, stride_xh, stride_xw, stride_oi, stride_oh, stride_ow,
                              ACT, HAS_IN_BIAS, FAST, ROWS, BLOCK_W, BLOCK_C, PREFETCH)

    @triton.jit
    def _dwconv_glu_tiles(x_ptr, w_ptr, b_ptr, ib_ptr, o_ptr,
                          H, W, C,
                          stride_xi, stride_xh, stride_xw, stride_oi, stride_oh, stride_ow,
                          ACT: tl.constexpr, HAS_IN_BIAS: tl.constexpr, FAST: tl.constexpr,
                          ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
                          PREFETCH: tl.constexpr):
        """Strips of rows x tiles of columns x tiles of channels, the column shifts as three shifted 2D loads."""
        n_strips = tl.cdiv(H, ROWS)
        pid = tl.program_id(0)
        img = (pid // n_strips).to(tl.int64)  # image offsets can pass 2^31 elements
        y0 = (pid % n_strips) * ROWS
        offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mask_cw = mask_c[None, :] & (offs_w < W)[:, None]
        ca = offs_c          # first half: the value
        cg = offs_c + C      # second half: the gate
        wa0, wa1, wa2, wa3, wa4, wa5, wa6, wa7, wa8, wg0, wg1, wg2, wg3, wg4, wg5, wg6, wg7, wg8, ba, bg, iba, ibg = \
            _channel_constants(w_ptr, b_ptr, ib_ptr, C, ca, cg, mask_c, BLOCK_C, HAS_IN_BIAS)

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


    # Tile shapes to try once per (H, W, C) on the GPU; the grid follows the chosen tiles. Four output columns per
    # program as separate vectors (COLUMNS), with the next row's loads issued before this row's arithmetic
    # (PREFETCH), won at every shape measured: on an H200, 1.35 ms against 1.73 for the best 2D tile at 480p (42
    # images of 30 x 52 x 2 x 5600), 3.02 against 4.01 at 720p, 0.73 against 0.97 for a stream block, bit for bit
    # the same output (benchmarks/results/dwconv-columns/). Two 2D tiles stay for shapes the columns do not suit.
    _TILES = [
        triton.Config({"ROWS": 64, "BLOCK_W": 4, "BLOCK_C": 64, "COLUMNS": True, "PREFETCH": True}, num_warps=1),
        triton.Config({"ROWS": 32, "BLOCK_W": 4, "BLOCK_C": 64, "COLUMNS": True, "PREFETCH": True}, num_warps=1),
        triton.Config({"ROWS": 32, "BLOCK_W": 4, "BLOCK_C": 128, "COLUMNS": True, "PREFETCH": True}, num_warps=2),
        triton.Config({"ROWS": 32, "BLOCK_W": 4, "BLOCK_C": 256, "COLUMNS": True, "PREFETCH": True}, num_warps=4),
        triton.Config({"ROWS": 32, "BLOCK_W": 2, "BLOCK_C": 128, "PREFETCH": True}, num_warps=2),
        triton.Config({"ROWS": 16, "BLOCK_W": 2, "BLOCK_C": 128, "PREFETCH": True}, num_warps=2),
    ]
    _dwconv_glu_tuned = triton.autotune(configs=_TILES, key=["H", "W", "C"])(_dwconv_glu_kernel)


def _dwconv_glu_triton(x, weight, bias, in_bias, activate_input: bool, rows: int | None = None,
                       block_w: int | None = None, block_c: int | None = None, num_warps: int = 4,
                       prefetch: bool = False, columns: bool = False):
    """Tiles given: that configuration; else autotuned on the GPU (a fixed default under the interpreter)."""
    I, H, W, C2 = x.shape
    C = C2 // 2
    if x.stride(-1) != 1:
        x = x.contiguous()
    w = weight.reshape(C2, 9).t().float().contiguous()  # [9, 2C]
    b = bias.float().contiguous() if bias is not None else torch.zeros(C2, device=x.device, dtype=torch.float32)
    out = torch.empty(I, H, W, C, device=x.device, dtype=x.dtype)
    args = (x, w, b, in_bias if in_bias is not None else b, out, H, W, C,
            x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2))
    flags = dict(ACT=activate_input, HAS_IN_BIAS=in_bias is not None, FAST=not interpreting())
    if rows is None and not interpreting():
        def grid(meta):
            return (I * triton.cdiv(H, meta["ROWS"]), triton.cdiv(W, meta["BLOCK_W"]), triton.cdiv(C, meta["BLOCK_C"]))
        _dwconv_glu_tuned[grid](*args, **flags)
        return out
    rows, block_w, block_c = rows or 16, 4 if columns else block_w or 8, block_c or 128
    grid = (I * triton.cdiv(H, rows), triton.cdiv(W, block_w), triton.cdiv(C, block_c))
    _dwconv_glu_kernel[grid](*args, **flags, ROWS=rows, BLOCK_W=block_w, BLOCK_C=block_c, PREFETCH=prefetch,
                             COLUMNS=columns, num_warps=num_warps)
    return out


def dwconv_glu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, in_bias: torch.Tensor | None = None,
               activate_input: bool = True, impl: str = "auto") -> torch.Tensor:
    """Fused ``a * silu(g)``, ``(a, g) = dwconv3x3(silu(x + in_bias)).chunk(2)``: x [I, H, W, 2C] -> [I, H, W, C].

    Accumulates in fp32, rounds once to x's dtype (the reference rounds after every op in 16-bit dtypes).
    """
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"x must be [I, H, W, 2C], got {tuple(x.shape)}")
    if resolve_impl(impl, x) == "triton":
        return _dwconv_glu_triton(x, weight, bias, in_bias, activate_input)
    return dwconv_glu_reference(x, weight, bias, in_bias, activate_input)


@torch.library.custom_op("sana::dwconv_glu", mutates_args=())
def _dwconv_glu_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, in_bias: torch.Tensor | None,
                   activate_input: bool) -> torch.Tensor:
    return dwconv_glu(x, weight, bias, in_bias, activate_input).contiguous()


@_dwconv_glu_op.register_fake
def _(x, weight, bias, in_bias, activate_input):
    I, H, W, C2 = x.shape
    return x.new_empty(I, H, W, C2 // 2)
