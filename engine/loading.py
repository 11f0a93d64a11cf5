"""Loading and saving diffusers-format checkpoints (a folder or a hub id) into our classes.

A pipeline folder holds ``model_index.json`` and one subfolder per component (transformer/, vae/, text_encoder/,
tokenizer/, scheduler/); a transformer folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` or
its shards with ``diffusion_pytorch_model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.errors import CheckpointError, DeviceError, UnknownModel
from engine.model import RotaryPosEmbed, SanaVideoTransformer
from engine.presets import BIDIRECTIONAL_CLASS, CAUSAL_CLASS, TransformerConfig, get_preset

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise DeviceError(f"unknown dtype {dtype!r} (accepted: {', '.join(sorted(DTYPES))})") from None


def check_device(device: str | torch.device | None, dtype: torch.dtype | None) -> torch.device:
    """The torch.device to run on; raises DeviceError when this machine cannot run ``device``/``dtype``."""
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as exc:  # "gpu", "cuda:x", ...
        raise DeviceError(f"unsupported device {device!r} (accepted: cpu, cuda, cuda:N)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} requested but CUDA is not available on this machine (accepted: cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise DeviceError(f"{dev} does not support bf16 (accepted: fp16, fp32)")
    elif dev.type == "cpu":
        if dtype == torch.float16:
            raise DeviceError("fp16 is not supported on CPU (accepted on cpu: fp32, bf16)")
    else:
        raise DeviceError(f"unsupported device {device!r} (accepted: cpu, cuda, cuda:N)")
    return dev


def resolve_folder(name_or_path: str, subfolder: str | None = None) -> Path:
    """A local folder for a folder path or a hub id (downloaded through huggingface_hub when a network exists)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a diffusers-format folder, found a file")
        return path
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
        raise UnknownModel(
            f"unknown model {name_or_path!r}: not a preset, not an existing folder, not a hub id (owner/name)"
        )
    try:
        from huggingface_hub import snapshot_download

        patterns = ["model_index.json", "*.json", "*.txt", "*.model", "*.safetensors"]
        if subfolder:
            patterns = ["model_index.json", f"{subfolder}/*"]
        return Path(snapshot_download(name_or_path, allow_patterns=patterns))
    except Exception as exc:  # network down, repo missing, gated...
        raise UnknownModel(f"could not fetch {name_or_path!r} from the Hugging Face hub: {exc}") from exc


def _transformer_folder(folder: Path) -> Path:
    if (folder / "config.json").exists():
        return folder
    if (folder / "transformer" / "config.json").exists():
        return folder / "transformer"
    raise CheckpointError(f"{folder}: expected config.json or transformer/config.json (diffusers format)")


def read_json(path: Path, what: str = "malformed") -> dict:
    """The JSON object in ``path`` (every config file of a checkpoint holds one); CheckpointError
    ``"<path>: <what> (<reason>)"`` when it cannot be read or parsed, or holds something else."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: {what} ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} (a JSON {type(data).__name__}, expected an object)")
    return data


def unwritable_folder(folder: Path) -> str | None:
    """Why no file can be made in ``folder`` (probed with a throw-away file), or None when one can."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sana-write-check-"):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def read_transformer_config(folder: Path) -> tuple[TransformerConfig, bool]:
    path = folder / "config.json"
    data = read_json(path, "unreadable config")
    cls = data.get("_class_name", BIDIRECTIONAL_CLASS)
    if cls not in (BIDIRECTIONAL_CLASS, CAUSAL_CLASS):
        raise CheckpointError(f"{path}: _class_name {cls!r}, expected {BIDIRECTIONAL_CLASS} or {CAUSAL_CLASS}")
    try:
        return TransformerConfig.from_dict(data), cls == CAUSAL_CLASS
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own SafetensorError (truncated, not safetensors, ...)
        raise CheckpointError(f"{path}: unreadable weights ({type(exc).__name__}: {exc})") from exc


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    single, index = folder / WEIGHTS_NAME, folder / WEIGHTS_INDEX_NAME
    if single.exists():
        return _load_weights(single)
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: malformed shard index ({exc})") from exc
        state = {}
        for shard in shards:
            if not (folder / shard).exists():
                raise CheckpointError(f"{folder}: shard {shard} listed in {WEIGHTS_INDEX_NAME} is missing")
            state.update(_load_weights(folder / shard))
        return state
    raise CheckpointError(f"{folder}: expected {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")


