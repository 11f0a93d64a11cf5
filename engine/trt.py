"""TensorRT backend: build a strongly typed engine from the clip-step ONNX, describe it in a sidecar, refuse an
engine that does not fit this machine, and run denoising steps through it.

TensorRT is imported on first use only (``import_tensorrt``): it is not installable everywhere (the GPU worker
image provides it), and nothing else in the engine needs it.

An engine folder holds ``engine.plan`` (the serialized engine), ``engine.json`` (the sidecar: TensorRT version,
GPU compute capability, precision, static input/output shapes and dtypes, the model it came from) and the ONNX
it was built from. Engines are specific to one TensorRT version and one compute capability, and serve one
resolution bucket (static shapes); ``TRTDenoiser`` holds one or more and falls back to the PyTorch transformer
for any other shape or for stream (block-causal) calls.

Precision choice: NVFP4 needs compute capability >= 10.0 (Blackwell: B200 10.0, RTX 5090 12.0), FP8 >= 8.9
(Ada, Hopper), bf16 >= 8.0; ``choose_precision`` takes the best the GPU and the available engines allow.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import EngineError

ENGINE_FILE = "engine.plan"
SIDECAR_FILE = "engine.json"
ONNX_FILE = "transformer.onnx"
SIDECAR_VERSION = 1
ENGINE_PRECISIONS = ("nvfp4", "fp8", "bf16")
BACKEND_PRECISIONS = ("auto", "torch") + ENGINE_PRECISIONS
# Best first. Minimum CUDA compute capability of each engine precision.
MIN_CAPABILITY = {"nvfp4": (10, 0), "fp8": (8, 9), "bf16": (8, 0)}
INPUT_ORDER = ("hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask")


class BackendError(EngineError, ValueError):
    """A precision or engine selection that cannot be honoured on this machine."""


class TensorRTUnavailable(BackendError):
    """TensorRT's Python package is not installed here."""


class EngineNotFound(BackendError):
    """No engine folder (with engine.plan and engine.json) where one was asked for."""


class EngineMismatch(BackendError):
    """An engine built for another TensorRT version, GPU, precision or shape."""


class EngineBuildError(EngineError):
    """TensorRT could not parse the ONNX or build the engine."""


def import_tensorrt():
    """The ``tensorrt`` module, or TensorRTUnavailable saying where to get it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(
            f"TensorRT is not installed ({exc}): use the GPU worker image (docker/Dockerfile.worker), or install "
            "TensorRT 10/11 from NVIDIA for this CUDA version (a worker runs without it: --precision torch)"
        ) from exc
    return tensorrt


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
    except TensorRTUnavailable:
        return False
    return True


def gpu_capability(device: torch.device | str | None = None) -> tuple[int, int] | None:
    """Compute capability (major, minor) of the CUDA device, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability(device))


def choose_precision(capability: tuple[int, int] | None, available: Iterable[str]) -> str:
    """The fastest of ``available`` engine precisions this GPU runs: "nvfp4" (compute >= 10.0), then "fp8"
    (>= 8.9), then "bf16" (>= 8.0); "torch" when none applies (no GPU, no engine)."""
    available = set(available)
    unknown = available - set(ENGINE_PRECISIONS)
    if unknown:
        raise ValueError(f"unknown engine precision(s) {sorted(unknown)} (accepted: {', '.join(ENGINE_PRECISIONS)})")
    if capability is None:
        return "torch"
    for precision in ENGINE_PRECISIONS:
        if precision in available and tuple(capability) >= MIN_CAPABILITY[precision]:
            return precision
    return "torch"


def check_capability(precision: str, capability: tuple[int, int] | None) -> None:
    """Raise EngineMismatch when a GPU of ``capability`` cannot run ``precision`` engines."""
    need = MIN_CAPABILITY[precision]
    if capability is None:
        raise EngineMismatch(f"{precision} engines need a CUDA GPU (compute capability >= {need[0]}.{need[1]}); none found")
    if tuple(capability) < need:
        raise EngineMismatch(
            f"{precision} needs compute capability >= {need[0]}.{need[1]}, this GPU has {capability[0]}.{capability[1]} "
            f"(accepted here: {', '.join(p for p in ENGINE_PRECISIONS if tuple(capability) >= MIN_CAPABILITY[p]) or 'torch'})"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Sidecar


@dataclass
class EngineSidecar:
    """What an engine was built for. ``inputs``: name -> {"shape": [...], "dtype": "bfloat16"|...}."""

    tensorrt_version: str
    compute_capability: tuple[int, int]
    precision: str
    inputs: dict[str, dict[str, Any]]
    output: dict[str, Any]
    gpu_name: str = ""
    model: dict[str, Any] = field(default_factory=dict)
    onnx_sha256: str = ""
    built_at: str = ""
    format_version: int = SIDECAR_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        data["compute_capability"] = list(self.compute_capability)
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = "engine.json") -> "EngineSidecar":
        try:
            data = json.loads(text)
            if data.get("format_version") != SIDECAR_VERSION:
                raise EngineMismatch(f"{where}: sidecar format_version {data.get('format_version')!r}, expected {SIDECAR_VERSION}")
            data["compute_capability"] = tuple(data["compute_capability"])
            return cls(**data)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise EngineMismatch(f"{where}: not a valid engine sidecar ({exc})") from exc

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v["shape"]) for k, v in self.inputs.items()}


