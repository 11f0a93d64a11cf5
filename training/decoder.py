"""Fine-tune the VAE decoder of shipped pipeline folders on longer clips, with the encoder frozen.

The Wan decoder is causal in time with a finite receptive field. A VAE trained on short clips (the demo's: 17 frames,
5 latent frames) never decoded a frame whose receptive field no longer reaches back to the clip's first frame, so
past that length its output drifts (the demo's yellow circle turned white and purple from frame ~24 on, in every
stream block after the first). Training the decoder alone on clips longer than that teaches it the steady state,
while the encoder, and with it the latent space, its statistics and every transformer trained on it, stays
bit-for-bit as it was.

The receptive field is long: perturbing the first latent frame moves decoded frames by 1e-3 of their range up to
frame ~72, by 4e-5 at frame 80, and not at all from frame ~120 on. The shipped decoder, fine-tuned on 49 frames,
still turns the encoder's latents of a red object green from about frame 60 on
(``benchmarks/results/demo/decoder_drift_probe.py``). Clips of 161 frames hold about 60 frames that no first frame
reaches, and ``--frames 161`` trains on them. A lower reconstruction error is not enough to ship a decoder, though:
on an H200, 161-frame training raised the blocks of encoded clips that keep their colour from 142 to 180 of 240, and
made the causal model's own 60 s stream keep its colour in 4 of 60 blocks instead of 59. Score the pipeline end to
end (``python -m training.evaluate --stream-seconds 60``) before shipping a new decoder.

    python -m training.decoder --model engine/weights/demo --also engine/weights/demo-causal --frames 161 \\
        --minutes 7 --check-frames 241 --report benchmarks/results/demo/decoder_finetune.json

The folders are rewritten only at the end, and only if the held-out reconstruction error of long clips went down
and, with ``--check-frames``, no fewer blocks keep their colour (``--force`` writes anyway); each VAE folder is
replaced as a whole (written beside it, then renamed).
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


def _loss(vae, video, alpha, object_weight: float, per_frame: bool = False):
    with torch.no_grad():
        z = vae.encode(video).latent_dist.mode()
    loss = reconstruction_error(vae.decode(z).sample, video, alpha, object_weight)
    return loss.mean(dim=(0, 1, 3, 4)) if per_frame else loss.mean()


@torch.no_grad()
def _validate(vae, val, object_weight: float) -> dict:
    per_frame = torch.stack([_loss(vae, v, a, object_weight, per_frame=True) for v, a in val]).mean(0)
    out = {"loss": round(float(per_frame.mean()), 5), "head_loss": round(float(per_frame[:TAIL_FROM].mean()), 5),
           "tail_loss": round(float(per_frame[TAIL_FROM:].mean()), 5)}
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


def _train_decoder(vae) -> None:
    """Training mode for the decoder side; the frozen encoder and quant_conv stay in eval mode."""
    vae.train()
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
    for module in (vae.encoder, vae.quant_conv):
        module.requires_grad_(False)
    _train_decoder(vae)
    params = [p for p in vae.parameters() if p.requires_grad]
    frozen = {k: v.detach().clone() for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    val = [_clips(min(8, args.val_clips - i), args.frames, 10_000 + i, device) for i in range(0, args.val_clips, 8)]
    before = _validate(vae, val, args.object_weight)
    print(f"validation before: {before}", flush=True)
    vae.eval()
    check_before = _check(vae, args.val_clips, args.check_frames, 20_000) if args.check_frames else None
    _train_decoder(vae)
    if check_before:
        print(f"stream round trip before: {check_before}", flush=True)
    start, step, losses = time.monotonic(), 0, []
    while time.monotonic() - start < 60 * args.minutes and (not args.max_steps or step < args.max_steps):
        video, alpha = _clips(args.batch, args.frames, args.seed * 1_000_003 + step, device)
        loss = _loss(vae, video, alpha, args.object_weight)
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
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in frozen.items()), "the encoder must not change"
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
                  "seconds": round(time.monotonic() - start, 1), "tail_from_frame": TAIL_FROM,
                  "validation_before": before, "validation_after": after, "stream_round_trip_before": check_before,
                  "stream_round_trip_after": check_after, "written": written,
                  "loss_every_20_steps": [round(sum(losses[i:i + 20]) / len(losses[i:i + 20]), 5)
                                          for i in range(0, len(losses), 20)]}
        Path(args.report).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
