"""Wan VAE decoding, block by block.

diffusers' ``AutoencoderKLWan`` is causal in time: it decodes one latent frame at a time with a feature cache. Keeping
that cache between blocks makes block-wise decoding equal whole-clip decoding, so each block of a stream can be
decoded (and sent) as soon as it is committed. The cache lives in the ``StreamingDecoder``, not in the VAE, so one
VAE serves many streams.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
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

    ``fast``: decode with ``FastWanDecoder`` (same weights and cache, fused memory passes; compiled on CUDA) instead
    of diffusers' modules, which stay the reference.
    """

    def __init__(self, vae: AutoencoderKLWan, fast: bool = False):
        self.vae = vae
        self.cache = [None] * vae._cached_conv_counts["decoder"]
        self.latent_frames = 0
        c = vae.config.z_dim
        param = next(vae.parameters())
        self.mean, self.std = latent_stats(vae, c, param.device, param.dtype)
        self.decoder = FastWanDecoder.of(vae) if fast else vae.decoder

    @torch.no_grad()
    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        z = latents.to(self.mean.dtype) * self.std + self.mean
        x = vae.post_quant_conv(z)
        outs = []
        for i in range(x.shape[2]):
            idx = [0]
            first = self.latent_frames == 0
            outs.append(self.decoder(x[:, :, i : i + 1], feat_cache=self.cache, feat_idx=idx, first_chunk=first))
            self.latent_frames += 1
        out = torch.cat(outs, dim=2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1.0, 1.0)

    def close(self) -> None:
        self.cache = None


