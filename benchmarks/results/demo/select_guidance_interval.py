"""Guidance intervals for demo-causal, scored as select_causal.py scores checkpoints (training combinations only):
a different guidance scale for the steps at t >= 900 (the first two of the preset's six per block), the preset's
2.5 for the rest and for the commit pass. CPU, fp32.

    python benchmarks/results/demo/select_guidance_interval.py OUT.json early4_900 early1.5_900
"""
import json
import os
import sys
import time

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import select_causal  # noqa: E402
from engine.pipeline import VideoPipeline  # noqa: E402
from training import evaluate  # noqa: E402

CANDIDATES = {
    "early4_900": [(900, 4.0)],
    "early1.5_900": [(900, 1.5)],
    "early4_800_late2": [(800, 4.0), (0.001, 2.0)],
}


def patched(schedule):
    """Wrap both velocity functions (the pipeline's, for streams, and the evaluation's batched one, for clips) so the
    first (t_min, scale) of ``schedule`` with t >= t_min sets the scale; the commit pass (t = 0) keeps its own."""
    def scale_for(t, default):
        if t <= 0:
            return default
        return next((g for t_min, g in schedule if t >= t_min), default)

    orig_pipe, orig_eval = VideoPipeline._velocity, evaluate._velocity

    def pipe_v(self, x, t, emb, mask, guidance, cfg, **kw):
        return orig_pipe(self, x, t, emb, mask, scale_for(t, guidance), cfg, **kw)

    def eval_v(pipe, x, t, emb, mask, guidance, cfg, **kw):
        return orig_eval(pipe, x, t, emb, mask, scale_for(t, guidance), cfg, **kw)

    VideoPipeline._velocity, evaluate._velocity = pipe_v, eval_v
    return orig_pipe, orig_eval


def main(out: str, names: list[str]) -> None:
    rows = {}
    for name in names:
        originals = patched(CANDIDATES[name])
        t0 = time.time()
        try:
            row = select_causal.score("engine/weights/demo-causal")
        finally:
            VideoPipeline._velocity, evaluate._velocity = originals
        row["seconds"], row["schedule"] = round(time.time() - t0, 1), CANDIDATES[name]
        rows[name] = row
        print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "streams"},
              flush=True)
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
