"""``engine.fast.apply_fast_path``: which denoiser a pipeline runs for each mode, and that the fast one makes the
same video as the reference (clip and stream presets, same seed, decoded frames). On CPU "on" runs the fast block
structure with the kernels' PyTorch references; the CUDA kernels and compile are pinned in test_fast_block.py."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.fast import FastBlock, apply_fast_path
from engine.model import TransformerBlock
from engine.pipeline import VideoPipeline
from engine.trt import BackendError, TRTDenoiser
from engine.types import GenerationParams


def video(pipe, seed=7):
    params = pipe.resolve(GenerationParams(prompt="a red circle moving left", frames=17, seed=seed))
    return np.concatenate([c.frames for c in pipe.generate(params)])


def block_types(pipe) -> set[type]:
    return {type(b) for b in pipe.transformer.transformer_blocks}


@pytest.mark.parametrize("preset", ["tiny", "tiny-causal"])  # clip, stream (block-causal with a BlockState)
def test_fast_path_makes_the_reference_video(preset):
    reference = VideoPipeline.from_pretrained(preset, device="cpu")
    fast = VideoPipeline.from_pretrained(preset, device="cpu")
    assert apply_fast_path(fast, "on") == "fast"
    assert block_types(fast) == {FastBlock} and fast.transformer.fast_settings.compile is False
    assert fast.fast_vae and not reference.fast_vae  # the VAE's fast decoder too
    expected, got = video(reference), video(fast)
    assert got.shape == expected.shape == (17, 64, 64, 3)
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and diff.mean() < 1e-3  # rounding of a few pixels at most
    assert np.abs(video(fast, seed=8).astype(int) - expected.astype(int)).mean() > 1.0  # the comparison can fail


@pytest.fixture(scope="module")
def pipe():
    return VideoPipeline.from_pretrained("tiny", device="cpu")


@pytest.mark.parametrize("mode", ["auto", "off", "OFF"])
def test_auto_and_off_keep_the_reference_on_cpu(pipe, mode):
    assert apply_fast_path(pipe, mode) == "reference"
    assert block_types(pipe) == {TransformerBlock} and not hasattr(pipe.transformer, "fast_settings")


@pytest.mark.parametrize("mode, message", [
    ("turbo", r"fast path mode 'turbo' \(accepted: auto, on, off, fp8\)"),
    ("fp8", r"fast path fp8 needs a CUDA GPU of compute capability >= 8\.9; the model is on cpu \(no CUDA GPU\) "
            r"\(accepted here: auto, on, off\)"),
])
def test_unknown_mode_and_fp8_without_an_fp8_gpu_are_typed_errors(pipe, mode, message):
    with pytest.raises(BackendError, match=message):
        apply_fast_path(pipe, mode)
    assert block_types(pipe) == {TransformerBlock}  # nothing half-converted


def test_a_tensorrt_denoiser_is_left_alone(pipe):
    runner = SimpleNamespace(sidecar=SimpleNamespace(precision="bf16"), device=torch.device("cpu"))
    original = pipe.transformer
    pipe.transformer = TRTDenoiser([runner], original.config, fallback=original)
    try:
        for mode in ("auto", "on", "off", "fp8"):
            assert apply_fast_path(pipe, mode) == "tensorrt"
        with pytest.raises(BackendError, match="accepted: auto, on, off, fp8"):
            apply_fast_path(pipe, "fast")
    finally:
        pipe.transformer = original
    assert block_types(pipe) == {TransformerBlock}


CUDA = torch.cuda.is_available()
FP8 = CUDA and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA: the Triton kernels and torch.compile run on the GPU")
@pytest.mark.parametrize("preset", ["tiny", "tiny-causal"])
@pytest.mark.parametrize("mode", ["auto", pytest.param("fp8", marks=pytest.mark.skipif(not FP8, reason="needs FP8"))])
def test_fast_path_on_cuda_makes_the_reference_video(preset, mode):
    """What a worker on a GPU runs by default ("auto": kernels + compile) and with --fast fp8, against the bf16
    reference on the same GPU: the same video to bf16 (and FP8) rounding, far closer than another seed's video."""
    reference = VideoPipeline.from_pretrained(preset, device="cuda")
    fast = VideoPipeline.from_pretrained(preset, device="cuda")
    assert apply_fast_path(fast, mode) == ("fast-fp8" if mode == "fp8" else "fast")
    expected, got = video(reference), video(fast)
    error = np.abs(got.astype(int) - expected.astype(int)).mean()
    other = np.abs(video(reference, seed=8).astype(int) - expected.astype(int)).mean()
    print(f"{preset} {mode}: mean |fast - reference| {error:.3f} levels, another seed {other:.3f}")
    assert error < (6.0 if mode == "fp8" else 2.0) and error < other / 4


def test_a_converted_model_is_not_converted_again():
    pipe = VideoPipeline.from_pretrained("tiny", device="cpu")
    assert apply_fast_path(pipe, "on") == "fast"
    blocks = list(pipe.transformer.transformer_blocks)
    assert apply_fast_path(pipe, "auto") == apply_fast_path(pipe, "on") == "fast"
    assert list(pipe.transformer.transformer_blocks) == blocks
    with pytest.raises(BackendError, match="already runs fast"):
        apply_fast_path(pipe, "off")
