"""The constant-memory block state: block-by-block with commits equals the block-causal formulation."""

import pytest
import torch

from engine.model import SanaVideoTransformer, apply_rotary
from engine.presets import TINY_TRANSFORMER
from engine.state import BlockState, ReferenceBlockState


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return SanaVideoTransformer(TINY_TRANSFORMER, causal=True).eval()


def inputs(frames, batch=2, h=8, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, h, w, generator=g)
    text = torch.randn(batch, 7, 32, generator=g)
    mask = torch.ones(batch, 7)
    mask[-1, 4:] = 0
    return x, text, torch.full((batch,), 400.0), mask


def run_blocks(model, state, x, text, t, mask, blocks):
    outs, start = [], 0
    for n in blocks:
        outs.append(model(x[:, :, start : start + n], text, t, mask, state=state, commit=True))
        start += n
    return torch.cat(outs, dim=2)


@torch.no_grad()
@pytest.mark.parametrize("blocks", [[3, 2, 2], [1, 1, 1, 1], [4, 3]])
def test_block_by_block_equals_block_causal_pass(model, blocks):
    x, text, t, mask = inputs(sum(blocks))
    one_pass = model(x, text, t, mask, block_frames=blocks)
    state = BlockState.for_model(model, batch=2, latent_height=8, latent_width=12)
    stepped = run_blocks(model, state, x, text, t, mask, blocks)
    assert rel_err(stepped, one_pass) <= 1e-5
    assert state.frames == sum(blocks) and state.blocks == len(blocks)


@torch.no_grad()
def test_block_causal_is_causal_and_differs_from_bidirectional(model):
    x, text, t, mask = inputs(6)
    causal = model(x, text, t, mask, block_frames=[3, 3])
    x2 = x.clone()
    x2[:, :, 3:] = torch.randn_like(x2[:, :, 3:])  # change the future block only
    causal2 = model(x2, text, t, mask, block_frames=[3, 3])
    assert torch.allclose(causal[:, :, :3], causal2[:, :, :3], atol=1e-6, rtol=0)  # past unaffected
    assert rel_err(causal[:, :, 3:], causal2[:, :, 3:]) > 1e-2
    bidirectional = model(x, text, t, mask)
    assert rel_err(causal, bidirectional) > 1e-3


@torch.no_grad()
def test_block_causal_pass_matches_masked_quadratic_attention(model):
    """Independent reference for the attention: an explicit N x N block-causal mask."""
    blocks = [2, 3]
    attn = model.transformer_blocks[0].attn1
    g = torch.Generator().manual_seed(5)
    h = torch.randn(1, sum(blocks) * 4 * 6, 48, generator=g)
    rope = model.rope(sum(blocks), 4, 6)
    tokens_per_frame = 24
    slices = [slice(0, 2 * tokens_per_frame), slice(2 * tokens_per_frame, 5 * tokens_per_frame)]
    got = attn(h, rope, 0, block_tokens=slices)

    q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
    q, k = attn.norm_q(q), attn.norm_k(k)
    q, k, v = (a.unflatten(2, (2, -1)) for a in (q, k, v))
    q, k = q.relu(), k.relu()
    qr, kr = apply_rotary(q, *rope), apply_rotary(k, *rope)
    block_id = torch.tensor([0] * 48 + [1] * 72)
    allowed = (block_id[None, :] <= block_id[:, None]).float()  # query i sees key j if block(j) <= block(i)
    num = torch.einsum("bihd,bjhd->bhij", qr, kr) * allowed
    den = (torch.einsum("bihd,bjhd->bhij", q, k) * allowed).sum(-1)
    out = torch.einsum("bhij,bjhd->bihd", num, v) / (den.transpose(1, 2).unsqueeze(-1) + 1e-15)
    expected = attn.to_out[0](out.flatten(2))
    assert rel_err(got, expected) <= 1e-5


@torch.no_grad()
def test_temporal_conv_uses_left_context_only(model):
    ff = model.transformer_blocks[0].ff
    t = torch.randn(1, 48, 5, 10)
    blocks = [2, 3]
    # Explicit taps: out[f] = x[f] + W0 x[f-1] + W1 x[f] + W2 x[f+1], x[f+1] dropped at a block's last frame.
    w = ff.conv_temp.weight[:, :, :, 0]  # [C_out, C_in, 3]
    expected = t.clone()
    ends = {blocks[0] - 1, sum(blocks) - 1}  # each block's last frame
    for f in range(5):
        acc = torch.einsum("oi,bin->bon", w[:, :, 1], t[:, :, f])
        if f > 0:
            acc += torch.einsum("oi,bin->bon", w[:, :, 0], t[:, :, f - 1])
        if f + 1 < 5 and f not in ends:
            acc += torch.einsum("oi,bin->bon", w[:, :, 2], t[:, :, f + 1])
        expected[:, :, f] += acc
    first = ff.temporal(t[:, :, :blocks[0]], None)
    second = ff.temporal(t[:, :, blocks[0]:], t[:, :, blocks[0] - 1:blocks[0]])
    assert rel_err(torch.cat([first, second], 2), expected) <= 1e-5


