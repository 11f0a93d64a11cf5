"""Checkpoints: diffusers-format folders (single file and sharded) load unchanged; bad ones fail clearly."""

import json

import pytest
import torch
from diffusers import SanaVideoTransformer3DModel

from engine import load_transformer, save_transformer
from engine.errors import CheckpointError, DeviceError, UnknownModel
from engine.model import SanaVideoTransformer
from engine.presets import TINY_TRANSFORMER


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    """A checkpoint written by diffusers itself (sharded, like the official 2B one)."""
    torch.manual_seed(0)
    model = SanaVideoTransformer3DModel(**TINY_TRANSFORMER.to_dict()).eval()
    folder = tmp_path_factory.mktemp("ckpt") / "transformer"
    model.save_pretrained(folder, max_shard_size="40KB", safe_serialization=True)
    return folder, model


def sample(batch=2):
    g = torch.Generator().manual_seed(2)
    return torch.randn(batch, 16, 3, 6, 8, generator=g), torch.randn(batch, 5, 32, generator=g), torch.tensor([900.0, 20.0])


def test_loads_diffusers_sharded_checkpoint(diffusers_folder):
    folder, reference = diffusers_folder
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").exists()
    ours = load_transformer(str(folder), dtype="fp32", device="cpu")
    assert isinstance(ours, SanaVideoTransformer) and not ours.causal
    x, text, t = sample()
    with torch.no_grad():
        a = reference(x, text, t, return_dict=False)[0]
        b = ours(x, text, t)
    assert ((a - b).norm() / a.norm()).item() <= 1e-5


def test_loads_pipeline_folder_and_causal_class(tmp_path, diffusers_folder):
    _, reference = diffusers_folder
    ours = SanaVideoTransformer(TINY_TRANSFORMER, causal=True)
    ours.load_state_dict(reference.state_dict())
    save_transformer(ours, tmp_path / "pipe" / "transformer")
    config = json.loads((tmp_path / "pipe" / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "SanaVideoCausalTransformer3DModel"
    loaded = load_transformer(str(tmp_path / "pipe"))  # a pipeline folder: transformer/ is found
    assert loaded.causal
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_save_sharded_roundtrip_and_dtype(tmp_path):
    torch.manual_seed(1)
    model = SanaVideoTransformer(TINY_TRANSFORMER)
    save_transformer(model, tmp_path / "t", max_shard_bytes=30_000)
    assert len(list((tmp_path / "t").glob("*.safetensors"))) > 1
    loaded = load_transformer(str(tmp_path / "t"), dtype="bf16")
    assert loaded.dtype == torch.bfloat16
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.bfloat16())


def test_a_save_replaces_the_weights_of_an_earlier_save_in_the_other_layout(tmp_path):
    torch.manual_seed(1)
    a, b = SanaVideoTransformer(TINY_TRANSFORMER), SanaVideoTransformer(TINY_TRANSFORMER)
    for first, second in (({}, {"max_shard_bytes": 30_000}), ({"max_shard_bytes": 30_000}, {})):
        folder = tmp_path / f"t{len(first)}"
        save_transformer(a, folder, **first)
        save_transformer(b, folder, **second)
        loaded = load_transformer(str(folder))
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in b.state_dict().items())


def test_a_fast_path_model_is_not_saved_as_a_checkpoint(tmp_path):
    from engine.fast import optimize

    model = optimize(SanaVideoTransformer(TINY_TRANSFORMER), compile=False, kernels=False)
    with pytest.raises(CheckpointError, match="save the model before"):
        save_transformer(model, tmp_path / "t")
    assert not (tmp_path / "t").exists()

    from engine.fast import apply_fast_path
    from engine.pipeline import VideoPipeline

    pipe = VideoPipeline.from_pretrained("tiny", device="cpu")
    apply_fast_path(pipe, "on")
    with pytest.raises(CheckpointError, match="save the model before"):
        pipe.save_pretrained(tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()  # nothing half-written


def test_mismatched_keys_are_listed(tmp_path, diffusers_folder):
    folder, reference = diffusers_folder
    bad = tmp_path / "bad"
    model = SanaVideoTransformer(TINY_TRANSFORMER)
    save_transformer(model, bad)
    config = json.loads((bad / "config.json").read_text())
    config["num_layers"] = 3  # config promises a layer the weights lack
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        load_transformer(str(bad))
    assert str(bad) in str(err.value) and "missing keys" in str(err.value)
    assert "transformer_blocks.2.attn1.to_q.weight" in str(err.value)

    config["num_layers"] = 2
    config["mlp_ratio"] = 3.0  # shapes disagree
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*transformer_blocks.0.ff.conv_inverted.weight \(240, 48, 1, 1\) vs config \(288, 48, 1, 1\)"):
        load_transformer(str(bad))


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "expected config.json or transformer/config.json"),
        (lambda p: (p / "config.json").write_text("{not json"), "unreadable config"),
        (lambda p: (p / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"})), "expected SanaVideoTransformer3DModel"),
        (lambda p: (p / "config.json").write_text(json.dumps({"bogus_field": 1})), "unknown transformer config fields: bogus_field"),
        (lambda p: (p / "config.json").write_text("{}"), "expected diffusion_pytorch_model.safetensors"),
    ],
)
def test_malformed_checkpoints(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        load_transformer(str(tmp_path))


def test_unknown_model_and_offline_hub():
    with pytest.raises(UnknownModel, match="not a preset"):
        load_transformer("no-such-model")
    with pytest.raises(UnknownModel, match="could not fetch"):
        load_transformer("nobody-here/not-a-real-repo-for-sure")


def test_device_errors():
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            load_transformer("tiny", device="cuda")
    with pytest.raises(DeviceError, match="fp16 is not supported on CPU"):
        load_transformer("tiny", device="cpu", dtype="fp16")
    with pytest.raises(DeviceError, match="unknown dtype"):
        load_transformer("tiny", dtype="int3")
