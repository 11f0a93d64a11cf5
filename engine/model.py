"""SANA-Video Linear DiT, weight-compatible with diffusers' ``SanaVideoTransformer3DModel``.

Module names and parameter shapes equal diffusers' (a state-dict key is an interface), so official
diffusers-format checkpoints load unchanged. One class serves the bidirectional models and the block-causal
(LongLive) ones: the causal checkpoints share the weight layout; only the attention and the temporal conv
become block-causal, driven by a ``BlockState`` (engine/state.py) or, for a whole sequence in one pass, by
``block_frames``.

Shapes: B batch, C channels, F latent frames, H/W latent height/width, N = F*(H/p)*(W/p) tokens,
L text tokens, heads x d = inner dim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import PixArtAlphaTextProjection, get_1d_rotary_pos_embed
from diffusers.models.normalization import AdaLayerNormSingle, RMSNorm
from diffusers.models.transformers.transformer_sana_video import SanaCombinedTimestepGuidanceEmbeddings
from torch import nn

from engine.presets import TransformerConfig

LINEAR_ATTENTION_EPS = 1e-15


# ---------------------------------------------------------------------------------------------------------------------
# Rotary position embedding (3D, split t/h/w like Wan) with an absolute frame offset.


class RotaryPosEmbed(nn.Module):
    """cos/sin tables of the 3D RoPE. ``max_seq_len`` (the checkpoints' ``rope_max_seq_len``) is the length the
    tables are first built to; a stream that runs past it grows them: the entry of a position does not depend on the
    table's length, and the attention sees only differences of positions, so frame 1030 of a long stream gets the
    rotation it would get from a longer table."""

    def __init__(self, attention_head_dim: int, patch_size: Sequence[int], max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.h_dim = self.w_dim = 2 * (attention_head_dim // 6)
        self.t_dim = attention_head_dim - self.h_dim - self.w_dim
        self.theta = theta
        cos, sin = self._tables(max_seq_len)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)

    def _tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = [], []
        for dim in (self.t_dim, self.h_dim, self.w_dim):
            c, s = get_1d_rotary_pos_embed(
                dim, length, self.theta, use_real=True, repeat_interleave_real=True, freqs_dtype=torch.float64
            )
            cos.append(c)
            sin.append(s)
        return torch.cat(cos, dim=1), torch.cat(sin, dim=1)

    def _grow(self, length: int) -> None:
        """Tables for at least ``length`` positions (doubling: a long stream rebuilds them a few times)."""
        length = max(length, 2 * self.freqs_cos.shape[0])
        cos, sin = self._tables(length)
        # The old tables stay allocated: a CUDA graph captured before (GraphedTransformer) replays reads of them.
        self._retired = getattr(self, "_retired", []) + [self.freqs_cos, self.freqs_sin]
        self.freqs_cos = cos.to(self.freqs_cos.device, self.freqs_cos.dtype)
        self.freqs_sin = sin.to(self.freqs_sin.device, self.freqs_sin.dtype)

    def forward(self, frames: int, height: int, width: int, frame_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [1, N, 1, d] for post-patch sizes; frames start at ``frame_offset``."""
        needed = max(frame_offset + frames, height, width)
        if needed > self.freqs_cos.shape[0]:
            self._grow(needed)
        split = [self.t_dim, self.h_dim, self.w_dim]
        out = []
        for table in (self.freqs_cos, self.freqs_sin):
            t, h, w = table.split(split, dim=1)
            t = t[frame_offset : frame_offset + frames].view(frames, 1, 1, -1).expand(frames, height, width, -1)
            h = h[:height].view(1, height, 1, -1).expand(frames, height, width, -1)
            w = w[:width].view(1, 1, width, -1).expand(frames, height, width, -1)
            out.append(torch.cat([t, h, w], dim=-1).reshape(1, frames * height * width, 1, -1))
        return out[0], out[1]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` [B, N, heads, d]; computed in the tables' dtype (fp32 unless the model was
    cast, as diffusers does; the fast path keeps them fp32), returned in x's dtype."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Linear attention: the plain PyTorch reference every kernel is pinned to.


def linear_attention_sums(k: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's contribution: S = sum_j v_j k_rot_j^T [B, heads, d, d] and z = sum_j k_j [B, heads, d], fp32."""
    S = torch.einsum("bnhc,bnhe->bhce", v.float(), k_rot.float())
    z = k.float().sum(dim=1)
    return S, z


def linear_attention_apply(q: torch.Tensor, q_rot: torch.Tensor, S: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """out_i = (S q_rot_i) / (z . q_i + eps): [B, N, heads, d] fp32."""
    num = torch.einsum("bhce,bnhe->bnhc", S, q_rot.float())
    den = torch.einsum("bhe,bnhe->bnh", z, q.float()) + LINEAR_ATTENTION_EPS
    return num / den.unsqueeze(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Layers


class SelfAttention(nn.Module):
    """ReLU linear self-attention with q/k RMSNorm across heads and 3D RoPE on the numerator."""

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool, qk_norm: str | None):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(dim, inner, bias=bias)
        self.to_v = nn.Linear(dim, inner, bias=bias)
        self.norm_q = RMSNorm(inner, eps=1e-5) if qk_norm else None
        self.norm_k = RMSNorm(inner, eps=1e-5) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=True), nn.Dropout(0.0)])

    def forward(self, x, rope, layer: int, state=None, commit: bool = False, block_tokens=None) -> torch.Tensor:
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = (t.unflatten(2, (self.heads, -1)) for t in (q, k, v))
        q, k = F.relu(q), F.relu(k)
        q_rot, k_rot = apply_rotary(q, *rope), apply_rotary(k, *rope)

        if block_tokens is not None:
            # Block-causal over the whole sequence in one pass: block b sees blocks <= b.
            outs, S_acc, z_acc = [], 0, 0
            for sl in block_tokens:
                S, z = linear_attention_sums(k[:, sl], k_rot[:, sl], v[:, sl])
                S_acc, z_acc = S_acc + S, z_acc + z
                outs.append(linear_attention_apply(q[:, sl], q_rot[:, sl], S_acc, z_acc))
            out = torch.cat(outs, dim=1)
        else:
            S, z = linear_attention_sums(k, k_rot, v)
            S_tot, z_tot = S, z
            if state is not None:
                S_prev, z_prev = state.attention_sums(layer)
                if S_prev is not None:
                    S_tot, z_tot = S + S_prev, z + z_prev
            out = linear_attention_apply(q, q_rot, S_tot, z_tot)
            if commit:
                self._pending = (S, z)
        out = out.flatten(2).to(x.dtype)
        return self.to_out[1](self.to_out[0](out))


class CrossAttention(nn.Module):
    """Softmax attention from video tokens to the text, with a padding bias [B, 1, L]."""

    def __init__(self, dim: int, cross_dim: int, heads: int, head_dim: int, qk_norm: str | None, out_bias: bool = True):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=True)
        self.to_k = nn.Linear(cross_dim, inner, bias=True)
        self.to_v = nn.Linear(cross_dim, inner, bias=True)
        self.norm_q = RMSNorm(inner, eps=1e-5) if qk_norm else None
        self.norm_k = RMSNorm(inner, eps=1e-5) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=out_bias), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        B = x.shape[0]
        q, k, v = (t.view(B, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
        mask = None if bias is None else bias[:, None].to(q.dtype)  # [B, 1, 1, L]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).flatten(2).type_as(q)
        return self.to_out[1](self.to_out[0](out))


class GLUMBTempConv(nn.Module):
    """Mix-FFN: 1x1 conv to 2x hidden, SiLU, depthwise 3x3, GLU gate, 1x1 conv back, then a temporal (3,1) conv
    with residual. In block-causal mode the temporal conv takes one frame of left context from the state."""

    def __init__(self, dim: int, expand_ratio: float):
        super().__init__()
        hidden = int(expand_ratio * dim)
        self.conv_inverted = nn.Conv2d(dim, hidden * 2, 1, 1, 0)
        self.conv_depth = nn.Conv2d(hidden * 2, hidden * 2, 3, 1, 1, groups=hidden * 2)
        self.conv_point = nn.Conv2d(hidden, dim, 1, 1, 0, bias=False)
        self.conv_temp = nn.Conv2d(dim, dim, kernel_size=(3, 1), stride=1, padding=(1, 0), bias=False)

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """[B, F, H, W, C] -> [B, C, F, H*W] (the temporal conv's input)."""
        B, Fr, H, W, C = x.shape
        if isinstance(self.conv_inverted, nn.Linear):
            # Pointwise convs as GEMMs on channels-last tokens (see pointwise_convs_to_linear).
            h = F.silu(self.conv_inverted(x.reshape(B * Fr, H, W, C))).permute(0, 3, 1, 2)
            h, gate = self.conv_depth(h).chunk(2, dim=1)
            h = self.conv_point((h * F.silu(gate)).permute(0, 2, 3, 1))
            return h.view(B, Fr, H * W, C).permute(0, 3, 1, 2)
        h = x.reshape(B * Fr, H, W, C).permute(0, 3, 1, 2)
        h = F.silu(self.conv_inverted(h))
        h, gate = self.conv_depth(h).chunk(2, dim=1)
        h = self.conv_point(h * F.silu(gate))
        return h.view(B, Fr, C, H * W).permute(0, 2, 1, 3)

    def temporal(self, t: torch.Tensor, left: torch.Tensor | None) -> torch.Tensor:
        """t [B, C, F, HW] -> t + conv_temp(t); ``left`` [B, C, 1, HW] replaces the zero padding before frame 0."""
        if left is None:
            return t + self.conv_temp(t)
        return t + self.conv_temp(torch.cat([left.to(t.dtype), t], dim=2))[:, :, 1:]

    def forward(self, x, layer: int, state=None, commit: bool = False, block_frames=None) -> torch.Tensor:
        B, Fr, H, W, C = x.shape
        t = self.spatial(x)
        if block_frames is not None:
            outs, start, left = [], 0, None
            for n in block_frames:
                blk = t[:, :, start : start + n]
                outs.append(self.temporal(blk, left))
                left, start = blk[:, :, -1:], start + n
            out = torch.cat(outs, dim=2)
        else:
            left = state.conv_context(layer) if state is not None else None
            out = self.temporal(t, left)
            if commit:
                self._pending = t[:, :, -1:]
        return out.permute(0, 2, 3, 1).reshape(B, Fr, H, W, C)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=cfg.norm_eps)
        self.attn1 = SelfAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.attention_bias, cfg.qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=cfg.norm_elementwise_affine, eps=cfg.norm_eps)
        self.attn2 = CrossAttention(
            dim, cfg.cross_attention_dim, cfg.num_cross_attention_heads, cfg.cross_attention_head_dim, cfg.qk_norm
        )
        self.ff = GLUMBTempConv(dim, cfg.mlp_ratio)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x, context, context_bias, temb, rope, grid, layer, state=None, commit=False, block_frames=None):
        B = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None, None] + temb.reshape(B, temb.shape[1], 6, -1)
        ).unbind(dim=2)
        frames, height, width = grid
        block_tokens = None
        if block_frames is not None:
            per_frame, start, block_tokens = height * width, 0, []
            for n in block_frames:
                block_tokens.append(slice(start * per_frame, (start + n) * per_frame))
                start += n

        h = (self.norm1(x) * (1 + scale_msa) + shift_msa).to(x.dtype)
        x = x + gate_msa * self.attn1(h, rope, layer, state, commit, block_tokens)
        x = x + self.attn2(x, context, context_bias)
        h = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        h = self.ff(h.unflatten(1, (frames, height, width)), layer, state, commit, block_frames)
        x = x + gate_mlp * h.flatten(1, 3)

        if commit:
            S, z = self.attn1._pending
            state.commit_layer(layer, S, z, self.ff._pending)
            del self.attn1._pending, self.ff._pending
        return x


class ModulatedNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        shift, scale = (table[None, None] + temb[:, :, None].to(table.device)).unbind(dim=2)
        return self.norm(x) * (1 + scale) + shift


# ---------------------------------------------------------------------------------------------------------------------
# The model


class SanaVideoTransformer(nn.Module):
    """The Linear DiT. ``forward`` takes what diffusers' forward takes and returns the velocity [B, C, F, H, W]."""

    def __init__(self, config: TransformerConfig, causal: bool = False):
        super().__init__()
        self.config = config
        self.causal = causal
        cfg, dim = config, config.inner_dim
        out_channels = cfg.out_channels or cfg.in_channels
        self.rope = RotaryPosEmbed(cfg.attention_head_dim, cfg.patch_size, cfg.rope_max_seq_len)
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        if cfg.guidance_embeds:
            self.time_embed = SanaCombinedTimestepGuidanceEmbeddings(dim)
        else:
            self.time_embed = AdaLayerNormSingle(dim)
        self.caption_projection = PixArtAlphaTextProjection(in_features=cfg.caption_channels, hidden_size=dim)
        self.caption_norm = RMSNorm(dim, eps=1e-5, elementwise_affine=True)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.num_layers)])
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.norm_out = ModulatedNorm(dim, eps=1e-6)
        self.proj_out = nn.Linear(dim, math.prod(cfg.patch_size) * out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj_out.weight.device

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        *,
        state=None,
        commit: bool = False,
        block_frames: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Velocity for latents ``hidden_states`` [B, C, F, H, W] given text [B, L, caption_channels], timesteps [B]
        and a text mask [B, L] (1 keep, 0 pad).

        Block-causal use: ``state`` (a BlockState for this stream) makes the block attend to every committed block
        and places it at absolute frame ``state.frames``; ``commit=True`` adds this block to the state (the clean
        block at t=0). ``block_frames`` instead runs a whole sequence block-causally in one pass (latent frames per
        block, summing to F); it equals committing the blocks one by one.
        """
        if commit and state is None:
            raise ValueError("commit=True needs a state")
        if state is not None and block_frames is not None:
            raise ValueError("pass either state or block_frames, not both")
        B, _, Fr, H, W = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        grid = (Fr // p_t, H // p_h, W // p_w)
        if block_frames is not None and sum(block_frames) != grid[0]:
            raise ValueError(f"block_frames {list(block_frames)} must sum to {grid[0]} latent frames")

        bias = None
        if encoder_attention_mask is not None and encoder_attention_mask.ndim == 2:
            bias = ((1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0).unsqueeze(1)

        frame_offset = state.frames if state is not None else 0
        rope = self.rope(*grid, frame_offset=frame_offset)

        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2)
        if guidance is not None:
            temb, embedded = self.time_embed(timestep.flatten(), guidance=guidance, hidden_dtype=x.dtype)
        else:
            temb, embedded = self.time_embed(timestep.flatten(), batch_size=B, hidden_dtype=x.dtype)
        temb = temb.view(B, -1, temb.size(-1))
        embedded = embedded.view(B, -1, embedded.size(-1))

        context = self.caption_projection(encoder_hidden_states).view(B, -1, x.shape[-1])
        context = self.caption_norm(context)

        for layer, block in enumerate(self.transformer_blocks):
            x = block(x, context, bias, temb, rope, grid, layer, state, commit, block_frames)

        x = self.proj_out(self.norm_out(x, embedded, self.scale_shift_table))
        x = x.reshape(B, *grid, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        if commit:
            state.advance(grid[0])
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def pointwise_convs_to_linear(model: nn.Module) -> nn.Module:
    """Replace the Mix-FFN's 1x1 convs (conv_inverted, conv_point) by numerically equivalent nn.Linear layers, in place.

    Linear layers are what GEMM kernels, FP8 matmuls, ModelOpt's NVFP4 recipes and TensorRT's FP4 cover; a 1x1
    Conv2d is left out by all of them. Weights [out, in, 1, 1] become [out, in] (so the state dict's shapes change:
    save such a model with its own format, or convert after loading a diffusers checkpoint).
    """
    for module in model.modules():
        if not isinstance(module, GLUMBTempConv):
            continue
        for name in ("conv_inverted", "conv_point"):
            conv = getattr(module, name)
            if isinstance(conv, nn.Linear):
                continue
            linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None,
                               device=conv.weight.device, dtype=conv.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(conv.weight.flatten(1))
                if conv.bias is not None:
                    linear.bias.copy_(conv.bias)
            setattr(module, name, linear)
    return model
