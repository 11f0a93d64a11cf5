"""Does a generated video show what its prompt asked for? Colour and motion measured from decoded frames alone.

``measure(frames)`` looks only at uint8 frames [F, H, W, 3]: the background is the clip's median colour; object
pixels are those far from it; the object's colour is the palette colour (data.OBJECT_COLOURS) most of them are
nearest to; its motion comes from the track of the object's centroid (a circular mean, so a shape wrapping around
an edge keeps a continuous track): left/right/up/down from the median step, "bouncing" when the vertical track goes
both up and down with little horizontal travel. The same measurement classifies the generator's own clips
(``ground_truth``) almost perfectly, which is what makes its verdict on generated clips mean something.

``generate_clips`` runs a pipeline on many prompts at once (batched; equal to ``VideoPipeline.generate`` prompt by
prompt, see tests/test_training_evaluate.py), ``evaluate_pipeline`` turns that into accuracies, and the command

    python -m training.evaluate --model engine/weights/demo --out benchmarks/results/demo_eval.json

writes them as JSON (held-out prompts: combinations of colour, shape and motion never seen in training).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training import data

MIN_OBJECT_PIXELS = 12  # fewer object pixels in a frame: no position for that frame
OBJECT_DISTANCE = 60.0  # RGB distance from the background above which a pixel belongs to the object
COLOUR_VOTE_DISTANCE = 80.0  # a pixel votes for its nearest palette colour only if it is this close to it
MIN_SPEED = 0.4  # pixels per frame: slower than this is "still"
MAX_STEP = 12.0  # a centroid jump larger than this (pixels) is a detection glitch, not motion

_OBJECT_RGB = np.array([data.PALETTE[c] for c in data.OBJECT_COLOURS], dtype=np.float32)


@dataclass
class Measurement:
    colour: str | None  # dominant non-background palette colour, None when no object was found
    motion: str | None  # left, right, up, down, bouncing, still; None when the object was not tracked
    velocity: tuple[float, float]  # median step (dx, dy), pixels per frame
    tracked_frames: int

    def to_dict(self) -> dict:
        return {"colour": self.colour, "motion": self.motion, "velocity": [round(v, 3) for v in self.velocity],
                "tracked_frames": self.tracked_frames}


def _wrapped(d: np.ndarray, period: int) -> np.ndarray:
    return (d + period / 2) % period - period / 2


def classify_motion(xs: np.ndarray, ys: np.ndarray, width: int, height: int) -> tuple[str | None, tuple[float, float]]:
    """Motion class from a centroid track (pixels; NaN where untracked) of consecutive frames."""
    ok = ~(np.isnan(xs) | np.isnan(ys))
    pairs = ok[1:] & ok[:-1]
    if pairs.sum() < 2:
        return None, (0.0, 0.0)
    dx = _wrapped(np.diff(xs)[pairs], width)
    dy = _wrapped(np.diff(ys)[pairs], height)
    keep = np.hypot(dx, dy) <= MAX_STEP
    if keep.sum() < 2:
        return None, (0.0, 0.0)
    dx, dy = dx[keep], dy[keep]
    med_dx, med_dy = float(np.median(dx)), float(np.median(dy))
    rise, fall = float(np.clip(-dy, 0, None).sum()), float(np.clip(dy, 0, None).sum())
    vertical = (rise + fall) / len(dy)  # vertical path length per frame
    if abs(med_dx) >= MIN_SPEED and abs(med_dx) >= 0.5 * vertical:
        return ("right" if med_dx > 0 else "left"), (med_dx, med_dy)
    if vertical >= MIN_SPEED:
        if min(rise, fall) >= 0.25 * max(rise, fall):
            return "bouncing", (med_dx, med_dy)
        return ("down" if fall > rise else "up"), (med_dx, med_dy)
    return "still", (med_dx, med_dy)


def measure(frames: np.ndarray) -> Measurement:
    """Colour and motion of the one object in ``frames`` (uint8 [F, H, W, 3])."""
    video = frames.astype(np.float32)
    F_, H, W, _ = video.shape
    background = np.median(video.reshape(-1, 3), axis=0)
    distance = np.linalg.norm(video - background, axis=-1)  # [F, H, W]
    mask = distance > OBJECT_DISTANCE
    pixels = video[mask]
    colour = None
    if len(pixels):
        d = np.linalg.norm(pixels[:, None, :] - _OBJECT_RGB[None], axis=-1)  # [P, colours]
        nearest, near = d.argmin(axis=1), d.min(axis=1) < COLOUR_VOTE_DISTANCE
        votes = np.bincount(nearest[near], minlength=len(data.OBJECT_COLOURS))
        if votes.sum() > 0:
            colour = data.OBJECT_COLOURS[int(votes.argmax())]
    # Centroids of all frames at once; frames with too few object pixels get no position.
    w = mask.astype(np.float32)
    counts = w.sum(axis=(1, 2))
    ax = 2 * math.pi * (np.arange(W, dtype=np.float32) + 0.5) / W
    ay = 2 * math.pi * (np.arange(H, dtype=np.float32) + 0.5) / H
    wx, wy = w.sum(axis=1), w.sum(axis=2)  # [F, W], [F, H]
    xs = np.arctan2(wx @ np.sin(ax), wx @ np.cos(ax)) * W / (2 * math.pi) % W
    ys = np.arctan2(wy @ np.sin(ay), wy @ np.cos(ay)) * H / (2 * math.pi) % H
    untracked = counts < MIN_OBJECT_PIXELS
    xs[untracked], ys[untracked] = np.nan, np.nan
    motion, velocity = classify_motion(xs, ys, W, H)
    return Measurement(colour, motion, velocity, int((~np.isnan(xs)).sum()))


def accuracy(measurements: list[Measurement], cases: list[data.Case]) -> dict:
    n = len(cases)
    colour = sum(m.colour == c.colour for m, c in zip(measurements, cases))
    motion = sum(m.motion == c.motion for m, c in zip(measurements, cases))
    return {"clips": n, "colour_accuracy": colour / n if n else 0.0, "motion_accuracy": motion / n if n else 0.0}


@torch.no_grad()
def round_trip_blocks(vae, cases: list[data.Case], frames: int = 65, block_latent_frames: int = 4, seed: int = 0,
                      batch: int = 8) -> dict:
    """The VAE alone, as a stream uses it: clips of ``cases`` rendered at ``frames``, encoded whole, then decoded
    block by block (``block_latent_frames`` latent frames a block, the first one more) by the streaming decoder.
    Returns the mean absolute error per frame (0-255 levels) and how many decoded blocks still measure as the
    clip's colour and motion. A decoder trained on clips shorter than a stream drifts after its training length
    (a whole-clip check cannot see it); this does."""
    from engine.pipeline import frames_of_blocks, latent_frames, stream_blocks
    from engine.vae import StreamingDecoder, encode_video

    device = next(vae.parameters()).device
    video = data.render(data.scenes_for(cases, torch.Generator(device).manual_seed(seed)), frames)
    blocks = stream_blocks(latent_frames(frames), block_latent_frames)
    errors, colour_ok, motion_ok, n_blocks = [], 0, 0, 0
    for i in range(0, len(cases), batch):
        clips = video[i : i + batch]
        z = encode_video(vae, clips)
        decoder, start, decoded = StreamingDecoder(vae), 0, []
        for n in blocks:
            decoded.append(data.to_uint8(decoder.decode_block(z[:, :, start : start + n])))
            start += n
        truth = data.to_uint8(clips)
        out = np.concatenate(decoded, axis=1)
        errors.append(np.abs(out.astype(np.float32) - truth.astype(np.float32)).mean(axis=(2, 3, 4)))
        for j, case in enumerate(cases[i : i + batch]):
            per_block = [d[j] for d in decoded]
            for m in measure_blocks(per_block):
                colour_ok += m.colour == case.colour
                motion_ok += m.motion == case.motion
                n_blocks += 1
    per_frame = np.concatenate(errors).mean(axis=0)
    head = frames_of_blocks(blocks)[0]
    return {"clips": len(cases), "frames": frames, "blocks_per_clip": len(blocks), "blocks": n_blocks,
            "colour_right_blocks": colour_ok, "motion_right_blocks": motion_ok,
            "mean_error_first_block": round(float(per_frame[:head].mean()), 3),
            "mean_error_later_blocks": round(float(per_frame[head:].mean()), 3),
            "mean_error_per_frame": [round(float(e), 2) for e in per_frame]}


def ground_truth(cases: list[data.Case], frames: int = 33, seed: int = 0) -> dict:
    """The measurement applied to the generator's own clips of ``cases`` (should be ~100%)."""
    g = torch.Generator().manual_seed(seed)
    clips = data.to_uint8(data.render(data.scenes_for(cases, g), frames))
    return accuracy([measure(c) for c in clips], cases)


