"""Where the demo models get the colour wrong: the object's mean colour and the palette votes per clip or stream
block, for red and green objects on white and other backgrounds (training combinations), both models, CPU fp32.

    python benchmarks/results/demo/colour_flips.py benchmarks/results/demo/colour_flips_cpu.json
"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.getcwd())
from engine.pipeline import VideoPipeline  # noqa: E402
from engine.types import GenerationParams  # noqa: E402
from training import data  # noqa: E402
from training import evaluate as ev  # noqa: E402

PROMPTS = ["a red circle moving left on a white background", "a green circle moving left on a white background",
           "a red square moving down on a white background", "a red triangle moving right on a white background",
           "a red circle moving left on a gray background", "a red circle moving left on a black background"]


def votes(frames: np.ndarray) -> dict:
    video = frames.astype(np.float32)
    background = np.median(video.reshape(-1, 3), axis=0)
    pixels = video[np.linalg.norm(video - background, axis=-1) > ev.OBJECT_DISTANCE]
    d = np.linalg.norm(pixels[:, None, :] - ev._OBJECT_RGB[None], axis=-1)
    near = d.min(axis=1) < ev.COLOUR_VOTE_DISTANCE
    counts = np.bincount(d.argmin(axis=1)[near], minlength=len(data.OBJECT_COLOURS))
    return {"mean_rgb": pixels.mean(0).round(1).tolist() if len(pixels) else None,
            "votes": {c: int(n) for c, n in zip(data.OBJECT_COLOURS, counts) if n}}


def main(out: str) -> None:
    report = {"command": " ".join(["python"] + sys.argv), "torch": torch.__version__, "clips": [], "stream": None}
    for name in ("demo", "demo-causal"):
        pipe = VideoPipeline.from_pretrained(name, device="cpu")
        for prompt in PROMPTS:
            for seed in range(3):
                params = pipe.resolve(GenerationParams(prompt=prompt, frames=33, seed=seed))
                frames = np.concatenate([c.frames for c in pipe.generate(params)])
                row = {"model": name, "prompt": prompt, "seed": seed, "colour": ev.measure(frames).colour,
                       **votes(frames)}
                report["clips"].append(row)
                print(name, prompt, seed, row["colour"], row["mean_rgb"], flush=True)
    pipe = VideoPipeline.from_pretrained("demo-causal", device="cpu")
    prompt, blocks, previous = PROMPTS[0], [], None
    for chunk in pipe.generate(pipe.resolve(GenerationParams(prompt=prompt, frames=161, seed=3, mode="stream"))):
        frames = chunk.frames if previous is None else np.concatenate([previous, chunk.frames])
        previous = chunk.frames[-1:]
        blocks.append({"index": chunk.index, "colour": ev.measure(frames).colour, **votes(frames)})
    report["stream"] = {"model": "demo-causal", "prompt": prompt, "seed": 3, "frames": 161, "blocks": blocks}
    print("stream", [b["colour"] for b in blocks])
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
