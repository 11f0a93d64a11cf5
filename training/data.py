"""Procedural captioned clips for the demo models: one coloured shape moving on a plain background.

A scene is a coloured circle, square or triangle that moves left, right, up or down at a constant speed (wrapping
around the frame edges, so a stream of any length keeps moving) or bounces on an invisible floor, on a plain
background of another colour. A mover starts on the side it comes from (one moving left starts in the right part of
the frame), so every frame of a clip, the first one included, shows where its caption says it goes. Its caption is
built from the same parameters: "a red circle moving left on a blue background", "a green triangle bouncing on a
black background".

Clips are rendered directly on the device (vectorised torch, anti-aliased signed distances), so training needs no
dataset files. Twelve colour/shape/motion combinations (``HELD_OUT``) are never used for training: the evaluation
prompts are made of them.

Shapes: B clips, F frames, H = W = ``SIZE`` pixels. Positions are in pixels, speeds in pixels per frame.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

SIZE = 64  # frame height and width, pixels
FPS = 16

# One palette for objects and backgrounds: a name in a caption always means the same RGB.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 210),
    "blue": (40, 80, 220),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "gray": (120, 120, 120),
}
OBJECT_COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
BACKGROUND_COLOURS = ("black", "gray", "white", "blue", "green")
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "bouncing")
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # image y points down

# Never trained on; the evaluation prompts use these. Triple i is (colour i+1 mod 8, shape i mod 3, motion i mod 5):
# twelve distinct combinations in which every colour, shape and motion still occurs in training with other partners.
# (The README's example, a red circle moving left, is a training combination: the first command must be dependable.)
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("orange", "circle", "left"),
    ("yellow", "square", "right"),
    ("green", "triangle", "up"),
    ("cyan", "circle", "down"),
    ("blue", "square", "bouncing"),
    ("purple", "triangle", "left"),
    ("white", "circle", "right"),
    ("red", "square", "up"),
    ("orange", "triangle", "down"),
    ("yellow", "circle", "bouncing"),
    ("green", "square", "left"),
    ("cyan", "triangle", "right"),
)

# Every word a caption can contain (the word-level tokenizer's vocabulary).
VOCAB: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["a", "an", "moving", "bouncing", "on", "background", *SHAPES, *DIRECTIONS, *OBJECT_COLOURS,
         *BACKGROUND_COLOURS]
    )
)

# Ranges of the random scene parameters.
RADIUS = (7.0, 10.0)  # circle radius; the square and triangle are scaled to a similar size
SPEED = (1.0, 1.6)  # pixels per frame for the movers: 32-51 pixels over a 33-frame clip
# Where a mover starts along its direction, as a share of the frame measured from the edge it moves towards: one moving
# left starts at x = SIZE * u with u in ENTRY (the right part). Without this every frame of a clip would look the same
# for "left" and "right" (uniform positions), and a model learns the sign of a motion only from the correlation between
# frames, far more slowly than the colour (measured: a model trained that way got the axis right, the sign at chance).
ENTRY = (0.6, 0.95)
BOUNCE_PERIOD = (10.0, 16.0)  # frames per bounce
BOUNCE_HEIGHT = (14.0, 24.0)  # pixels


def caption(colour: str, shape: str, motion: str, background: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    verb = "bouncing" if motion == "bouncing" else f"moving {motion}"
    return f"{article} {colour} {shape} {verb} on a {background} background"


def _triples(split: str) -> list[tuple[str, str, str]]:
    every = [(c, s, m) for c in OBJECT_COLOURS for s in SHAPES for m in MOTIONS]
    if split == "all":
        return every
    if split == "train":
        return [t for t in every if t not in HELD_OUT]
    if split == "held_out":
        return list(HELD_OUT)
    raise ValueError(f"unknown split {split!r} (accepted: train, held_out, all)")


def backgrounds_for(colour: str) -> list[str]:
    """The backgrounds an object of ``colour`` may appear on (never its own colour)."""
    return [b for b in BACKGROUND_COLOURS if b != colour]


@dataclass(frozen=True)
class Case:
    """One caption's parameters (the evaluation's ground truth)."""

    colour: str
    shape: str
    motion: str
    background: str

    @property
    def prompt(self) -> str:
        return caption(self.colour, self.shape, self.motion, self.background)


def held_out_cases(backgrounds_per_triple: int = 2) -> list[Case]:
    """The evaluation prompts: each held-out triple on ``backgrounds_per_triple`` backgrounds (fixed choice)."""
    cases = []
    for i, (colour, shape, motion) in enumerate(HELD_OUT):
        options = backgrounds_for(colour)
        for j in range(backgrounds_per_triple):
            cases.append(Case(colour, shape, motion, options[(i + j) % len(options)]))
    return cases


def sample_cases(n: int, generator: torch.Generator, split: str = "train") -> list[Case]:
    """``n`` random cases of ``split`` ("train": every combination but HELD_OUT; "held_out"; "all")."""
    return _draw(_triples(split), n, generator)


def check_focus(colours: tuple[str, ...], background: str | None) -> None:
    """ValueError unless ``colours`` are object colours (at least one) and ``background`` a background colour."""
    unknown = [c for c in colours if c not in OBJECT_COLOURS] + (
        [background] if background is not None and background not in BACKGROUND_COLOURS else [])
    if unknown or not colours:
        raise ValueError(f"focus colours {list(colours)} / background {background!r}: expected object colours from "
                         f"{', '.join(OBJECT_COLOURS)} and a background from {', '.join(BACKGROUND_COLOURS)}")


def sample_focus_cases(n: int, generator: torch.Generator, colours: tuple[str, ...], background: str | None,
                       split: str = "train") -> list[Case]:
    """``n`` random cases of ``split`` whose object has one of ``colours``; half of them on ``background`` (where the
    colour allows it), the rest on any allowed background. Training draws a share of its clips this way to practise
    the distinctions a model gets wrong (red against green on white, say) more often than uniform sampling would."""
    check_focus(colours, background)
    return _draw([t for t in _triples(split) if t[0] in colours], n, generator, background)


def _draw(triples: list[tuple[str, str, str]], n: int, generator: torch.Generator,
          prefer: str | None = None) -> list[Case]:
    """``n`` cases of random ``triples`` on random allowed backgrounds; every other case on ``prefer`` instead, where
    the colour allows it."""
    picks = torch.randint(len(triples), (n,), generator=generator, device=generator.device).tolist()
    backs = torch.randint(2**31 - 1, (n,), generator=generator, device=generator.device).tolist()
    out = []
    for i, (pick, back) in enumerate(zip(picks, backs)):
        colour, shape, motion = triples[pick]
        options = backgrounds_for(colour)
        chosen = prefer if i % 2 == 0 and prefer in options else options[back % len(options)]
        out.append(Case(colour, shape, motion, chosen))
    return out


@dataclass
class Scenes:
    """A batch of scenes: attribute indices (long [B]) and continuous parameters (float [B])."""

    colour: torch.Tensor  # index into OBJECT_COLOURS
    shape: torch.Tensor  # index into SHAPES
    motion: torch.Tensor  # index into MOTIONS
    background: torch.Tensor  # index into BACKGROUND_COLOURS
    radius: torch.Tensor
    x0: torch.Tensor
    y0: torch.Tensor  # for bouncing: the floor (lowest centre position)
    speed: torch.Tensor
    period: torch.Tensor
    height: torch.Tensor
    phase: torch.Tensor  # bounce phase in [0, 1)

    def __len__(self) -> int:
        return int(self.colour.shape[0])

    def __getitem__(self, index) -> "Scenes":
        return Scenes(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})

    def cases(self) -> list[Case]:
        columns = zip(self.colour.tolist(), self.shape.tolist(), self.motion.tolist(), self.background.tolist())
        return [Case(OBJECT_COLOURS[c], SHAPES[s], MOTIONS[m], BACKGROUND_COLOURS[b]) for c, s, m, b in columns]

    def captions(self) -> list[str]:
        return [c.prompt for c in self.cases()]


def scenes_for(cases: list[Case], generator: torch.Generator, device=None) -> Scenes:
    """Scenes with the given attributes and random positions, sizes, speeds and bounce parameters."""
    device = torch.device(device) if device is not None else generator.device
    n = len(cases)

    def index(names, values):
        return torch.tensor([names.index(v) for v in values], dtype=torch.long, device=device)

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator, device=generator.device).to(device)

    radius = uniform(*RADIUS)
    height = uniform(*BOUNCE_HEIGHT)
    motion = index(MOTIONS, [c.motion for c in cases])
    bouncing = motion == MOTIONS.index("bouncing")
    # Movers start on the side they come from (ENTRY) and anywhere across it; they wrap around the edges. A bouncing
    # shape's floor keeps the whole bounce inside the frame.
    floor_lo, floor_hi = height + 1.3 * radius + 1.0, SIZE - 1.3 * radius - 1.0
    floor = floor_lo + (floor_hi - floor_lo) * uniform(0.0, 1.0)
    dirs = torch.tensor([DIRECTIONS.get(m, (0.0, 0.0)) for m in MOTIONS], device=device)[motion]  # [n, 2]
    entry = SIZE * uniform(*ENTRY)
    x_free, y_free = uniform(0.0, SIZE), uniform(0.0, SIZE)
    x_free = torch.where(dirs[:, 0] < 0, entry, torch.where(dirs[:, 0] > 0, SIZE - entry, x_free))
    y_free = torch.where(dirs[:, 1] < 0, entry, torch.where(dirs[:, 1] > 0, SIZE - entry, y_free))
    x_bounce = 1.3 * radius + 1.0 + (SIZE - 2.6 * radius - 2.0) * uniform(0.0, 1.0)
    return Scenes(
        colour=index(OBJECT_COLOURS, [c.colour for c in cases]),
        shape=index(SHAPES, [c.shape for c in cases]),
        motion=motion,
        background=index(BACKGROUND_COLOURS, [c.background for c in cases]),
        radius=radius,
        x0=torch.where(bouncing, x_bounce, x_free),
        y0=torch.where(bouncing, floor, y_free),
        speed=uniform(*SPEED),
        period=uniform(*BOUNCE_PERIOD),
        height=height,
        phase=uniform(0.0, 1.0),
    )


def tracks(scenes: Scenes, frames: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre positions (x, y) [B, F] in pixels of frames ``start .. start+frames-1`` (x, y taken modulo SIZE)."""
    t = torch.arange(start, start + frames, device=scenes.x0.device, dtype=torch.float32)[None]
    dirs = torch.tensor([DIRECTIONS.get(m, (0.0, 0.0)) for m in MOTIONS], device=t.device)[scenes.motion]
    x = scenes.x0[:, None] + scenes.speed[:, None] * dirs[:, :1] * t
    y = scenes.y0[:, None] + scenes.speed[:, None] * dirs[:, 1:] * t
    bounce = scenes.y0[:, None] - scenes.height[:, None] * torch.sin(
        math.pi * (t / scenes.period[:, None] + scenes.phase[:, None])
    ).abs()
    bouncing = (scenes.motion == MOTIONS.index("bouncing"))[:, None]
    y = torch.where(bouncing, bounce, y)
    return torch.remainder(x, SIZE), torch.remainder(y, SIZE)