# ---------------------------------------------------------------------------------------------------------------------
# Generation of many prompts at once (the pipeline's own sampling, batched).


def _encode(pipe, prompts: list[str], cfg: bool):
    preset = pipe.preset
    # As VideoPipeline._encode_prompt: the official pipelines append a motion score.
    texts = [p if preset.motion_score is None or "motion score" in p else f"{p} motion score: {preset.motion_score}."
             for p in prompts]
    emb, mask = pipe.text_encoder.encode(texts)
    if cfg:
        neg, neg_mask = pipe.text_encoder.encode([""] * len(prompts), with_instruction=False)
        emb, mask = torch.cat([neg, emb]), torch.cat([neg_mask, mask])
    return emb.to(pipe.dtype), mask


def _velocity(pipe, x, t: float, emb, mask, guidance: float, cfg: bool, **kw) -> torch.Tensor:
    inp = torch.cat([x, x]) if cfg else x
    timestep = torch.full((inp.shape[0],), float(t), device=pipe.device)
    v = pipe.transformer(inp.to(pipe.dtype), emb, timestep, mask, **kw).float()
    if cfg:
        uncond, cond = v.chunk(2)
        v = uncond + guidance * (cond - uncond)
    return v


def _noise(pipe, gens: list[torch.Generator], shape) -> torch.Tensor:
    # One CPU generator per prompt, drawn in the pipeline's order: each prompt gets exactly its own noise.
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in gens]).to(pipe.device)


