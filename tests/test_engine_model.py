"""Our transformer equals diffusers' SanaVideoTransformer3DModel on the same weights (fp32, CPU)."""

import dataclasses

import pytest
import torch
from diffusers import SanaVideoTransformer3DModel

from engine.model import SanaVideoTransformer, linear_attention_apply, linear_attention_sums
from engine.presets import TINY_TRANSFORMER, TransformerConfig


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def pair(config: TransformerConfig, seed: int = 0):
    torch.manual_seed(seed)
    reference = SanaVideoTransformer3DModel(**config.to_dict()).eval()
    ours = SanaVideoTransformer(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


CONFIGS = {
    "tiny": TINY_TRANSFORMER,
    "wider-heads": dataclasses.replace(
        TINY_TRANSFORMER, num_attention_heads=3, attention_head_dim=36, num_cross_attention_heads=3,
        cross_attention_head_dim=36, cross_attention_dim=108, num_layers=3, caption_channels=40,
    ),
    "guidance-embeds": dataclasses.replace(TINY_TRANSFORMER, guidance_embeds=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("shape", [(1, 4, 6), (5, 8, 12), (3, 10, 4)])
def test_equals_diffusers(name, shape):
    config = CONFIGS[name]
    reference, ours = pair(config)
    frames, height, width = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, frames, height, width, generator=g)
    text = torch.randn(2, 9, config.caption_channels, generator=g)
    t = torch.tensor([999.0, 37.5])
    mask = torch.ones(2, 9)
    mask[1, 5:] = 0  # padded caption in the second sample
    kwargs = {}
    if config.guidance_embeds:
        kwargs["guidance"] = torch.tensor([4.5, 1.0])
    with torch.no_grad():
        expected = reference(x, text, t, encoder_attention_mask=mask, return_dict=False, **kwargs)[0]
        got = ours(x, text, t, mask, **kwargs)
    assert got.shape == x.shape
    assert rel_err(got, expected) <= 1e-5


def test_padding_mask_matters():
    """The mask must really reach the cross-attention (a test that ignored it could not tell)."""
    _, ours = pair(TINY_TRANSFORMER)
    x, text, t = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 6, 32), torch.tensor([500.0])
    full, half = torch.ones(1, 6), torch.ones(1, 6)
    half[0, 3:] = 0
    with torch.no_grad():
        assert rel_err(ours(x, text, t, full), ours(x, text, t, half)) > 1e-3


def test_linear_attention_matches_quadratic_formula():
    """out_i = sum_j (q_rot_i . k_rot_j) v_j / sum_j (q_i . k_j): the O(N d^2) path equals the O(N^2) definition."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.rand(2, 30, 3, 8, generator=g) for _ in range(3))
    q_rot, k_rot = torch.randn(2, 30, 3, 8, generator=g), torch.randn(2, 30, 3, 8, generator=g)
    S, z = linear_attention_sums(k, k_rot, v)
    fast = linear_attention_apply(q, q_rot, S, z)
    scores = torch.einsum("bihd,bjhd->bhij", q_rot, k_rot)
    norm = torch.einsum("bihd,bjhd->bhij", q, k).sum(-1)
    slow = torch.einsum("bhij,bjhd->bihd", scores, v) / (norm.transpose(1, 2).unsqueeze(-1) + 1e-15)
    assert rel_err(fast, slow) <= 1e-5


def test_bf16_close_to_fp32():
    _, ours = pair(TINY_TRANSFORMER)
    x, text, t = torch.randn(2, 16, 3, 8, 8), torch.randn(2, 5, 32), torch.tensor([700.0, 300.0])
    with torch.no_grad():
        ref = ours(x, text, t)
        low = ours.to(torch.bfloat16)(x.bfloat16(), text.bfloat16(), t).float()
    assert rel_err(low, ref) < 0.05
