"""Constant-memory block state of the block-causal (LongLive) model.

Per transformer layer the state holds the running linear-attention sums of every committed block,
``S = sum_j v_j (RoPE k_j)^T`` ([B, heads, d, d], fp32) and ``z = sum_j k_j`` ([B, heads, d], fp32), plus the
last frame of the temporal conv's input ([B, C, 1, H*W]: kernel 3 needs one frame of left context).
All of it is allocated up front, so the state's size never depends on how many blocks came before.
``ReferenceBlockState`` keeps the per-block contributions in lists and re-sums them (as the reference
implementations do): it exists to pin ``BlockState`` against.
"""

from __future__ import annotations

import torch


class BlockState:
    """Running sums for one stream (batch ``B``: 2 with classifier-free guidance)."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        heads: int,
        head_dim: int,
        channels: int,
        tokens_per_frame: int,
        device: torch.device | str = "cpu",
        conv_dtype: torch.dtype = torch.float32,
    ):
        self.num_layers = num_layers
        self.tokens_per_frame = tokens_per_frame
        self.S = torch.zeros(num_layers, batch, heads, head_dim, head_dim, device=device, dtype=torch.float32)
        self.z = torch.zeros(num_layers, batch, heads, head_dim, device=device, dtype=torch.float32)
        # Zeros equal the conv's own zero padding, so "no block committed yet" needs no special case.
        self.conv = torch.zeros(num_layers, batch, channels, 1, tokens_per_frame, device=device, dtype=conv_dtype)
        self.frames = 0  # latent frames committed so far: the next block's absolute RoPE start frame
        self.blocks = 0

    @classmethod
    def for_model(cls, model, batch: int, latent_height: int, latent_width: int, device=None, dtype=None) -> "BlockState":
        """A state sized for ``model`` at one latent resolution (``latent_height`` x ``latent_width``)."""
        cfg = model.config
        _, p_h, p_w = cfg.patch_size
        param = next(model.parameters())
        return cls(
            num_layers=cfg.num_layers,
            batch=batch,
            heads=cfg.num_attention_heads,
            head_dim=cfg.attention_head_dim,
            channels=cfg.inner_dim,
            tokens_per_frame=(latent_height // p_h) * (latent_width // p_w),
            device=device or param.device,
            conv_dtype=dtype or param.dtype,
        )

    def attention_sums(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.S[layer], self.z[layer]

    def conv_context(self, layer: int) -> torch.Tensor:
        return self.conv[layer]

    def commit_layer(self, layer: int, S: torch.Tensor, z: torch.Tensor, conv_last: torch.Tensor) -> None:
        """Add one block's contribution of ``layer`` (in place: no allocation, whatever the length)."""
        self.S[layer].add_(S)
        self.z[layer].add_(z)
        self.conv[layer].copy_(conv_last)

    def advance(self, frames: int) -> None:
        self.frames += frames
        self.blocks += 1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.S, self.z, self.conv))

    def reset(self) -> None:
        self.S.zero_()
        self.z.zero_()
        self.conv.zero_()
        self.frames = 0
        self.blocks = 0


class ReferenceBlockState:
    """The reference formulation: per-block contributions kept in lists and re-summed for every block."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.S_blocks: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.z_blocks: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self.conv_last: list[torch.Tensor | None] = [None] * num_layers
        self.frames = 0
        self.blocks = 0

    def attention_sums(self, layer: int):
        if not self.S_blocks[layer]:
            return None, None
        return torch.stack(self.S_blocks[layer]).sum(0), torch.stack(self.z_blocks[layer]).sum(0)

    def conv_context(self, layer: int):
        return self.conv_last[layer]

    def commit_layer(self, layer: int, S: torch.Tensor, z: torch.Tensor, conv_last: torch.Tensor) -> None:
        self.S_blocks[layer].append(S.clone())
        self.z_blocks[layer].append(z.clone())
        self.conv_last[layer] = conv_last.clone()

    def advance(self, frames: int) -> None:
        self.frames += frames
        self.blocks += 1

    def nbytes(self) -> int:
        tensors = [t for layer in self.S_blocks for t in layer] + [t for layer in self.z_blocks for t in layer]
        tensors += [t for t in self.conv_last if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)