def _frames(pixels: torch.Tensor) -> list[np.ndarray]:
    x = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(x.permute(0, 2, 3, 4, 1).cpu().numpy())


@torch.inference_mode()
def generate_clips(pipe, prompts: list[str], seeds: list[int], frames: int | None = None, steps: int | None = None,
                   guidance_scale: float | None = None) -> list[list[np.ndarray]]:
    """Videos of ``prompts`` (one seed each) as the pipeline makes them one by one, in one batch: per prompt the
    list of decoded blocks, uint8 [f, H, W, 3] each. Clip mode for bidirectional models, stream mode for causal."""
    from diffusers import DPMSolverMultistepScheduler

    from engine.pipeline import latent_frames, shifted_sigma, stream_blocks
    from engine.state import BlockState
    from engine.types import GenerationParams
    from engine.vae import StreamingDecoder

    params = pipe.resolve(GenerationParams(prompt=prompts[0], frames=frames, steps=steps,
                                           guidance_scale=guidance_scale))
    cfg = params.guidance_scale > 1.0
    emb, mask = _encode(pipe, prompts, cfg)
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    c = pipe.transformer.config.in_channels
    h, w = params.height // 8, params.width // 8
    blocks = stream_blocks(latent_frames(params.frames), pipe.preset.block_latent_frames)
    decoder = StreamingDecoder(pipe.vae)
    out: list[list[np.ndarray]] = [[] for _ in prompts]
    B = len(prompts)
    if params.mode == "clip":
        latents = _noise(pipe, gens, (B, c, latent_frames(params.frames), h, w))
        config = {k: v for k, v in pipe.scheduler_config.items() if not k.startswith("_")}
        scheduler = DPMSolverMultistepScheduler.from_config(config)
        scheduler.set_timesteps(params.steps, device=pipe.device)
        for t in scheduler.timesteps:
            v = _velocity(pipe, latents, float(t), emb, mask, params.guidance_scale, cfg)
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
        start = 0
        for n in blocks:
            for i, f in enumerate(_frames(decoder.decode_block(latents[:, :, start : start + n].to(pipe.dtype)))):
                out[i].append(f)
            start += n
        return out
    state = BlockState.for_model(pipe.transformer, 2 * B if cfg else B, h, w)
    sigmas = [shifted_sigma(t, pipe.preset.stream_shift) for t in pipe.stream_timesteps(params.steps)]
    for n in blocks:
        shape = (B, c, n, h, w)
        x = x0 = _noise(pipe, gens, shape)
        for i, sigma in enumerate(sigmas):
            v = _velocity(pipe, x, sigma * 1000.0, emb, mask, params.guidance_scale, cfg, state=state)
            x0 = x - sigma * v
            if i + 1 < len(sigmas):
                x = (1 - sigmas[i + 1]) * x0 + sigmas[i + 1] * _noise(pipe, gens, shape)
        _velocity(pipe, x0, 0.0, emb, mask, params.guidance_scale, cfg, state=state, commit=True)
        for i, f in enumerate(_frames(decoder.decode_block(x0.to(pipe.dtype)))):
            out[i].append(f)
    return out


