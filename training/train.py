"""Train the demo models in one run: a small Wan VAE, then a bidirectional and a block-causal SANA-Video transformer,
each with its own small Gemma-2 text encoder (trained jointly) and a word-level tokenizer.

    python -m training.train --out runs/demo --budget-minutes 8 --resume --pack runs/demo/demo-weights.tar.gz
    python -m training.train --out /tmp/smoke --smoke            # tiny models, a few steps, on the CPU

Phases, in order (each resumes where a checkpoint left it):
  vae     reconstruct procedural clips (data.py), L1 + L2 weighted towards the object, tiny KL; then the latent
          statistics (latents_mean/std in the VAE config) are measured so the transformers see ~unit-variance latents.
  clip    the bidirectional transformer: flow matching (x_t = (1-s) x0 + s noise, target noise - x0, timestep 1000 s)
          on whole clips, 10% empty captions so classifier-free guidance works.
  causal  the block-causal transformer with teacher forcing, block by block as the stream pipeline runs: the noisy
          block is scored against a BlockState holding the clean blocks before it, then the clean block is committed at
          t=0 (gradients flow through the state). Half the committed blocks are perturbed (a little noise, or the
          model's own prediction) so that a stream survives its own imperfect blocks.

Clips are rendered on the device and encoded by the trained VAE into a ring buffer of latents that is refreshed every
step (no dataset files). Wall-clock budget: every phase gets a share of --budget-minutes; checkpoints are written every
--checkpoint-seconds and at the end of each phase; whatever time is left, the run ends by exporting the best (lowest
validation loss) EMA weights as diffusers-format pipeline folders (demo/, demo-causal/), evaluating them and, with
--pack, writing one .tar.gz of the folders and the logs.
"""

from __future__ import annotations

import time

START = time.monotonic()  # the budget counts from here, imports included

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from engine.presets import DEMO_COMMON, TINY_TEXT_ENCODER, TINY_TRANSFORMER, ModelPreset, TransformerConfig  # noqa: E402
from engine.state import BlockState  # noqa: E402
from training import data  # noqa: E402

PHASES = ("vae", "clip", "causal")
STOP = threading.Event()  # set by SIGTERM/SIGINT: stop training, export what there is
MODEL_NAMES = {"clip": "demo", "causal": "demo-causal"}

# The shipped demo models (both folders together stay under 25 MB in bf16).
DEMO_TRANSFORMER = TransformerConfig(
    num_attention_heads=5,
    attention_head_dim=32,
    num_layers=6,
    num_cross_attention_heads=5,
    cross_attention_head_dim=32,
    cross_attention_dim=160,
    caption_channels=64,
    mlp_ratio=2.5,
)
# Encoder wide enough to learn quickly; decoder narrow at full resolution, which is what CPU decoding pays for.
DEMO_VAE = dict(
    base_dim=16,
    decoder_base_dim=8,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
)
DEMO_TEXT_ENCODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=64,
)
SMOKE_VAE = dict(
    base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
    temperal_downsample=[False, True, True],
)

# Sampling defaults written beside the weights (sana_video.json); the sweep at the end may replace steps/guidance.
# The shared fields are the demo presets' own (engine/presets.py); the rest are the defaults before the sweep.
DEMO_SAMPLING = dict(DEMO_COMMON, frames=33, steps=12, guidance_scale=4.0, stream_guidance_scale=1.0)
CAUSAL_FRAMES = 81


@dataclasses.dataclass
class Config:
    transformer: TransformerConfig = DEMO_TRANSFORMER
    vae: dict = dataclasses.field(default_factory=lambda: dict(DEMO_VAE))
    text_encoder: dict = dataclasses.field(default_factory=lambda: dict(DEMO_TEXT_ENCODER))
    max_sequence_length: int = 16
    block_latent_frames: int = 4
    # Share of the training time of each phase.
    phase_weights: tuple[float, float, float] = (0.25, 0.35, 0.40)
    # VAE phase.
    vae_frames: int = 17  # 1 + 4*4: the first-frame path and enough cached chunks to reach the causal steady state
    vae_batch: int = 48
    vae_lr: float = 2e-3
    vae_kl: float = 5e-5
    object_weight: float = 12.0  # the object is ~6% of the pixels; its colour is what matters
    # Transformer phases.
    clip_batch: int = 384
    clip_lengths: tuple[int, ...] = (9, 9, 9, 9, 9, 9, 9, 13, 13, 21)  # latent frames, drawn uniformly per step
    causal_batch: int = 96
    causal_max_blocks: int = 8
    lr: float = 6e-4
    causal_lr: float = 3e-4  # fine-tuning: the causal model starts from the trained bidirectional one
    warmup_steps: int = 150
    caption_dropout: float = 0.1
    # The transformers' loss weighs latent positions the object covers 1 + this much (the loss is normalized by the
    # mean weight). The object is ~17% of the latent positions, and a red and a green circle on white differ by only
    # ~0.01 in the normalized latents' mean square (up to ~1.3 std at the object's positions): unweighted, a colour
    # flip costs a denoiser almost nothing.
    latent_object_weight: float = 0.0
    clip_shift: float = 2.0  # training timesteps: logit-normal, shifted like the samplers do
    causal_shift: float = 3.0
    context_perturb: float = 0.5  # share of committed blocks that are perturbed
    context_noise: float = 0.2  # at most this much noise on a perturbed committed block
    history_scale: float = 10.0  # half the sequences weigh their committed blocks up to this much (long streams)
    # Share of the transformer phases' fresh clips drawn from focus_colours only, half of those on focus_background
    # (data.sample_focus_cases): more practice for the colours a model confuses. 0: uniform over training combinations.
    focus_share: float = 0.0
    focus_colours: tuple[str, ...] = ("red", "green", "orange", "blue")
    focus_background: str = "white"
    causal_warmup_steps: int = 30
    ema_decay: float = 0.999
    pool_clips: int = 8192  # latent ring buffer (clip phase); the causal one holds half as many, 4x longer
    pool_refresh: int = 128  # clips rendered, encoded and replaced at once (few large calls: less launch overhead)
    pool_refresh_every: int = 8  # steps between refreshes at least; more when encoding takes over pool_max_share
    # Share of a phase's time that encoding fresh clips may take. On a GPU, 0.15 keeps the pool fresh; on a CPU the VAE
    # encoder is slow and 0.15 leaves a pool of a few hundred clips that a fine-tune overfits (validation loss rose).
    pool_max_share: float = 0.15
    grad_clip: float = 1.0
    val_clips: int = 64
    # Evaluation at the end.
    eval_backgrounds: int = 2  # 0: two held-out prompts only
    eval_frames: int | None = None  # None: the presets' default lengths
    sweep: bool = True
    stream_check_seconds: float = 60.0
    latent_stats_clips: int = 256

    @classmethod
    def smoke(cls) -> "Config":
        return cls(
            transformer=TINY_TRANSFORMER,
            vae=dict(SMOKE_VAE),
            text_encoder=dict(TINY_TEXT_ENCODER),
            block_latent_frames=2, vae_frames=5, vae_batch=1, clip_batch=2, clip_lengths=(2, 3), causal_batch=2,
            causal_max_blocks=2, causal_warmup_steps=2, pool_clips=4, pool_refresh=1, pool_refresh_every=1,
            val_clips=1, warmup_steps=2, eval_backgrounds=0, eval_frames=9, sweep=False, stream_check_seconds=0.5,
            latent_stats_clips=2,
        )

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["transformer"] = self.transformer.to_dict()
        return out