def same_model(a: str, b: str) -> bool:
    """Whether two model names (presets or their aliases, folders, hub ids) name the same model."""
    from engine.presets import PRESETS, get_preset

    def key(name: str) -> str:
        preset = get_preset(name) or next((p for p in PRESETS.values() if p.source and p.source == name), None)
        if preset is not None:
            return f"preset:{preset.name}"
        return str(Path(name).resolve()) if Path(name).exists() else name

    return key(a) == key(b)


def check_engine_model(sidecar: EngineSidecar, model: str, where: str = "engine") -> None:
    """Refuse an engine built from another model: it holds that model's weights, and would run them in its place.
    (A sidecar that does not record its model passes.)"""
    built_from = (sidecar.model or {}).get("base_model")
    if built_from is not None and not same_model(str(built_from), model):
        raise EngineMismatch(f"{where} holds the weights of {built_from}, not of {model}: build one from {model} "
                             "with `sana-video build-engine`, or give this worker a folder of its own engines")


def check_sidecar(sidecar: EngineSidecar, tensorrt_version: str, capability: tuple[int, int] | None,
                  where: str = "engine") -> None:
    """Refuse an engine built elsewhere: TensorRT engines run only with the TensorRT version and on the compute
    capability they were built for."""
    rebuild = "rebuild it on this machine with `sana-video build-engine`"
    if sidecar.tensorrt_version != tensorrt_version:
        raise EngineMismatch(
            f"{where} was built with TensorRT {sidecar.tensorrt_version}, this machine has TensorRT {tensorrt_version}: {rebuild}"
        )
    if capability is None:
        raise EngineMismatch(f"{where} needs a CUDA GPU; none found")
    if tuple(sidecar.compute_capability) != tuple(capability):
        built = ".".join(map(str, sidecar.compute_capability))
        raise EngineMismatch(
            f"{where} was built for compute capability {built} ({sidecar.gpu_name or 'unknown GPU'}), this GPU is "
            f"{capability[0]}.{capability[1]}: {rebuild}"
        )
    if sidecar.precision not in ENGINE_PRECISIONS:
        raise EngineMismatch(f"{where}: unknown precision {sidecar.precision!r} (accepted: {', '.join(ENGINE_PRECISIONS)})")
    check_capability(sidecar.precision, capability)


def read_sidecar(engine_dir: str | Path) -> EngineSidecar:
    engine_dir = Path(engine_dir)
    path = engine_dir / SIDECAR_FILE
    if not path.is_file() or not (engine_dir / ENGINE_FILE).is_file():
        raise EngineNotFound(f"{engine_dir}: expected {ENGINE_FILE} and {SIDECAR_FILE} (a folder made by `sana-video build-engine`)")
    return EngineSidecar.from_json(path.read_text(), str(path))


def find_engines(path: str | Path) -> list[Path]:
    """Engine folders at ``path``: the folder itself if it is one, else its direct subfolders that are."""
    path = Path(path)
    if not path.is_dir():
        raise EngineNotFound(f"engine path {path} is not a folder (expected one made by `sana-video build-engine`)")
    if (path / SIDECAR_FILE).is_file():
        return [path]
    found = sorted(p for p in path.iterdir() if (p / SIDECAR_FILE).is_file() and (p / ENGINE_FILE).is_file())
    if not found:
        raise EngineNotFound(f"{path}: no engine folder (with {ENGINE_FILE} and {SIDECAR_FILE}) in it")
    return found