def _circle(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(dx * dx + dy * dy) - r


def _square(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    # Same area as the circle: half side sqrt(pi)/2 * r.
    qx, qy = dx.abs() - 0.886 * r, dy.abs() - 0.886 * r
    return torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2) + torch.maximum(qx, qy).clamp(max=0)


def _triangle(dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    # Equilateral, pointing up, centroid at 0, circumradius 1.3 r (exact distance, after Inigo Quilez).
    k = math.sqrt(3.0)
    half = 1.3 * r * k / 2
    px, py = dx.abs() - half, -dy + half / k
    fold = px + k * py > 0
    px, py = torch.where(fold, (px - k * py) / 2, px), torch.where(fold, (-k * px - py) / 2, py)
    px = px - torch.minimum(torch.maximum(px, -2 * half), torch.zeros_like(px))
    return -torch.sqrt(px * px + py * py) * torch.sign(py)


def _signed_distance(dx: torch.Tensor, dy: torch.Tensor, shape: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, negative inside) [B, F, H, W] of offsets dx [B, F, 1, W], dy [B, F, H, 1] from each
    scene's shape centred at 0."""
    out = torch.empty(dx.shape[0], dx.shape[1], dy.shape[2], dx.shape[3], device=dx.device)
    for index, fn in enumerate((_circle, _square, _triangle)):
        rows = (shape == index).nonzero().squeeze(1)
        if len(rows):
            out[rows] = fn(dx[rows], dy[rows], radius[rows].view(-1, 1, 1, 1))
    return out


def render(scenes: Scenes, frames: int, start: int = 0, with_alpha: bool = False):
    """Clips [B, 3, F, H, W] in [-1, 1] (the VAE's input layout) of frames ``start .. start+frames-1``; with
    ``with_alpha`` also the object's coverage [B, F, H, W] in [0, 1]."""
    device = scenes.x0.device
    cx, cy = tracks(scenes, frames, start)
    coords = torch.arange(SIZE, device=device, dtype=torch.float32) + 0.5
    # Toroidal offsets: a shape crossing an edge shows on both sides.
    dx = torch.remainder(coords.view(1, 1, 1, SIZE) - cx[:, :, None, None] + SIZE / 2, SIZE) - SIZE / 2
    dy = torch.remainder(coords.view(1, 1, SIZE, 1) - cy[:, :, None, None] + SIZE / 2, SIZE) - SIZE / 2
    alpha = (0.5 - _signed_distance(dx, dy, scenes.shape, scenes.radius)).clamp(0.0, 1.0)  # [B, F, H, W]
    palette = torch.tensor([PALETTE[c] for c in PALETTE], device=device, dtype=torch.float32) / 127.5 - 1.0
    names = list(PALETTE)
    obj = palette[torch.tensor([names.index(c) for c in OBJECT_COLOURS], device=device)][scenes.colour]
    bg = palette[torch.tensor([names.index(c) for c in BACKGROUND_COLOURS], device=device)][scenes.background]
    a = alpha[:, None]
    video = bg.view(-1, 3, 1, 1, 1) * (1 - a) + obj.view(-1, 3, 1, 1, 1) * a
    return (video, alpha) if with_alpha else video


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[B, 3, F, H, W] in [-1, 1] -> uint8 numpy [B, F, H, W, 3] (what a decoder hands out)."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()
