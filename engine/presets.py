"""Model presets: the one place that names every model we serve and its sampling defaults.

A preset is either built locally from small random-init configs (``tiny``, ``tiny-causal``: no download,
seeded, for tests and CPU development) or names a diffusers-format checkpoint (a hub id or a folder).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TransformerConfig:
    """Mirrors diffusers' ``SanaVideoTransformer3DModel`` config.json fields (defaults = the 2B model)."""

    in_channels: int = 16
    out_channels: int | None = 16
    num_attention_heads: int = 20
    attention_head_dim: int = 112
    num_layers: int = 20
    num_cross_attention_heads: int | None = 20
    cross_attention_head_dim: int | None = 112
    cross_attention_dim: int | None = 2240
    caption_channels: int = 2304
    mlp_ratio: float = 2.5
    dropout: float = 0.0
    attention_bias: bool = False
    sample_size: int = 30
    patch_size: tuple[int, int, int] = (1, 2, 2)
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    interpolation_scale: int | None = None
    guidance_embeds: bool = False
    guidance_embeds_scale: float = 0.1
    qk_norm: str | None = "rms_norm_across_heads"
    rope_max_seq_len: int = 1024

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TransformerConfig":
        """Build from a config.json dict; keys starting with '_' (diffusers metadata) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in data if not k.startswith("_") and k not in names)
        if unknown:
            raise ValueError(f"unknown transformer config fields: {', '.join(unknown)}")
        kwargs = {k: v for k, v in data.items() if k in names}
        if "patch_size" in kwargs and kwargs["patch_size"] is not None:
            kwargs["patch_size"] = tuple(kwargs["patch_size"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["patch_size"] = list(self.patch_size)
        return out


# Class names written in model_index.json / config.json of the official checkpoints.
BIDIRECTIONAL_CLASS = "SanaVideoTransformer3DModel"
CAUSAL_CLASS = "SanaVideoCausalTransformer3DModel"

# The official pipeline's "complex human instruction" prefix (diffusers SanaVideoPipeline default).
COMPLEX_HUMAN_INSTRUCTION = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for video generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, motion, and temporal relationships to create vivid and dynamic scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat slowly settling into a curled position, peacefully falling asleep on a warm sunny windowsill, with gentle sunlight filtering through surrounding pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps gradually lighting up, a diverse crowd of people in colorful clothing walking past, and a double-decker bus smoothly passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",
    "User Prompt: ",
)


@dataclass(frozen=True)
class ModelPreset:
    """Everything needed to build or locate a model and sample from it with sensible defaults."""

    name: str
    causal: bool
    # Hub id or folder of a diffusers-format pipeline; None for presets built locally from the configs below.
    source: str | None = None
    # Locally built presets: configs of each component (random init, seeded).
    transformer: TransformerConfig | None = None
    vae: dict[str, Any] | None = None
    text_encoder: dict[str, Any] | None = None
    vocab: tuple[str, ...] | None = None
    seed: int = 0
    # Sampling defaults.
    height: int = 480
    width: int = 832
    frames: int = 81
    fps: int = 16
    steps: int = 50
    guidance_scale: float = 6.0
    flow_shift: float = 8.0
    # Text conditioning as the official pipeline does it.
    max_sequence_length: int = 300
    use_instruction: bool = True
    motion_score: int | None = 30
    # Stream (block-causal) mode: latent frames per block and the few-step schedule of each block.
    block_latent_frames: int = 10
    stream_timesteps: tuple[int, ...] = (1000, 750, 500, 250)
    stream_shift: float = 3.0
    stream_guidance_scale: float = 1.0
    # Limits of this model (validated before any work starts).
    max_frames: int = 8001
    max_clip_frames: int = 161
    max_pixels: int = 1280 * 720
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def built_locally(self) -> bool:
        return self.source is None


# Small random configs that run a 33-frame 64x64 clip in seconds on 2 CPU cores.
_TINY_VOCAB = tuple(
    "a an the of on in with and to is at by from moving left right up down bouncing still slowly quickly "
    "red green blue yellow orange purple white black pink cyan gray brown circle square triangle ball box "
    "cat dog car tree sky sea city street night day sun moon light dark background motion score".split()
)

TINY_TRANSFORMER = TransformerConfig(
    num_attention_heads=2,
    attention_head_dim=24,
    num_layers=2,
    num_cross_attention_heads=2,
    cross_attention_head_dim=24,
    cross_attention_dim=48,
    caption_channels=32,
    mlp_ratio=2.5,
)
TINY_VAE = dict(
    base_dim=8,
    z_dim=16,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
)
TINY_TEXT_ENCODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=512,
)

_TINY_COMMON = dict(
    transformer=TINY_TRANSFORMER,
    vae=TINY_VAE,
    text_encoder=TINY_TEXT_ENCODER,
    vocab=_TINY_VOCAB,
    height=64,
    width=64,
    frames=33,
    fps=16,
    steps=4,
    guidance_scale=3.0,
    flow_shift=3.0,
    max_sequence_length=32,
    use_instruction=False,
    motion_score=None,
    block_latent_frames=3,
    stream_timesteps=(1000, 500),
    max_pixels=256 * 256,
    max_frames=2001,
    max_clip_frames=129,
)

# The small trained demo models shipped in engine/weights (training/README.md says how they were made): 64x64 clips
# of one coloured shape moving on a plain background, from captions like "a red circle moving left on a blue
# background". Sampling defaults here; the sana_video.json beside the weights holds the same values (a test keeps
# them equal).
DEMO_WEIGHTS = Path(__file__).resolve().parent / "weights"
DEMO_COMMON = dict(
    height=64,
    width=64,
    fps=16,
    flow_shift=3.0,
    max_sequence_length=16,
    use_instruction=False,
    motion_score=None,
    block_latent_frames=4,
    stream_shift=3.0,
    max_frames=4001,
    max_clip_frames=81,
    max_pixels=128 * 128,
)

PRESETS: dict[str, ModelPreset] = {
    "demo": ModelPreset(name="demo", causal=False, source=str(DEMO_WEIGHTS / "demo"), frames=33, steps=12,
                        guidance_scale=5.0, stream_timesteps=(1000, 750, 500, 250), **DEMO_COMMON),
    # Six steps per block (chosen at the end of run 10 on training combinations: colour 0.81, motion 0.94, against
    # 0.75 / 0.88 with four; benchmarks/results/demo/h200_run10_causal_train.log) with guidance 2.5 (chosen for run 13
    # on training combinations against 3.0 and 3.5: benchmarks/results/demo/select_guidance.json), both kept for the
    # shipped run 19 weights.
    "demo-causal": ModelPreset(name="demo-causal", causal=True, source=str(DEMO_WEIGHTS / "demo-causal"), frames=81,
                               steps=12, guidance_scale=4.0, stream_guidance_scale=2.5,
                               stream_timesteps=(1000, 833, 667, 500, 333, 167), **DEMO_COMMON),
    "tiny": ModelPreset(name="tiny", causal=False, seed=0, **_TINY_COMMON),
    "tiny-causal": ModelPreset(name="tiny-causal", causal=True, seed=1, **_TINY_COMMON),
    "sana-video-480p": ModelPreset(
        name="sana-video-480p",
        causal=False,
        source="Efficient-Large-Model/SANA-Video_2B_480p_diffusers",
        height=480,
        width=832,
        frames=81,
        steps=50,
        guidance_scale=6.0,
        flow_shift=8.0,
        max_frames=161,
        max_pixels=832 * 480,
    ),
    "sana-video-480p-longlive": ModelPreset(
        name="sana-video-480p-longlive",
        causal=True,
        source="Efficient-Large-Model/SANA-Video_2B_480p_LongLive_diffusers",
        height=480,
        width=832,
        frames=161,
        steps=4,
        guidance_scale=1.0,
        flow_shift=3.0,
        block_latent_frames=10,
        stream_timesteps=(1000, 750, 500, 250),
        stream_shift=3.0,
        max_frames=8001,
        max_pixels=832 * 480,
    ),
    "sana-video-720p": ModelPreset(
        name="sana-video-720p",
        causal=False,
        source="Efficient-Large-Model/SANA-Video_2B_720p_diffusers",
        height=704,
        width=1280,
        frames=81,
        steps=50,
        guidance_scale=6.0,
        flow_shift=8.0,
        max_frames=121,
        max_clip_frames=121,  # a clip model: this is the limit that applies
        max_pixels=1280 * 720,
    ),
}

# Short aliases users type.
ALIASES = {
    "480p": "sana-video-480p",
    "480p-longlive": "sana-video-480p-longlive",
    "longlive": "sana-video-480p-longlive",
    "720p": "sana-video-720p",
}


def get_preset(name: str) -> ModelPreset | None:
    """The preset called ``name`` (or one of its aliases), else None."""
    return PRESETS.get(ALIASES.get(name, name))
