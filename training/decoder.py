"""Fine-tune the VAE of shipped pipeline folders: the decoder on longer clips or as a stream, or the encoder too.

The Wan decoder is causal in time with a finite receptive field. A VAE trained on short clips (the demo's: 17 frames,
5 latent frames) never decoded a frame whose receptive field no longer reaches back to the clip's first frame, so
past that length its output drifts (the demo's yellow circle turned white and purple from frame ~24 on, in every
stream block after the first). Three ways to train it past that point:

- Whole clips (the default, ``--frames N``): the decoder alone on clips of N frames, encoder frozen, so the latent
  space, its statistics and every transformer trained on it stay bit-for-bit as they were. The receptive field is
  long: perturbing the first latent frame moves decoded frames by 1e-3 of their range up to frame ~72 and not at all
  from frame ~120 on (``benchmarks/results/demo/decoder_drift_probe.py``), so clips must be long to show the steady
  state, and a step costs the whole clip.
- ``--encoder --tail-weight W``: encoder and decoder together, plus a fresh decode from a random latent frame k >= 1
  against frames 4k on. The demo's first encoder left the object's colour almost only to the first latent frame
  (orange and blue objects on white differ by ~20 there and ~0.7 later), so past the first frame's reach the decoder
  could only guess; the fresh-tail loss makes every latent frame carry it. The latent space changes: transformers
  must be fine-tuned on it afterwards (the latent statistics in the config are kept).
- ``--stream-frames N``: the decoder alone, trained as a stream decodes: clips of N frames encoded whole, decoded
  block by block with the decoder's cache carried from block to block, one optimizer step a block, the gradient cut
  at each block's start. Every step is one block, yet the steps reach frames far past the first frame's reach.

The shipped ``demo-causal`` VAE came from the second, then the third, on an H200 (run 18 in
``benchmarks/results/demo/README.md``); ``demo`` keeps its VAE. A lower reconstruction error is not enough to ship
a decoder: score the pipeline end to end (``python -m training.evaluate --stream-seconds 60``) first.

    python -m training.decoder --model FOLDER --frames 33 --batch 32 --minutes 2.8 --encoder --tail-weight 1 \\
        --check-frames 161
    python -m training.decoder --model FOLDER --frames 33 --stream-frames 321 --batch 16 --lr 1e-4 --minutes 4 \\
        --check-frames 321 --val-clips 8

The folders are rewritten only at the end, and only if the held-out reconstruction error went down and, with
``--check-frames``, no fewer blocks of clips decoded as a stream keep their colour (with ``--stream-frames``: no fewer
blocks and no higher error past the first block); ``--force`` writes anyway. Each VAE folder is replaced as a whole
(written beside it, then renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from training import data
from training.train import Config, reconstruction_error

TAIL_FROM = 21  # first video frame past the 17-frame (5 latent frame) horizon the demo VAE was trained on
STEADY_FROM = 121  # first video frame the clip's first latent frame no longer reaches (see above)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="pipeline folder whose VAE is fine-tuned (and rewritten)")
    p.add_argument("--also", action="append", default=[], metavar="FOLDER",
                   help="other pipeline folders with the same VAE that get the fine-tuned one too (repeatable)")
    p.add_argument("--frames", type=int, default=49, help="clip length, 4k+1 (default 49: 13 latent frames)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: time only)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--object-weight", type=float, default=Config.object_weight,
                   help="loss weight of object pixels (as the VAE phase)")
    p.add_argument("--encoder", action="store_true",
                   help="train the encoder (and quant_conv) too: the latent space changes, so only for folders whose "
                        "transformers are fine-tuned on it afterwards (the latent statistics in the config are kept)")
    p.add_argument("--tail-weight", type=float, default=0.0,
                   help="also decode the latents from a random latent frame k >= 1 on with a fresh decoder (no first "
                        "frame in reach) against frames 4k on, weighted this much; with --encoder this makes every "
                        "latent frame carry the object's colour (default 0: off)")
    p.add_argument("--kl", type=float, default=Config.vae_kl, help="KL weight with --encoder (as the VAE phase)")
    p.add_argument("--stream-frames", type=int, default=0,
                   help="train as a stream decodes: clips of this many frames (4k+1) encoded whole, then decoded "
                        "block by block with the decoder's cache carried over, one optimizer step a block, the "
                        "gradient cut at block boundaries (truncated backpropagation). Reaches the steady state "
                        "past the first frame's reach at the cost of one block a step (0: off, train on --frames "
                        "clips whole)")
    p.add_argument("--stream-groups", type=int, default=4,
                   help="with --stream-frames: groups of --batch clips, each at another point of its clips, that "
                        "take turns, so that consecutive steps see different clips and places (default 4)")
    p.add_argument("--val-clips", type=int, default=16)
    p.add_argument("--check-frames", type=int, default=0,
                   help="also decode --val-clips clips of this many frames block by block, as a stream does, before "
                        "and after, and count the blocks that keep their colour (4k+1; 0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--report", default=None, help="write the before/after errors and settings here (JSON)")
    p.add_argument("--force", action="store_true", help="write the decoder even if the validation error rose")
    args = p.parse_args(argv)
    if args.frames < 5 or (args.frames - 1) % 4:
        p.error(f"--frames must be 4k+1 and at least 5, got {args.frames}")
    if args.stream_frames and (args.stream_frames < 5 or (args.stream_frames - 1) % 4):
        p.error(f"--stream-frames must be 4k+1 and at least 5 (or 0), got {args.stream_frames}")
    if args.stream_frames and (args.encoder or args.tail_weight):
        p.error("--stream-frames trains the decoder alone: not with --encoder or --tail-weight")
    if args.stream_frames and not args.check_frames:
        p.error("--stream-frames needs --check-frames: a stream-trained decoder is judged by the streams it decodes")
    if args.stream_groups < 1:
        p.error(f"--stream-groups must be at least 1, got {args.stream_groups}")
    if args.check_frames and (args.check_frames < 5 or (args.check_frames - 1) % 4):
        p.error(f"--check-frames must be 4k+1 and at least 5 (or 0), got {args.check_frames}")
    for folder in [args.model, *args.also]:
        if not Path(folder, "vae", "config.json").is_file():
            p.error(f"{folder} is not a pipeline folder with a vae/ (no vae/config.json)")
    return args


def _clips(n: int, frames: int, seed: int, device):
    cases = data.sample_cases(n, torch.Generator().manual_seed(seed), "train")
    scenes = data.scenes_for(cases, torch.Generator(device).manual_seed(seed + 1), device=device)
    video, alpha = data.render(scenes, frames, with_alpha=True)
    return video, alpha[:, None]


def _per_frame_loss(vae, z, video, alpha, object_weight: float) -> torch.Tensor:
    """Reconstruction error of each video frame, the latents ``z`` of ``video`` decoded whole."""
    loss = reconstruction_error(vae.decode(z).sample, video, alpha, object_weight)
    return loss.mean(dim=(0, 1, 3, 4))


def _tail_loss(vae, z, video, alpha, object_weight: float, k: int) -> torch.Tensor:
    """Latents ``z`` from latent frame ``k`` on, decoded by a fresh decoder (its first latent frame decodes to one
    frame, as a clip's first does), against video frames 4k on. Only what those latents carry can be drawn: the clip's
    first frame, which the decoder otherwise reads the colour from, is out of reach."""
    recon = vae.decode(z[:, :, k:]).sample
    return reconstruction_error(recon, video[:, :, 4 * k :], alpha[:, :, 4 * k :], object_weight).mean()


def _train_loss(vae, video, alpha, args, k: int) -> torch.Tensor:
    """Reconstruction of the whole clip, plus ``--tail-weight`` times the fresh decode from latent frame ``k``, plus
    the KL term when the encoder trains."""
    with torch.set_grad_enabled(args.encoder):
        posterior = vae.encode(video).latent_dist
        z = posterior.mode()
    loss = reconstruction_error(vae.decode(z).sample, video, alpha, args.object_weight).mean()
    if k:
        loss = loss + args.tail_weight * _tail_loss(vae, z, video, alpha, args.object_weight, k)
    if args.encoder and args.kl:
        loss = loss + args.kl * 0.5 * (posterior.mean.pow(2) + posterior.var - 1 - posterior.logvar).mean()
    return loss


class TrainingStream:
    """``batch`` clips of ``frames`` frames encoded whole (frozen encoder), then handed out block by block as a
    stream decodes them: ``next_block()`` returns the block's pixels, coverage and the decoder's output for it, decoded
    with the cache the blocks before it left (detached: the gradient stops at the block's start). New clips are drawn
    when these run out."""

    def __init__(self, vae, batch: int, frames: int, block_latent_frames: int, seed: int, device, skip: int = 0):
        from engine.pipeline import stream_blocks

        self.vae, self.batch, self.frames, self.seed, self.device = vae, batch, frames, seed, device
        self.blocks = stream_blocks((frames - 1) // 4 + 1, block_latent_frames)
        self.round, self.index = 0, len(self.blocks)
        with torch.no_grad():  # start ``skip`` blocks into the first clips
            for _ in range(skip):
                self.next_block()

    def _refill(self) -> None:
        self.video, self.alpha = _clips(self.batch, self.frames, self.seed * 1_000_003 + self.round, self.device)
        self.round += 1
        with torch.no_grad():
            self.z = self.vae.encode(self.video).latent_dist.mode()
        self.cache = [None] * self.vae._cached_conv_counts["decoder"]
        self.index, self.latent, self.frame = 0, 0, 0

    def next_block(self):
        if self.index == len(self.blocks):
            self._refill()
        n = self.blocks[self.index]
        self.cache = [c.detach() if isinstance(c, torch.Tensor) else c for c in self.cache]
        x = self.vae.post_quant_conv(self.z[:, :, self.latent : self.latent + n])
        outs = []
        for i in range(n):
            outs.append(self.vae.decoder(x[:, :, i : i + 1], feat_cache=self.cache, feat_idx=[0],
                                         first_chunk=self.latent + i == 0))
        frames = 4 * n - (3 if self.latent == 0 else 0)
        video = self.video[:, :, self.frame : self.frame + frames]
        alpha = self.alpha[:, :, self.frame : self.frame + frames]
        self.index, self.latent, self.frame = self.index + 1, self.latent + n, self.frame + frames
        return torch.cat(outs, 2), video, alpha


@torch.no_grad()
def _validate(vae, val, object_weight: float) -> dict:
    zs = [vae.encode(v).latent_dist.mode() for v, _ in val]  # once per clip, for both losses
    per_frame = torch.stack([_per_frame_loss(vae, z, v, a, object_weight) for z, (v, a) in zip(zs, val)]).mean(0)
    out = {"loss": round(float(per_frame.mean()), 5), "head_loss": round(float(per_frame[:TAIL_FROM].mean()), 5),
           "tail_loss": round(float(per_frame[TAIL_FROM:].mean()), 5)}
    latent_frames = (val[0][0].shape[2] - 1) // 4 + 1
    if latent_frames > 2:  # from the middle latent frame on, with a fresh decoder (see _tail_loss)
        tails = [_tail_loss(vae, z, v, a, object_weight, latent_frames // 2) for z, (v, a) in zip(zs, val)]
        out["fresh_tail_loss"] = round(float(sum(tails) / len(tails)), 5)
    if len(per_frame) > STEADY_FROM:
        out["steady_loss"] = round(float(per_frame[STEADY_FROM:].mean()), 5)
    return out


@torch.no_grad()
def _check(vae, clips: int, frames: int, seed: int) -> dict:
    """Training combinations (new scenes) decoded block by block: blocks that keep their colour and motion."""
    from training.evaluate import round_trip_blocks

    cases = data.sample_cases(clips, torch.Generator().manual_seed(seed), "train")
    r = round_trip_blocks(vae, cases, frames=frames, seed=seed, batch=8)
    return {k: r[k] for k in ("clips", "frames", "blocks", "colour_right_blocks", "motion_right_blocks",
                              "mean_error_first_block", "mean_error_later_blocks")}


def _train_decoder(vae, encoder: bool = False) -> None:
    """Training mode for the decoder side (and the encoder with ``encoder``); a frozen encoder stays in eval mode."""
    vae.train()
    if not encoder:
        vae.encoder.eval()
        vae.quant_conv.eval()


def stored_dtype(folder: Path) -> torch.dtype:
    """The dtype the VAE weights of a pipeline folder are stored in (the shipped demo folders: bf16)."""
    from safetensors import safe_open

    with safe_open(str(folder / "vae" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        return f.get_tensor(next(iter(f.keys()))).dtype


def _write_vae(vae, folder: Path, dtype: torch.dtype) -> None:
    """Replace ``folder``/vae with ``vae`` stored in ``dtype`` (written beside it, then renamed)."""
    target = folder / "vae"
    tmp = folder / "vae.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.to(dtype).save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config.pop("_name_or_path", None)  # where this run read it from: not part of the shipped folder
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    old = folder / "vae.old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old)


def main(argv=None) -> int:
    args = parse_args(argv)
    from diffusers import AutoencoderKLWan

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    dtype = stored_dtype(Path(args.model))
    vae = AutoencoderKLWan.from_pretrained(Path(args.model, "vae")).to(device).float()
    if not args.encoder:
        for module in (vae.encoder, vae.quant_conv):
            module.requires_grad_(False)
    _train_decoder(vae, args.encoder)
    params = [p for p in vae.parameters() if p.requires_grad]
    frozen = {k: v.detach().clone() for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    val = [_clips(min(8, args.val_clips - i), args.frames, 10_000 + i, device) for i in range(0, args.val_clips, 8)]
    before = _validate(vae, val, args.object_weight)
    print(f"validation before: {before}", flush=True)
    vae.eval()
    check_before = _check(vae, args.val_clips, args.check_frames, 20_000) if args.check_frames else None
    _train_decoder(vae, args.encoder)
    if check_before:
        print(f"stream round trip before: {check_before}", flush=True)
    start, step, losses = time.monotonic(), 0, []
    tail_generator = torch.Generator().manual_seed(args.seed)
    latent_frames = (args.frames - 1) // 4 + 1
    groups = []
    if args.stream_frames:
        n_blocks = (args.stream_frames - 1) // 4 // Config.block_latent_frames
        groups = [TrainingStream(vae, args.batch, args.stream_frames, Config.block_latent_frames,
                                 args.seed * 101 + g, device, skip=g * n_blocks // args.stream_groups)
                  for g in range(args.stream_groups)]
    while time.monotonic() - start < 60 * args.minutes and (not args.max_steps or step < args.max_steps):
        if groups:
            recon, video, alpha = groups[step % len(groups)].next_block()
            loss = reconstruction_error(recon, video, alpha, args.object_weight).mean()
        else:
            video, alpha = _clips(args.batch, args.frames, args.seed * 1_000_003 + step, device)
            k = int(torch.randint(1, latent_frames, (1,), generator=tail_generator)) if args.tail_weight else 0
            loss = _train_loss(vae, video, alpha, args, k)
        for group in opt.param_groups:  # a short warm-up: Adam's first steps are large for a trained decoder
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 20 == 0:
            print(f"[{time.monotonic() - start:7.1f}s] step {step} loss {sum(losses[-20:]) / 20:.5f}", flush=True)
    vae.eval()
    after = _validate(vae, val, args.object_weight)
    print(f"validation after {step} steps: {after}", flush=True)
    check_after = _check(vae, args.val_clips, args.check_frames, 20_000) if args.check_frames else None
    if check_after:
        print(f"stream round trip after: {check_after}", flush=True)
    if not args.encoder:
        assert all(torch.equal(v, vae.state_dict()[k]) for k, v in frozen.items()), "the encoder must not change"
    if args.stream_frames:  # judged as it was trained: by the streams it decodes
        improved = (check_after["colour_right_blocks"] >= check_before["colour_right_blocks"]
                    and check_after["mean_error_later_blocks"] <= check_before["mean_error_later_blocks"])
    else:
        improved = after["loss"] < before["loss"] and (
            check_after is None or check_after["colour_right_blocks"] >= check_before["colour_right_blocks"])
    written = []
    if improved or args.force:
        vae = vae.to("cpu")
        for folder in [args.model, *args.also]:
            _write_vae(vae, Path(folder), dtype)
            written.append(str(folder))
        print(f"wrote the fine-tuned decoder into {', '.join(written)}", flush=True)
    else:
        print("validation error did not go down, or fewer blocks kept their colour: folders left as they were "
              "(--force writes anyway)", flush=True)
    if args.report:
        report = {"command": " ".join(getattr(sys, "orig_argv", sys.argv)), "device": str(device),
                  "torch": torch.__version__, "frames": args.frames, "batch": args.batch, "lr": args.lr, "steps": step,
                  "encoder": args.encoder, "tail_weight": args.tail_weight, "stream_frames": args.stream_frames,
                  "seconds": round(time.monotonic() - start, 1), "tail_from_frame": TAIL_FROM,
                  "validation_before": before, "validation_after": after, "stream_round_trip_before": check_before,
                  "stream_round_trip_after": check_after, "written": written,
                  "loss_every_20_steps": [round(sum(losses[i:i + 20]) / len(losses[i:i + 20]), 5)
                                          for i in range(0, len(losses), 20)]}
        Path(args.report).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