def build_transformer(config: TransformerConfig, causal: bool, seed: int | None = None) -> SanaVideoTransformer:
    if seed is not None:
        torch.manual_seed(seed)
    return SanaVideoTransformer(config, causal=causal).eval()


def load_transformer(path_or_hub_id: str, dtype=None, device=None) -> SanaVideoTransformer:
    """Load a diffusers-format SANA-Video transformer (folder, pipeline folder or hub id) or a built-in preset.

    Raises CheckpointError naming the path and what was expected (missing/unexpected keys, shape mismatches),
    UnknownModel for a name that is nothing we can load, DeviceError for an unusable device/dtype.
    """
    dtype = parse_dtype(dtype)
    dev = check_device(device, dtype)
    preset = get_preset(path_or_hub_id)
    if preset is not None and preset.built_locally:
        model = build_transformer(preset.transformer, preset.causal, seed=preset.seed)
        return model.to(device=dev, dtype=dtype or torch.float32)
    source = preset.source if preset is not None else path_or_hub_id
    folder = _transformer_folder(resolve_folder(source, subfolder="transformer"))
    config, causal = read_transformer_config(folder)
    state = read_state_dict(folder)
    try:
        with torch.device("meta"):
            model = SanaVideoTransformer(config, causal=causal)
    except (TypeError, ValueError) as exc:  # a config value of the wrong type ("num_layers": "six")
        raise CheckpointError(f"{folder / 'config.json'}: cannot build the transformer ({exc})") from exc
    model.rope = RotaryPosEmbed(config.attention_head_dim, config.patch_size, config.rope_max_seq_len)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
        if wrong:
            parts.append(
                "shape mismatches: "
                + ", ".join(f"{k} {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}" for k in wrong[:20])
            )
        raise CheckpointError(f"{folder}: checkpoint does not match its config.json: " + "; ".join(parts))
    target = dtype or next(iter(state.values())).dtype
    model.load_state_dict({k: v.to(target) for k, v in state.items()}, strict=True, assign=True)
    return model.to(device=dev, dtype=target).eval()


def check_saveable(model) -> None:
    """Raise CheckpointError for a transformer that cannot be written as a diffusers checkpoint."""
    if hasattr(model, "fast_settings"):
        raise CheckpointError("this transformer runs the fast path (engine.fast), whose blocks hold fused weights "
                              "under other names: save the model before apply_fast_path/optimize")


def save_transformer(model: SanaVideoTransformer, folder: str | Path, max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` as a diffusers-format transformer folder (config.json + safetensors, sharded if asked)."""
    check_saveable(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Weights of an earlier save in another layout (one file against shards) would be loaded in place of these.
    for old in [*folder.glob("diffusion_pytorch_model*.safetensors"), folder / WEIGHTS_INDEX_NAME]:
        old.unlink(missing_ok=True)
    config = model.config.to_dict()
    config["_class_name"] = CAUSAL_CLASS if model.causal else BIDIRECTIONAL_CLASS
    config["_diffusers_version"] = "0.42.1"
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_write(folder / "config.json", json.dumps(config, indent=2).encode())
    if max_shard_bytes is None:
        save_file(state, str(folder / WEIGHTS_NAME))
        return folder
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name))
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}, "weight_map": weight_map}
    _atomic_write(folder / WEIGHTS_INDEX_NAME, json.dumps(index, indent=2).encode())
    return folder


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; a checkpoint is read by other users (containers, services)
    os.replace(tmp, path)