def evaluate_pipeline(pipe, cases: list[data.Case] | None = None, seeds: list[int] | None = None, batch: int = 8,
                      frames: int | None = None, steps: int | None = None, guidance_scale: float | None = None) -> dict:
    """Colour and motion accuracy of ``pipe`` on ``cases`` (default: the held-out prompts), one clip per case with
    ``seeds[i]`` (default: i). Returns accuracies plus one record per clip."""
    cases = cases if cases is not None else data.held_out_cases()
    seeds = seeds if seeds is not None else list(range(len(cases)))
    records, measurements = [], []
    start = time.perf_counter()
    for i in range(0, len(cases), batch):
        part = cases[i : i + batch]
        videos = generate_clips(pipe, [c.prompt for c in part], seeds[i : i + batch], frames, steps, guidance_scale)
        for case, seed, blocks in zip(part, seeds[i : i + batch], videos):
            m = measure(np.concatenate(blocks))
            measurements.append(m)
            records.append({"prompt": case.prompt, "seed": seed, "colour": case.colour, "motion": case.motion,
                            "measured": m.to_dict()})
    result = accuracy(measurements, cases)
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["records"] = records
    return result


def measure_blocks(blocks: list[np.ndarray]) -> list[Measurement]:
    """One measurement per decoded block; each block is preceded by the previous block's last frame, so the step
    across every block boundary counts too."""
    out, previous = [], None
    for frames in blocks:
        out.append(measure(frames if previous is None else np.concatenate([previous, frames])))
        previous = frames[-1:]
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def stream_consistency(pipe, case: data.Case, seconds: float = 60.0, seed: int = 0, steps: int | None = None,
                       guidance_scale: float | None = None, on_block=None) -> dict:
    """One long stream through ``VideoPipeline.generate``, measured block by block as it arrives (nothing is kept):
    the colour and motion of every block, the block state's size and the process RSS after every block.
    ``on_block(index)`` is called after each block (a probe for tests)."""
    from engine.types import GenerationParams

    fps = pipe.preset.fps
    frames = 4 * round(seconds * fps / 4) + 1
    params = GenerationParams(prompt=case.prompt, frames=frames, steps=steps, guidance_scale=guidance_scale, seed=seed,
                              mode="stream")
    blocks, rss, state_bytes, previous = [], [], set(), None
    start = time.perf_counter()
    for chunk in pipe.generate(params):
        # As measure_blocks: the previous block's last frame joins each block.
        m = measure(chunk.frames if previous is None else np.concatenate([previous, chunk.frames]))
        blocks.append({"index": chunk.index, "frames": chunk.num_frames, **m.to_dict()})
        previous = chunk.frames[-1:]
        rss.append(_rss_bytes())
        state_bytes.add(pipe.last_state_bytes)
        if on_block is not None:
            on_block(chunk.index)
    consistent = [b["colour"] == case.colour and b["motion"] == case.motion for b in blocks]
    return {
        "prompt": case.prompt,
        "seed": seed,
        "seconds_of_video": frames / fps,
        "frames": frames,
        "blocks": len(blocks),
        "colour_consistent_blocks": sum(b["colour"] == case.colour for b in blocks),
        "motion_consistent_blocks": sum(b["motion"] == case.motion for b in blocks),
        "all_blocks_consistent": all(consistent),
        "state_bytes": sorted(state_bytes),
        "rss_mb": [round(r / 2**20, 2) for r in rss],
        "wall_seconds": round(time.perf_counter() - start, 2),
        "per_block": blocks,
    }


