"""Stream sampling schedules for demo-causal (timestep shift and steps a block), scored as select_causal.py scores
checkpoints (training combinations only; the held-out prompts are scored once, for the chosen one). The preset's
guidance (2.5) is kept. CPU, fp32.

    python benchmarks/results/demo/select_stream_schedule.py OUT.json shift4 shift2 steps8
"""
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import select_causal  # noqa: E402
from engine.pipeline import VideoPipeline  # noqa: E402

SIX = (1000, 833, 667, 500, 333, 167)
CANDIDATES = {
    "preset": dict(stream_shift=3.0, stream_timesteps=SIX),
    "shift2": dict(stream_shift=2.0, stream_timesteps=SIX),
    "shift4": dict(stream_shift=4.0, stream_timesteps=SIX),
    "shift5": dict(stream_shift=5.0, stream_timesteps=SIX),
    "shift6": dict(stream_shift=6.0, stream_timesteps=SIX),
    "steps8": dict(stream_shift=3.0, stream_timesteps=(1000, 875, 750, 625, 500, 375, 250, 125)),
}


def main(out: str, names: list[str]) -> None:
    rows = {}
    original = VideoPipeline.from_pretrained.__func__
    for name in names:
        change = CANDIDATES[name]

        def loader(cls, *args, _change=change, **kwargs):
            pipe = original(cls, *args, **kwargs)
            pipe.preset = dataclasses.replace(pipe.preset, **_change)
            return pipe

        VideoPipeline.from_pretrained = classmethod(loader)
        t0 = time.time()
        try:
            row = select_causal.score("engine/weights/demo-causal")
        finally:
            VideoPipeline.from_pretrained = classmethod(original)
        row["seconds"], row["schedule"] = round(time.time() - t0, 1), change
        rows[name] = row
        print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "streams"},
              flush=True)
        with open(out, "w") as f:
            json.dump({"command": " ".join(["python"] + sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
