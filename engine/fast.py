"""Turn a loaded ``SanaVideoTransformer`` into the fast one, in place: same inputs, same outputs (to rounding).

``optimize(model)`` replaces every ``TransformerBlock`` by a ``FastBlock`` built from its weights:
- q|k|v as one GEMM, the text's k|v as one GEMM;
- ReLU linear attention (engine/kernels/linear_attention.py): by default q's and k's RMS norm, ReLU, RoPE rotation
  and normalisation in one Triton kernel each (one read of the row), the products as strided cuBLAS batched GEMMs
  (``attention="gemm"``); the same with that prologue left to torch.compile (``"gemm-compiled"``); or the two fused
  Triton kernels (``"triton"``); never an fp32 copy of q, k, v;
- the Mix-FFN on channels-last tokens: 1x1 convs as GEMMs, bias + SiLU + depthwise 3x3 + GLU gate in one kernel
  (engine/kernels/mixffn.py), the temporal (3,1) conv as one GEMM to three frame-shifted outputs summed with the
  residual in the next pointwise pass (no permutes, no padded copies);
- optionally every big linear layer in scaled FP8 (engine/kernels/fp8.py);
- each block's math compiled once (regional ``torch.compile``: the 20 blocks share one compiled graph per shape),
  so norms, modulation, gates and residuals fuse into a few memory passes.
The block-causal state (BlockState) is read and committed outside the compiled region, exactly as the reference
block does. ``GraphedTransformer`` adds CUDA-graph replay for fixed-shape clip steps.
``apply_fast_path(pipe, mode)`` is how a worker or the CLI picks between this and the reference for a pipeline.

The reference model (engine/model.py) is untouched; tests pin ``FastBlock`` to ``TransformerBlock``.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence

import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

from engine.kernels import linear_attention as la
from engine.kernels import mixffn, norms, triton_available
from engine.kernels.fp8 import FP8Linear, fp8_supported
from engine.model import LINEAR_ATTENTION_EPS, RotaryPosEmbed, SanaVideoTransformer, TransformerBlock
from engine.trt import MIN_CAPABILITY, BackendError, gpu_capability
from engine.vae import FastWanDecoder

# What apply_fast_path accepts (server/settings.py's FastMode lists the same).
FAST_MODES = ("auto", "on", "off", "fp8")
ATTENTION_IMPLS = ("gemm", "gemm-compiled", "triton")


@dataclasses.dataclass(frozen=True)
class FastSettings:
    """What ``optimize`` did to a model (kept on it as ``model.fast_settings``)."""

    kernels: bool = True       # Triton kernels (else their PyTorch references, same restructured math)
    attention: str = "gemm"    # linear attention: "gemm" (prologue kernels + cuBLAS), "gemm-compiled" or "triton"
    fp8: bool = False          # scaled FP8 GEMMs for the block linears
    compile: bool = True       # regional torch.compile of each block's math
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    norm_kernels: bool = True  # the residual adds + LayerNorm + modulation kernels (else compiled)
    fp8_fast_accum: bool = False  # FP8 GEMMs accumulate without promotion to fp32 (engine/kernels/fp8.py)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, fp8: bool, fast_accum: bool = True) -> nn.Module:
    out_f, in_f = weight.shape
    if fp8 and fp8_supported(in_f, out_f):
        return FP8Linear(weight, bias, out_dtype=weight.dtype, fast_accum=fast_accum)
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _cat_bias(*layers: nn.Linear) -> torch.Tensor | None:
    if all(layer.bias is None for layer in layers):
        return None
    return torch.cat([layer.bias if layer.bias is not None else torch.zeros_like(layer.weight[:, 0])
                      for layer in layers])


class BlockCore(nn.Module):
    """The math of one transformer block as a pure function (what gets compiled).

    forward(x [B, N, C], context [B, L, C], context_bias [B, 1, L] | None, temb [B, 1, 6C], cos/sin [N, d/2]
    ([N, d] from ``la.swap_tables`` for the compiled GEMM attention),
    grid (F, H, W), S_prev [B, h, d, d] | None, z_prev [B, h, d] | None, left [B, C, 1, H*W] | None,
    block_frames tuple | None) -> (x, S, z, last): the block output, this call's attention sums and the last frame
    of the temporal conv's input ([B, C, 1, H*W], the state's layout).
    """

    def __init__(self, block: TransformerBlock, fp8: bool, kernels: bool, attention: str = "gemm",
                 norm_kernels: bool = True, fp8_fast_accum: bool = True):
        super().__init__()
        a1, a2, ff = block.attn1, block.attn2, block.ff
        self.kernels = kernels
        self.attention = attention
        # The prologue kernel (norm + ReLU + rotation of q and k) needs the RMS norms; without them the compiled form.
        if attention == "gemm" and a1.norm_q is None:
            self.attention = "gemm-compiled"
        self.prologue = kernels and self.attention == "gemm"
        # The residual add + LayerNorm + modulation kernels (with FP8 they also quantize what the next GEMM reads).
        self.norm_kernels = kernels and norm_kernels
        # Full swapped RoPE tables for the compiled prologue, per-pair ones for the kernels and the references.
        self.swapped_tables = kernels and self.attention == "gemm-compiled"
        self.heads = a1.heads
        self.cross_heads = a2.heads
        self.scale_shift_table = block.scale_shift_table
        self.norm1_eps = block.norm1.eps
        self.norm2 = block.norm2
        with torch.no_grad():
            # Self-attention.
            qkv_w = torch.cat([a1.to_q.weight, a1.to_k.weight, a1.to_v.weight])
            self.qkv = _linear(qkv_w, _cat_bias(a1.to_q, a1.to_k, a1.to_v), fp8, fp8_fast_accum)
            self.norm_q, self.norm_k = a1.norm_q, a1.norm_k
            self.attn_out = _linear(a1.to_out[0].weight, a1.to_out[0].bias, fp8, fp8_fast_accum)
            # Cross-attention (the text side is a few hundred tokens: kept in bf16).
            self.cross_q = _linear(a2.to_q.weight, a2.to_q.bias, fp8, fp8_fast_accum)
            self.cross_kv = _linear(torch.cat([a2.to_k.weight, a2.to_v.weight]), _cat_bias(a2.to_k, a2.to_v), False)
            self.cross_norm_q, self.cross_norm_k = a2.norm_q, a2.norm_k
            self.cross_out = _linear(a2.to_out[0].weight, a2.to_out[0].bias, fp8, fp8_fast_accum)
            # Mix-FFN: 1x1 convs (or their Linear form) as GEMMs; the expansion's bias goes into the fused kernel.
            w_in = ff.conv_inverted.weight.flatten(1)
            self.ffn_in = _linear(w_in, None, fp8, fp8_fast_accum)
            self.ffn_in_bias = nn.Parameter(ff.conv_inverted.bias.detach().clone(), requires_grad=False)
            self.dw_weight = nn.Parameter(ff.conv_depth.weight.detach().clone(), requires_grad=False)
            self.dw_bias = nn.Parameter(ff.conv_depth.bias.detach().clone(), requires_grad=False)
            self.ffn_out = _linear(ff.conv_point.weight.flatten(1), None, fp8, fp8_fast_accum)
            wt = ff.conv_temp.weight[..., 0]  # [C_out, C_in, 3]: taps at frames f-1, f, f+1
            self.temporal = _linear(torch.cat([wt[:, :, 0], wt[:, :, 1], wt[:, :, 2]]), None, fp8, fp8_fast_accum)
            self.temporal_prev = nn.Parameter(wt[:, :, 0].detach().clone(), requires_grad=False)
        # FP8: the norm kernels hand q|k|v and the Mix-FFN's expansion their input quantized (e4m3 rows + scales).
        self.quantized_norms = (self.norm_kernels and isinstance(self.qkv, FP8Linear)
                                and isinstance(self.ffn_in, FP8Linear))

    # -- parts -------------------------------------------------------------------------------------------------------

    @staticmethod
    def _project(layer, h, shape):
        """layer(h) for h [B, N, C], or for h = (e4m3 rows [B*N, C], scales [B*N, 1]) from a norm kernel that
        quantized it for the FP8 layer: [B, N, out] either way (``shape`` is h's [B, N, C])."""
        if isinstance(h, tuple):
            return layer.quantized(*h).view(shape[0], shape[1], -1)
        return layer(h)

    def _attention_sums(self, k, v, cos, sin):
        if not self.kernels:
            return la.sums_reference(k, v, cos, sin, self.heads)
        if self.prologue:  # k as the projection wrote it: norm, ReLU and rotation in the kernel
            rot_k, k = torch.ops.sana.norm_rotate(k, self.norm_k.weight, self.norm_k.eps, cos, sin, self.heads, None,
                                                  LINEAR_ATTENTION_EPS)
            return torch.ops.sana.head_outer_sums(v, rot_k, k, self.heads)
        if self.attention == "gemm-compiled":
            return la.sums_gemm(k, v, cos, sin, self.heads)
        return torch.ops.sana.linear_attention_sums(k, v, cos, sin, self.heads)

    def _attend(self, q, cos, sin, S, z):
        if not self.kernels:
            return la.apply_reference(q, cos, sin, S, z, LINEAR_ATTENTION_EPS)
        if self.prologue:
            x, _ = torch.ops.sana.norm_rotate(q, self.norm_q.weight, self.norm_q.eps, cos, sin, self.heads, z,
                                              LINEAR_ATTENTION_EPS)
            return torch.ops.sana.head_products(x, S.to(x.dtype), self.heads)
        if self.attention == "gemm-compiled":
            return la.apply_gemm(q, cos, sin, S, z, LINEAR_ATTENTION_EPS)
        return torch.ops.sana.linear_attention_apply(q, cos, sin, S, z, LINEAR_ATTENTION_EPS)

    def self_attention(self, h, cos, sin, S_prev, z_prev, block_tokens, shape):
        q, k, v = self._project(self.qkv, h, shape).chunk(3, dim=-1)
        if not self.prologue:
            if self.norm_q is not None:
                q, k = self.norm_q(q), self.norm_k(k)
            q, k = F.relu(q), F.relu(k)
        if block_tokens is not None:
            outs, S_acc, z_acc = [], None, None
            for start, stop in block_tokens:
                S, z = self._attention_sums(k[:, start:stop], v[:, start:stop], cos[start:stop], sin[start:stop])
                S_acc, z_acc = (S, z) if S_acc is None else (S_acc + S, z_acc + z)
                outs.append(self._attend(q[:, start:stop], cos[start:stop], sin[start:stop], S_acc, z_acc))
            out, S, z = torch.cat(outs, dim=1), S_acc, z_acc
        else:
            S, z = self._attention_sums(k, v, cos, sin)
            S_tot, z_tot = (S, z) if S_prev is None else (S + S_prev, z + z_prev)
            out = self._attend(q, cos, sin, S_tot, z_tot)
        return self.attn_out(out), S, z

    def cross_attention(self, x, context, context_bias):
        B = x.shape[0]
        q = self.cross_q(x)
        k, v = self.cross_kv(context).chunk(2, dim=-1)
        if self.cross_norm_q is not None:
            q, k = self.cross_norm_q(q), self.cross_norm_k(k)
        heads = self.cross_heads
        q, k, v = (t.view(B, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        mask = None if context_bias is None else context_bias[:, None].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.cross_out(out.transpose(1, 2).flatten(2).type_as(q))

    def mix_ffn(self, h, grid, left, block_frames, shape):
        B, N, C = shape
        frames, height, width = grid
        hw = height * width
        e = self._project(self.ffn_in, h, shape)
        e = e.view(B * frames, height, width, e.shape[-1])
        if self.kernels:
            g = torch.ops.sana.dwconv_glu(e, self.dw_weight, self.dw_bias, self.ffn_in_bias, True)
        else:
            g = mixffn.dwconv_glu_reference(e, self.dw_weight, self.dw_bias, self.ffn_in_bias, True)
        t = self.ffn_out(g.reshape(B, frames, hw, g.shape[-1]))  # [B, F, HW, C]: the temporal conv's input
        y_prev, y_mid, y_next = self.temporal(t).chunk(3, dim=-1)
        zeros = torch.zeros_like(t[:, :1])
        if left is not None:
            first = F.linear(left[:, :, 0].transpose(1, 2).to(t.dtype), self.temporal_prev)[:, None]
        else:
            first = zeros
        from_prev = torch.cat([first, y_prev[:, :-1]], dim=1)   # W0 t[f-1]
        from_next = torch.cat([y_next[:, 1:], zeros], dim=1)    # W2 t[f+1]
        if block_frames is not None:
            # Each block is zero-padded on its right: no tap across a block's last frame.
            keep, start = [1.0] * frames, 0
            for n in block_frames:
                start += n
                keep[start - 1] = 0.0
            from_next = from_next * torch.tensor(keep, device=t.device, dtype=t.dtype)[None, :, None, None]
        out = t + (from_prev + y_mid + from_next)
        last = t[:, -1].transpose(1, 2).unsqueeze(2)  # [B, C, 1, HW]
        return out.reshape(B, N, C), last

    # -- the block ---------------------------------------------------------------------------------------------------

    def forward(self, x, context, context_bias, temb, cos, sin, grid: tuple[int, int, int], S_prev=None, z_prev=None,
                left=None, block_frames: tuple[int, ...] | None = None):
        B, N, C = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None, None] + temb.reshape(B, temb.shape[1], 6, -1)
        ).unbind(dim=2)
        block_tokens = None
        if block_frames is not None:
            per_frame, start, block_tokens = grid[1] * grid[2], 0, []
            for n in block_frames:
                block_tokens.append((start * per_frame, (start + n) * per_frame))
                start += n
        # Norm kernels (torch.ops.sana.*) for one modulation per sample; else the model's ops, for compile to fuse.
        norm_kernels = self.norm_kernels and temb.shape[1] == 1
        if norm_kernels:
            # Their scale and shift in fp32, unrounded, as compile's fused form of the model's ops has them.
            table = self.scale_shift_table[None, None].float()
            shift32, scale32, gate32, shift_mlp32, scale_mlp32, _ = (
                table + temb.float().reshape(B, temb.shape[1], 6, -1)).unbind(dim=2)
            if self.quantized_norms:
                h = torch.ops.sana.norm_modulate_fp8(x, scale32, shift32, None, None, self.norm1_eps)
            else:
                h = torch.ops.sana.norm_modulate(x, scale32, shift32, None, None, self.norm1_eps)
        else:
            _, h = norms.add_norm_modulate_reference(x, None, scale_msa, shift_msa, None, None, self.norm1_eps)
        attn, S, z = self.self_attention(h, cos, sin, S_prev, z_prev, block_tokens, x.shape)
        x_attn = x + gate_msa * attn
        norm2 = (self.norm2.weight, self.norm2.bias, self.norm2.eps)
        cross = self.cross_attention(x_attn, context, context_bias)
        if norm_kernels and self.quantized_norms:  # x + gate * attn + cross summed in fp32, rounded once
            x, q, q_scale = torch.ops.sana.add_norm_modulate_fp8(x, gate32, attn, cross, scale_mlp32, shift_mlp32,
                                                                 *norm2)
            h = (q, q_scale)
        elif norm_kernels:
            x, h = torch.ops.sana.add_norm_modulate(x, gate32, attn, cross, scale_mlp32, shift_mlp32, *norm2)
        else:
            x, h = norms.add_norm_modulate_reference(x_attn, cross, scale_mlp, shift_mlp, *norm2)
        ff, last = self.mix_ffn(h, grid, left, block_frames, x.shape)
        x = x + gate_mlp * ff
        return x, S, z, last


class RopePairs:
    """Per-pair RoPE tables [N, d/2] (cos of the even lanes, sin of the odd) of the model's interleaved [1, N, 1, d]
    tables, made contiguous once per forward and shared by every block: the kernels then read dense rows instead
    of every other element. ``swapped=True`` gives the full tables of the GEMM attention's rotation instead
    (``linear_attention.swap_tables``), also made once per forward."""

    def __init__(self):
        self.source = None  # weak reference to the table the pairs come from
        self.pairs = None
        self.swapped = None

    def __call__(self, rope, swapped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if self.source is None or self.source() is not rope[0]:  # a new forward
            self.pairs = (rope[0][0, :, 0, 0::2].contiguous(), rope[1][0, :, 0, 1::2].contiguous())
            self.swapped = None
            # Dropped with the table (at the end of its forward, unless the model caches it): no memory held
            # between jobs.
            self.source = weakref.ref(rope[0], self._dropped)
        if swapped:
            if self.swapped is None:
                self.swapped = la.swap_tables(*self.pairs)
            return self.swapped
        return self.pairs

    def _dropped(self, ref) -> None:
        if self.source is ref:
            self.source = self.pairs = self.swapped = None


class FastBlock(nn.Module):
    """Drop-in for ``TransformerBlock`` (same forward signature); state I/O stays outside the compiled core."""

    def __init__(self, block: TransformerBlock, fp8: bool = False, kernels: bool = True, rope_pairs=None,
                 attention: str = "gemm", norm_kernels: bool = True, fp8_fast_accum: bool = True):
        super().__init__()
        self.core = BlockCore(block, fp8=fp8, kernels=kernels, attention=attention, norm_kernels=norm_kernels,
                              fp8_fast_accum=fp8_fast_accum)
        self.rope_pairs = rope_pairs if rope_pairs is not None else RopePairs()

    def forward(self, x, context, context_bias, temb, rope, grid, layer, state=None, commit=False, block_frames=None):
        cos, sin = self.rope_pairs(rope, swapped=self.core.swapped_tables)
        S_prev = z_prev = left = None
        if state is not None:
            S_prev, z_prev = state.attention_sums(layer)
            left = state.conv_context(layer)
        # One compiled graph for every text length (the pipeline cuts the text's padding: lengths vary by prompt).
        if context.shape[1] > 1:
            torch._dynamo.mark_dynamic(context, 1)
            if context_bias is not None:
                torch._dynamo.mark_dynamic(context_bias, 2)
        if self.core.norm_kernels:
            # Row-major tokens for the kernels: the patch embedding hands the first block a transposed view (and
            # every block then shares one compiled graph).
            x = x.contiguous()
        x, S, z, last = self.core(x, context, context_bias, temb, cos, sin, tuple(grid), S_prev, z_prev, left,
                                  None if block_frames is None else tuple(block_frames))
        if commit:
            state.commit_layer(layer, S, z, last)
        return x


def optimize(model: SanaVideoTransformer, *, kernels: bool = True, fp8: bool = False, compile: bool = True,
             compile_mode: str | None = None, compile_backend: str = "inductor",
             attention: str = "gemm", norm_kernels: bool = True,
             fp8_fast_accum: bool = True) -> SanaVideoTransformer:
    """Make ``model`` fast in place and return it. Call after loading weights and moving to the device/dtype.

    ``kernels``: Triton kernels on CUDA (their PyTorch references elsewhere or when False). ``fp8``: scaled FP8
    GEMMs (needs an FP8 GPU, e.g. H100, for speed; runs anywhere ``torch._scaled_mm`` does). ``compile``: compile
    each block's math once per input shape (``dynamic=False``: one specialised graph per resolution bucket);
    ``compile_mode``/``compile_backend`` go to ``torch.compile``. ``attention``: how the linear attention runs
    with ``kernels``: "gemm" (q's and k's norm, ReLU, rotation and normalisation in one Triton kernel each, the
    products as cuBLAS batched GEMMs; the fastest), "gemm-compiled" (that prologue fused by torch.compile instead)
    or "triton" (the two fused Triton kernels). ``norm_kernels``: the block's two LayerNorms with their residual adds
    and modulation as Triton kernels (engine/kernels/norms.py; 2.6% faster a bf16 step on an H100, the same error
    against fp32; with ``fp8`` they also quantize the input of the GEMM they feed), else left to torch.compile.
    ``fp8_fast_accum``: with ``fp8``, the GEMMs accumulate in the tensor cores' FP8 accumulator without promotion
    to fp32 (``torch._scaled_mm``'s ``use_fast_accum``; faster, the same error at the model's depths:
    engine/kernels/fp8.py).
    """
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention {attention!r} (accepted: {', '.join(ATTENTION_IMPLS)})")
    rope_pairs = RopePairs()
    for i, block in enumerate(model.transformer_blocks):
        if isinstance(block, TransformerBlock):
            model.transformer_blocks[i] = FastBlock(block, fp8=fp8, kernels=kernels, rope_pairs=rope_pairs,
                                                    attention=attention, norm_kernels=norm_kernels,
                                                    fp8_fast_accum=fp8_fast_accum)
    # RoPE tables in fp32 whatever the weights' dtype: casting the model to bf16 rounds every cos/sin to 8 bits,
    # an error the kernels (which rotate in fp32) need not inherit. Rebuilt, since the cast already rounded them.
    cfg = model.config
    if model.rope.freqs_cos.dtype != torch.float32:
        model.rope = RotaryPosEmbed(cfg.attention_head_dim, cfg.patch_size, cfg.rope_max_seq_len).to(model.device)
    if compile:
        compile_blocks(model, mode=compile_mode, backend=compile_backend)
    model.fast_settings = FastSettings(kernels=kernels, attention=attention, fp8=fp8, compile=compile,
                                       compile_mode=compile_mode, compile_backend=compile_backend,
                                       norm_kernels=norm_kernels and kernels,
                                       fp8_fast_accum=fp8_fast_accum and fp8)
    return model


def apply_fast_path(pipe, mode: str = "auto") -> str:
    """Make ``pipe.transformer`` (an ``engine.pipeline.VideoPipeline``'s denoiser) fast in place, as ``mode`` asks.

    "auto": the fast path (Triton kernels + regional torch.compile) for a PyTorch transformer on CUDA, the
    reference elsewhere. "on": the fast path anywhere; off CUDA it runs the kernels' PyTorch references, uncompiled
    (the same restructured math, so tests can pin it). "off": the reference. "fp8": the fast path with scaled-FP8
    block linears; needs a CUDA GPU of compute capability >= 8.9. A TensorRT denoiser is left as it is.

    Returns what now runs the denoiser: "reference", "fast", "fast-fp8", or "tensorrt" (not a PyTorch
    ``SanaVideoTransformer``: untouched whatever the mode). Raises BackendError for an unknown mode or for "fp8"
    where FP8 cannot run. Compilation happens on the first forward of each input shape (a worker makes one short
    video of its default shape at start, ``workers.tasks.warm_up``).
    """
    mode = str(mode).lower()
    if mode not in FAST_MODES:
        raise BackendError(f"fast path mode {mode!r} (accepted: {', '.join(FAST_MODES)})")
    model = pipe.transformer
    if not isinstance(model, SanaVideoTransformer):
        return "tensorrt"
    if hasattr(model, "fast_settings"):  # converted already: say what runs, do not convert twice
        current = "fast-fp8" if model.fast_settings.fp8 else "fast"
        if mode == "off" or (mode == "fp8" and not model.fast_settings.fp8):
            raise BackendError(f"fast path mode {mode!r}: the model already runs {current} (load it again to change)")
        return current
    on_cuda = model.device.type == "cuda"
    # torch.compile on CUDA needs Triton (inductor's GPU code generator); without it the reference is what works.
    compiles = on_cuda and triton_available()
    if mode == "off" or (mode == "auto" and not compiles):
        return "reference"
    if on_cuda and not compiles:
        raise BackendError(f"fast path {mode} on CUDA needs Triton (pip install triton) (accepted here: auto, off)")
    fp8 = mode == "fp8"
    if fp8:
        need = MIN_CAPABILITY["fp8"]
        capability = gpu_capability(model.device) if on_cuda else None
        if capability is None or tuple(capability) < need:
            where = "no CUDA GPU" if capability is None else f"compute capability {capability[0]}.{capability[1]}"
            raise BackendError(
                f"fast path fp8 needs a CUDA GPU of compute capability >= {need[0]}.{need[1]}; the model is on "
                f"{model.device} ({where}) (accepted here: {', '.join(m for m in FAST_MODES if m != 'fp8')})"
            )
    optimize(model, kernels=True, fp8=fp8, compile=compiles)
    pipe.fast_vae = FastWanDecoder.supports(pipe.vae)  # compiled where the transformer is; Wan 2.1 layout only
    return "fast-fp8" if fp8 else "fast"


def compile_blocks(model: SanaVideoTransformer, mode: str | None = None, backend: str = "inductor") -> None:
    """Regional compilation: every FastBlock's core compiled; the blocks share one graph per input signature."""
    import torch._dynamo

    # One graph per resolution bucket x (clip, stream) variant; leave room for several buckets.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for block in model.transformer_blocks:
        block.core.compile(dynamic=False, mode=mode, backend=backend)


class GraphedTransformer:
    """CUDA-graph replay of whole clip-mode forwards, one graph per input signature (shapes, dtypes, mask).

    A replay launches the ~hundreds of kernels of a step at once, with no host work in between. Calls with a
    block state, ``block_frames`` or ``guidance`` run the model as is. The returned tensor is a fresh copy.
    """

    def __init__(self, model: nn.Module, warmup: int = 2):
        self.model = model
        self.warmup = warmup
        self.graphs: dict = {}

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask=None, guidance=None,
                 **kwargs):
        if kwargs or guidance is not None or not hidden_states.is_cuda:
            return self.model(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask, guidance,
                              **kwargs)
        inputs = (hidden_states, encoder_hidden_states, timestep, encoder_attention_mask)
        key = tuple(None if t is None else (tuple(t.shape), t.dtype) for t in inputs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(inputs)
            self.graphs[key] = entry
        static_inputs, graph, out = entry
        for dst, src in zip(static_inputs, inputs):
            if dst is not None:
                dst.copy_(src)
        graph.replay()
        return out.clone()

    def _capture(self, inputs: Sequence):
        static = [None if t is None else t.clone() for t in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(self.warmup):
                self.model(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            out = self.model(*static)
        return static, graph, out