def _norm_act(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """WanRMS_norm (no bias) then SiLU, over channels-last [B, T, H, W, C]: one read, one write."""
    n = F.normalize(x.float(), dim=-1) * (scale * gamma.float())
    return F.silu(n).to(x.dtype)


def _conv_input(x, gamma, scale: float, prev, padding: int):
    """The input of a cached causal conv with ``padding`` causal frames, channels-last [B, T, H, W, C]: the cached
    frames ``prev`` after as many zero frames as they fall short, then ``x`` (normalized and activated first when
    ``gamma`` is given); and the next cache, the last two frames of ``prev`` + ``x``. One pass where diffusers makes
    five (norm in fp32, scale, SiLU, cat, pad)."""
    if gamma is not None:
        x = _norm_act(x, gamma, scale)
    seq = x if prev is None else torch.cat([prev, x], 1)
    keep = seq[:, -2:].clone()
    zeros = padding - (0 if prev is None else prev.shape[1])
    if zeros > 0:
        seq = torch.cat([seq.new_zeros((seq.shape[0], zeros, *seq.shape[2:])), seq], 1)
    return seq, keep


def _upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling of channels-last frames [N, H, W, C] -> [N, 2H, 2W, C] as one broadcast copy:
    the values of ``F.interpolate(..., scale_factor=2, mode="nearest-exact")``, whose channels-last kernel moved
    about 0.5 TB/s in the decoder's profile (benchmarks/results/long-stream-2026-11-27)."""
    n, h, w, c = x.shape
    return x[:, :, None, :, None, :].expand(n, h, 2, w, 2, c).reshape(n, 2 * h, 2 * w, c)


class FastWanDecoder(torch.nn.Module):
    """``WanDecoder3d.forward`` (Wan 2.1 layout) restructured for speed; same weights, same ``feat_cache`` list.

    - Activations stay channels-last (NDHWC), cuDNN's native layout for bf16 convolutions.
    - Each cached causal conv gets its input from one fused pass: RMS norm + SiLU + the cached frames + the causal
      zero frames (``_conv_input``, compiled on CUDA); the spatial padding happens inside the convolution.
    - Nearest-neighbour upsampling is one broadcast copy (compiled on CUDA) in the activations' dtype (diffusers goes
      through fp32 and ``F.interpolate``: the same values).

    The diffusers decoder stays the reference (``StreamingDecoder(vae, fast=False)``); tests pin the two together.
    """

    def __init__(self, decoder, compile: bool | None = None):
        super().__init__()
        self.d = decoder
        if compile is None:
            compile = next(decoder.parameters()).is_cuda
        self.conv_input = torch.compile(_conv_input, dynamic=False) if compile else _conv_input
        self.upsample2x = torch.compile(_upsample2x, dynamic=False) if compile else _upsample2x
        if compile:
            from torch import _dynamo

            # One graph per signature: about 18 per resolution (6 stage shapes x first, second, later chunk).
            _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 128)
        self.to_channels_last()

    @staticmethod
    def supports(vae) -> bool:
        """Whether ``vae`` has the decoder layout this class runs (Wan 2.1; not Wan 2.2's residual up-blocks)."""
        return isinstance(vae, AutoencoderKLWan) and not getattr(vae.config, "is_residual", False)

    @classmethod
    def of(cls, vae) -> "FastWanDecoder":
        """The VAE's fast decoder, made once and kept on it (made again if the VAE moved to another device or
        dtype, or its weights were replaced since)."""
        if not cls.supports(vae):
            raise ValueError("FastWanDecoder supports the Wan 2.1 VAE layout (AutoencoderKLWan, is_residual=False)")
        fast = getattr(vae, "_fast_decoder", None)
        if fast is None or not fast.current():
            fast = cls(vae.decoder)
            object.__setattr__(vae, "_fast_decoder", fast)  # not a submodule: state dicts stay diffusers'
        return fast

    def current(self) -> bool:
        """Whether the channels-last copies still match the decoder's weights (same tensors, device and dtype)."""
        return all(m.weight._version == self.versions[m] and m.weight.device == w.device and m.weight.dtype == w.dtype
                   and m.weight.data_ptr() == self.sources[m] for m, w in self.weights.items())

    def to_channels_last(self) -> None:
        """Channels-last copies of the conv weights, kept here: the VAE's own parameters stay as they are (a
        diffusers save needs them contiguous). The decoder's conv weights once more in memory (140 MiB for Wan 2.1 in
        bf16)."""
        self.weights, self.versions, self.sources = {}, {}, {}
        for m in self.d.modules():
            if isinstance(m, (torch.nn.Conv3d, torch.nn.Conv2d)):
                fmt = torch.channels_last_3d if m.weight.dim() == 5 else torch.channels_last
                self.weights[m] = m.weight.detach().clone(memory_format=fmt)
                self.versions[m], self.sources[m] = m.weight._version, m.weight.data_ptr()

    # Tensors below are channels-last views [B, T, H, W, C] unless named otherwise.

    def _conv3d(self, conv, x):
        """A WanCausalConv3d whose causal time padding is already in ``x``; spatial padding inside the conv."""
        y = F.conv3d(x.permute(0, 4, 1, 2, 3), self.weights[conv], conv.bias, conv.stride,
                     (0, conv._padding[2], conv._padding[0]))
        return y.permute(0, 2, 3, 4, 1)

    def _cached_conv(self, conv, x, cache, idx, norm=None):
        gamma, scale = (None, 1.0) if norm is None else (norm.gamma.reshape(-1), norm.scale)
        seq, cache[idx[0]] = self.conv_input(x, gamma, scale, cache[idx[0]], conv._padding[4])
        idx[0] += 1
        return self._conv3d(conv, seq)

    def _resnet(self, block, x, cache, idx):
        h = x if isinstance(block.conv_shortcut, torch.nn.Identity) else self._conv3d(block.conv_shortcut, x)
        x = self._cached_conv(block.conv1, x, cache, idx, block.norm1)
        x = self._cached_conv(block.conv2, x, cache, idx, block.norm2)
        return x + h

    def _upsample(self, rs, x, cache, idx):
        b, t, h, w, c = x.shape
        if rs.mode == "upsample3d":
            i = idx[0]
            state = cache[i]
            if state is None:
                cache[i] = "Rep"  # the first chunk is not upsampled in time
            else:
                # The cached convs' input and cache rules (run eagerly: two such convs a chunk, at the two lowest
                # resolutions). After "Rep" diffusers caches a zero frame before a one-frame chunk; keeping the one
                # frame is the same, since the next call pads the missing frame with zeros.
                seq, keep = _conv_input(x, None, 1.0, None if isinstance(state, str) else state,
                                        rs.time_conv._padding[4])
                y = self._conv3d(rs.time_conv, seq)  # [B, t, h, w, 2c]: two frames per input frame
                x = y.reshape(b, t, h, w, 2, c).permute(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
                cache[i] = keep
            idx[0] += 1
        elif rs.mode != "upsample2d":
            raise ValueError(f"FastWanDecoder: unexpected resample mode {rs.mode!r}")
        t = x.shape[1]
        x2 = self.upsample2x(x.reshape(b * t, h, w, c)).permute(0, 3, 1, 2)  # NCHW view of channels-last frames
        conv = rs.resample[1]
        x2 = F.conv2d(x2, self.weights[conv], conv.bias, 1, conv.padding)
        return x2.permute(0, 2, 3, 1).reshape(b, t, 2 * h, 2 * w, -1)

    def forward(self, x, feat_cache, feat_idx, first_chunk=False):
        d = self.d
        x = x.permute(0, 2, 3, 4, 1)  # [B, C, T, H, W] -> [B, T, H, W, C]
        x = self._cached_conv(d.conv_in, x, feat_cache, feat_idx)
        mid = d.mid_block
        x = self._resnet(mid.resnets[0], x, feat_cache, feat_idx)
        for attn, resnet in zip(mid.attentions, mid.resnets[1:]):
            x = attn(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)
            x = self._resnet(resnet, x, feat_cache, feat_idx)
        for up in d.up_blocks:
            for resnet in up.resnets:
                x = self._resnet(resnet, x, feat_cache, feat_idx)
            if up.upsamplers is not None:
                x = self._upsample(up.upsamplers[0], x, feat_cache, feat_idx)
        x = self._cached_conv(d.conv_out, x, feat_cache, feat_idx, d.norm_out)
        return x.permute(0, 4, 1, 2, 3)


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


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[B=1, 3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3] on the same device."""
    x = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0)


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """[B=1, 3, F, H, W] in [-1, 1] -> uint8 numpy [F, H, W, 3]."""
    return to_uint8(pixels).cpu().numpy()
