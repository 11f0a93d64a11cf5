"""Text-to-video generation in two modes, both generators of decoded frame chunks.

``clip``: bidirectional model, the whole latent video denoised for N steps (flow matching, DPM-Solver with
flow_shift, classifier-free guidance), then decoded block by block.
``stream``: block-causal model; the latent frames are cut into blocks (the first absorbs the remainder); each
block is denoised in a few steps, committed to the constant-memory ``BlockState`` by one more forward of the clean
block at t=0, decoded with the VAE cache kept, and yielded at once.

Progress is reported after every transformer forward; cancellation is checked before every one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from engine.errors import CheckpointError, GenerationCancelled, InvalidParams
from engine.loading import (
    build_transformer,
    check_device,
    check_saveable,
    load_transformer,
    parse_dtype,
    read_json,
    resolve_folder,
    save_transformer,
)
from engine.presets import PRESETS, ModelPreset, get_preset
from engine.state import BlockState
from engine.text import TextEncoder, build_text_encoder, build_word_tokenizer, cut_padding
from engine.types import GenerationParams, Progress, VideoChunk
from engine.vae import StreamingDecoder, build_vae, to_uint8, to_uint8_frames

PRESET_FILE = "sana_video.json"  # our sampling defaults stored beside a checkpoint (optional)
TEMPORAL_FACTOR, SPATIAL_FACTOR = 4, 8
MAX_PROMPT_CHARS = 4000


def latent_frames(frames: int) -> int:
    return (frames - 1) // TEMPORAL_FACTOR + 1


def stream_blocks(num_latent_frames: int, block: int) -> list[int]:
    """Latent frames per block: blocks of ``block`` frames, the first absorbing the remainder."""
    n = max(1, num_latent_frames // block)
    return [num_latent_frames - (n - 1) * block] + [block] * (n - 1)


def frames_of_blocks(blocks: list[int]) -> list[int]:
    """Decoded video frames per latent block (the causal VAE turns the very first latent frame into one frame)."""
    return [TEMPORAL_FACTOR * n - (TEMPORAL_FACTOR - 1 if i == 0 else 0) for i, n in enumerate(blocks)]


def shifted_sigma(t: float, shift: float) -> float:
    s = t / 1000.0
    return shift * s / (1 + (shift - 1) * s)


@contextlib.contextmanager
def _quiet_libraries():
    """diffusers/transformers loading chatter (progress bars, "accelerate not found", dtype advice) off for a load:
    the CLI prints its own progress and errors surface as CheckpointError."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error(), tlog.set_verbosity_error()
    dlog.disable_progress_bar(), tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0]), tlog.set_verbosity(levels[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


class VideoPipeline:
    """Owns the transformer, VAE and text encoder of one model; load once, generate many times."""

    def __init__(self, name: str, preset: ModelPreset, transformer, vae, text_encoder: TextEncoder, scheduler_config: dict,
                 device: torch.device, dtype: torch.dtype):
        self.name = name
        self.preset = preset
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.scheduler_config = scheduler_config
        self.device = device
        self.dtype = dtype
        self.last_state_bytes = 0
        self.patch = transformer.config.patch_size
        # Decode with engine.vae.FastWanDecoder (set by engine.fast.apply_fast_path); else diffusers' decoder.
        self.fast_vae = False
        # Streams on CUDA: decode each block on a side CUDA stream while the next one is denoised (DecodeQueue).
        self.overlap_decode = True
        # Cross-attention over the prompts' real tokens, not their padding to max_sequence_length (exact:
        # engine.text.cut_padding; a TensorRT engine built for the full length gets the padding back).
        self.cut_text_padding = True
        # One transformer forward at a time: a commit keeps per-layer sums on the modules between two calls, and
        # CUDA graphs replay into shared buffers, so generations in several threads take turns step by step.
        self._forward_lock = threading.Lock()

    @property
    def causal(self) -> bool:
        return self.transformer.causal

    # -- loading ---------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model: str, device=None, dtype=None) -> "VideoPipeline":
        """``model``: a preset name (see engine.presets), a diffusers-format pipeline folder, or a hub id."""
        dtype = parse_dtype(dtype)
        dev = check_device(device, dtype)
        if dtype is None:  # bf16 on GPUs that have it, else fp16; fp32 on the CPU
            if dev.type == "cuda":
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            else:
                dtype = torch.float32
        preset = get_preset(model)
        if preset is not None and preset.built_locally:
            return cls._build_local(preset, dev, dtype)
        source = preset.source if preset is not None else model
        folder = resolve_folder(source)
        return cls._load_folder(folder, preset, model, dev, dtype)

    @classmethod
    def _build_local(cls, preset: ModelPreset, dev, dtype) -> "VideoPipeline":
        transformer = build_transformer(preset.transformer, preset.causal, seed=preset.seed)
        vae = build_vae(preset.vae, seed=preset.seed + 100)
        tokenizer = build_word_tokenizer(preset.vocab)
        encoder = build_text_encoder(preset.text_encoder, len(tokenizer), seed=preset.seed + 200)
        if encoder.config.hidden_size != preset.transformer.caption_channels:
            raise CheckpointError(f"preset {preset.name}: text hidden size != transformer caption_channels")
        text = TextEncoder(tokenizer, encoder, preset.max_sequence_length, preset.use_instruction)
        return cls._assemble(preset.name, preset, transformer, vae, text, default_scheduler_config(preset), dev, dtype)

    @classmethod
    def _load_folder(cls, folder: Path, preset: ModelPreset | None, name: str, dev, dtype) -> "VideoPipeline":
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, Gemma2Model

        for sub in ("transformer", "vae", "text_encoder", "tokenizer"):
            if not (folder / sub).is_dir():
                raise CheckpointError(f"{folder}: expected a diffusers pipeline folder with a {sub}/ subfolder")
        vae_class = _component_class(folder, "vae")
        if vae_class not in (None, "AutoencoderKLWan"):
            # The 720p model's LTX-2 VAE has other compression factors and no block-wise decode here yet.
            raise CheckpointError(f"{folder}: VAE class {vae_class} is not supported (accepted: AutoencoderKLWan)")
        transformer = load_transformer(str(folder / "transformer"), dtype=dtype, device=dev)
        base = preset or PRESETS["sana-video-480p-longlive" if transformer.causal else "sana-video-480p"]
        overrides = {}
        if (folder / PRESET_FILE).exists():
            overrides = read_json(folder / PRESET_FILE)
            known = {f.name for f in dataclasses.fields(ModelPreset)} - {"name", "causal", "source"}
            unknown = sorted(set(overrides) - known) if isinstance(overrides, dict) else ["(not an object)"]
            if unknown:
                raise CheckpointError(f"{folder / PRESET_FILE}: unknown settings {unknown} (accepted: "
                                      f"{', '.join(sorted(known))})")
            fields = {f.name: f for f in dataclasses.fields(ModelPreset)}
            for key, value in overrides.items():
                if not _same_kind(fields[key], getattr(base, key), value):
                    raise CheckpointError(f"{folder / PRESET_FILE}: {key} is {value!r}, not of the kind of the "
                                          f"default {getattr(base, key)!r}")
            if "stream_timesteps" in overrides:
                overrides["stream_timesteps"] = tuple(overrides["stream_timesteps"])
        preset = dataclasses.replace(base, name=name, causal=transformer.causal, source=str(folder), **overrides)
        for part, needed in (("text_encoder", "config.json"), ("tokenizer", "tokenizer.json")):
            if not (folder / part / needed).is_file():  # else transformers falls back to defaults, or misleads
                raise CheckpointError(f"{folder}: {part}/{needed} is missing")
        loading = "vae"
        try:
            with _quiet_libraries():
                vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae").eval()
                loading = "tokenizer"
                tokenizer = AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
                loading = "text_encoder"
                encoder = Gemma2Model.from_pretrained(folder, subfolder="text_encoder").eval()
        except Exception as exc:  # damaged files surface as safetensors', transformers' or diffusers' own errors
            raise CheckpointError(f"{folder}: could not load {loading} ({type(exc).__name__}: {exc})") from exc
        latent = vae.config.z_dim
        if not latent == transformer.config.in_channels == (transformer.config.out_channels or latent):
            raise CheckpointError(
                f"{folder}: vae z_dim {latent} != transformer in_channels {transformer.config.in_channels} / "
                f"out_channels {transformer.config.out_channels}"
            )
        if encoder.config.hidden_size != transformer.config.caption_channels:
            raise CheckpointError(
                f"{folder}: text_encoder hidden_size {encoder.config.hidden_size} != transformer caption_channels "
                f"{transformer.config.caption_channels}"
            )
        sched = default_scheduler_config(preset)
        if (folder / "scheduler" / "scheduler_config.json").exists():
            sched = read_json(folder / "scheduler" / "scheduler_config.json")
            _check_scheduler(folder / "scheduler" / "scheduler_config.json", sched)
        text = TextEncoder(tokenizer, encoder, preset.max_sequence_length, preset.use_instruction)
        return cls._assemble(name, preset, transformer, vae, text, sched, dev, dtype)

    @classmethod
    def _assemble(cls, name, preset, transformer, vae, text, sched, dev, dtype) -> "VideoPipeline":
        with _quiet_libraries():  # diffusers' advice on keeping modules in fp32 does not apply to the Wan VAE
            transformer = transformer.to(device=dev, dtype=dtype).eval()
            vae = vae.to(device=dev, dtype=dtype).eval()
            text.to(device=dev, dtype=dtype)
        return cls(name, preset, transformer, vae, text, sched, dev, dtype)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the whole pipeline as a diffusers-format folder (plus our sampling defaults in sana_video.json)."""
        check_saveable(self.transformer)  # before anything is written
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_transformer(self.transformer, folder / "transformer")
        self.vae.save_pretrained(folder / "vae")
        self.text_encoder.model.save_pretrained(folder / "text_encoder")
        self.text_encoder.tokenizer.save_pretrained(folder / "tokenizer")
        (folder / "scheduler").mkdir(exist_ok=True)
        sched = {"_class_name": "DPMSolverMultistepScheduler", **self.scheduler_config}
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        index = {
            "_class_name": "SanaVideoPipeline",
            "_diffusers_version": "0.42.1",
            "transformer": ["diffusers", "SanaVideoCausalTransformer3DModel" if self.causal else "SanaVideoTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLWan"],
            "text_encoder": ["transformers", "Gemma2Model"],
            "tokenizer": ["transformers", type(self.text_encoder.tokenizer).__name__],
            "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        }
        (folder / "model_index.json").write_text(json.dumps(index, indent=2))
        p = self.preset
        defaults = dict(
            height=p.height, width=p.width, frames=p.frames, fps=p.fps, steps=p.steps, guidance_scale=p.guidance_scale,
            flow_shift=p.flow_shift, max_sequence_length=p.max_sequence_length, use_instruction=p.use_instruction,
            motion_score=p.motion_score, block_latent_frames=p.block_latent_frames,
            stream_timesteps=list(p.stream_timesteps), stream_shift=p.stream_shift,
            stream_guidance_scale=p.stream_guidance_scale, max_frames=p.max_frames, max_clip_frames=p.max_clip_frames,
            max_pixels=p.max_pixels,
        )
        (folder / PRESET_FILE).write_text(json.dumps(defaults, indent=2))
        return folder

    # -- requests --------------------------------------------------------------------------------------------------

    @property
    def size_multiple(self) -> int:
        return SPATIAL_FACTOR * max(self.patch[1], self.patch[2])

    def limits(self) -> dict:
        p = self.preset
        return {
            "mode": "stream" if self.causal else "clip",
            "frames": {"min": 1, "max": p.max_frames if self.causal else p.max_clip_frames, "rule": "4k+1"},
            "width_height_multiple": self.size_multiple,
            "max_pixels": p.max_pixels,
            "steps": {"min": 1, "max": 200},
            "guidance_scale": {"min": 0.0, "max": 20.0, "off_at_or_below": 1.0},
            "fps": {"min": 1, "max": 60},
        }

    def resolve(self, params: GenerationParams) -> GenerationParams:
        """Fill None fields from the preset and validate; raises InvalidParams(field, message, accepted)."""
        p = self.preset
        mode = params.mode or ("stream" if self.causal else "clip")
        if mode not in ("clip", "stream"):
            raise InvalidParams("mode", f"unknown mode {mode!r}", "clip, stream")
        if mode == "stream" and not self.causal:
            raise InvalidParams("mode", f"model {self.name} is bidirectional and cannot stream", "clip")
        if mode == "clip" and self.causal:
            raise InvalidParams("mode", f"model {self.name} is block-causal and generates streams", "stream")
        prompt = params.prompt if isinstance(params.prompt, str) else ""
        if not prompt.strip():
            raise InvalidParams("prompt", "must not be empty", f"1..{MAX_PROMPT_CHARS} characters")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InvalidParams("prompt", f"{len(prompt)} characters", f"1..{MAX_PROMPT_CHARS} characters")
        # The text encoder reads a fixed number of tokens; a longer prompt would lose its end (and the motion score
        # after it) without a word.
        for field, text, instruction in (("prompt", self._full_prompt(prompt), None),
                                         ("negative_prompt", params.negative_prompt or "", False)):
            over = self.text_encoder.overflow(text, with_instruction=instruction)
            if over is not None:
                raise InvalidParams(field, f"{over[0]} tokens, more than model {self.name} reads",
                                    f"at most {over[1]} tokens (special tokens"
                                    + (" and the motion score" if field == "prompt" and text != prompt else "")
                                    + " included)")
        m = self.size_multiple
        width = p.width if params.width is None else params.width
        height = p.height if params.height is None else params.height
        for field, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or value < m or value % m:
                raise InvalidParams(field, f"{value!r} is not a positive multiple of {m}", f"multiples of {m}")
        if width * height > p.max_pixels:
            # The field the request set, when it set one of the two (the other is the model's default).
            field = "height" if params.height is not None and params.width is None else "width"
            raise InvalidParams(field, f"{width}x{height} exceeds {p.max_pixels} pixels", f"width*height <= {p.max_pixels}")
        max_frames = p.max_frames if mode == "stream" else p.max_clip_frames
        frames = p.frames if params.frames is None else params.frames
        if not isinstance(frames, int) or frames < 1 or (frames - 1) % TEMPORAL_FACTOR or frames > max_frames:
            raise InvalidParams("frames", f"{frames!r} is not 4k+1 within 1..{max_frames}", f"4k+1, 1..{max_frames}")
        fps = p.fps if params.fps is None else params.fps
        if not isinstance(fps, int) or not 1 <= fps <= 60:
            raise InvalidParams("fps", f"{fps!r}", "integer 1..60")
        default_steps = len(p.stream_timesteps) if mode == "stream" else p.steps
        steps = default_steps if params.steps is None else params.steps
        if not isinstance(steps, int) or not 1 <= steps <= 200:
            raise InvalidParams("steps", f"{steps!r}", "integer 1..200")
        default_cfg = p.stream_guidance_scale if mode == "stream" else p.guidance_scale
        guidance = default_cfg if params.guidance_scale is None else float(params.guidance_scale)
        if not math.isfinite(guidance) or not 0.0 <= guidance <= 20.0:
            raise InvalidParams("guidance_scale", f"{guidance!r}", "0..20 (1 or less: no guidance)")
        if not isinstance(params.seed, int) or not 0 <= params.seed < 2**63:
            raise InvalidParams("seed", f"{params.seed!r}", "integer 0..2**63-1")
        return GenerationParams(
            prompt=prompt, negative_prompt=params.negative_prompt or "", width=width, height=height, frames=frames,
            fps=fps, steps=steps, guidance_scale=guidance, seed=params.seed, mode=mode,
        )

    def _blocks(self, params: GenerationParams) -> list[int]:
        block = self.preset.block_latent_frames
        return stream_blocks(latent_frames(params.frames), block)

    def plan(self, params: GenerationParams) -> dict:
        """Exact progress totals for a resolved request."""
        if params.mode == "stream":
            blocks = self._blocks(params)
            return {"blocks_total": len(blocks), "steps_per_block": params.steps + 1, "frames_total": params.frames}
        return {"blocks_total": 1, "steps_per_block": params.steps, "frames_total": params.frames}

    def stream_timesteps(self, steps: int) -> list[float]:
        ts = self.preset.stream_timesteps
        if steps != len(ts):
            ts = [1000.0 * (1 - i / steps) for i in range(steps)]
        return [float(t) for t in ts]

    # -- generation ------------------------------------------------------------------------------------------------

    def _full_prompt(self, prompt: str) -> str:
        """The prompt as the text encoder reads it: the model's motion score appended (official pipeline)."""
        if self.preset.motion_score is not None and "motion score" not in prompt:
            prompt = f"{prompt} motion score: {self.preset.motion_score}."
        return prompt

    def _encode_prompt(self, params: GenerationParams, cfg: bool):
        emb, mask = self.text_encoder.encode([self._full_prompt(params.prompt)])
        if cfg:
            neg, neg_mask = self.text_encoder.encode([params.negative_prompt], with_instruction=False)
            emb, mask = torch.cat([neg, emb]), torch.cat([neg_mask, mask])
        if self.cut_text_padding:
            emb, mask = cut_padding(emb, mask)
        return emb.to(self.dtype), mask

    def _velocity(self, x, t: float, emb, mask, guidance: float, cfg: bool, **kw) -> torch.Tensor:
        batch = 2 if cfg else 1
        inp = torch.cat([x] * batch).to(self.dtype)
        timestep = torch.full((batch,), float(t), device=self.device)
        with self._forward_lock:
            v = self.transformer(inp, emb, timestep, mask, **kw).float()
        if cfg:
            uncond, cond = v.chunk(2)
            v = uncond + guidance * (cond - uncond)
        return v

    def generate(
        self,
        params: GenerationParams,
        on_progress: Callable[[Progress], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> Iterator[VideoChunk]:
        """Yield VideoChunk (uint8 [F, H, W, 3]) as blocks are decoded. Raises GenerationCancelled at a step
        boundary when ``should_cancel()`` is true. ``params`` must come from ``resolve``."""
        params = self.resolve(params)
        try:
            if params.mode == "stream":
                yield from self._generate_stream(params, on_progress, should_cancel)
            else:
                yield from self._generate_clip(params, on_progress, should_cancel)
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _noise(self, gen: torch.Generator, shape) -> torch.Tensor:
        # Drawn on the CPU so a seed gives the same video on every device. Copied from pinned memory without blocking:
        # a stream draws noise between forwards, and a pageable copy would wait for the GPU to finish the last one.
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        if self.device.type != "cuda":
            return noise.to(self.device)
        return noise.pin_memory().to(self.device, non_blocking=True)

    def _latent_shape(self, params: GenerationParams, frames: int) -> tuple[int, ...]:
        c = self.transformer.config.in_channels
        return (1, c, frames, params.height // SPATIAL_FACTOR, params.width // SPATIAL_FACTOR)

    @torch.inference_mode()
    def _generate_clip(self, params, on_progress, should_cancel) -> Iterator[VideoChunk]:
        cfg = params.guidance_scale > 1.0
        emb, mask = self._encode_prompt(params, cfg)
        gen = torch.Generator("cpu").manual_seed(params.seed)
        total_latent = latent_frames(params.frames)
        latents = self._noise(gen, self._latent_shape(params, total_latent))
        scheduler = _scheduler(self.scheduler_config)
        scheduler.set_timesteps(params.steps, device=self.device)
        # The timesteps' values read once: float() of a GPU tensor every step would wait for the step before it.
        for i, (t, t_value) in enumerate(zip(scheduler.timesteps, scheduler.timesteps.tolist())):
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled("cancelled")
            v = self._velocity(latents, t_value, emb, mask, params.guidance_scale, cfg)
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
            if on_progress is not None:
                on_progress(Progress(1, 1, i + 1, params.steps, 0, params.frames))
        decoder = StreamingDecoder(self.vae, fast=self.fast_vae)
        start, frames_done = 0, 0
        for index, n in enumerate(self._blocks(params)):
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled("cancelled")
            pixels = decoder.decode_block(latents[:, :, start : start + n].to(self.dtype))
            start += n
            chunk = VideoChunk(index=index, start_frame=frames_done, frames=to_uint8_frames(pixels))
            frames_done += chunk.num_frames
            if on_progress is not None:
                on_progress(Progress(1, 1, params.steps, params.steps, frames_done, params.frames))
            yield chunk

    @torch.inference_mode()
    def _generate_stream(self, params, on_progress, should_cancel) -> Iterator[VideoChunk]:
        cfg = params.guidance_scale > 1.0
        emb, mask = self._encode_prompt(params, cfg)
        gen = torch.Generator("cpu").manual_seed(params.seed)
        blocks = self._blocks(params)
        shape = self._latent_shape(params, 1)
        state = BlockState.for_model(self.transformer, 2 if cfg else 1, shape[3], shape[4])
        self.last_state_bytes = state.nbytes()
        decoder = StreamingDecoder(self.vae, fast=self.fast_vae)
        # On CUDA every block's VAE decode and host copy run on a side stream (``DecodeQueue``) while the next block
        # is denoised; its frames are handed out at the first step boundary after they arrive. The first block's
        # frames are waited for: they are the stream's time to first frames.
        decodes = DecodeQueue(decoder, self.device) if self.overlap_decode and self.device.type == "cuda" else None
        timesteps = self.stream_timesteps(params.steps)
        sigmas = [shifted_sigma(t, self.preset.stream_shift) for t in timesteps]
        steps_total = len(timesteps) + 1
        frames_done = 0
        where = (1, 0)  # (block, step) reached: the progress a late chunk reports, so the fraction never goes back

        def chunk_of(index, frames):
            nonlocal frames_done
            chunk = VideoChunk(index=index, start_frame=frames_done, frames=frames)
            frames_done += chunk.num_frames
            if on_progress is not None:
                on_progress(Progress(where[0], len(blocks), where[1], steps_total, frames_done, params.frames))
            return chunk

        def arrived(keep: int = 1 << 30):
            """The decoded blocks that have arrived, in order; waits for the oldest while more than ``keep`` are
            queued."""
            while decodes and (len(decodes) > keep or decodes.ready()):
                yield chunk_of(*decodes.pop())

        try:
            for b, n in enumerate(blocks):
                block_shape = self._latent_shape(params, n)
                x = self._noise(gen, block_shape)
                x0 = x
                for i, sigma in enumerate(sigmas):
                    if should_cancel is not None and should_cancel():
                        raise GenerationCancelled("cancelled")
                    v = self._velocity(x, sigma * 1000.0, emb, mask, params.guidance_scale, cfg, state=state)
                    x0 = x - sigma * v
                    if i + 1 < len(sigmas):
                        x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * self._noise(gen, block_shape)
                    where = (b + 1, i + 1)
                    if on_progress is not None:
                        on_progress(Progress(b + 1, len(blocks), i + 1, steps_total, frames_done, params.frames))
                    yield from arrived()
                if should_cancel is not None and should_cancel():
                    raise GenerationCancelled("cancelled")
                # Commit: the clean block at t=0 adds its contribution to the running sums.
                self._velocity(x0, 0.0, emb, mask, params.guidance_scale, cfg, state=state, commit=True)
                where = (b + 1, steps_total)
                if on_progress is not None:  # the commit is a step; its decode is not
                    on_progress(Progress(b + 1, len(blocks), steps_total, steps_total, frames_done, params.frames))
                latents = x0.to(self.dtype)
                if decodes is None:
                    yield chunk_of(b, to_uint8_frames(decoder.decode_block(latents)))
                    continue
                decodes.push(b, latents)
                # The first block's frames at once; later, at most two decodes queued (host memory and latency bounded).
                yield from arrived(keep=0 if b == 0 else 2)
            yield from arrived(keep=0)
        finally:
            if decodes is not None:
                # Closed or cancelled with decodes queued: the main stream waits for them before anything they
                # read (latents, the decoder's tables) can be freed and reused.
                torch.cuda.current_stream(self.device).wait_stream(decodes.stream)


class DecodeQueue:
    """Block decodes on a side CUDA stream: ``push`` queues a block's decode and the copy of its uint8 frames to
    pinned host memory behind the main stream's work so far, without waiting; ``ready``/``pop`` hand them out in
    order. The decoder (and its cache) is only ever used on the side stream."""

    def __init__(self, decoder: StreamingDecoder, device: torch.device):
        self.decoder = decoder
        self.stream = torch.cuda.Stream(device)
        self.items: list = []  # (index, pinned uint8 frames [F, H, W, 3], event recorded after the copy)

    def __len__(self) -> int:
        return len(self.items)

    def push(self, index: int, latents: torch.Tensor) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(latents.device))
        with torch.cuda.stream(self.stream):
            latents.record_stream(self.stream)  # made on the main stream, read on this one
            frames = to_uint8(self.decoder.decode_block(latents))
            host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(frames, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.items.append((index, host, done))

    def ready(self) -> bool:
        return bool(self.items) and self.items[0][2].query()

    def pop(self) -> tuple[int, object]:
        index, host, done = self.items.pop(0)
        done.synchronize()
        # A copy: a consumer that keeps its chunks must not keep page-locked memory (a minute at 480p is 1.1 GiB);
        # the pinned buffer goes back to PyTorch's cache for the next block.
        return index, host.numpy().copy()


def _same_kind(field: dataclasses.Field, default, value) -> bool:
    """Whether a ``sana_video.json`` value can stand where the preset has ``default`` (JSON has no tuples)."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if value is None:
        return "None" in str(field.type)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return number(value) and isinstance(value, int)
    if isinstance(default, float):
        return number(value)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, tuple):
        return isinstance(value, list) and all(map(number, value))
    return True  # None defaults (component configs): checked where they are used


def _component_class(folder: Path, component: str) -> str | None:
    """The class model_index.json names for ``component`` (None when the file or entry is absent)."""
    index = folder / "model_index.json"
    if not index.exists():
        return None
    entry = read_json(index).get(component)
    return entry[1] if isinstance(entry, list) and len(entry) == 2 else None


def _scheduler(config: dict):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def _check_scheduler(path: Path, config: dict) -> None:
    """A checkpoint's scheduler must be one we sample with, and buildable: at load, not at a job's first step."""
    name = config.get("_class_name", "DPMSolverMultistepScheduler")
    if name != "DPMSolverMultistepScheduler":
        raise CheckpointError(f"{path}: _class_name is {name!r} (accepted: 'DPMSolverMultistepScheduler')")
    try:
        _scheduler(config)
    except Exception as exc:  # diffusers' own check: NotImplementedError for an unknown algorithm_type, ...
        raise CheckpointError(f"{path}: cannot build the scheduler ({type(exc).__name__}: {exc})") from exc


def default_scheduler_config(preset: ModelPreset) -> dict:
    """The official SANA-Video scheduler: DPM-Solver++ on flow-matching sigmas with flow_shift."""
    return {
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "prediction_type": "flow_prediction",
        "use_flow_sigmas": True,
        "flow_shift": preset.flow_shift,
        "num_train_timesteps": 1000,
        "lower_order_final": True,
        "final_sigmas_type": "zero",
    }
