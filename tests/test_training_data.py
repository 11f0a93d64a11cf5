"""The procedural clips of the demo models: captions, held-out combinations, rendering and motion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.text import build_word_tokenizer
from training import data


def test_captions_name_the_parameters_and_use_only_the_vocabulary():
    assert data.caption("red", "circle", "left", "blue") == "a red circle moving left on a blue background"
    assert data.caption("orange", "square", "bouncing", "black") == "an orange square bouncing on a black background"
    tokenizer = build_word_tokenizer(data.VOCAB)
    unk = tokenizer.convert_tokens_to_ids("<unk>")
    cases = data.sample_cases(300, torch.Generator().manual_seed(0), "all")
    for case in cases:
        ids = tokenizer(case.prompt).input_ids
        assert unk not in ids, case.prompt
        assert case.background != case.colour


def test_held_out_combinations_never_reach_training_but_their_parts_do():
    assert len(set(data.HELD_OUT)) == len(data.HELD_OUT) == 12
    train = data.sample_cases(3000, torch.Generator().manual_seed(1), "train")
    seen = {(c.colour, c.shape, c.motion) for c in train}
    assert not seen & set(data.HELD_OUT)
    # Every triple that is not held out shows up, and every attribute of a held-out triple is trained elsewhere.
    assert len(seen) == len(data.OBJECT_COLOURS) * len(data.SHAPES) * len(data.MOTIONS) - 12
    for colour, shape, motion in data.HELD_OUT:
        assert any(c == colour for c, _, _ in seen) and any(s == shape for _, s, _ in seen)
        assert any(m == motion for _, _, m in seen)
    assert ("red", "circle", "left") not in data.HELD_OUT  # the README's first command asks for one
    cases = data.held_out_cases(2)
    assert len(cases) == 24 and len({c.prompt for c in cases}) == 24
    assert {(c.colour, c.shape, c.motion) for c in cases} == set(data.HELD_OUT)



def test_focus_cases_keep_to_their_colours_and_never_reach_held_out_combinations():
    cases = data.sample_focus_cases(400, torch.Generator().manual_seed(3), ("red", "white"), "white")
    assert {c.colour for c in cases} == {"red", "white"}
    assert not {(c.colour, c.shape, c.motion) for c in cases} & set(data.HELD_OUT)
    red = [c for c in cases if c.colour == "red"]
    on_white = sum(c.background == "white" for c in red) / len(red)
    assert 0.5 < on_white < 0.75  # half of them by choice, the rest a fifth of the time by chance
    assert all(c.background != "white" for c in cases if c.colour == "white")  # never on its own colour
    for colours, background in ((("red", "pink"), "white"), (("red",), "beige"), ((), "white")):
        with pytest.raises(ValueError, match="expected object colours"):
            data.sample_focus_cases(1, torch.Generator(), colours, background)

def test_render_draws_the_named_colours_and_shapes():
    cases = [data.Case("red", "circle", "left", "blue"), data.Case("yellow", "square", "up", "black"),
             data.Case("white", "triangle", "bouncing", "gray")]
    scenes = data.scenes_for(cases, torch.Generator().manual_seed(2))
    video, alpha = data.render(scenes, 9, with_alpha=True)
    assert video.shape == (3, 3, 9, data.SIZE, data.SIZE) and alpha.shape == (3, 9, data.SIZE, data.SIZE)
    assert video.min() >= -1 and video.max() <= 1
    frames = data.to_uint8(video)
    assert frames.shape == (3, 9, data.SIZE, data.SIZE, 3) and frames.dtype == np.uint8
    for i, case in enumerate(cases):
        inside = alpha[i].numpy() == 1.0
        outside = alpha[i].numpy() == 0.0
        assert np.all(frames[i][inside] == data.PALETTE[case.colour])
        assert np.all(frames[i][outside] == data.PALETTE[case.background])
    # Similar sizes, different outlines: a square covers its bounding box, a triangle about half of it.
    area = alpha.sum(dim=(2, 3))[:, 0]
    r = scenes.radius
    assert torch.allclose(area[0], torch.pi * r[0] ** 2, rtol=0.05)
    assert torch.allclose(area[1], (1.772 * r[1]) ** 2, rtol=0.05)
    assert 0.3 * torch.pi * r[2] ** 2 < area[2] < 1.1 * torch.pi * r[2] ** 2


@pytest.mark.parametrize("motion", data.MOTIONS)
def test_tracks_move_as_named(motion):
    cases = [data.Case("green", "square", motion, "black")] * 16
    scenes = data.scenes_for(cases, torch.Generator().manual_seed(3))
    x, y = data.tracks(scenes, 33)
    dx = (torch.diff(x, dim=1) + data.SIZE / 2) % data.SIZE - data.SIZE / 2  # wrapped steps
    dy = (torch.diff(y, dim=1) + data.SIZE / 2) % data.SIZE - data.SIZE / 2
    if motion == "bouncing":
        assert torch.all(dx == 0)
        assert torch.all((dy < 0).any(dim=1) & (dy > 0).any(dim=1))  # up and down in every clip
        # The whole bounce stays inside the frame.
        assert torch.all(y - 1.3 * scenes.radius[:, None] >= 0) and torch.all(y + 1.3 * scenes.radius[:, None] <= 64)
    else:
        ux, uy = data.DIRECTIONS[motion]
        speed = scenes.speed[:, None]
        assert torch.allclose(dx, ux * speed.expand_as(dx), atol=1e-3)
        assert torch.allclose(dy, uy * speed.expand_as(dy), atol=1e-3)


def test_shapes_wrap_around_the_edges():
    scenes = data.scenes_for([data.Case("red", "circle", "left", "black")], torch.Generator().manual_seed(4))
    scenes.x0[:] = 0.0
    scenes.y0[:] = 32.0
    _, alpha = data.render(scenes, 1, with_alpha=True)
    row = alpha[0, 0, 32]
    assert row[0] == 1 and row[-1] == 1 and row[32] == 0  # half on the left edge, half on the right


@pytest.mark.parametrize("motion", ["left", "right", "up", "down"])
def test_movers_start_on_the_side_they_come_from(motion):
    """Every frame, the first included, tells the direction: a left mover starts in the right part of the frame and
    is in the left part after a 33-frame clip far more often than not."""
    cases = [data.Case("red", "circle", motion, "black")] * 400
    scenes = data.scenes_for(cases, torch.Generator().manual_seed(5))
    x, y = data.tracks(scenes, 33)
    ux, uy = data.DIRECTIONS[motion]
    along, across = (x, y) if ux else (y, x)
    sign = ux or uy
    lo, hi = data.SIZE * data.ENTRY[0], data.SIZE * data.ENTRY[1]
    start = along[:, 0] if sign < 0 else data.SIZE - along[:, 0]
    assert torch.all((start >= lo) & (start <= hi))
    assert across[:, 0].min() < 0.1 * data.SIZE and across[:, 0].max() > 0.9 * data.SIZE  # anywhere across it
    half = data.SIZE / 2
    ends_where_it_goes = (along[:, -1] < half) if sign < 0 else (along[:, -1] >= half)
    assert ends_where_it_goes.float().mean() > 0.75
