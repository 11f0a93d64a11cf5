"""``engine.vae.FastWanDecoder`` against diffusers' Wan decoder (the reference) on the same weights: block-by-block
decoding with the cache kept, the first chunk, the partial cache of the second and the steady state all included.
On CPU the fused passes run eagerly in fp32; the compiled bf16 path is pinned on CUDA."""

import pytest
import torch

from engine.pipeline import VideoPipeline
from engine.vae import FastWanDecoder, StreamingDecoder, _upsample2x, build_vae, decode_whole


def blockwise(vae, z, bounds, fast):
    decoder = StreamingDecoder(vae, fast=fast)
    return torch.cat([decoder.decode_block(z[:, :, s:e]) for s, e in bounds], 2)


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_fast_decoder_equals_diffusers(preset):
    vae = VideoPipeline.from_pretrained(preset, device="cpu").vae.float()
    z = torch.randn(1, vae.config.z_dim, 9, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = decode_whole(vae, z)
    bounds = ((0, 1), (1, 4), (4, 5), (5, 9))  # a one-frame first block, then the cache's partial and full states
    fast = blockwise(vae, z, bounds, fast=True)
    assert fast.shape == whole.shape == (1, 3, 33, 64, 64)
    assert torch.allclose(fast, whole, atol=2e-5, rtol=0)
    other = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    assert (blockwise(vae, other, bounds, fast=True) - whole).abs().mean() > 0.01  # the comparison can fail
    assert isinstance(StreamingDecoder(vae, fast=True).decoder, FastWanDecoder)
    assert StreamingDecoder(vae, fast=True).decoder is FastWanDecoder.of(vae)  # made once per VAE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_upsampling_copy_equals_interpolate(dtype):
    import torch.nn.functional as F

    x = torch.randn(3, 5, 7, 6, generator=torch.Generator().manual_seed(0)).to(dtype)  # [N, H, W, C]
    expected = F.interpolate(x.permute(0, 3, 1, 2), scale_factor=2.0, mode="nearest-exact").permute(0, 2, 3, 1)
    got = _upsample2x(x)
    assert got.shape == (3, 10, 14, 6) and got.is_contiguous()  # channels-last frames, as the conv reads them
    assert torch.equal(got, expected)


def test_fast_decoder_leaves_the_vae_as_it_was(tmp_path):
    vae = build_vae({"base_dim": 8, "z_dim": 16}, seed=0)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    blockwise(vae, torch.randn(1, 16, 3, 8, 8), ((0, 1), (1, 3)), fast=True)
    after = vae.state_dict()
    assert after.keys() == before.keys()  # no new keys: the fast decoder is not registered as a submodule
    assert all(torch.equal(after[k], before[k]) and after[k].is_contiguous() for k in before)
    vae.save_pretrained(tmp_path / "vae")  # safetensors refuses non-contiguous (e.g. channels-last) weights
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").is_file()


def test_fast_decoder_follows_the_vae_and_refuses_other_layouts():
    from diffusers import AutoencoderKLWan

    vae = build_vae({"base_dim": 8, "z_dim": 16}, seed=0)
    first = FastWanDecoder.of(vae)
    assert FastWanDecoder.of(vae) is first
    vae.to(torch.float64)  # moved: its channels-last copies would be stale
    again = FastWanDecoder.of(vae)
    assert again is not first and all(w.dtype == torch.float64 for w in again.weights.values())
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(2)  # changed in place
    assert FastWanDecoder.of(vae) is not again

    wan22 = AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=16, is_residual=True, in_channels=12,
                             out_channels=12, patch_size=2, scale_factor_spatial=16)
    assert FastWanDecoder.supports(vae) and not FastWanDecoder.supports(wan22)
    with pytest.raises(ValueError, match="Wan 2.1"):
        FastWanDecoder.of(wan22)