COLOUR_THRESHOLD, MOTION_THRESHOLD = 0.9, 0.8  # what the demo models must reach on the held-out prompts


def held_out_clips(backgrounds: int = 2, seeds_per_case: int = 1) -> tuple[list[data.Case], list[int]]:
    """The held-out evaluation's clips: every held-out prompt ``seeds_per_case`` times, with seeds 0.. (+1000 per
    prompt), so runs with the same counts score the same clips."""
    cases = [c for c in data.held_out_cases(backgrounds) for _ in range(seeds_per_case)]
    return cases, [i % seeds_per_case + 1000 * (i // seeds_per_case) for i in range(len(cases))]


def evaluate_model(model: str, device: str | None = None, dtype: str | None = None, backgrounds: int = 2,
                   seeds_per_case: int = 1, frames: int | None = None, steps: int | None = None,
                   guidance_scale: float | None = None, batch: int = 8, stream_seconds: float = 0.0,
                   vae_frames: int = 0) -> dict:
    """Held-out accuracies of ``model`` (preset name or pipeline folder) as a JSON-ready dict."""
    from engine.pipeline import VideoPipeline
    from engine.types import GenerationParams

    pipe = VideoPipeline.from_pretrained(model, device=device, dtype=dtype)
    cases, seeds = held_out_clips(backgrounds, seeds_per_case)
    resolved = pipe.resolve(GenerationParams(prompt=cases[0].prompt, frames=frames, steps=steps,
                                             guidance_scale=guidance_scale))
    settings = {"frames": resolved.frames, "fps": resolved.fps, "width": resolved.width, "height": resolved.height,
                "steps": resolved.steps, "guidance_scale": resolved.guidance_scale, "mode": resolved.mode}
    if resolved.mode == "stream":
        settings.update(stream_timesteps=pipe.stream_timesteps(resolved.steps), stream_shift=pipe.preset.stream_shift,
                        block_latent_frames=pipe.preset.block_latent_frames)
    else:
        settings.update(flow_shift=pipe.scheduler_config.get("flow_shift"), scheduler="DPMSolverMultistepScheduler")
    result = evaluate_pipeline(pipe, cases, seeds, batch=batch, frames=frames, steps=steps,
                               guidance_scale=guidance_scale)
    out = {
        "model": model,
        "device": str(pipe.device),
        "dtype": str(pipe.dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "settings": settings,
        "held_out_combinations": [list(t) for t in data.HELD_OUT],
        "ground_truth": ground_truth(cases, frames=resolved.frames),
        "clips": result["clips"],
        "colour_accuracy": result["colour_accuracy"],
        "motion_accuracy": result["motion_accuracy"],
        "thresholds": {"colour_accuracy": COLOUR_THRESHOLD, "motion_accuracy": MOTION_THRESHOLD},
        "passed": result["colour_accuracy"] >= COLOUR_THRESHOLD and result["motion_accuracy"] >= MOTION_THRESHOLD,
        "seconds": result["seconds"],
        "records": result["records"],
    }
    if stream_seconds > 0 and pipe.causal:
        out["stream"] = stream_consistency(pipe, cases[0], seconds=stream_seconds, steps=steps,
                                           guidance_scale=guidance_scale)
    if vae_frames > 0:
        out["vae_round_trip"] = round_trip_blocks(pipe.vae, data.held_out_cases(backgrounds), frames=vae_frames,
                                                  block_latent_frames=pipe.preset.block_latent_frames, batch=batch)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Colour/motion accuracy of a model on the held-out prompts.")
    p.add_argument("--model", required=True, help="preset name or diffusers-format pipeline folder")
    p.add_argument("--out", default=None, help="write the JSON report here (default: print it)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="fp32, bf16 (default: the pipeline's)")
    p.add_argument("--backgrounds", type=int, default=2, help="backgrounds per held-out combination")
    p.add_argument("--seeds", type=int, default=1, help="seeds per prompt")
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--batch", type=int, default=8, help="prompts generated together")
    p.add_argument("--stream-seconds", type=float, default=0.0,
                   help="causal models: also one stream this long, checked block by block")
    p.add_argument("--vae-frames", type=int, default=0,
                   help="also the VAE alone: held-out clips of this many frames (4k+1) encoded, then decoded block by "
                   "block as a stream decodes them")
    args = p.parse_args(argv)
    if args.vae_frames and (args.vae_frames < 1 or (args.vae_frames - 1) % 4):
        p.error(f"--vae-frames {args.vae_frames}: expected 4k+1 frames (e.g. 65)")
    for name in ("backgrounds", "seeds", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: expected at least 1")
    if args.stream_seconds < 0:
        p.error(f"--stream-seconds {args.stream_seconds}: expected 0 (none) or more")
    if args.out:  # before minutes of evaluation: can the report be written there?
        from engine.loading import unwritable_folder

        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            reason = unwritable_folder(Path(args.out).parent)
        except OSError as exc:
            reason = exc.strerror or str(exc)
        if reason is not None:
            p.error(f"--out {args.out}: cannot write there ({reason})")
    from engine.errors import EngineError

    try:
        report = evaluate_model(args.model, args.device, args.dtype, args.backgrounds, args.seeds, args.frames,
                                args.steps, args.guidance_scale, args.batch, args.stream_seconds, args.vae_frames)
    except EngineError as exc:  # unknown model, device, dtype, frames, steps, guidance: one message, exit 2
        p.error(str(exc))
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    summary = (f"{args.model}: colour {report['colour_accuracy']:.3f}, motion {report['motion_accuracy']:.3f} on "
               f"{report['clips']} held-out clips (ground truth {report['ground_truth']['colour_accuracy']:.3f}/"
               f"{report['ground_truth']['motion_accuracy']:.3f})")
    if "stream" in report:
        s = report["stream"]
        summary += (f"; {s['seconds_of_video']:.0f}s stream: colour {s['colour_consistent_blocks']}/{s['blocks']}, "
                    f"motion {s['motion_consistent_blocks']}/{s['blocks']} blocks")
    if "vae_round_trip" in report:
        v = report["vae_round_trip"]
        summary += (f"; VAE alone over {v['frames']} frames: colour {v['colour_right_blocks']}/{v['blocks']}, motion "
                    f"{v['motion_right_blocks']}/{v['blocks']} blocks, mean error {v['mean_error_first_block']:.1f} "
                    f"(first block) / {v['mean_error_later_blocks']:.1f} (later) levels")
    print(summary if args.out else text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
