"""TensorRT backend: precision choice from the GPU's capability, the engine sidecar and its refusal of mismatched
engines, the worker's denoiser selection, and (where TensorRT and a GPU exist) a real engine build and run."""

from __future__ import annotations

import pytest
import torch

from engine import trt
from engine.errors import EngineError
from engine.trt import (
    BackendError,
    EngineMismatch,
    EngineNotFound,
    EngineSidecar,
    TensorRTUnavailable,
    check_capability,
    check_sidecar,
    choose_precision,
    find_engines,
    load_denoiser,
    read_sidecar,
)

HAS_TRT = trt.tensorrt_available()
NO_TRT = "TensorRT is not installed here (the GPU worker image provides it)"


@pytest.mark.parametrize(
    "capability, available, expected",
    [
        ((12, 0), {"nvfp4", "fp8", "bf16"}, "nvfp4"),  # RTX 5090
        ((10, 0), {"nvfp4", "fp8"}, "nvfp4"),  # B200
        ((9, 0), {"nvfp4", "fp8", "bf16"}, "fp8"),  # H100: no FP4 tensor cores
        ((8, 9), {"nvfp4", "fp8", "bf16"}, "fp8"),  # L40S / RTX 4090
        ((8, 6), {"nvfp4", "fp8", "bf16"}, "bf16"),  # A10
        ((8, 0), {"bf16"}, "bf16"),
        ((7, 5), {"nvfp4", "fp8", "bf16"}, "torch"),  # T4: no bf16 engines
        ((12, 0), {"bf16"}, "bf16"),
        ((12, 0), set(), "torch"),
        (None, {"nvfp4", "fp8", "bf16"}, "torch"),  # no GPU
    ],
)
def test_choose_precision(capability, available, expected):
    assert choose_precision(capability, available) == expected


def test_choose_precision_rejects_unknown_names():
    with pytest.raises(ValueError, match="int8"):
        choose_precision((9, 0), {"int8"})


def test_check_capability_says_what_this_gpu_accepts():
    check_capability("fp8", (9, 0))
    with pytest.raises(EngineMismatch, match=r"nvfp4 needs compute capability >= 10.0, this GPU has 9.0 \(accepted here: fp8, bf16\)"):
        check_capability("nvfp4", (9, 0))
    with pytest.raises(EngineMismatch, match="none found"):
        check_capability("bf16", None)


def _sidecar(**kw):
    base = dict(tensorrt_version="10.9.0", compute_capability=(9, 0), precision="fp8", gpu_name="NVIDIA H100",
                inputs={"hidden_states": {"shape": [2, 16, 21, 60, 104], "dtype": "bfloat16"}},
                output={"name": "velocity", "shape": [2, 16, 21, 60, 104], "dtype": "bfloat16"})
    base.update(kw)
    return EngineSidecar(**base)


def test_sidecar_round_trips_and_refuses_mismatched_engines(tmp_path):
    s = _sidecar()
    assert EngineSidecar.from_json(s.to_json()) == s
    check_sidecar(s, "10.9.0", (9, 0))
    with pytest.raises(EngineMismatch, match=r"built with TensorRT 10.9.0, this machine has TensorRT 10.11.0: rebuild"):
        check_sidecar(s, "10.11.0", (9, 0))
    with pytest.raises(EngineMismatch, match=r"built for compute capability 9.0 \(NVIDIA H100\), this GPU is 12.0"):
        check_sidecar(s, "10.9.0", (12, 0))
    with pytest.raises(EngineMismatch, match="nvfp4 needs compute capability >= 10.0"):
        check_sidecar(_sidecar(precision="nvfp4"), "10.9.0", (9, 0))
    with pytest.raises(EngineMismatch, match="format_version"):
        EngineSidecar.from_json('{"format_version": 99}')
    with pytest.raises(EngineMismatch, match="not a valid engine sidecar"):
        EngineSidecar.from_json("{")


