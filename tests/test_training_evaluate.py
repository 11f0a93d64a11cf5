"""The colour/motion measurement from decoded frames: right on the generator's own clips, wrong when the clip is
wrong, and the batched generation it runs on equals the pipeline prompt by prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.pipeline import VideoPipeline
from engine.state import BlockState
from engine.types import GenerationParams
from training import data
from training.evaluate import (accuracy, generate_clips, ground_truth, measure, measure_blocks, round_trip_blocks,
                               stream_consistency)


def every_combination(backgrounds: int = 1) -> list[data.Case]:
    out = []
    for i, (c, s, m) in enumerate((c, s, m) for c in data.OBJECT_COLOURS for s in data.SHAPES for m in data.MOTIONS):
        options = data.backgrounds_for(c)
        out += [data.Case(c, s, m, options[(i + j) % len(options)]) for j in range(backgrounds)]
    return out


def clips_of(cases, frames, seed=0):
    return data.to_uint8(data.render(data.scenes_for(cases, torch.Generator().manual_seed(seed)), frames))


def test_ground_truth_clips_are_measured_right():
    cases = every_combination()
    result = ground_truth(cases, frames=33, seed=5)
    assert result == {"clips": 120, "colour_accuracy": 1.0, "motion_accuracy": 1.0}


def test_one_second_blocks_are_measured_right():
    cases = every_combination()[::2]
    clips = clips_of(cases, 49, seed=6)
    for case, clip in zip(cases, clips):
        blocks = [clip[:17], clip[17:33], clip[33:]]
        for m in measure_blocks(blocks):
            assert (m.colour, m.motion) == (case.colour, case.motion), case


def test_wrong_clips_are_measured_wrong():
    case = data.Case("red", "circle", "left", "blue")
    clip = clips_of([case], 33, seed=7)[0]
    assert (measure(clip).colour, measure(clip).motion) == ("red", "left")
    assert measure(clip[::-1].copy()).motion == "right"  # played backwards
    assert measure(np.repeat(clip[:1], 33, axis=0)).motion == "still"
    empty = np.broadcast_to(np.array(data.PALETTE["blue"], dtype=np.uint8), clip.shape).copy()
    assert (measure(empty).colour, measure(empty).motion) == (None, None)
    other = clips_of([data.Case("green", "circle", "up", "blue")], 33, seed=7)[0]
    assert accuracy([measure(other)], [case]) == {"clips": 1, "colour_accuracy": 0.0, "motion_accuracy": 0.0}
    scenes = data.scenes_for([data.Case("red", "circle", "bouncing", "blue")], torch.Generator().manual_seed(7))
    bounce = data.to_uint8(data.render(scenes, 33))[0]
    assert measure(bounce).motion == "bouncing"
    # Between two turns a bounce is a plain vertical move.
    dy = np.diff(data.tracks(scenes, 33)[1][0].numpy())
    start = next(i for i in range(len(dy) - 6) if np.all(np.sign(dy[i : i + 6]) == np.sign(dy[i])))
    assert measure(bounce[start : start + 7]).motion == ("down" if dy[start] > 0 else "up")


def test_noise_and_blur_do_not_fool_it():
    """Decoded videos are not crisp: mild noise and blur keep every verdict."""
    cases = every_combination()[::3]
    clips = clips_of(cases, 33, seed=8).astype(np.float32)
    rng = np.random.default_rng(0)
    blurred = (clips + np.roll(clips, 1, axis=2) + np.roll(clips, -1, axis=2) + np.roll(clips, 1, axis=3)
               + np.roll(clips, -1, axis=3)) / 5
    noisy = np.clip(blurred + rng.normal(0, 12, clips.shape), 0, 255).astype(np.uint8)
    assert accuracy([measure(c) for c in noisy], cases)["colour_accuracy"] == 1.0
    assert accuracy([measure(c) for c in noisy], cases)["motion_accuracy"] == 1.0


@pytest.mark.parametrize("preset", ["tiny", "tiny-causal"])
def test_batched_generation_equals_the_pipeline(preset):
    pipe = VideoPipeline.from_pretrained(preset, device="cpu")
    prompts, seeds = ["a red circle moving left", "a blue square bouncing on a gray background"], [3, 11]
    batched = generate_clips(pipe, prompts, seeds, frames=17)
    for prompt, seed, blocks in zip(prompts, seeds, batched):
        reference = [c.frames for c in pipe.generate(GenerationParams(prompt=prompt, seed=seed, frames=17))]
        assert [b.shape for b in blocks] == [r.shape for r in reference]
        diff = np.abs(np.concatenate(blocks).astype(int) - np.concatenate(reference).astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.01


def test_stream_consistency_reports_every_block_and_a_constant_state():
    pipe = VideoPipeline.from_pretrained("tiny-causal", device="cpu")
    case = data.Case("red", "circle", "left", "blue")
    report = stream_consistency(pipe, case, seconds=2.0)
    assert report["frames"] == 33 and report["blocks"] == len(report["per_block"]) == 3
    assert sum(b["frames"] for b in report["per_block"]) == 33
    expected = BlockState.for_model(pipe.transformer, 2 if pipe.preset.stream_guidance_scale > 1 else 1, 8, 8).nbytes()
    assert report["state_bytes"] == [expected]
    # Random weights draw no red circle moving left: the report says so.
    assert report["all_blocks_consistent"] is False


@torch.no_grad()
def test_block_round_trip_equals_decoding_whole_clips_and_sees_a_broken_decoder():
    """The VAE check decodes block by block as a stream does; the Wan decoder is causal, so its per-frame error must
    equal decoding the whole clip at once (frames line up). A decoder that goes wrong after the first block (as the
    17-frame-trained demo decoder did after ~21 frames) shows in the later blocks only."""
    vae = VideoPipeline.from_pretrained("demo", device="cpu", dtype=torch.float32).vae
    cases = every_combination()[:3]
    result = round_trip_blocks(vae, cases, frames=33, block_latent_frames=4, seed=7, batch=2)
    assert (result["clips"], result["blocks_per_clip"], result["blocks"]) == (3, 2, 6)
    assert result["colour_right_blocks"] == result["motion_right_blocks"] == 6
    assert result["mean_error_later_blocks"] < 8

    video = data.render(data.scenes_for(cases, torch.Generator().manual_seed(7)), 33)
    z = vae.encode(video).latent_dist.mode()
    whole = data.to_uint8(vae.decode(z).sample.clamp(-1, 1)).astype(np.float32)
    per_frame = np.abs(whole - data.to_uint8(video).astype(np.float32)).mean(axis=(0, 2, 3, 4))
    np.testing.assert_allclose(result["mean_error_per_frame"], per_frame, atol=0.02)

    # Break the decoder from the second latent block on: the check must see it there and not before.
    decoder_forward = vae.decoder.forward
    calls = {"n": 0}

    def broken(x, *args, **kwargs):
        out = decoder_forward(x, *args, **kwargs)
        calls["n"] += 1
        return out if calls["n"] <= 5 else -out  # one batch, one call per latent frame: the first block is 5

    vae.decoder.forward = broken
    bad = round_trip_blocks(vae, cases[:2], frames=33, block_latent_frames=4, seed=7, batch=2)
    assert bad["mean_error_first_block"] == pytest.approx(result["mean_error_first_block"], abs=1.0)
    assert bad["mean_error_later_blocks"] > 30 and bad["colour_right_blocks"] <= 2


@pytest.mark.parametrize("argv, says", [
    (["--model", "nope"], "unknown model"),
    (["--model", "tiny", "--frames", "2"], "4k+1"),
    (["--model", "tiny", "--device", "foo"], "unsupported device"),
    (["--model", "tiny", "--dtype", "int8"], "unknown dtype"),
    (["--model", "tiny", "--batch", "0"], "--batch 0"),
    (["--model", "tiny", "--backgrounds", "0"], "--backgrounds 0"),
    (["--model", "tiny", "--out", "/proc/report.json"], "cannot write"),
])
def test_bad_arguments_exit_2_with_one_message(argv, says, capsys):
    from training.evaluate import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and says in capsys.readouterr().err