def test_a_stream_closed_early_leaves_the_pipeline_usable():
    from engine.types import GenerationParams
    import numpy as np

    pipe = VideoPipeline.from_pretrained("tiny-causal", device="cpu")
    pipe.fast_vae = True
    params = pipe.resolve(GenerationParams(prompt="a red circle moving left", frames=49, seed=3))
    gen = pipe.generate(params)
    next(gen)
    gen.close()
    full = np.concatenate([c.frames for c in pipe.generate(params)])
    assert full.shape[0] == params.frames


def test_pipeline_decodes_with_the_fast_decoder_when_asked():
    from engine.types import GenerationParams
    import numpy as np

    pipe = VideoPipeline.from_pretrained("tiny-causal", device="cpu")
    params = pipe.resolve(GenerationParams(prompt="a red circle moving left", frames=17, seed=3))
    reference = np.concatenate([c.frames for c in pipe.generate(params)])
    pipe.fast_vae = True
    got = np.concatenate([c.frames for c in pipe.generate(params)])
    assert got.shape == reference.shape
    assert np.abs(got.astype(int) - reference.astype(int)).max() <= 1
    assert hasattr(pipe.vae, "_fast_decoder")  # it ran


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled bf16 decoder")
def test_compiled_bf16_fast_decoder_matches_diffusers_on_cuda():
    vae32 = build_vae({"base_dim": 32, "z_dim": 16}, seed=0).cuda()
    vae = build_vae({"base_dim": 32, "z_dim": 16}, seed=0).cuda().to(torch.bfloat16)
    z = torch.randn(1, 16, 9, 16, 24, generator=torch.Generator().manual_seed(0)).cuda()
    bounds = ((0, 1), (1, 5), (5, 9))
    ref32 = blockwise(vae32, z, bounds, fast=False)
    ref = blockwise(vae, z, bounds, fast=False)
    fast = blockwise(vae, z, bounds, fast=True)
    err = lambda a: ((a.float() - ref32).norm() / ref32.norm()).item()  # noqa: E731
    assert err(fast) < max(2 * err(ref), 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the decode overlaps on a side CUDA stream")
@pytest.mark.parametrize("fast_vae", [False, True])
def test_overlapped_stream_decode_makes_the_same_video_in_order(fast_vae):
    from engine.types import GenerationParams
    import numpy as np

    pipe = VideoPipeline.from_pretrained("tiny-causal", device="cuda")
    pipe.fast_vae = fast_vae
    params = pipe.resolve(GenerationParams(prompt="a red circle moving left", frames=49, seed=3))  # 4 blocks
    runs = {}
    for overlap in (False, True):
        pipe.overlap_decode = overlap
        seen = []
        chunks = list(pipe.generate(params, on_progress=seen.append))
        assert [c.index for c in chunks] == list(range(len(chunks))) and len(chunks) >= 3
        assert [c.start_frame for c in chunks] == list(np.cumsum([0] + [c.num_frames for c in chunks[:-1]]))
        fractions = [p.fraction for p in seen]
        assert fractions == sorted(fractions) and seen[-1].frames_done == params.frames
        runs[overlap] = np.concatenate([c.frames for c in chunks])
    assert runs[True].shape == runs[False].shape == (params.frames, 64, 64, 3)
    assert np.abs(runs[True].astype(int) - runs[False].astype(int)).max() <= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: decodes queued on a side CUDA stream")
def test_a_stream_closed_with_decodes_queued_leaves_the_pipeline_usable():
    from engine.types import GenerationParams
    import numpy as np

    pipe = VideoPipeline.from_pretrained("tiny-causal", device="cuda")
    params = pipe.resolve(GenerationParams(prompt="a red circle moving left", frames=49, seed=3))
    expected = np.concatenate([c.frames for c in pipe.generate(params)])
    for _ in range(3):
        gen = pipe.generate(params)
        next(gen)
        next(gen)  # later blocks' decodes may still be queued when the consumer goes away
        gen.close()
    again = np.concatenate([c.frames for c in pipe.generate(params)])
    assert np.array_equal(again, expected)