@torch.no_grad()
def test_state_bytes_constant_after_1_and_200_blocks(model):
    x, text, t, mask = inputs(1, batch=1, h=4, w=4)
    state = BlockState.for_model(model, batch=1, latent_height=4, latent_width=4)
    model(x, text, t, mask, state=state, commit=True)
    after_one = state.nbytes()
    for _ in range(199):
        model(x, text, t, mask, state=state, commit=True)
    assert state.blocks == 200 and state.frames == 200
    assert state.nbytes() == after_one
    # The list-keeping reference grows with every block.
    ref = ReferenceBlockState(model.config.num_layers)
    for _ in range(3):
        model(x, text, t, mask, state=ref, commit=True)
    grown = ref.nbytes()
    model(x, text, t, mask, state=ref, commit=True)
    assert ref.nbytes() > grown


@torch.no_grad()
def test_running_sum_equals_reference_resumming(model):
    x, text, t, mask = inputs(8)
    blocks = [2, 2, 2, 2]
    state = BlockState.for_model(model, batch=2, latent_height=8, latent_width=12)
    ref = ReferenceBlockState(model.config.num_layers)
    ours = run_blocks(model, state, x, text, t, mask, blocks)
    theirs = run_blocks(model, ref, x, text, t, mask, blocks)
    assert rel_err(ours, theirs) <= 1e-5
    # A denoising (non-commit) forward must leave the state untouched.
    before = state.S.clone()
    model(x[:, :, :2], text, t, mask, state=state)
    assert torch.equal(before, state.S) and state.frames == 8


@torch.no_grad()
def test_rope_uses_absolute_frame_positions(model):
    cos0, _ = model.rope(2, 2, 2, frame_offset=0)
    cos5, _ = model.rope(2, 2, 2, frame_offset=5)
    full, _ = model.rope(7, 2, 2)
    assert torch.equal(cos5, full[:, 5 * 4 :])
    assert not torch.equal(cos0, cos5)


@torch.no_grad()
def test_a_stream_runs_past_the_rope_table_as_with_a_longer_table(model):
    """Checkpoints set rope_max_seq_len (1024 latent frames, about 4,100 video frames); a longer stream grows the
    tables, and its blocks are the same as from a model whose tables were that long from the start."""
    import dataclasses

    short = SanaVideoTransformer(dataclasses.replace(TINY_TRANSFORMER, rope_max_seq_len=6), causal=True).eval()
    short.load_state_dict(model.state_dict())
    assert short.rope.freqs_cos.shape[0] == 6 < model.rope.freqs_cos.shape[0]
    x, text, t, mask = inputs(9)
    blocks = [3, 3, 3]
    expected = run_blocks(model, BlockState.for_model(model, batch=2, latent_height=8, latent_width=12),
                          x, text, t, mask, blocks)
    got = run_blocks(short, BlockState.for_model(short, batch=2, latent_height=8, latent_width=12),
                     x, text, t, mask, blocks)
    assert short.rope.freqs_cos.shape[0] >= 9
    assert torch.equal(got, expected)
    long_cos, long_sin = model.rope(9, 8, 12)
    grown_cos, grown_sin = short.rope(9, 8, 12)
    assert torch.equal(grown_cos, long_cos) and torch.equal(grown_sin, long_sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grown_rope_tables_equal_longer_ones_on_every_axis(dtype):
    from engine.model import RotaryPosEmbed

    short, long = RotaryPosEmbed(24, (1, 2, 2), 4).to(dtype), RotaryPosEmbed(24, (1, 2, 2), 64).to(dtype)
    for frames, height, width, offset in ((3, 2, 2, 3), (2, 9, 3, 0), (2, 3, 17, 40)):  # past t, then h, then w
        got = short(frames, height, width, frame_offset=offset)
        expected = long(frames, height, width, frame_offset=offset)
        assert got[0].dtype == dtype and torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert short.freqs_cos.shape[0] >= 42 and short.freqs_cos.dtype == dtype


def test_commit_requires_state(model):
    x, text, t, mask = inputs(1)
    with pytest.raises(ValueError, match="commit=True needs a state"):
        model(x, text, t, mask, commit=True)