def test_an_engine_of_another_model_is_refused(tmp_path):
    """Engines hold their model's weights: a sana-video-720p worker given a folder with the 480p model's engines
    must not run them (its videos would come from the other model). Aliases and folders name models too."""
    from engine.trt import check_engine_model

    s480 = _sidecar(model={"model": "/data/q480", "base_model": "sana-video-480p"})
    with pytest.raises(EngineMismatch, match="holds the weights of sana-video-480p, not of sana-video-720p"):
        check_engine_model(s480, "sana-video-720p", where="e480")
    check_engine_model(s480, "sana-video-480p", where="e480")
    check_engine_model(s480, "Efficient-Large-Model/SANA-Video_2B_480p_diffusers")  # the preset by its hub id
    folder = tmp_path / "ckpt"
    folder.mkdir()
    check_engine_model(_sidecar(model={"base_model": str(folder)}), str(tmp_path / "." / "ckpt"))
    with pytest.raises(EngineMismatch):
        check_engine_model(_sidecar(model={"base_model": str(folder)}), "sana-video-480p")
    check_engine_model(_sidecar(), "sana-video-720p")  # a sidecar without the record: not refused


def test_engine_folders_are_found_and_incomplete_ones_refused(tmp_path):
    with pytest.raises(EngineNotFound, match="not a folder"):
        find_engines(tmp_path / "missing")
    with pytest.raises(EngineNotFound, match="no engine folder"):
        find_engines(tmp_path)
    for name, precision in (("a-fp8", "fp8"), ("b-bf16", "bf16")):
        d = tmp_path / name
        d.mkdir()
        (d / trt.SIDECAR_FILE).write_text(_sidecar(precision=precision).to_json())
        (d / trt.ENGINE_FILE).write_bytes(b"plan")
    (tmp_path / "c-half").mkdir()
    (tmp_path / "c-half" / trt.SIDECAR_FILE).write_text(_sidecar().to_json())  # no engine.plan
    assert [p.name for p in find_engines(tmp_path)] == ["a-fp8", "b-bf16"]
    assert find_engines(tmp_path / "a-fp8") == [tmp_path / "a-fp8"]
    assert read_sidecar(tmp_path / "b-bf16").precision == "bf16"
    with pytest.raises(EngineNotFound, match="expected engine.plan"):
        read_sidecar(tmp_path / "c-half")


@pytest.fixture(scope="module")
def pipes():
    from engine.pipeline import VideoPipeline

    return VideoPipeline.from_pretrained("tiny", device="cpu"), VideoPipeline.from_pretrained("tiny-causal", device="cpu")


def test_load_denoiser_selection_and_typed_errors(pipes, tmp_path):
    pipe, causal = pipes
    assert load_denoiser(pipe, "torch") == (pipe.transformer, "torch", ())
    assert load_denoiser(pipe, "auto").precision == "torch"  # no engine given
    assert load_denoiser(causal, "auto").module is causal.transformer
    with pytest.raises(BackendError, match="accepted: auto, torch, nvfp4, fp8, bf16"):
        load_denoiser(pipe, "int8")
    with pytest.raises(EngineNotFound, match="--precision fp8 needs --engine DIR"):
        load_denoiser(pipe, "fp8")
    with pytest.raises(BackendError, match="block-causal"):
        load_denoiser(causal, "nvfp4", tmp_path)
    # An engine path whose engines cannot be used here: auto falls back to PyTorch, never fails.
    d = tmp_path / "e"
    d.mkdir()
    (d / trt.SIDECAR_FILE).write_text(_sidecar(tensorrt_version="0.0.0").to_json())
    (d / trt.ENGINE_FILE).write_bytes(b"plan")
    assert load_denoiser(pipe, "auto", tmp_path).precision == "torch"
    assert issubclass(TensorRTUnavailable, EngineError) and issubclass(EngineMismatch, EngineError)


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here: the missing-TensorRT path cannot be exercised")
def test_missing_tensorrt_is_a_typed_error_with_what_to_do(pipes, tmp_path):
    pipe, _ = pipes
    with pytest.raises(TensorRTUnavailable, match="GPU worker image"):
        load_denoiser(pipe, "bf16", tmp_path)
    from quantization import cli_build_engine

    with pytest.raises(TensorRTUnavailable):
        cli_build_engine("tiny", "bf16", 64, 64, 9, tmp_path / "engine")
    assert not (tmp_path / "engine").exists()
    with pytest.raises(EngineError, match="accepted: nvfp4, fp8, bf16"):
        cli_build_engine("tiny", "int8", 64, 64, 9, tmp_path / "engine")


