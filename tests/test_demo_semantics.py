"""The shipped demo models on the CPU, judged from their decoded frames alone (training/evaluate.py).

Prompts are made of colour/shape/motion combinations never seen in training (training.data.HELD_OUT). The
bidirectional ``demo`` and the block-causal ``demo-causal`` must draw the asked colour in >= 90% of the clips and the
asked motion in >= 80%; a one-minute stream of ``demo-causal`` must keep both in every block while the memory it
holds stays flat. (The recorded numbers in benchmarks/results/demo/demo_*eval_cpu.json come from the larger run of
``python -m training.evaluate``; here one 2 s clip per held-out combination and background, 24 clips, keeps the test
quick.)

Both meet the bar: on the recorded 48 clips (benchmarks/results/demo/README.md) ``demo`` scores colour 0.917 and
motion 0.958, ``demo-causal`` 0.979 and 1.000 with all 60 blocks of its minute of stream right. What the shipped
weights reach here is also pinned below the measured values, well above chance (1/8 for colour, 1/5 for motion), so a
broken pipeline or model still fails.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import warnings
from pathlib import Path

import pytest
import torch

import engine
from engine.pipeline import VideoPipeline
from engine.presets import get_preset
from engine.state import BlockState
from training import data
from training.evaluate import COLOUR_THRESHOLD, MOTION_THRESHOLD, evaluate_pipeline, stream_consistency

WEIGHTS = Path(engine.__file__).parent / "weights"
FOLDERS = {"demo": WEIGHTS / "demo", "demo-causal": WEIGHTS / "demo-causal"}

pytestmark = pytest.mark.skipif(
    not all((f / "model_index.json").exists() for f in FOLDERS.values()),
    reason="the demo weights are not in engine/weights (see training/README.md)",
)


@pytest.fixture(scope="module")
def pipes():
    # Each folder on its own (no shared parts), the way the server loads them.
    return {name: VideoPipeline.from_pretrained(str(folder), device="cpu") for name, folder in FOLDERS.items()}


def failures(result: dict) -> list[str]:
    return [f"{r['prompt']} (seed {r['seed']}): {r['measured']}" for r in result["records"]
            if (r["measured"]["colour"], r["measured"]["motion"]) != (r["colour"], r["motion"])]


# What the shipped weights reach on these 24 clips (CPU, fp32): demo 0.96 / 0.96, demo-causal 0.96 / 1.00. The floors
# leave two clips of slack for other CPUs' rounding; a model that moves every object one way scores at most 6/24 in
# motion (three held-out combinations per direction, two backgrounds each), below both motion floors.
FLOORS = {"demo": (0.875, 0.875), "demo-causal": (0.875, 0.91)}


@pytest.fixture(scope="module")
def held_out(pipes):
    """One 33-frame clip per held-out combination and background (24) and model, generated once for the tests below."""
    results = {}
    for name, pipe in pipes.items():
        assert pipe.causal == (name == "demo-causal")
        results[name] = evaluate_pipeline(pipe, data.held_out_cases(2), batch=12, frames=33)
        assert results[name]["clips"] == 24
    return results


@pytest.mark.parametrize("name", ["demo", "demo-causal"])
def test_held_out_prompts_come_out_right(held_out, name):
    result = held_out[name]
    assert result["colour_accuracy"] >= COLOUR_THRESHOLD, failures(result)
    assert result["motion_accuracy"] >= MOTION_THRESHOLD, failures(result)


@pytest.mark.parametrize("name", ["demo", "demo-causal"])
def test_held_out_prompts_keep_the_shipped_quality(held_out, name):
    colour, motion = FLOORS[name]
    result = held_out[name]
    assert result["colour_accuracy"] >= colour, failures(result)
    assert result["motion_accuracy"] >= motion, failures(result)


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage Python still references (weights, caches, states, anything kept)."""
    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance on some deprecated module objects warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        storage = obj.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


@pytest.fixture(scope="module")
def minute_stream(pipes):
    pipe = pipes["demo-causal"]
    case = data.held_out_cases(1)[0]
    held = {}

    def probe(index: int) -> None:
        if index in (4, 59):
            held[index] = live_tensor_bytes()

    report = stream_consistency(pipe, case, seconds=60.0, on_block=probe)
    return pipe, case, report, held


def test_a_minute_of_stream_holds_flat_memory(minute_stream):
    pipe, case, report, held = minute_stream
    assert report["frames"] == 961 and report["blocks"] == 60
    # Flat memory: one state allocation of the model's size, and nothing more held after 60 blocks than after 5.
    cfg = 2 if pipe.preset.stream_guidance_scale > 1 else 1
    assert report["state_bytes"] == [BlockState.for_model(pipe.transformer, cfg, 8, 8).nbytes()]
    assert held[59] == held[4]


def test_a_minute_of_stream_keeps_colour_and_motion_in_every_block(minute_stream):
    _, case, report, _ = minute_stream
    bad = [b for b in report["per_block"] if (b["colour"], b["motion"]) != (case.colour, case.motion)]
    assert not bad, f"{case.prompt}: {len(bad)} blocks off, e.g. {bad[:3]}"


def test_the_default_model_is_demo():
    from engine.cli import FALLBACK_MODEL
    from server.settings import Settings

    assert FALLBACK_MODEL == "demo"
    assert Settings.model_fields["model"].default == "demo"


def test_weights_are_small_and_presets_point_at_them():
    total = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    assert total <= 25_000_000
    for name, folder in FOLDERS.items():
        preset = get_preset(name)
        assert preset is not None, f"no preset {name!r} in engine/presets.py"
        assert Path(preset.source).resolve() == folder.resolve()
        assert preset.causal == (name == "demo-causal")
        # The preset's sampling defaults are the ones stored beside the weights (a load takes the file's).
        stored = json.loads((folder / "sana_video.json").read_text())
        preset_values = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(preset).items()}
        assert {k: preset_values[k] for k in stored} == stored
