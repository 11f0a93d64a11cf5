"""Plain data that flows out of the engine: parameters, progress and video chunks."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

Mode = Literal["clip", "stream"]


@dataclass
class GenerationParams:
    """One generation request. ``None`` fields take the model preset's defaults (see ``VideoPipeline.resolve``)."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    fps: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    mode: Mode | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Progress:
    """Where a generation stands. Blocks count from 1; ``step`` counts denoising forwards within the block."""

    block: int
    blocks_total: int
    step: int
    steps_total: int
    frames_done: int
    frames_total: int

    @property
    def fraction(self) -> float:
        if self.blocks_total <= 0 or self.steps_total <= 0:
            return 0.0
        done = (self.block - 1) + min(self.step, self.steps_total) / self.steps_total
        return max(0.0, min(1.0, done / self.blocks_total))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["fraction"] = round(self.fraction, 6)
        return out


@dataclass
class VideoChunk:
    """Decoded frames of one block: ``frames`` is uint8 [F, H, W, 3]; ``start_frame`` its first frame index."""

    index: int
    start_frame: int
    frames: np.ndarray

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])