def log(*parts) -> None:
    print(f"[{time.monotonic() - START:7.1f}s]", *parts, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Pieces shared by the phases


def tokenize(tokenizer, prompts: list[str], max_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask [B, max_len], exactly as engine.text.TextEncoder.encode prepares them (no instruction)."""
    enc = tokenizer([p.lower().strip() for p in prompts], padding="max_length", max_length=max_len, truncation=True,
                    add_special_tokens=True, return_tensors="pt")
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def logit_normal_sigmas(n: int, shift: float, generator, device) -> torch.Tensor:
    """Noise levels s in (0, 1): logit-normal, 10% uniform (the extremes matter to few-step samplers), then shifted
    as the samplers shift their schedules (s' = shift s / (1 + (shift - 1) s))."""
    s = torch.sigmoid(torch.randn(n, generator=generator, device=device))
    uniform = torch.rand(n, generator=generator, device=device)
    s = torch.where(torch.rand(n, generator=generator, device=device) < 0.1, uniform, s)
    return (shift * s / (1 + (shift - 1) * s)).clamp(1e-4, 1.0)


class EMA:
    """Exponential moving average of a module's parameters (its buffers are constants here)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema = [p for p in self.module.parameters()]
        src = [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(ema, src, 1 - decay)


def cosine_lr(base: float, progress: float, step: int, warmup: int) -> float:
    warm = min(1.0, (step + 1) / max(1, warmup))
    return base * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class WeightedBlockState(BlockState):
    """A ``BlockState`` whose committed blocks count ``weight`` [B] times: the running sums of a stream many blocks
    long weigh the current block as little as this does, which a short training sequence otherwise never shows."""

    weight: torch.Tensor | None = None

    def commit_layer(self, layer: int, S: torch.Tensor, z: torch.Tensor, conv_last: torch.Tensor) -> None:
        if self.weight is not None:
            S, z = S * self.weight.view(-1, 1, 1, 1), z * self.weight.view(-1, 1, 1)
        super().commit_layer(layer, S, z, conv_last)


class LatentPool:
    """Ring buffer of encoded clips (normalized latents, bf16 on the device) with their caption tokens; ``refresh``
    renders and encodes new clips over the oldest ones, ``sample`` draws a batch from what is filled."""

    def __init__(self, vae, tokenizer, size: int, latent_frames: int, max_len: int, device, generator,
                 case_generator: torch.Generator, refresh_every: int,
                 focus: tuple[float, tuple, str | None] = (0.0, (), None)):
        from engine.vae import latent_stats

        self.vae, self.tokenizer, self.max_len = vae, tokenizer, max_len
        self.size, self.latent_frames, self.device, self.generator = size, latent_frames, device, generator
        self.case_generator = case_generator  # on the CPU: captions are drawn without waiting for the device
        self.focus_share, self.focus_colours, self.focus_background = focus
        self.frames = 1 + 4 * (latent_frames - 1)
        c = vae.config.z_dim
        s = data.SIZE // 8
        self.latents = torch.zeros(size, c, latent_frames, s, s, device=device, dtype=torch.bfloat16)
        self.ids = torch.zeros(size, max_len, device=device, dtype=torch.long)
        self.mask = torch.zeros(size, max_len, device=device, dtype=torch.long)
        self.cover = torch.zeros(size, 1, latent_frames, s, s, device=device, dtype=torch.bfloat16)
        self.filled, self.cursor = 0, 0
        self.mean, self.std = latent_stats(vae, c, device, torch.float32)
        # Refresh pacing (see Run.maybe_refresh).
        self.created, self.seconds, self.every, self.next_refresh = time.monotonic(), 0.0, refresh_every, 0

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):
            z = self.vae.encode(video).latent_dist.mode()
        return (z.float() - self.mean) / self.std

    @torch.no_grad()
    def refresh(self, n: int, chunk: int = 128) -> None:
        n = min(n, self.size)
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            n_focus = round(k * self.focus_share)
            cases = data.sample_cases(k - n_focus, self.case_generator, "train")
            if n_focus:
                cases += data.sample_focus_cases(n_focus, self.case_generator, self.focus_colours,
                                                 self.focus_background)
            video, alpha = data.render(data.scenes_for(cases, self.generator), self.frames, with_alpha=True)
            z = self.encode(video)
            idx = (self.cursor + torch.arange(k, device=self.device)) % self.size
            self.latents[idx] = z.to(torch.bfloat16)
            self.cover[idx] = latent_coverage(alpha, z.shape[2]).to(torch.bfloat16)
            ids, mask = tokenize(self.tokenizer, [c.prompt for c in cases], self.max_len, self.device)
            self.ids[idx], self.mask[idx] = ids, mask
            self.cursor = (self.cursor + k) % self.size
            self.filled = min(self.size, self.filled + k)

    def sample(self, n: int, latent_frames: int):
        """Latents [n, C, T, h, w], caption ids and mask [n, L], object coverage [n, 1, T, h, w]."""
        idx = torch.randint(self.filled, (n,), device=self.device, generator=self.generator)
        return (self.latents[idx, :, :latent_frames].float(), self.ids[idx], self.mask[idx],
                self.cover[idx, :, :latent_frames].float())


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def reconstruction_error(recon: torch.Tensor, video: torch.Tensor, alpha: torch.Tensor,
                         object_weight: float) -> torch.Tensor:
    """The VAE's per-pixel reconstruction loss: L1 + L2, object pixels (``alpha``, from ``data.render``) weighted
    ``1 + object_weight``; the caller reduces it."""
    err = recon.float() - video
    return (1 + object_weight * alpha) * (err.abs() + err.pow(2))


def latent_coverage(alpha: torch.Tensor, latent_frames: int) -> torch.Tensor:
    """The object's coverage [B, F, H, W] (``data.render``) at the Wan VAE's latent resolution [B, 1, T, H/8, W/8]:
    the most of a latent's frames and 8x8 pixels that the object covers (latent frame 0 is frame 0, latent frame t
    frames 4t-3 .. 4t)."""
    B, F_, H, W = alpha.shape
    frames = torch.cat([alpha[:, :1].expand(B, 3, H, W), alpha], 1)[:, : 4 * latent_frames]  # pad to 4 per latent
    per_latent = frames.reshape(B, latent_frames, 4, H, W).amax(2)
    return F.max_pool2d(per_latent, 8)[:, None]


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, cover: torch.Tensor | None, weight: float) -> torch.Tensor:
    """Mean squared error with latent positions weighted 1 + ``weight`` * ``cover`` [B, 1, T, h, w], normalized by
    the mean weight; plain MSE when ``weight`` is 0."""
    if not weight or cover is None:
        return F.mse_loss(pred.float(), target)
    w = 1 + weight * cover
    return ((pred.float() - target).pow(2) * w).mean() / w.mean()


def state_to_cpu(module: torch.nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------------
# The run


class Run:
    def __init__(self, args, cfg: Config):
        from engine.loading import build_transformer
        from engine.text import build_text_encoder, build_word_tokenizer
        from engine.vae import build_vae

        self.args, self.cfg = args, cfg
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True  # the VAE's 3D convolutions run at a few fixed shapes
        torch.manual_seed(args.seed)
        self.generator = torch.Generator(self.device).manual_seed(args.seed)
        # Choices the host makes (captions, sequence lengths) come from the CPU, so they never wait for the device.
        self.case_generator = torch.Generator().manual_seed(args.seed + 5)
        self.rng = random.Random(args.seed)
        self.tokenizer = build_word_tokenizer(data.VOCAB)
        self.models: dict[str, torch.nn.Module] = {
            "vae": build_vae(cfg.vae, seed=args.seed),
            "clip": build_transformer(cfg.transformer, causal=False, seed=args.seed + 1),
            "clip_text": build_text_encoder(cfg.text_encoder, len(self.tokenizer), seed=args.seed + 2),
            "causal": build_transformer(cfg.transformer, causal=True, seed=args.seed + 3),
            "causal_text": build_text_encoder(cfg.text_encoder, len(self.tokenizer), seed=args.seed + 4),
        }
        for m in self.models.values():
            m.to(self.device).train()
        self.phase_models = {"vae": ["vae"], "clip": ["clip", "clip_text"], "causal": ["causal", "causal_text"]}
        self.emas = {name: EMA(m, cfg.ema_decay) for name, m in self.models.items()}
        self.best: dict[str, dict] = {}  # model name -> CPU state dict of the best EMA weights
        self.optims = {
            "vae": torch.optim.AdamW(self.models["vae"].parameters(), lr=cfg.vae_lr, betas=(0.9, 0.99),
                                     weight_decay=0.0),
            "clip": torch.optim.AdamW([p for n in ("clip", "clip_text") for p in self.models[n].parameters()],
                                      lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.01),
            "causal": torch.optim.AdamW([p for n in ("causal", "causal_text") for p in self.models[n].parameters()],
                                        lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.01),
        }
        self.progress = {
            p: {"steps": 0, "seconds": 0.0, "target_seconds": 0.0, "done": False, "best_val": None, "error": None,
                "batch": {"vae": cfg.vae_batch, "clip": cfg.clip_batch, "causal": cfg.causal_batch}[p]}
            for p in PHASES
        }
        self.history: dict[str, list] = {p: [] for p in PHASES}
        self.validation: dict[str, list] = {p: [] for p in PHASES}
        self.last_checkpoint = time.monotonic()

    # -- checkpoints -----------------------------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        state = {
            "config": self.cfg.to_dict(),
            "progress": self.progress,
            "models": {n: m.state_dict() for n, m in self.models.items()},
            "ema": {n: e.module.state_dict() for n, e in self.emas.items()},
            "ema_updates": {n: e.updates for n, e in self.emas.items()},
            "best": self.best,
            "optims": {n: o.state_dict() for n, o in self.optims.items()},
            "history": self.history,
            "validation": self.validation,
        }
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)
        self.write_logs()
        self.last_checkpoint = time.monotonic()
        log(f"checkpoint written ({self.checkpoint_path})")

    def load_checkpoint(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        # A portable checkpoint (see save_portable) leaves out what the remaining phases do not need: models of
        # phases not started keep their seeded initialization, finished phases keep only their best weights.
        for n, m in self.models.items():
            if n in state["models"]:
                m.load_state_dict(state["models"][n])
            elif n in state["best"]:  # a finished phase (portable): training on (--extend) starts from its best
                m.load_state_dict(state["best"][n])
            if n in state["ema"]:
                self.emas[n].module.load_state_dict(state["ema"][n])
            elif n in state["best"]:
                self.emas[n].module.load_state_dict(state["best"][n])
            self.emas[n].updates = state["ema_updates"].get(n, 0)
        for n, o in self.optims.items():
            if n in state["optims"]:
                o.load_state_dict(state["optims"][n])
        self.best = state["best"]
        for p in PHASES:
            saved = dict(state["progress"][p])
            if not saved.get("steps"):  # a phase not started takes its batch from this run's config (--set)
                saved.pop("batch", None)
            self.progress[p].update(saved)
        self.history, self.validation = state["history"], state["validation"]
        stats = self.progress["vae"].get("latent_stats")
        if stats:
            self.set_latent_stats(*stats)
        log(f"resumed from {self.checkpoint_path}: " + ", ".join(
            f"{p} {self.progress[p]['steps']} steps{' (done)' if self.progress[p]['done'] else ''}" for p in PHASES))
        return True

    def save_portable(self, folder: Path, part_mib: int = 15) -> list[Path]:
        """The checkpoint without what later runs cannot need (optimizer state and raw weights of finished phases,
        anything of phases not started), split into parts of at most ``part_mib`` MiB so that it can travel to
        another machine; ``cat part* > OUT/checkpoint.pt`` restores a file that ``--resume`` reads."""
        keep_raw = {n for p in PHASES if self.progress[p]["steps"] > 0 and not self.progress[p]["done"]
                    for n in self.phase_models[p]}
        # Weights that later phases build on: phases trained here, finished, or taken from a folder (--init-from:
        # its VAE counts as finished with no step of its own; leaving it out would resume on a random VAE).
        started = {n for p in PHASES if self.progress[p]["steps"] > 0 or self.progress[p]["done"]
                   or self.progress[p].get("initialized_from") for n in self.phase_models[p]}
        state = {
            "config": self.cfg.to_dict(),
            "progress": self.progress,
            "models": {n: m.state_dict() for n, m in self.models.items() if n in keep_raw},
            "ema": {n: e.module.state_dict() for n, e in self.emas.items() if n in keep_raw},
            "ema_updates": {n: e.updates for n, e in self.emas.items() if n in started},
            "best": {n: v for n, v in self.best.items() if n in started},
            "optims": {p: o.state_dict() for p, o in self.optims.items()
                       if any(n in keep_raw for n in self.phase_models[p])},
            "history": self.history,
            "validation": self.validation,
        }
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("checkpoint.part*"):
            old.unlink()
        import io

        buffer = io.BytesIO()
        torch.save(state, buffer)
        blob, step, parts = buffer.getvalue(), part_mib * 2**20, []
        for i in range(0, len(blob), step):
            parts.append(folder / f"checkpoint.part{i // step:02d}")
            parts[-1].write_bytes(blob[i : i + step])
        log(f"portable checkpoint: {len(blob) / 2**20:.1f} MiB in {len(parts)} parts under {folder}")
        return parts

    def write_logs(self) -> None:
        logs = {"config": self.cfg.to_dict(), "progress": self.progress, "train": self.history,
                "validation": self.validation, "device": str(self.device), "torch": torch.__version__}
        tmp = self.out / "losses.json.tmp"
        tmp.write_text(json.dumps(logs, indent=1))
        os.replace(tmp, self.out / "losses.json")

    def maybe_checkpoint(self) -> None:
        if time.monotonic() - self.last_checkpoint >= self.args.checkpoint_seconds:
            self.save_checkpoint()

    # -- budget ----------------------------------------------------------------------------------------------------

    def plan(self, deadline: float) -> None:
        """Seconds each unfinished phase may still train in this run, scaled to fit before ``deadline``."""
        available = max(0.0, deadline - time.monotonic())
        todo = [p for p in PHASES if not self.finished(p)]
        explicit = self.args.phase_minutes
        for i, p in enumerate(PHASES):
            if p in todo and self.progress[p]["target_seconds"] <= self.progress[p]["seconds"]:
                if explicit and self.progress[p]["seconds"] > 0:
                    self.progress[p]["target_seconds"] = self.progress[p]["seconds"] + 60.0 * explicit[i]
                elif explicit:
                    self.progress[p]["target_seconds"] = 60.0 * explicit[i]
                else:
                    share = self.cfg.phase_weights[i] / sum(self.cfg.phase_weights[PHASES.index(q)] for q in todo)
                    self.progress[p]["target_seconds"] = self.progress[p]["seconds"] + share * available
        remaining = {p: max(0.0, self.progress[p]["target_seconds"] - self.progress[p]["seconds"]) for p in todo}
        total = sum(remaining.values())
        if total > available > 0:
            for p in todo:  # squeeze: every phase keeps its share, and its schedule ends within this run
                remaining[p] *= available / total
                self.progress[p]["target_seconds"] = self.progress[p]["seconds"] + remaining[p]
        self.remaining = remaining
        log("plan: " + ", ".join(f"{p} {remaining[p]:.0f}s" for p in todo) + f" (available {available:.0f}s)")

    # -- phases ----------------------------------------------------------------------------------------------------

    def run_phase(self, phase: str, deadline: float) -> None:
        prog = self.progress[phase]
        if self.finished(phase):
            return
        step_fn = {"vae": self.vae_step, "clip": self.clip_step, "causal": self.causal_step}[phase]
        budget = self.remaining.get(phase, 0.0)
        # Everything the phase does counts towards its time: data, validation and checkpoints too.
        phase_start, seconds_before = time.monotonic(), prog["seconds"]
        clip_trained = self.progress["clip"]["steps"] > 0 or "initialized_from" in self.progress["clip"]
        if phase == "causal" and prog["steps"] == 0 and clip_trained and "initialized_from" not in prog:
            self.init_causal_from_clip()
        if phase != "vae":
            self.make_pool(phase)
        val_batch = self.validation_batch(phase)
        if prog["steps"] == 0 and "initialized_from" in prog:  # the starting weights are the first candidate best
            self.validate(phase, val_batch)
        last_val = last_log = time.monotonic()
        loss_sum, loss_steps = None, 0  # summed on the device: no synchronisation per step
        log(f"phase {phase}: {budget:.0f}s, batch {prog['batch']}, from step {prog['steps']}")
        while True:
            now = time.monotonic()
            prog["seconds"] = seconds_before + now - phase_start
            if now >= deadline or now - phase_start >= budget or prog["seconds"] >= prog["target_seconds"]:
                break
            if STOP.is_set():
                break
            if self.args.max_steps and prog["steps"] >= self.args.max_steps:
                break
            try:
                loss = step_fn(prog)
            except torch.OutOfMemoryError:
                if prog["batch"] <= 1:
                    raise
                prog["batch"] //= 2
                loss = None
                torch.cuda.empty_cache()
                log(f"{phase}: out of memory, batch -> {prog['batch']}")
                continue
            prog["steps"] += 1
            loss_sum, loss_steps = (loss if loss_sum is None else loss_sum + loss), loss_steps + 1
            if time.monotonic() - last_log >= self.args.log_seconds or prog["steps"] == 1:
                self.log_loss(phase, loss_sum.item() / loss_steps, loss_steps / (time.monotonic() - last_log))
                loss_sum, loss_steps, last_log = None, 0, time.monotonic()
            if time.monotonic() - last_val >= self.args.val_seconds:
                self.validate(phase, val_batch)
                last_val = time.monotonic()
            self.maybe_checkpoint()
        if loss_steps:
            self.log_loss(phase, loss_sum.item() / loss_steps, loss_steps / max(time.monotonic() - last_log, 1e-6))
        self.validate(phase, val_batch)
        prog["seconds"] = seconds_before + time.monotonic() - phase_start
        if prog["seconds"] >= prog["target_seconds"] - 1.0:  # the loop checks two clocks: within a second is done
            prog["done"] = True
        if phase == "vae":
            self.measure_latent_stats()
            self.vae_round_trip()
        self.save_checkpoint()

    def log_loss(self, phase: str, loss: float, steps_per_second: float) -> None:
        prog = self.progress[phase]
        self.history[phase].append([prog["steps"], round(prog["seconds"], 2), round(loss, 6)])
        pool = getattr(self, "pool", None) if phase != "vae" else None
        data_note = f", pool refresh every {pool.every} steps ({pool.seconds:.0f}s)" if pool is not None else ""
        log(f"{phase} step {prog['steps']} loss {loss:.5f} ({steps_per_second:.1f} steps/s, batch {prog['batch']}"
            f"{data_note}, {prog['seconds']:.0f}/{prog['target_seconds']:.0f}s)")

    def reopen(self, phases: list[str], minutes: list[float] | None) -> None:
        """--extend: finished phases named in --phases train on, for their --phase-minutes more (else their share of
        this run); the learning-rate schedule restarts from where the longer target puts it."""
        for i, p in enumerate(PHASES):
            prog = self.progress[p]
            if p in phases and prog["done"]:
                prog["done"] = False
                prog["target_seconds"] = 0.0 if not minutes else prog["seconds"] + 60.0 * minutes[i]
                prog["extended_from_step"] = prog["steps"]
                log(f"{p}: extended from step {prog['steps']}")

    def finished(self, phase: str) -> bool:
        """Nothing left for this run: its time target is met (for good), or --max-steps (for this run), or not asked."""
        prog = self.progress[phase]
        steps_reached = bool(self.args.max_steps) and prog["steps"] >= self.args.max_steps
        return prog["done"] or steps_reached or phase not in self.args.phases

    def set_lr(self, phase: str, base: float) -> None:
        prog = self.progress[phase]
        progress = prog["seconds"] / max(prog["target_seconds"], 1e-6)
        if self.args.max_steps:
            progress = max(progress, prog["steps"] / self.args.max_steps)
        warmup = self.cfg.causal_warmup_steps if phase == "causal" else self.cfg.warmup_steps
        # An extended phase may start with fresh optimizer moments (portable checkpoints drop them): warm up again.
        lr = cosine_lr(base, progress, prog["steps"] - prog.get("extended_from_step", 0), warmup)
        for g in self.optims[phase].param_groups:
            g["lr"] = lr

    def optimize(self, phase: str, loss: torch.Tensor) -> None:
        opt = self.optims[phase]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for n in self.phase_models[phase] for p in self.models[n].parameters()]
        torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        opt.step()
        for n in self.phase_models[phase]:
            self.emas[n].update(self.models[n])

    # VAE ------------------------------------------------------------------------------------------------------------

    def vae_loss(self, vae, video: torch.Tensor, alpha: torch.Tensor, sample: bool = True):
        with autocast(self.device):
            posterior = vae.encode(video).latent_dist
            z = posterior.sample(self.generator) if sample else posterior.mode()
            recon = vae.decode(z).sample
        rec = reconstruction_error(recon, video, alpha, self.cfg.object_weight).mean()
        kl = 0.5 * (posterior.mean.float().pow(2) + posterior.var.float() - 1 - posterior.logvar.float()).mean()
        return rec, kl

    def vae_batch(self, n: int, generator=None, case_generator=None):
        cases = data.sample_cases(n, case_generator or self.case_generator, "train")
        video, alpha = data.render(data.scenes_for(cases, generator or self.generator), self.cfg.vae_frames,
                                   with_alpha=True)
        return video, alpha[:, None]

    def vae_step(self, prog) -> float:
        self.set_lr("vae", self.cfg.vae_lr)
        video, alpha = self.vae_batch(prog["batch"])
        rec, kl = self.vae_loss(self.models["vae"], video, alpha)
        loss = rec + self.cfg.vae_kl * kl
        self.optimize("vae", loss)
        return rec.detach()

    @torch.no_grad()
    def measure_latent_stats(self) -> None:
        """Per-channel mean/std of the exported VAE's latents; stored in the VAE config (latents_mean/std)."""
        vae = self.export_vae()
        g = torch.Generator(self.device).manual_seed(self.args.seed + 7)
        g_cases = torch.Generator().manual_seed(self.args.seed + 7)
        zs = []
        for start in range(0, self.cfg.latent_stats_clips, 64):
            cases = data.sample_cases(min(64, self.cfg.latent_stats_clips - start), g_cases, "train")
            scenes = data.scenes_for(cases, g)
            with autocast(self.device):
                zs.append(vae.encode(data.render(scenes, 33)).latent_dist.mode().float())
        z = torch.cat(zs).transpose(0, 1).flatten(1)
        mean, std = z.mean(1).tolist(), z.std(1).clamp(min=1e-3).tolist()
        self.progress["vae"]["latent_stats"] = [mean, std]
        self.set_latent_stats(mean, std)
        log("latent stats: mean " + " ".join(f"{m:+.2f}" for m in mean) + " | std " + " ".join(f"{s:.2f}" for s in std))

    @torch.no_grad()
    def vae_round_trip(self) -> None:
        """Held-out clips encoded and decoded by the exported VAE, then measured like generated ones: the ceiling of
        what the transformers can reach (a VAE that loses the colour makes every later accuracy meaningless)."""
        from training.evaluate import accuracy, measure, round_trip_blocks

        vae = self.export_vae()
        cases = data.held_out_cases(2)
        g = torch.Generator(self.device).manual_seed(self.args.seed + 8)
        video = data.render(data.scenes_for(cases, g), 33)
        with autocast(self.device):
            recon = torch.cat([vae.decode(vae.encode(video[i : i + 8]).latent_dist.mode()).sample.float()
                               for i in range(0, len(cases), 8)])
        result = accuracy([measure(c) for c in data.to_uint8(recon.clamp(-1, 1))], cases)
        # Streams decode block by block for far longer than a training clip: check the decoder past that length.
        k = self.cfg.block_latent_frames
        with autocast(self.device):
            result["blocks"] = round_trip_blocks(vae, cases, frames=1 + 4 * 4 * k, block_latent_frames=k,
                                                 seed=self.args.seed + 9)
        self.progress["vae"]["round_trip"] = result
        b = result["blocks"]
        log(f"vae round trip on held-out clips: colour {result['colour_accuracy']:.3f} "
            f"motion {result['motion_accuracy']:.3f}; block by block over {b['frames']} frames: colour "
            f"{b['colour_right_blocks']}/{b['blocks']} blocks, mean error {b['mean_error_first_block']:.1f} (first "
            f"block) / {b['mean_error_later_blocks']:.1f} (later) levels")

    def set_latent_stats(self, mean: list[float], std: list[float]) -> None:
        for vae in (self.models["vae"], self.emas["vae"].module):
            vae.register_to_config(latents_mean=list(mean), latents_std=list(std))

    def export_vae(self):
        """The VAE the transformers train on and ship with: best (or EMA) weights with the latent statistics."""
        vae = copy.deepcopy(self.emas["vae"].module)
        if "vae" in self.best:
            vae.load_state_dict(self.best["vae"])
        return vae.eval().requires_grad_(False)

    # Transformers -------------------------------------------------------------------------------------------------

    def make_pool(self, phase: str) -> None:
        cfg = self.cfg
        vae = self.export_vae().to(self.device)
        if phase == "clip":
            size, frames = cfg.pool_clips, max(cfg.clip_lengths)
        else:
            size, frames = max(cfg.pool_clips // 2, 2), 2 * cfg.block_latent_frames - 1 + cfg.block_latent_frames * (
                cfg.causal_max_blocks - 1)
        seed = self.args.seed + 11 + self.progress[phase]["steps"]
        self.pool = LatentPool(vae, self.tokenizer, size, frames, cfg.max_sequence_length, self.device,
                               torch.Generator(self.device).manual_seed(seed), torch.Generator().manual_seed(seed),
                               cfg.pool_refresh_every, (cfg.focus_share, cfg.focus_colours, cfg.focus_background))
        t0 = time.monotonic()
        self.pool.refresh(max(2 * cfg.pool_refresh, min(size, self.progress[phase]["batch"])))
        self.pool.next_refresh = self.progress[phase]["steps"] + self.pool.every
        self.empty_ids, self.empty_mask = tokenize(self.tokenizer, [""], cfg.max_sequence_length, self.device)
        log(f"{phase}: latent pool of {size} x {frames} latent frames, {self.pool.filled} filled in "
            f"{time.monotonic() - t0:.1f}s")

    def maybe_refresh(self, prog) -> None:
        """Replace ``pool_refresh`` clips of the pool every few steps; refresh less often while encoding takes more
        than ``pool_max_share`` of the phase's time, more often (down to every ``pool_refresh_every`` steps) below a
        third of it."""
        if prog["steps"] < self.pool.next_refresh:
            return
        t0 = time.monotonic()
        self.pool.refresh(self.cfg.pool_refresh)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.pool.seconds += time.monotonic() - t0
        share = self.pool.seconds / max(time.monotonic() - self.pool.created, 1e-6)
        if share > self.cfg.pool_max_share:
            self.pool.every *= 2
        elif share < self.cfg.pool_max_share / 3:
            self.pool.every = max(self.cfg.pool_refresh_every, self.pool.every // 2)
        self.pool.next_refresh = prog["steps"] + self.pool.every

    def text_features(self, phase: str, ids: torch.Tensor, mask: torch.Tensor, drop: bool = True, ema: bool = False):
        text = (self.emas[f"{phase}_text"].module if ema else self.models[f"{phase}_text"])
        if drop and self.cfg.caption_dropout > 0:
            keep = torch.rand(ids.shape[0], device=self.device, generator=self.generator) >= self.cfg.caption_dropout
            ids = torch.where(keep[:, None], ids, self.empty_ids)
            mask = torch.where(keep[:, None], mask, self.empty_mask)
        return text(ids, attention_mask=mask)[0], mask

    def init_from(self, folder: str) -> None:
        """--init-from: start from a pipeline folder (diffusers format, e.g. engine/weights/demo) instead of seeded
        weights. Its VAE and latent statistics make the VAE phase finished; its transformer and text encoder start the
        phase of their kind (clip for a bidirectional model, causal for a block-causal one), from its first step."""
        from engine.pipeline import VideoPipeline

        pipe = VideoPipeline.from_pretrained(folder, device="cpu", dtype="fp32")
        phase = "causal" if pipe.causal else "clip"
        for name, module in (("vae", pipe.vae), (phase, pipe.transformer), (f"{phase}_text", pipe.text_encoder.model)):
            state = state_to_cpu(module)
            try:
                self.models[name].load_state_dict(state)
            except RuntimeError as exc:  # bad input, like the argument checks: exit code 2 with the reason
                print(f"--init-from {folder}: its {name} does not fit this run's configuration: {exc}", file=sys.stderr)
                raise SystemExit(2) from None
            self.emas[name].module.load_state_dict(state)
            self.best[name] = state
        stats = [list(pipe.vae.config.latents_mean), list(pipe.vae.config.latents_std)]
        self.set_latent_stats(*stats)
        self.progress["vae"].update(done=True, latent_stats=stats, initialized_from=str(folder))
        self.progress[phase]["initialized_from"] = str(folder)
        log(f"initialized the VAE and the {phase} model from {folder}")

    def init_causal_from_clip(self) -> None:
        """As the official LongLive models are made: the block-causal model starts from the bidirectional one (the
        weight layout is the same) and is fine-tuned block by block."""
        for src, dst in (("clip", "causal"), ("clip_text", "causal_text")):
            state = self.best.get(src) or state_to_cpu(self.emas[src].module)
            self.models[dst].load_state_dict(state)
            self.emas[dst].module.load_state_dict(state)
        self.progress["causal"]["initialized_from"] = f"clip step {self.progress['clip'].get('best_step')}"
        log("causal: initialized from the bidirectional model")

    def clip_step(self, prog) -> float:
        cfg = self.cfg
        self.set_lr("clip", cfg.lr)
        self.maybe_refresh(prog)
        length = self.rng.choice(cfg.clip_lengths)
        x0, ids, mask, cover = self.pool.sample(prog["batch"], length)
        with autocast(self.device):
            loss = self.clip_loss(self.models["clip"], x0, ids, mask, ema=False, cover=cover)
        self.optimize("clip", loss)
        return loss.detach()

    def clip_loss(self, model, x0, ids, mask, ema: bool, noise=None, sigma=None, drop: bool = True, cover=None):
        B = x0.shape[0]
        if sigma is None:
            sigma = logit_normal_sigmas(B, self.cfg.clip_shift, self.generator, self.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=self.generator, device=self.device)
        s = sigma.view(B, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        emb, mask = self.text_features("clip", ids, mask, drop=drop, ema=ema)
        v = model(xt, emb, 1000 * sigma, mask)
        return weighted_mse(v, noise - x0, cover, self.cfg.latent_object_weight)

    def causal_step(self, prog) -> float:
        cfg = self.cfg
        self.set_lr("causal", cfg.causal_lr)
        self.maybe_refresh(prog)
        k = cfg.block_latent_frames
        blocks_n = self.rng.randint(1, cfg.causal_max_blocks)
        first = self.rng.randint(k, 2 * k - 1)  # stream_blocks: the first block absorbs the remainder
        blocks = [first] + [k] * (blocks_n - 1)
        x0, ids, mask, cover = self.pool.sample(prog["batch"], sum(blocks))
        with autocast(self.device):
            loss = self.causal_loss(self.models["causal"], x0, ids, mask, blocks, ema=False, cover=cover)
        self.optimize("causal", loss)
        return loss.detach()

    def causal_loss(self, model, x0, ids, mask, blocks: list[int], ema: bool, noises=None, sigmas=None,
                    drop: bool = True, perturb: bool = True, cover=None):
        """Teacher forcing over ``blocks``: score each noisy block against the state of the blocks before it, then
        commit that block (clean, or perturbed) at t=0."""
        cfg = self.cfg
        B = x0.shape[0]
        emb, mask = self.text_features("causal", ids, mask, drop=drop, ema=ema)
        weight = torch.ones(B, device=self.device)
        if perturb and cfg.history_scale > 1:
            u = torch.rand(B, device=self.device, generator=self.generator)
            weight = torch.where(u < 0.5, torch.exp(2 * u * math.log(cfg.history_scale)), weight)
        state = WeightedBlockState.for_model(model, B, x0.shape[3], x0.shape[4], device=self.device,
                                             dtype=torch.float32)
        state.weight = weight
        zero_t = torch.zeros(B, device=self.device)
        total, start = 0.0, 0
        for b, n in enumerate(blocks):
            clean = x0[:, :, start : start + n]
            start += n
            sigma = sigmas[b] if sigmas is not None else logit_normal_sigmas(B, cfg.causal_shift, self.generator,
                                                                             self.device)
            noise = noises[b] if noises is not None else torch.randn(clean.shape, generator=self.generator,
                                                                     device=self.device)
            s = sigma.view(B, 1, 1, 1, 1)
            xt = (1 - s) * clean + s * noise
            v = model(xt, emb, 1000 * sigma, mask, state=state)
            block_cover = None if cover is None else cover[:, :, start - n : start]
            total = total + weighted_mse(v, noise - clean, block_cover, cfg.latent_object_weight)
            if b + 1 == len(blocks):
                break
            context = clean
            if perturb and cfg.context_perturb > 0:
                # Half of the perturbed blocks get a little noise, the other half the model's own prediction where
                # it was made from a low noise level (what a stream commits); the rest stay clean.
                u = torch.rand(B, device=self.device, generator=self.generator)
                level = cfg.context_noise * torch.rand(B, device=self.device, generator=self.generator)
                noisy = (1 - level.view(B, 1, 1, 1, 1)) * clean + level.view(B, 1, 1, 1, 1) * torch.randn(
                    clean.shape, generator=self.generator, device=self.device)
                predicted = (xt - s * v.float()).detach()
                use_noisy = (u < cfg.context_perturb / 2).view(B, 1, 1, 1, 1)
                use_pred = ((u >= cfg.context_perturb / 2) & (u < cfg.context_perturb) & (sigma <= 0.6)).view(
                    B, 1, 1, 1, 1)
                context = torch.where(use_noisy, noisy, torch.where(use_pred, predicted, clean))
            model(context, emb, zero_t, mask, state=state, commit=True)
        return total / len(blocks)

    # Validation ---------------------------------------------------------------------------------------------------

    def validation_batch(self, phase: str):
        """Fixed clips of training combinations (new positions/speeds), noise and noise levels."""
        cfg = self.cfg
        seed = self.args.seed + 1000 + PHASES.index(phase)
        g, g_cases = torch.Generator(self.device).manual_seed(seed), torch.Generator().manual_seed(seed)
        n = cfg.val_clips
        if phase == "vae":
            return self.vae_batch(n, g, g_cases)
        k = cfg.block_latent_frames
        blocks = [k + 1] + [k] * 3 if phase == "causal" else None
        length = sum(blocks) if blocks else cfg.clip_lengths[0]
        cases = data.sample_cases(n, g_cases, "train")
        scenes = data.scenes_for(cases, g)
        frames = 1 + 4 * (length - 1)
        x0, cover = [], []
        for i in range(0, n, 16):
            video, alpha = data.render(scenes[i : i + 16], frames, with_alpha=True)
            x0.append(self.pool.encode(video))
            cover.append(latent_coverage(alpha, length))
        x0, cover = torch.cat(x0), torch.cat(cover)
        ids, mask = tokenize(self.tokenizer, [c.prompt for c in cases], cfg.max_sequence_length, self.device)
        if phase == "clip":
            return dict(x0=x0, ids=ids, mask=mask, cover=cover, sigma=torch.linspace(0.05, 0.95, n, device=self.device),
                        noise=torch.randn(x0.shape, generator=g, device=self.device))
        noises = [torch.randn((n, x0.shape[1], b, x0.shape[3], x0.shape[4]), generator=g, device=self.device)
                  for b in blocks]
        sigmas = [torch.linspace(0.05, 0.95, n, device=self.device).roll(i * 7) for i in range(len(blocks))]
        return dict(x0=x0, ids=ids, mask=mask, cover=cover, blocks=blocks, noises=noises, sigmas=sigmas)

    @torch.no_grad()
    def validate(self, phase: str, batch) -> None:
        names = self.phase_models[phase]
        for n in names:
            self.emas[n].module.eval()
        if phase == "vae":
            video, alpha = batch
            losses = [self.vae_loss(self.emas["vae"].module, video[i : i + 8], alpha[i : i + 8], sample=False)[0]
                      for i in range(0, video.shape[0], 8)]
            loss = float(sum(losses) / len(losses))
        elif phase == "clip":
            with autocast(self.device):
                loss = float(self.clip_loss(self.emas["clip"].module, batch["x0"], batch["ids"], batch["mask"],
                                            ema=True, noise=batch["noise"], sigma=batch["sigma"], drop=False,
                                            cover=batch["cover"]))
        else:
            with autocast(self.device):
                loss = float(self.causal_loss(self.emas["causal"].module, batch["x0"], batch["ids"], batch["mask"],
                                              batch["blocks"], ema=True, noises=batch["noises"],
                                              sigmas=batch["sigmas"], drop=False, perturb=False,
                                              cover=batch["cover"]))
        prog = self.progress[phase]
        self.validation[phase].append([prog["steps"], round(prog["seconds"], 2), round(loss, 6)])
        if prog["best_val"] is None or loss < prog["best_val"]:
            prog["best_val"] = loss
            prog["best_step"] = prog["steps"]
            for n in names:
                self.best[n] = state_to_cpu(self.emas[n].module)
        log(f"{phase} validation loss {loss:.5f} (best {prog['best_val']:.5f} at step {prog.get('best_step')})")

    # -- export ----------------------------------------------------------------------------------------------------

    def pipeline(self, phase: str, device=None, dtype=torch.float32, sampling: dict | None = None):
        """A VideoPipeline of the best weights of ``phase`` ("clip" or "causal")."""
        from engine.pipeline import VideoPipeline, default_scheduler_config
        from engine.text import TextEncoder

        sampling = dict(DEMO_SAMPLING, frames=CAUSAL_FRAMES if phase == "causal" else DEMO_SAMPLING["frames"],
                        max_sequence_length=self.cfg.max_sequence_length,
                        block_latent_frames=self.cfg.block_latent_frames, **(sampling or {}))
        preset = ModelPreset(name=MODEL_NAMES[phase], causal=phase == "causal", **sampling)
        transformer = copy.deepcopy(self.emas[phase].module)
        text = copy.deepcopy(self.emas[f"{phase}_text"].module)
        for name, module in ((phase, transformer), (f"{phase}_text", text)):
            if name in self.best:
                module.load_state_dict(self.best[name])
        encoder = TextEncoder(self.tokenizer, text.eval(), preset.max_sequence_length, preset.use_instruction)
        return VideoPipeline._assemble(preset.name, preset, transformer, self.export_vae(), encoder,
                                       default_scheduler_config(preset), torch.device(device or self.device), dtype)

    def export(self, phase: str, sampling: dict | None = None) -> Path:
        """Write the ``phase`` model as a diffusers-format pipeline folder, weights in bf16."""
        pipe = self.pipeline(phase, device="cpu", dtype=torch.bfloat16, sampling=sampling)
        folder = self.out / "export" / MODEL_NAMES[phase]
        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        pipe.save_pretrained(tmp)
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        os.replace(tmp, folder)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        log(f"exported {folder} ({size / 2**20:.2f} MiB)")
        return folder


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation at the end: sampling defaults chosen on training combinations, then the held-out accuracies


CLIP_CANDIDATES = [dict(steps=s, guidance_scale=g) for s in (8, 12) for g in (1.0, 3.0, 5.0)]
STREAM_CANDIDATES = [
    dict(stream_timesteps=(1000, 750, 500, 250), stream_shift=3.0, stream_guidance_scale=1.0),
    dict(stream_timesteps=(1000, 750, 500, 250), stream_shift=1.5, stream_guidance_scale=1.0),
    dict(stream_timesteps=(1000, 800, 600, 400, 200), stream_shift=2.0, stream_guidance_scale=1.0),
    dict(stream_timesteps=(1000, 750, 500, 250), stream_shift=3.0, stream_guidance_scale=3.0),
    dict(stream_timesteps=(1000, 750, 500, 250), stream_shift=3.0, stream_guidance_scale=5.0),
    dict(stream_timesteps=(1000, 833, 667, 500, 333, 167), stream_shift=3.0, stream_guidance_scale=3.0),
]


def sweep(run: Run, phase: str, deadline: float) -> tuple[dict, list]:
    """Pick the sampling defaults with the best accuracy on training combinations (fresh seeds); for streams, the
    share of consistent blocks in a few long streams counts too. Ties go to the cheaper setting."""
    from training.evaluate import evaluate_pipeline, generate_clips, measure_blocks

    g = torch.Generator().manual_seed(run.args.seed + 99)
    cases = data.sample_cases(32, g, "train")
    long_cases = cases[:4]
    long_frames = 4 * round(run.cfg.stream_check_seconds * data.FPS / 4) + 1
    candidates = CLIP_CANDIDATES if phase == "clip" else STREAM_CANDIDATES
    results, best, best_score = [], {}, -1.0
    for cand in candidates:
        if time.monotonic() > deadline:
            break
        pipe = run.pipeline(phase, dtype=torch.float32, sampling=cand)
        r = evaluate_pipeline(pipe, cases, seeds=list(range(5000, 5000 + len(cases))), batch=32,
                              frames=run.cfg.eval_frames or 33)
        forwards = (cand.get("steps", 0) * (2 if cand.get("guidance_scale", 1) > 1 else 1)
                    + len(cand.get("stream_timesteps", ())) * (2 if cand.get("stream_guidance_scale", 1) > 1 else 1))
        score = r["colour_accuracy"] + r["motion_accuracy"] - 0.002 * forwards
        record = {**{k: list(v) if isinstance(v, tuple) else v for k, v in cand.items()},
                  "colour_accuracy": r["colour_accuracy"], "motion_accuracy": r["motion_accuracy"]}
        if phase == "causal":
            videos = generate_clips(pipe, [c.prompt for c in long_cases], list(range(6000, 6000 + len(long_cases))),
                                    frames=long_frames)
            good = total = 0
            for case, blocks in zip(long_cases, videos):
                for m in measure_blocks(blocks):
                    good += m.colour == case.colour and m.motion == case.motion
                    total += 1
            record["long_stream_consistent_blocks"] = good / total
            score += good / total
        results.append(record)
        log(f"sweep {phase}: {record}")
        if score > best_score:
            best, best_score = cand, score
    return best, results


def finish(run: Run, deadline: float) -> dict:
    """Export both models (sampling defaults from the sweep), evaluate them on the held-out prompts."""
    from training.evaluate import evaluate_pipeline, ground_truth, stream_consistency

    report: dict = {"progress": run.progress}
    cases = data.held_out_cases(run.cfg.eval_backgrounds) if run.cfg.eval_backgrounds else data.held_out_cases(1)[:2]
    report["ground_truth"] = ground_truth(cases)
    for phase in ("clip", "causal"):
        if run.progress[phase]["steps"] == 0:
            continue
        sampling: dict = {}
        try:
            if run.cfg.sweep and time.monotonic() < deadline and not STOP.is_set():
                sampling, report[f"{phase}_sweep"] = sweep(run, phase, deadline)
            folder = run.export(phase, sampling)
            report[f"{phase}_export"] = str(folder)
            report[f"{phase}_sampling"] = {k: list(v) if isinstance(v, tuple) else v for k, v in sampling.items()}
            pipe = run.pipeline(phase, dtype=torch.float32, sampling=sampling)
            r = evaluate_pipeline(pipe, cases, batch=32, frames=run.cfg.eval_frames)
            report[f"{phase}_held_out"] = r
            log(f"{phase} held-out: colour {r['colour_accuracy']:.3f} motion {r['motion_accuracy']:.3f}")
            if phase == "causal" and run.cfg.stream_check_seconds > 0 and not STOP.is_set():
                s = stream_consistency(pipe, cases[0], seconds=run.cfg.stream_check_seconds)
                s.pop("per_block")
                s.pop("rss_mb")
                report["causal_stream"] = s
                log(f"stream {s['seconds_of_video']:.0f}s: colour {s['colour_consistent_blocks']}/{s['blocks']} "
                    f"motion {s['motion_consistent_blocks']}/{s['blocks']} blocks")
        except Exception as exc:  # an evaluation failure must not cost the exported weights
            report[f"{phase}_error"] = f"{type(exc).__name__}: {exc}"
            log(f"{phase} finish failed:\n{traceback.format_exc()}")
    if run.device.type == "cuda":
        report["cuda_max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    (run.out / "final_eval.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def pack(out: Path, target: Path) -> None:
    """One .tar.gz of the exported folders and the logs (what comes back from the training machine)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    def readable(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mode = 0o755 if info.isdir() else 0o644  # some writers create 0600 files; the package must be readable
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with tarfile.open(tmp, "w:gz") as tar:
        for name in ("export/demo", "export/demo-causal", "losses.json", "final_eval.json", "train.log"):
            if (out / name).exists():
                tar.add(out / name, arcname=name.replace("export/", ""), filter=readable)
    os.replace(tmp, target)
    log(f"packed {target} ({target.stat().st_size / 2**20:.2f} MiB)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder: checkpoint.pt, losses.json, export/, final_eval.json")
    p.add_argument("--budget-minutes", type=float, default=8.0, help="wall-clock budget of this invocation")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    p.add_argument("--smoke", action="store_true", help="tiny models and a few steps (CPU check of the whole run)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ",".join(PHASES))
    p.add_argument("--phase-minutes", default=None, help="minutes of each phase (vae,clip,causal), e.g. 5,1.5,1.5; scaled down together if they exceed the budget")
    p.add_argument("--extend", action="store_true", help="with --resume: train finished phases named in --phases "
                   "further (--phase-minutes more minutes, else their share of the budget)")
    p.add_argument("--init-from", action="append", default=[], metavar="FOLDER",
                   help="start from a pipeline folder such as engine/weights/demo (its VAE counts as trained; its "
                   "transformer and text encoder start the clip or causal phase); repeatable; not with --resume")
    p.add_argument("--max-steps", type=int, default=0, help="stop each phase after this many steps (0: time only)")
    p.add_argument("--reserve-seconds", type=float, default=None, help="kept for export and evaluation")
    p.add_argument("--checkpoint-seconds", type=float, default=60.0)
    p.add_argument("--val-seconds", type=float, default=30.0)
    p.add_argument("--log-seconds", type=float, default=10.0)
    p.add_argument("--pack", default=None, help="write a .tar.gz of the exported folders and logs here")
    p.add_argument("--no-finish", action="store_true", help="skip export and evaluation")
    p.add_argument("--portable", default=None, help="also write a slim checkpoint in parts of <= 15 MiB to this folder "
                   "(to carry the run to another machine: cat the parts into OUT/checkpoint.pt, then --resume)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a Config field, e.g. --set causal_batch=32 (repeatable)")
    args = p.parse_args(argv)
    args.phases = [x for x in args.phases.split(",") if x]
    unknown = [x for x in args.phases if x not in PHASES]
    if unknown:
        p.error(f"unknown phases {unknown} (accepted: {', '.join(PHASES)})")
    if args.extend and not args.resume:
        p.error("--extend trains on from a checkpoint: add --resume")
    if args.init_from and args.resume:
        p.error("--init-from starts a new run; --resume continues one (use one of them)")
    missing = [f for f in args.init_from if not Path(f, "model_index.json").is_file()]
    if missing:
        p.error(f"--init-from: not a pipeline folder (no model_index.json): {', '.join(missing)}")
    if args.phase_minutes:
        try:
            args.phase_minutes = [float(x) for x in args.phase_minutes.split(",")]
        except ValueError:
            p.error(f"--phase-minutes {args.phase_minutes!r}: expected three numbers, e.g. 5,1.5,1.5")
        if len(args.phase_minutes) != len(PHASES) or min(args.phase_minutes) < 0:
            p.error("--phase-minutes needs one number >= 0 per phase: vae,clip,causal")
    for name in ("budget_minutes", "max_steps", "checkpoint_seconds", "val_seconds", "log_seconds"):
        if getattr(args, name) < 0 or (name == "budget_minutes" and args.budget_minutes == 0):
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a number above 0"
                    + (" (or 0 for time only)" if name == "max_steps" else ""))
    if args.device is not None:
        from engine.errors import DeviceError
        from engine.loading import check_device

        try:
            check_device(args.device, None)
        except DeviceError as exc:
            p.error(f"--device: {exc}")
    try:
        apply_overrides(Config(), args.set)
    except ValueError as exc:
        p.error(str(exc))
    if args.smoke and not args.max_steps:
        args.max_steps = 3
    return args


def apply_overrides(cfg: Config, items: list[str]) -> Config:
    """``FIELD=VALUE`` pairs parsed as JSON (falling back to the string), checked against Config's fields and the
    type of their defaults; ValueError names the item."""
    fields = {f.name for f in dataclasses.fields(Config)}
    changes = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields or key == "transformer":
            names = ", ".join(sorted(fields - {"transformer"}))
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {names}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        default = getattr(cfg, key)
        number = isinstance(parsed, (int, float)) and not isinstance(parsed, bool)
        if isinstance(default, bool):
            ok = isinstance(parsed, bool)
        elif isinstance(default, int):
            ok = number and float(parsed).is_integer()
            parsed = int(parsed) if ok else parsed
        elif isinstance(default, float):
            ok, parsed = number, float(parsed) if number else parsed
        elif isinstance(default, tuple):
            ok, parsed = isinstance(parsed, list), tuple(parsed) if isinstance(parsed, list) else parsed
        else:
            ok = default is None or isinstance(parsed, type(default))
        if not ok:
            raise ValueError(f"--set {item!r}: {key} takes a {type(default).__name__} (now {default!r})")
        changes[key] = parsed
    cfg = dataclasses.replace(cfg, **changes)
    if not 0.0 <= cfg.focus_share <= 1.0:
        raise ValueError(f"--set focus_share={cfg.focus_share}: expected a share between 0 and 1")
    if cfg.focus_share > 0:
        data.check_focus(cfg.focus_colours, cfg.focus_background)
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = apply_overrides(Config.smoke() if args.smoke else Config(), args.set)
    budget = 60.0 * args.budget_minutes
    reserve = args.reserve_seconds if args.reserve_seconds is not None else min(90.0, 0.2 * budget)
    deadline = START + budget - reserve
    run = Run(args, cfg)

    def stop(signum, frame):
        log(f"signal {signum}: stopping after this step, then export")
        STOP.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log(f"device {run.device}, torch {torch.__version__}, budget {budget:.0f}s (reserve {reserve:.0f}s), parameters: "
        + ", ".join(f"{n} {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M" for n, m in run.models.items()))
    if args.resume:
        run.load_checkpoint()
    for folder in args.init_from:
        run.init_from(folder)
    if args.extend:
        run.reopen(args.phases, args.phase_minutes)
    run.plan(deadline)
    failed = False
    for phase in PHASES:
        try:
            run.run_phase(phase, deadline)
        except Exception:  # keep what was trained: checkpoint, export, pack
            failed = True
            run.progress[phase]["error"] = traceback.format_exc()
            log(f"phase {phase} failed:\n{run.progress[phase]['error']}")
            run.save_checkpoint()
            break
        if time.monotonic() >= deadline or STOP.is_set():
            break
    if args.portable:
        run.save_portable(Path(args.portable))
    if not args.no_finish and (run.progress["vae"]["steps"] > 0 or "initialized_from" in run.progress["vae"]):
        finish(run, START + budget - 0.5 * reserve)
    run.write_logs()
    if args.pack:
        pack(run.out, Path(args.pack))
    log("done" + (" (a phase failed, see losses.json)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
