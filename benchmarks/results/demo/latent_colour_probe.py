"""Where a VAE encoder puts the object's colour: two clips that differ only in the object's colour (same shape, track
and white background), encoded, and the squared distance of their normalized latents (summed over channels, averaged
over the latent positions the object covers) in every latent frame. CPU, fp32.

    python benchmarks/results/demo/latent_colour_probe.py OUT.json NAME=PIPELINE_FOLDER [NAME=PIPELINE_FOLDER ...]
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

sys.path.insert(0, os.getcwd())
from training import data  # noqa: E402

PAIRS = [("orange", "blue"), ("red", "green"), ("red", "orange")]
FRAMES, CLIPS = 33, 4


def distances(vae, a: str, b: str) -> list[float]:
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    shapes = [data.SHAPES[i % len(data.SHAPES)] for i in range(CLIPS)]
    motions = ["left", "right", "up", "down"][:CLIPS]
    latents = []
    for colour in (a, b):
        cases = [data.Case(colour, s, m, "white") for s, m in zip(shapes, motions)]
        scenes = data.scenes_for(cases, torch.Generator().manual_seed(0))  # the same tracks for both colours
        video, alpha = data.render(scenes, FRAMES, with_alpha=True)
        with torch.no_grad():
            latents.append((vae.encode(video).latent_dist.mode() - mean) / std)
    # The object's coverage (the same for both colours) at latent resolution: 8x in space, the 4 frames a latent
    # frame stands for in time.
    t = alpha[:, None]
    t = torch.cat([t[:, :, :1].expand(-1, -1, 4, -1, -1), t[:, :, 1:]], 2)  # the first latent frame is one frame
    cover = F.avg_pool3d(t, (4, 8, 8))[:, 0] > 0.25
    d = (latents[0] - latents[1]).pow(2).sum(1)  # [clips, latent frames, h, w]
    return [round(float(d[:, i][cover[:, i]].mean()), 3) for i in range(d.shape[1])]


def main(argv):
    out, report = argv[0], {"command": " ".join(["python"] + sys.argv), "torch": torch.__version__, "frames": FRAMES,
                            "clips_per_colour": CLIPS, "rows": {}}
    for arg in argv[1:]:
        name, folder = arg.split("=", 1)
        vae = AutoencoderKLWan.from_pretrained(os.path.join(folder, "vae")).float().eval()
        report["rows"][name] = row = {f"{a} vs {b}": distances(vae, a, b) for a, b in PAIRS}
        for k, v in row.items():
            print(f"{name} {k}: latent frame 0 {v[0]}, later {v[1:]}", flush=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
