"""Calibration: real denoising runs of the pipeline over a prompt set.

Every transformer forward of every step (both halves of the classifier-free-guidance batch, every timestep from
pure noise to clean) passes through the quantizers, so the activation ranges they record are the ones met in
serving, not those of one synthetic input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.errors import InvalidParams
from engine.types import GenerationParams
from quantization.errors import QuantizationError

# Varied subjects, motion, lighting and colour, written like the official examples.
DEFAULT_PROMPTS = (
    "A red ball bouncing slowly across a wooden floor in a sunlit room",
    "A golden retriever running along a beach at sunset, waves rolling in",
    "A busy city street at night with glowing neon signs and cars passing by",
    "Close-up of a hummingbird hovering beside a purple flower, wings blurred",
    "A timelapse of clouds drifting over snowy mountain peaks under a blue sky",
    "An astronaut walking on the moon, Earth rising on the dark horizon",
    "Steam rising from a cup of coffee on a cafe table, rain on the window",
    "A paper boat floating down a small stream through a green forest",
    "A chef slicing vegetables quickly on a cutting board in a bright kitchen",
    "Fireworks bursting in many colours over a river at night",
    "A cat slowly waking up and stretching on a windowsill",
    "Aerial view of a sailboat crossing a turquoise bay",
)
# The tiny presets know only their small vocabulary; prompts in it exercise their text path for real.
TINY_PROMPTS = (
    "a red ball moving left",
    "a blue square moving right",
    "a green circle bouncing up and down",
    "a yellow box moving slowly on a dark background",
)


@dataclass(frozen=True)
class CalibrationSettings:
    """Sampling settings of the calibration runs; ``None`` takes the model preset's default."""

    prompts: tuple[str, ...]
    steps: int | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    seed: int = 0


def default_prompts(pipe) -> tuple[str, ...]:
    name = Path(pipe.preset.name).name
    if name.startswith("tiny"):
        return TINY_PROMPTS
    if name.startswith("demo"):
        # The demo models read 16 words of their own vocabulary: captions of training combinations (the held-out
        # ones stay out of calibration, since they score the quantized model).
        from training import data

        return tuple(c.prompt for c in data.sample_cases(12, torch.Generator().manual_seed(0), "train"))
    return DEFAULT_PROMPTS


def read_prompts(source: str | Path | Sequence[str] | None, pipe) -> tuple[str, ...]:
    """Prompts from a text file (one per line, blank lines and lines starting with '#' skipped), a list, or the
    default set when ``source`` is None."""
    if source is None:
        return default_prompts(pipe)
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise QuantizationError(f"calibration prompts {path}: cannot read ({exc}); expected a text file, one prompt a line") from exc
        prompts = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
        where = str(path)
    else:
        prompts = tuple(str(p).strip() for p in source if str(p).strip())
        where = "the prompt list"
    if not prompts:
        raise QuantizationError(f"{where} holds no prompt (expected one prompt a line)")
    return prompts


def forward_loop(pipe, settings: CalibrationSettings, on_prompt: Callable[[int, str], None] | None = None):
    """A ModelOpt ``forward_loop(model)``: runs ``pipe.generate`` for each prompt with ``model`` as the
    transformer. The decoded frames are discarded."""

    def loop(model) -> None:
        original = pipe.transformer
        pipe.transformer = model
        try:
            for i, prompt in enumerate(settings.prompts):
                if on_prompt is not None:
                    on_prompt(i, prompt)
                params = GenerationParams(
                    prompt=prompt, steps=settings.steps, frames=settings.frames, height=settings.height,
                    width=settings.width, seed=settings.seed + i,
                )
                try:
                    for _ in pipe.generate(params):
                        pass
                except InvalidParams as exc:
                    raise QuantizationError(f"calibration settings rejected by the model: {exc}") from exc
        finally:
            pipe.transformer = original

    return loop
