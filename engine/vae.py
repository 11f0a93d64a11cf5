"""Wan VAE decoding, block by block.

diffusers' ``AutoencoderKLWan`` is causal in time: it decodes one latent frame at a time with a feature cache. Keeping
that cache between blocks makes block-wise decoding equal whole-clip decoding, so each block of a stream can be
decoded (and sent) as soon as it is committed. The cache lives in the ``StreamingDecoder``, not in the VAE, so one
VAE serves many streams.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKLWan


def build_vae(config: dict, seed: int) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(**config).eval()


def latent_stats(vae, channels: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) [1, C, 1, 1, 1] of the latent space (the transformer works on (z - mean) / std)."""
    cfg = vae.config
    mean = getattr(cfg, "latents_mean", None)
    std = getattr(cfg, "latents_std", None)
    if mean is None or std is None or len(mean) != channels:
        mean, std = [0.0] * channels, [1.0] * channels
    shape = (1, channels, 1, 1, 1)
    return (
        torch.tensor(mean, device=device, dtype=dtype).view(shape),
        torch.tensor(std, device=device, dtype=dtype).view(shape),
    )


class StreamingDecoder:
    """Decodes consecutive latent blocks of one video; the Wan feature cache is kept between calls.

    ``decode_block(latents [B, C, f, h, w])`` (normalized latents, as the transformer produces them) returns pixels
    [B, 3, F, 8h, 8w] in [-1, 1]: F = 1 + 4(f-1) for the first block, 4f afterwards.
    """

    def __init__(self, vae: AutoencoderKLWan):
        self.vae = vae
        self.cache = [None] * vae._cached_conv_counts["decoder"]
        self.latent_frames = 0
        c = vae.config.z_dim
        param = next(vae.parameters())
        self.mean, self.std = latent_stats(vae, c, param.device, param.dtype)

    @torch.no_grad()
    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        z = latents.to(self.mean.dtype) * self.std + self.mean
        x = vae.post_quant_conv(z)
        outs = []
        for i in range(x.shape[2]):
            idx = [0]
            first = self.latent_frames == 0
            outs.append(vae.decoder(x[:, :, i : i + 1], feat_cache=self.cache, feat_idx=idx, first_chunk=first))
            self.latent_frames += 1
        out = torch.cat(outs, dim=2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1.0, 1.0)

    def close(self) -> None:
        self.cache = None


@torch.no_grad()
def decode_whole(vae, latents: torch.Tensor) -> torch.Tensor:
    """Reference: diffusers' own whole-clip decode of normalized latents, [B, 3, F, H, W] in [-1, 1]."""
    param = next(vae.parameters())
    mean, std = latent_stats(vae, latents.shape[1], param.device, param.dtype)
    return vae.decode(latents.to(param.dtype) * std + mean, return_dict=False)[0]


@torch.no_grad()
def encode_video(vae, video: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
    """Pixels [B, 3, F, H, W] in [-1, 1] -> normalized latents [B, C, f, h, w] (used by training and tests)."""
    param = next(vae.parameters())
    dist = vae.encode(video.to(param.dtype)).latent_dist
    z = dist.sample(generator) if sample else dist.mode()
    mean, std = latent_stats(vae, z.shape[1], param.device, param.dtype)
    return (z - mean) / std


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """[B=1, 3, F, H, W] in [-1, 1] -> uint8 numpy [F, H, W, 3]."""
    x = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()