# ---------------------------------------------------------------------------------------------------------------------
# Build


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_engine(onnx_path: str | Path, out_dir: str | Path, *, precision: str, inputs: dict[str, dict[str, Any]],
                 output: dict[str, Any], model: dict[str, Any] | None = None, workspace_bytes: int | None = None) -> Path:
    """Build a strongly typed engine from ``onnx_path`` into ``out_dir`` (engine.plan + engine.json).

    The precision comes from the graph (Q/DQ nodes and tensor types); ``precision``, ``inputs`` and ``output``
    are recorded in the sidecar. Raises TensorRTUnavailable, EngineMismatch (GPU too old for ``precision``) or
    EngineBuildError (parser or builder errors, listed).
    """
    trt = import_tensorrt()
    if precision not in ENGINE_PRECISIONS:
        raise BackendError(f"precision {precision!r} (accepted: {', '.join(ENGINE_PRECISIONS)})")
    capability = gpu_capability()
    check_capability(precision, capability)
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 needs the flag; in TensorRT 11 every network is strongly typed and the flag may be gone.
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(1 << int(strongly_typed) if strongly_typed is not None else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT could not build a {precision} engine from {onnx_path} (see its log above)")
    out_dir.mkdir(parents=True, exist_ok=True)
    sidecar = EngineSidecar(
        tensorrt_version=trt.__version__, compute_capability=capability, precision=precision, inputs=inputs,
        output=output, gpu_name=torch.cuda.get_device_name(), model=model or {}, onnx_sha256=_sha256(onnx_path),
        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    _atomic_write(out_dir / ENGINE_FILE, bytes(plan))
    _atomic_write(out_dir / SIDECAR_FILE, sidecar.to_json().encode())
    return out_dir


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------------------------
# Run

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}


class EngineRunner:
    """One deserialized engine and its execution context; ``run`` takes and returns CUDA tensors."""

    def __init__(self, engine_dir: str | Path, device: torch.device | str = "cuda"):
        trt = import_tensorrt()
        self.dir = Path(engine_dir)
        self.sidecar = read_sidecar(self.dir)
        self.device = torch.device(device)
        check_sidecar(self.sidecar, trt.__version__, gpu_capability(self.device), where=str(self.dir))
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine((self.dir / ENGINE_FILE).read_bytes())
        if self.engine is None:
            raise EngineMismatch(f"{self.dir}: TensorRT {trt.__version__} could not deserialize {ENGINE_FILE}; rebuild it")
        self.context = self.engine.create_execution_context()
        self.inputs, self.outputs = {}, {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            spec = (tuple(self.engine.get_tensor_shape(name)), _TORCH_DTYPES[self.engine.get_tensor_dtype(name).name])
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs[name] = spec
            else:
                self.outputs[name] = spec

    @property
    def key(self) -> tuple[int, ...]:
        return self.inputs["hidden_states"][0]

    def accepts(self, tensors: dict[str, torch.Tensor]) -> bool:
        return all(name in tensors and tuple(tensors[name].shape) == shape for name, (shape, _) in self.inputs.items())

    def run(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        keep = []
        stream = torch.cuda.current_stream(self.device)
        for name, (shape, dtype) in self.inputs.items():
            t = tensors[name].to(device=self.device, dtype=dtype).contiguous()
            keep.append(t)
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name, (shape, dtype) in self.outputs.items():
            outs[name] = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, outs[name].data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise EngineBuildError(f"{self.dir}: TensorRT execution failed")
        return next(iter(outs.values()))


class TRTDenoiser(nn.Module):
    """Drop-in for the transformer in ``VideoPipeline``: same call signature, runs the clip step through the
    TensorRT engine whose static shapes match, else through ``fallback`` (the PyTorch transformer) when given.

    ``precision`` is the engines' precision; ``config``/``causal``/``dtype``/``device`` mirror the transformer's.
    """

    def __init__(self, runners: list[EngineRunner], config, fallback: nn.Module | None = None, dtype=torch.bfloat16):
        super().__init__()
        if not runners:
            raise EngineNotFound("TRTDenoiser needs at least one engine")
        precisions = {r.sidecar.precision for r in runners}
        if len(precisions) != 1:
            raise EngineMismatch(f"engines of several precisions given together: {sorted(precisions)}")
        self.runners = runners
        self.precision = precisions.pop()
        self.config = config
        self.causal = False
        self.fallback = fallback
        self._dtype = dtype
        self.engine_calls = 0
        self.fallback_calls = 0

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.runners[0].device

    def buckets(self) -> list[dict[str, tuple[int, ...]]]:
        return [r.sidecar.input_shapes() for r in self.runners]

    def forward(self, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask=None, guidance=None, *,
                state=None, commit=False, block_frames=None):
        tensors = {"hidden_states": hidden_states, "encoder_hidden_states": encoder_hidden_states,
                   "timestep": timestep.flatten(), "encoder_attention_mask": encoder_attention_mask}
        plain = state is None and not commit and block_frames is None and guidance is None and encoder_attention_mask is not None
        if plain:
            for runner in self.runners:
                fitted = padded_text(tensors, runner)
                if runner.accepts(fitted):
                    self.engine_calls += 1
                    return runner.run(fitted).to(hidden_states.dtype)
        if self.fallback is not None:
            self.fallback_calls += 1
            return self.fallback(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask, guidance,
                                 state=state, commit=commit, block_frames=block_frames)
        got = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
        raise EngineMismatch(
            f"no engine for this call (inputs {got}; engines serve {self.buckets()}) and no PyTorch fallback: build "
            "an engine for this size with `sana-video build-engine --height H --width W --frames N`"
        )


def padded_text(tensors: dict[str, torch.Tensor], runner) -> dict[str, torch.Tensor]:
    """``tensors`` with the text and its mask padded with masked-out tokens up to the length ``runner``'s engine
    was built for (the pipeline cuts a prompt's padding: engine.text.cut_padding; padding back is exact)."""
    want = runner.sidecar.input_shapes().get("encoder_attention_mask")
    mask = tensors["encoder_attention_mask"]
    if want is None or len(want) != 2 or mask.ndim != 2 or mask.shape[1] >= want[1]:
        return tensors
    extra = want[1] - mask.shape[1]
    text = tensors["encoder_hidden_states"]
    return {**tensors, "encoder_hidden_states": F.pad(text, (0, 0, 0, extra)),
            "encoder_attention_mask": F.pad(mask, (0, extra))}


class DenoiserChoice(NamedTuple):
    """What ``load_denoiser`` picked: the module to use as ``pipe.transformer``, its precision ("torch" for the
    PyTorch transformer), and the engine folders it runs (empty for torch)."""

    module: nn.Module
    precision: str
    engines: tuple[Path, ...]


def load_denoiser(pipe, precision: str = "auto", engine_path: str | Path | None = None,
                  keep_fallback: bool = True) -> DenoiserChoice:
    """The denoiser a worker should run for ``precision`` ("auto", "torch", "nvfp4", "fp8", "bf16").

    "torch": the pipeline's PyTorch transformer. An engine precision: the engines of that precision under
    ``engine_path`` (an engine folder or a folder of them), checked against this machine; raises EngineNotFound,
    EngineMismatch, TensorRTUnavailable or BackendError with what to do. "auto": the best precision this GPU and
    the usable engines under ``engine_path`` allow (``choose_precision``), else "torch" — never an error for a
    missing or unusable engine. Stream (block-causal) models always run in PyTorch.
    """
    precision = str(precision).lower()
    if precision not in BACKEND_PRECISIONS:
        raise BackendError(f"precision {precision!r} (accepted: {', '.join(BACKEND_PRECISIONS)})")
    torch_choice = DenoiserChoice(pipe.transformer, "torch", ())
    if precision == "torch":
        return torch_choice
    if pipe.causal:
        if precision == "auto":
            return torch_choice
        raise BackendError(f"model {pipe.name} is block-causal (stream mode): TensorRT engines cover the clip step only (accepted: torch, auto)")
    if engine_path is None:
        if precision == "auto":
            return torch_choice
        raise EngineNotFound(f"--precision {precision} needs --engine DIR (made by `sana-video build-engine --precision {precision}`)")
    if precision == "auto":
        try:
            trt = import_tensorrt()
            capability = gpu_capability(pipe.device if pipe.device.type == "cuda" else None)
            usable: dict[str, list[Path]] = {}
            for folder in find_engines(engine_path):
                sidecar = read_sidecar(folder)
                try:
                    check_sidecar(sidecar, trt.__version__, capability, where=str(folder))
                    check_engine_model(sidecar, pipe.name, where=str(folder))
                except EngineMismatch:
                    continue
                usable.setdefault(sidecar.precision, []).append(folder)
        except BackendError:
            return torch_choice
        chosen = choose_precision(capability, usable)
        if chosen == "torch":
            return torch_choice
        folders = usable[chosen]
    else:
        import_tensorrt()
        check_capability(precision, gpu_capability(pipe.device if pipe.device.type == "cuda" else None))
        sidecars = {f: read_sidecar(f) for f in find_engines(engine_path)}
        folders = [f for f, sidecar in sidecars.items() if sidecar.precision == precision]
        if not folders:
            raise EngineNotFound(f"{engine_path}: no {precision} engine there (build one with `sana-video build-engine --precision {precision}`)")
        for folder in folders:
            check_engine_model(sidecars[folder], pipe.name, where=str(folder))
        chosen = precision
    if pipe.device.type != "cuda":
        raise BackendError(f"TensorRT engines run on CUDA; the pipeline is on {pipe.device} (accepted here: torch)")
    runners = [EngineRunner(f, pipe.device) for f in folders]
    module = TRTDenoiser(runners, pipe.transformer.config, pipe.transformer if keep_fallback else None, pipe.dtype)
    return DenoiserChoice(module, chosen, tuple(folders))
