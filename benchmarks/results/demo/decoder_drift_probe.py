"""Where the shipped demo VAE's colour goes in long clips (CPU, fp32): how far back the decoder's receptive field
reaches, and which colour each stream block of ground-truth clips decodes to.

    python benchmarks/results/demo/decoder_drift_probe.py benchmarks/results/demo/decoder_drift_cpu.json

- ``receptive_field``: one 241-frame clip decoded twice, the second time with its first latent frame perturbed
  (0.5 x unit noise); the mean absolute difference of every 8th decoded frame.
- ``round_trip``: clips of training combinations, 161 frames, encoded whole, then decoded block by block as a
  stream decodes them; the colour each block measures as.
- ``from_later_latents``: the same latents decoded by a fresh decoder from latent frame k on (no first frame in
  reach), and the tail of the clip encoded on its own (frames 96-160) and decoded.
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from engine.pipeline import VideoPipeline, stream_blocks  # noqa: E402
from engine.vae import StreamingDecoder, encode_video  # noqa: E402
from training import data  # noqa: E402
from training.evaluate import measure_blocks  # noqa: E402


def stream_colours(vae, z) -> list[list[str]]:
    decoder, start, out = StreamingDecoder(vae), 0, []
    for n in stream_blocks(z.shape[2], 4):
        out.append(data.to_uint8(decoder.decode_block(z[:, :, start : start + n])))
        start += n
    return [[m.colour for m in measure_blocks([o[j] for o in out])] for j in range(z.shape[0])]


@torch.no_grad()
def main(out: str) -> None:
    t0 = time.time()
    vae = VideoPipeline.from_pretrained("engine/weights/demo-causal", device="cpu").vae.float()
    report = {"command": " ".join(sys.orig_argv), "torch": torch.__version__, "vae": "engine/weights/demo-causal/vae"}

    video = data.render(data.scenes_for([data.Case("red", "circle", "left", "gray")],
                                        torch.Generator().manual_seed(0)), 241)
    z = vae.encode(video).latent_dist.mode()
    a = vae.decode(z).sample
    z2 = z.clone()
    z2[:, :, 0] += 0.5 * torch.randn(z2[:, :, 0].shape, generator=torch.Generator().manual_seed(1))
    diff = (a - vae.decode(z2).sample).abs().mean(dim=(0, 1, 3, 4))
    report["receptive_field"] = {"frames": list(range(0, 241, 8)), "mean_abs_change": [float(f"{float(d):.2e}")
                                                                                       for d in diff[::8]]}

    cases = [data.Case("orange", "triangle", "right", "white"), data.Case("red", "circle", "left", "white"),
             data.Case("red", "circle", "left", "gray"), data.Case("green", "square", "down", "white")]
    rows = []
    for seed in (0, 1):
        video = data.render(data.scenes_for(cases, torch.Generator().manual_seed(seed)), 161)
        z = encode_video(vae, video)
        for case, colours in zip(cases, stream_colours(vae, z)):
            rows.append({"prompt": case.prompt, "seed": seed, "block_colours": colours})
        if seed == 0:
            later = {k: [{"prompt": c.prompt, "block_colours": col}
                         for c, col in zip(cases, stream_colours(vae, z[:, :, k:]))] for k in (12, 24)}
            tail = encode_video(vae, video[:, :, 96:])
            later["tail_encoded_alone"] = [{"prompt": c.prompt, "block_colours": col}
                                           for c, col in zip(cases, stream_colours(vae, tail))]
            report["from_later_latents"] = later
    report["round_trip"] = rows
    report["seconds"] = round(time.time() - t0, 1)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    for r in rows:
        print(r["seed"], r["prompt"], r["block_colours"])


if __name__ == "__main__":
    main(sys.argv[1])
