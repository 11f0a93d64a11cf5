"""The ModelOpt flow on the tiny preset: calibration by real denoising runs, FP8 simulation, NVFP4 calibration,
save and restore, and the typed errors of ``cli_quantize``."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt (the quant extra) is not installed")

from engine.errors import UnknownModel  # noqa: E402
from engine.loading import load_transformer  # noqa: E402
from engine.model import pointwise_convs_to_linear  # noqa: E402
from quantization import cli_quantize  # noqa: E402
from quantization.errors import QuantizationError  # noqa: E402
from quantization.onnx_export import build_export_model  # noqa: E402
from quantization.policy import LayerPolicy  # noqa: E402
from quantization.quantize import QUANT_CONFIG, load_quantized, plain_copy, read_quant_config, recipe_from_config  # noqa: E402

# Tiny has two blocks: keep none at the end so that block 1 is quantized.
POLICY = LayerPolicy(keep_first_blocks=1, keep_last_blocks=0)
CALIB = dict(steps=2, frames=5, policy=POLICY, log=None)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 2, 8, 8, generator=g)
    ctx = torch.randn(2, 32, 32, generator=g)
    mask = torch.ones(2, 32)
    mask[0, 10:] = 0
    return x, ctx, torch.tensor([800.0, 300.0]), mask


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    prompts = root / "prompts.txt"
    prompts.write_text("# calibration set\na red ball moving left\n\na blue square moving right\n")
    out = {}
    for precision in ("fp8", "nvfp4"):
        summary = cli_quantize("tiny", precision, root / precision, calib_prompts=prompts, device="cpu", **CALIB)
        out[precision] = (root / precision, summary)
    return out


def test_calibration_covers_every_planned_layer_with_real_ranges(quantized):
    folder, summary = quantized["fp8"]
    config = read_quant_config(folder)
    planned = sorted(n for n, d in config["layers"].items() if d["quantize"])
    assert summary["quantized_layers"] == len(planned) == 9  # block 1: 8 attention projections + conv_inverted
    assert sorted(config["recipe"]) == planned
    assert all(n.startswith("transformer_blocks.1.") for n in planned)
    assert config["calibration"]["prompts"] == ["a red ball moving left", "a blue square moving right"]
    for q in config["recipe"].values():
        assert q["format"] == "fp8" and q["input_amax"] > 0 and q["weight_amax"] > 0
    # The recorded weight range is the weight's own absolute maximum.
    model = pointwise_convs_to_linear(load_transformer("tiny"))
    w = model.get_submodule("transformer_blocks.1.attn1.to_q").weight
    assert config["recipe"]["transformer_blocks.1.attn1.to_q"]["weight_amax"] == pytest.approx(w.abs().max().item())
    nv = read_quant_config(quantized["nvfp4"][0])
    assert {q["format"] for q in nv["recipe"].values()} == {"nvfp4"}
    assert nv["policy"] == POLICY.to_dict()


def test_fp8_restore_matches_and_the_qdq_reference_equals_modelopt(quantized):
    folder, _ = quantized["fp8"]
    model, config = load_quantized(folder)
    plain = plain_copy(model)
    args = _inputs()
    with torch.no_grad():
        simulated = model(*args)
        exact = plain(*args)
        reference = build_export_model(plain, recipe_from_config(config), torch.float32)(*args)
    rel = ((simulated - exact).norm() / exact.norm()).item()
    assert 1e-4 < rel < 0.1  # quantization is active, and FP8 stays close
    # The Q/DQ arithmetic the ONNX graph carries is ModelOpt's own simulation.
    torch.testing.assert_close(reference, simulated, rtol=1e-5, atol=1e-5)
    again, _ = load_quantized(folder)
    with torch.no_grad():
        torch.testing.assert_close(again(*args), simulated, rtol=0, atol=0)


def test_nvfp4_restore_keeps_the_calibrated_ranges(quantized):
    folder, _ = quantized["nvfp4"]
    model, config = load_quantized(folder)
    q = model.get_submodule("transformer_blocks.1.attn1.to_k")
    assert tuple(q.weight_quantizer.num_bits) == (2, 1) and q.weight_quantizer.block_sizes[-1] == 16
    assert q.input_quantizer.amax.item() == pytest.approx(config["recipe"]["transformer_blocks.1.attn1.to_k"]["input_amax"])
    assert not model.get_submodule("transformer_blocks.0.attn1.to_k").input_quantizer.is_enabled


def test_cli_quantize_rejects_bad_input_and_leaves_no_partial_folder(tmp_path):
    with pytest.raises(QuantizationError, match="accepted: nvfp4, fp8"):
        cli_quantize("tiny", "int4", tmp_path / "a")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep me")
    with pytest.raises(QuantizationError, match="not an empty folder"):
        cli_quantize("tiny", "fp8", taken)
    assert (taken / "x").read_text() == "keep me"
    empty = tmp_path / "empty.txt"
    empty.write_text("# only comments\n\n")
    with pytest.raises(QuantizationError, match="no prompt"):
        cli_quantize("tiny", "fp8", tmp_path / "b", calib_prompts=empty, device="cpu")
    with pytest.raises(QuantizationError, match="cannot read"):
        cli_quantize("tiny", "fp8", tmp_path / "b", calib_prompts=tmp_path / "missing.txt", device="cpu")
    # Every prompt is checked before calibration starts: the third is longer than tiny's text encoder reads.
    long_third = tmp_path / "long.txt"
    long_third.write_text("a red ball moving left\na blue square\n" + "red " * 100 + "\n")
    logged: list[str] = []
    with pytest.raises(QuantizationError, match="prompt 3"):
        cli_quantize("tiny", "fp8", tmp_path / "b", calib_prompts=long_third, device="cpu", steps=1, frames=5,
                     policy=POLICY, log=logged.append)
    assert not any("prompt 1" in m or "calibrat" in m.lower() for m in logged), logged
    assert not (tmp_path / "b").exists()
    long_third.unlink()
    with pytest.raises(UnknownModel):
        cli_quantize("no-such-model", "fp8", tmp_path / "b")
    # The default policy keeps both blocks of the two-block tiny model: nothing to quantize.
    with pytest.raises(QuantizationError, match="no linear layer"):
        cli_quantize("tiny", "fp8", tmp_path / "c", device="cpu", steps=1, frames=5, log=None)
    with pytest.raises(QuantizationError, match="frames"):
        cli_quantize("tiny", "fp8", tmp_path / "d", device="cpu", frames=6, policy=POLICY, log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "taken"]


def test_quant_config_is_plain_json(quantized):
    folder, _ = quantized["fp8"]
    data = json.loads((folder / QUANT_CONFIG).read_text())
    assert data["base_model"] == "tiny" and data["precision"] == "fp8" and data["causal"] is False


def test_default_calibration_prompts_fit_every_local_model():
    """The demo models read 16 words of their own vocabulary: their default prompts are training captions."""
    from engine.pipeline import VideoPipeline
    from engine.types import GenerationParams
    from quantization.calibration import default_prompts

    for model in ("tiny", "tiny-causal", "demo", "demo-causal"):
        pipe = VideoPipeline.from_pretrained(model, device="cpu")
        prompts = default_prompts(pipe)
        assert len(prompts) >= 4
        for prompt in prompts:
            pipe.resolve(GenerationParams(prompt=prompt))  # raises InvalidParams when a prompt does not fit


def test_quantize_command_on_a_two_block_model_needs_and_takes_the_keep_options(tmp_path):
    """The default policy keeps the first and the last block: nothing is left of tiny's two, and the message says
    which options change that; with both at 0 the command quantizes it."""
    from typer.testing import CliRunner

    from engine.cli import app

    runner = CliRunner()
    base = ["quantize", "--model", "tiny", "--precision", "fp8", "--device", "cpu"]
    refused = runner.invoke(app, [*base, "--out", str(tmp_path / "a")])
    assert refused.exit_code == 2 and "--keep-first-blocks" in refused.output, refused.output
    done = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--keep-first-blocks", "0",
                               "--keep-last-blocks", "0"])
    assert done.exit_code == 0, done.output
    config = read_quant_config(tmp_path / "b")
    assert config["precision"] == "fp8" and config["policy"]["keep_first_blocks"] == 0
    assert any(d["quantize"] for d in config["layers"].values())


def test_quantize_refuses_an_out_it_cannot_make_before_calibrating(tmp_path):
    """An --out under a file is refused at once (exit 2), not after the whole calibration when the result is saved."""
    from typer.testing import CliRunner

    from engine.cli import app

    (tmp_path / "a-file").write_text("")
    result = CliRunner().invoke(app, ["quantize", "--model", "tiny", "--precision", "fp8", "--device", "cpu",
                                      "--keep-first-blocks", "0", "--keep-last-blocks", "0",
                                      "--out", str(tmp_path / "a-file" / "deeper" / "q")])
    assert result.exit_code == 2 and "is a file, not a folder" in result.output, result.output
    assert "calibrat" not in result.output.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
