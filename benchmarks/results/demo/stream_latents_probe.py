"""Do demo-causal's own stream latents carry their colour without the first frame? Two 161-frame streams; their
latents (as handed to the decoder) decoded again by a fresh decoder from latent frame k on (k = 0, 13, 25), and the
colour of each block. Compare decoder_drift_probe.py, where encoded clips decoded from k = 12 stay wrong. CPU, fp32.

    python benchmarks/results/demo/stream_latents_probe.py > benchmarks/results/demo/stream_latents_cpu.txt
"""
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from engine import vae as vae_mod  # noqa: E402
from engine.pipeline import VideoPipeline, stream_blocks  # noqa: E402
from engine.types import GenerationParams  # noqa: E402
from engine.vae import StreamingDecoder  # noqa: E402
from training import data  # noqa: E402
from training.evaluate import measure_blocks  # noqa: E402


def main() -> None:
    pipe = VideoPipeline.from_pretrained("engine/weights/demo-causal", device="cpu")
    captured, original = [], vae_mod.StreamingDecoder.decode_block

    def recording(self, z):
        captured.append(z.detach().clone())
        return original(self, z)

    print(f"torch {torch.__version__}; {pipe.name}, stream mode, preset sampling")
    prompts = ("an orange circle moving left on a black background", "a red circle moving left on a gray background")
    for prompt in prompts:
        captured.clear()
        vae_mod.StreamingDecoder.decode_block = recording
        try:
            list(pipe.generate(GenerationParams(prompt=prompt, frames=161, seed=0, mode="stream")))
        finally:
            vae_mod.StreamingDecoder.decode_block = original
        z = torch.cat(captured, 2)
        print(prompt)
        with torch.no_grad():
            for k in (0, 13, 25):
                decoder, start, blocks = StreamingDecoder(pipe.vae), 0, []
                tail = z[:, :, k:]
                for n in stream_blocks(tail.shape[2], 4):
                    blocks.append(data.to_uint8(decoder.decode_block(tail[:, :, start : start + n])))
                    start += n
                print(f"  from latent frame {k:2d}:", [m.colour for m in measure_blocks([b[0] for b in blocks])])


if __name__ == "__main__":
    main()
