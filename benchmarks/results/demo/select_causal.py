"""Choose the shipped demo-causal among candidate checkpoints on training combinations only (never the held-out
prompts, which are scored once, for the chosen one): 96 clips of training colour/shape/motion combinations with new
backgrounds and seeds, and 4 streams of 30 s of training prompts. Score = clip colour + clip motion + the share of
stream blocks with the right colour and motion. CPU, fp32.

    python benchmarks/results/demo/select_causal.py OUT.json NAME=FOLDER [NAME=FOLDER ...] [--soup NAME=A+B]
        [--device cuda]

``--soup NAME=A+B`` first writes the average of candidates A's and B's transformer and text encoder (same
architecture, one fine-tuning chain) to .run/soup-NAME, then scores it as a candidate. ``--device cuda`` scores on a
GPU (fp32): faster, and comparable only with candidates scored in the same run.
"""
import json
import os
import shutil
import sys
import time

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.getcwd())
from engine.pipeline import VideoPipeline  # noqa: E402
from training import data  # noqa: E402
from training.evaluate import evaluate_pipeline, stream_consistency  # noqa: E402


def soup(a: str, b: str, out: str) -> str:
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(a, out)
    for part in ("transformer", "text_encoder"):
        for name in os.listdir(os.path.join(a, part)):
            if name.endswith(".safetensors"):
                wa, wb = load_file(os.path.join(a, part, name)), load_file(os.path.join(b, part, name))
                avg = {k: ((wa[k].float() + wb[k].float()) / 2).to(wa[k].dtype) for k in wa}
                save_file(avg, os.path.join(out, part, name), metadata={"format": "pt"})
    return out


def score(folder: str, device: str = "cpu") -> dict:
    pipe = VideoPipeline.from_pretrained(folder, device=device, dtype="fp32")
    cases = data.sample_cases(96, torch.Generator().manual_seed(2026), "train")
    clips = evaluate_pipeline(pipe, cases, seeds=[5000 + i for i in range(len(cases))], batch=24)
    streams = [stream_consistency(pipe, case, seconds=30.0, seed=s)
               for s, case in enumerate(data.sample_cases(4, torch.Generator().manual_seed(77), "train"))]
    blocks = sum(s["blocks"] for s in streams)
    good = sum(sum(b["colour"] == c.colour and b["motion"] == c.motion for b in s["per_block"])
               for s, c in zip(streams, data.sample_cases(4, torch.Generator().manual_seed(77), "train")))
    row = {"folder": folder, "clip_colour": clips["colour_accuracy"], "clip_motion": clips["motion_accuracy"],
           "stream_blocks_consistent": good / blocks, "streams": [
               {k: s[k] for k in ("prompt", "blocks", "colour_consistent_blocks", "motion_consistent_blocks")}
               for s in streams]}
    row["score"] = row["clip_colour"] + row["clip_motion"] + row["stream_blocks_consistent"]
    return row


def main(argv):
    out, args = argv[0], argv[1:]
    candidates, soups, device = {}, [], "cpu"
    it = iter(args)
    for arg in it:
        if arg == "--device":
            device = next(it)
        elif arg == "--soup":
            name, pair = next(it).split("=", 1)
            soups.append((name, *pair.split("+")))
        else:
            name, folder = arg.split("=", 1)
            candidates[name] = folder
    for name, a, b in soups:
        candidates[name] = soup(candidates[a], candidates[b], f".run/soup-{name}")
    report = {"command": " ".join(["python"] + sys.argv), "torch": torch.__version__, "device": device,
              "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None, "rows": {}}
    for name, folder in candidates.items():
        t0 = time.time()
        report["rows"][name] = row = score(folder, device)
        row["seconds"] = round(time.time() - t0, 1)
        print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "streams"},
              flush=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
    report["chosen"] = max(report["rows"], key=lambda n: report["rows"][n]["score"])
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print("chosen:", report["chosen"])


if __name__ == "__main__":
    main(sys.argv[1:])