@pytest.mark.skipif(not HAS_TRT or not torch.cuda.is_available(),
                    reason=NO_TRT if not HAS_TRT else "building an engine needs a CUDA GPU")
def test_bf16_engine_builds_runs_and_matches_pytorch(tmp_path):
    from engine.pipeline import VideoPipeline
    from quantization import cli_build_engine

    summary = cli_build_engine("tiny", "bf16", 64, 64, 9, tmp_path / "engine", device="cuda")
    sidecar = read_sidecar(tmp_path / "engine")
    assert sidecar.precision == "bf16" and sidecar.tensorrt_version == trt.import_tensorrt().__version__
    assert summary["frames"] == 9
    pipe = VideoPipeline.from_pretrained("tiny", device="cuda")
    choice = load_denoiser(pipe, "auto", tmp_path / "engine")
    assert choice.precision == "bf16"
    shapes = sidecar.input_shapes()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shapes["hidden_states"], generator=g).to("cuda", torch.bfloat16)
    ctx = torch.randn(shapes["encoder_hidden_states"], generator=g).to("cuda", torch.bfloat16)
    t = torch.tensor([700.0, 700.0], device="cuda")
    mask = torch.ones(shapes["encoder_attention_mask"], device="cuda")
    with torch.no_grad():
        ref = pipe.transformer(x, ctx, t, mask).float()
        out = choice.module(x, ctx, t, mask).float()
    assert choice.module.engine_calls == 1
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2


class _TorchRunner:
    """Stands in for EngineRunner where TensorRT is absent: serves one static shape bucket by running the PyTorch
    transformer, so TRTDenoiser's dispatch and its fit in the pipeline are exercised for real."""

    def __init__(self, transformer, shapes, precision="bf16"):
        inputs = {k: {"shape": list(v), "dtype": "float32"} for k, v in shapes.items()}
        self.sidecar = _sidecar(precision=precision, inputs=inputs)
        self.device = transformer.device
        self.transformer = transformer
        self.calls = 0

    def accepts(self, tensors):
        return all(tuple(tensors[k].shape) == tuple(v["shape"]) for k, v in self.sidecar.inputs.items())

    def run(self, tensors):
        self.calls += 1
        return self.transformer(*(tensors[k] for k in trt.INPUT_ORDER))


def test_trt_denoiser_runs_matching_calls_in_the_pipeline_and_falls_back_otherwise(pipes):
    from engine.types import GenerationParams
    from quantization.onnx_export import StepShapes

    pipe, _ = pipes
    params = GenerationParams(prompt="a red ball moving left", frames=9, steps=2, seed=3)
    reference = [c.frames for c in pipe.generate(params)]
    text_len = pipe.text_encoder.encode(["x"])[0].shape[1]
    bucket = StepShapes.for_video(pipe.transformer.config, 64, 64, 9, text_len).inputs()
    runner = _TorchRunner(pipe.transformer, bucket)
    denoiser = trt.TRTDenoiser([runner], pipe.transformer.config, fallback=pipe.transformer, dtype=pipe.dtype)
    original = pipe.transformer
    pipe.transformer = denoiser
    try:
        got = [c.frames for c in pipe.generate(params)]
        assert runner.calls == 2 and denoiser.fallback_calls == 0  # both CFG steps through the engine
        assert all((a == b).all() for a, b in zip(got, reference))
        list(pipe.generate(GenerationParams(prompt="a red ball", frames=13, steps=1)))  # another bucket
        assert runner.calls == 2 and denoiser.fallback_calls == 1
        bare = trt.TRTDenoiser([runner], original.config, fallback=None)
        pipe.transformer = bare
        with pytest.raises(EngineMismatch, match="build-engine --height H --width W --frames N"):
            list(pipe.generate(GenerationParams(prompt="a red ball", frames=13, steps=1)))
    finally:
        pipe.transformer = original
    with pytest.raises(EngineMismatch, match="several precisions"):
        trt.TRTDenoiser([runner, _TorchRunner(original, bucket, "fp8")], original.config)
