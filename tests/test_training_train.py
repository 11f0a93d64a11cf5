"""The demo training run end to end on the CPU (--smoke: tiny models, a few steps): phases, checkpoints, resume,
wall-clock budget, export of loadable diffusers-format folders and the packed archive."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.pipeline import VideoPipeline
from engine.types import GenerationParams
from training import data
from training.train import Config, WeightedBlockState, apply_overrides, latent_coverage, weighted_mse

ROOT = Path(__file__).resolve().parents[1]


def train(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "training.train", "--smoke", "--device", "cpu", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """First the VAE alone, then a resumed run that trains the transformers and exports everything."""
    first_out, out = tmp_path_factory.mktemp("demo-run-vae"), tmp_path_factory.mktemp("demo-run")
    portable = first_out / "portable"
    train("--out", str(first_out), "--phases", "vae", "--max-steps", "2", "--no-finish", "--portable", str(portable))
    first = json.loads((first_out / "losses.json").read_text())
    first_vae = torch.load(first_out / "checkpoint.pt", weights_only=False)["best"]["vae"]
    # The second run happens elsewhere: it gets only the portable checkpoint's parts, put back together.
    parts = sorted(portable.glob("checkpoint.part*"))
    assert parts and all(part.stat().st_size <= 15 * 2**20 for part in parts)
    (out / "checkpoint.pt").write_bytes(b"".join(part.read_bytes() for part in parts))
    slim = torch.load(out / "checkpoint.pt", weights_only=False)
    assert set(slim["models"]) == {"vae"} and not {"clip", "causal"} & set(slim["optims"])
    proc = train("--out", str(out), "--resume", "--max-steps", "2", "--pack", str(out / "demo-weights.tar.gz"))
    return out, first, first_vae, proc


def test_resume_continues_where_the_checkpoint_left_off(resumed_run):
    out, first, first_vae, proc = resumed_run
    assert first["progress"]["vae"]["steps"] == 2 and first["progress"]["vae"]["latent_stats"]
    assert first["progress"]["clip"]["steps"] == 0
    logs = json.loads((out / "losses.json").read_text())
    assert "resumed from" in proc.stdout
    progress = logs["progress"]
    assert progress["vae"]["steps"] == 2  # not trained again
    assert progress["clip"]["steps"] == 2 and progress["causal"]["steps"] == 2
    assert progress["causal"]["initialized_from"].startswith("clip step")
    for phase in ("vae", "clip", "causal"):
        assert logs["train"][phase] and all(len(row) == 3 for row in logs["train"][phase])
        assert logs["validation"][phase]
    # The VAE the transformers trained on and the exported one are the VAE of the first run.
    exported = load_file(out / "export" / "demo" / "vae" / "diffusion_pytorch_model.safetensors")
    for key, value in first_vae.items():
        assert torch.equal(exported[key], value.to(torch.bfloat16)), key


def test_exported_folders_load_and_generate(resumed_run):
    out = resumed_run[0]
    report = json.loads((out / "final_eval.json").read_text())
    assert report["ground_truth"]["colour_accuracy"] == 1.0
    for name, mode in (("demo", "clip"), ("demo-causal", "stream")):
        folder = out / "export" / name
        assert json.loads((folder / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKLWan"]
        pipe = VideoPipeline.from_pretrained(str(folder), device="cpu")
        assert pipe.causal == (mode == "stream")
        assert pipe.preset.height == pipe.preset.width == 64 and pipe.preset.use_instruction is False
        stats = pipe.vae.config.latents_std
        assert len(stats) == 16 and stats != [1.0] * 16
        chunks = list(pipe.generate(GenerationParams(prompt="a red circle moving left on a blue background",
                                                     frames=9, steps=2)))
        assert sum(c.num_frames for c in chunks) == 9
        assert chunks[0].frames.shape[1:] == (64, 64, 3)


def test_pack_holds_both_folders_readable(resumed_run):
    out = resumed_run[0]
    with tarfile.open(out / "demo-weights.tar.gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    for name in ("demo/transformer/diffusion_pytorch_model.safetensors", "demo-causal/vae/config.json",
                 "demo-causal/tokenizer/tokenizer.json", "demo/sana_video.json", "losses.json", "final_eval.json"):
        assert name in members, name
    assert all(m.mode & 0o444 == 0o444 for m in members.values())


def test_an_exhausted_budget_still_exports(resumed_run, tmp_path):
    """More steps asked for, no time left: nothing is trained, the checkpoint's weights are exported."""
    out = tmp_path / "run"
    shutil.copytree(resumed_run[0], out, ignore=shutil.ignore_patterns("export", "*.tar.gz"))
    before = json.loads((out / "losses.json").read_text())["progress"]
    train("--out", str(out), "--resume", "--budget-minutes", "0.01", "--max-steps", "50")
    after = json.loads((out / "losses.json").read_text())["progress"]
    assert {p: after[p]["steps"] for p in after} == {p: before[p]["steps"] for p in before}
    assert (out / "export" / "demo" / "transformer" / "config.json").exists()
    assert (out / "export" / "demo-causal" / "transformer" / "config.json").exists()


def test_overrides_are_checked():
    cfg = apply_overrides(Config(), ["causal_batch=32", "clip_lengths=[9, 13]", "sweep=false"])
    assert (cfg.causal_batch, cfg.clip_lengths, cfg.sweep) == (32, (9, 13), False)
    with pytest.raises(ValueError, match="expected FIELD=VALUE"):
        apply_overrides(Config(), ["no_such_field=1"])
    for bad in ("causal_batch=abc", "causal_batch=1.5", "sweep=1", "clip_lengths=9", "lr=fast"):
        with pytest.raises(ValueError, match="takes a"):
            apply_overrides(Config(), [bad])
    assert apply_overrides(Config(), ["lr=1"]).lr == 1.0  # an int where a float goes is fine
    cfg = apply_overrides(Config(), ["focus_share=0.5", 'focus_colours=["red", "green"]'])
    assert (cfg.focus_share, cfg.focus_colours) == (0.5, ("red", "green"))
    with pytest.raises(ValueError, match="between 0 and 1"):
        apply_overrides(Config(), ["focus_share=1.5"])
    with pytest.raises(ValueError, match="expected object colours"):
        apply_overrides(Config(), ["focus_share=0.5", 'focus_colours=["red", "teal"]'])


def test_weighted_state_weighs_committed_blocks():
    from engine.presets import TINY_TRANSFORMER
    from engine.model import SanaVideoTransformer

    torch.manual_seed(0)
    model = SanaVideoTransformer(TINY_TRANSFORMER, causal=True).eval()
    x = torch.randn(2, 16, 2, 8, 8)
    text, mask, t = torch.randn(2, 4, TINY_TRANSFORMER.caption_channels), torch.ones(2, 4), torch.zeros(2)
    plain = WeightedBlockState.for_model(model, 2, 8, 8)
    weighted = WeightedBlockState.for_model(model, 2, 8, 8)
    weighted.weight = torch.tensor([1.0, 3.0])
    with torch.no_grad():
        model(x, text, t, mask, state=plain, commit=True)
        model(x, text, t, mask, state=weighted, commit=True)
    assert torch.allclose(weighted.S[:, 0], plain.S[:, 0]) and torch.allclose(weighted.S[:, 1], 3 * plain.S[:, 1])
    assert torch.allclose(weighted.z[:, 1], 3 * plain.z[:, 1]) and torch.equal(weighted.conv, plain.conv)


def test_latent_coverage_finds_the_object_where_the_vae_puts_it():
    """A square in one 8x8 cell, then moving right by 8 pixels per frame: its coverage lands in the latent cell and
    latent frame (frame 0 alone, then 4 frames each) that hold those pixels."""
    frames = 9  # latent frames 0 | 1-4 | 5-8
    alpha = torch.zeros(1, frames, data.SIZE, data.SIZE)
    for f in range(frames):
        alpha[0, f, 20:22, 8 * f + 3 : 8 * f + 5] = 1.0  # latent row 2, column f
    alpha[0, 2, 20, 8 * 2 + 3] = 0.25
    cover = latent_coverage(alpha, 3)
    assert cover.shape == (1, 1, 3, data.SIZE // 8, data.SIZE // 8)
    expected = torch.zeros(3, 8, 8)
    expected[0, 2, 0] = 1.0
    expected[1, 2, 1:5] = 1.0
    expected[2, 2, 5:8] = 1.0  # frame 8's column 8 is off the frame
    assert torch.equal(cover[0, 0], expected)


def test_weighted_mse_weighs_the_covered_positions():
    torch.manual_seed(0)
    target = torch.randn(2, 4, 3, 8, 8)
    cover = torch.zeros(2, 1, 3, 8, 8)
    cover[:, :, :, 2:4, 2:4] = 1.0
    assert torch.equal(weighted_mse(target + 1, target, cover, 0.0), torch.tensor(1.0))
    off_object = target.clone()
    off_object[:, :, :, 0, 0] += 1.0  # wrong outside the object
    on_object = target.clone()
    on_object[:, :, :, 2, 2] += 1.0  # wrong by as much on it
    plain = [weighted_mse(x, target, cover, 0.0) for x in (off_object, on_object)]
    weighted = [weighted_mse(x, target, cover, 8.0) for x in (off_object, on_object)]
    assert torch.allclose(plain[0], plain[1])
    assert torch.allclose(weighted[1], 9 * weighted[0])
    assert torch.allclose(weighted_mse(target + 1, target, cover, 8.0), torch.tensor(1.0))  # normalized


def test_extend_reopens_a_finished_phase_for_more_minutes(tmp_path):
    from training.train import Run, parse_args

    args = parse_args(["--out", str(tmp_path), "--device", "cpu", "--resume", "--extend", "--phases", "clip",
                       "--phase-minutes", "0,2,0"])
    run = Run(args, Config.smoke())
    run.progress["clip"].update(steps=100, seconds=240.0, target_seconds=240.0, done=True)
    run.progress["vae"].update(steps=50, seconds=60.0, target_seconds=60.0, done=True)
    run.reopen(args.phases, args.phase_minutes)
    assert not run.progress["clip"]["done"] and run.progress["vae"]["done"]  # only the named phase
    run.plan(deadline=__import__("time").monotonic() + 600)
    assert run.remaining == {"clip": pytest.approx(120.0)}
    assert run.progress["clip"]["target_seconds"] == pytest.approx(360.0)


def test_extend_needs_resume(tmp_path, capsys):
    from training.train import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["--out", str(tmp_path), "--extend"])
    assert exc.value.code == 2 and "--extend trains on from a checkpoint: add --resume" in capsys.readouterr().err


def _vae_state(folder: Path) -> dict:
    return VideoPipeline.from_pretrained(folder, device="cpu", dtype="fp32").vae.state_dict()


def test_init_from_a_shipped_folder_trains_on_from_its_weights(resumed_run, tmp_path):
    """--init-from starts the clip phase from a pipeline folder's weights and keeps its VAE untrained; the causal
    phase starts from the trained clip model as usual."""
    folder = resumed_run[0] / "export" / "demo"
    out = tmp_path / "run"
    proc = train("--out", str(out), "--init-from", str(folder), "--phases", "clip,causal", "--max-steps", "1",
                 "--portable", str(tmp_path / "portable"), "--set", "latent_object_weight=8")
    assert "initialized the VAE and the clip model from" in proc.stdout
    logs = json.loads((out / "losses.json").read_text())
    progress = logs["progress"]
    assert progress["vae"]["steps"] == 0 and progress["vae"]["done"]
    assert progress["clip"]["initialized_from"] == str(folder)
    assert progress["clip"]["steps"] == 1 and progress["causal"]["steps"] == 1
    assert progress["causal"]["initialized_from"].startswith("clip step")
    shipped = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    exported = load_file(out / "export" / "demo" / "vae" / "diffusion_pytorch_model.safetensors")
    assert shipped.keys() == exported.keys() and all(torch.equal(shipped[k], exported[k]) for k in shipped)
    vae_config = json.loads((out / "export" / "demo" / "vae" / "config.json").read_text())
    assert vae_config["latents_std"] == json.loads((folder / "vae" / "config.json").read_text())["latents_std"]
    # The starting weights were validated before the first step (they are the first candidate for the export), and
    # the transformer moved on from them (one optimizer step), but not far.
    assert logs["validation"]["clip"][0][0] == 0 and len(logs["validation"]["clip"]) == 2
    before = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    after = torch.load(out / "checkpoint.pt", weights_only=False)["models"]["clip"]
    diffs = [float((after[k].float() - before[k].float()).abs().max()) for k in before]
    assert 0 < max(diffs) < 0.1
    # The portable checkpoint keeps the folder's VAE (its phase ran no step here): a run resumed from it elsewhere
    # encodes clips with the same VAE, not a random one.
    parts = sorted((tmp_path / "portable").glob("checkpoint.part*"))
    slim = torch.load(io.BytesIO(b"".join(part.read_bytes() for part in parts)), weights_only=False)
    assert all(torch.equal(slim["best"]["vae"][k], v) for k, v in _vae_state(folder).items())


def test_init_from_is_checked(tmp_path, capsys):
    from training.train import parse_args

    for argv, message in ((["--init-from", str(tmp_path)], "not a pipeline folder"),
                          (["--init-from", str(ROOT / "engine" / "weights" / "demo"), "--resume"],
                           "--init-from starts a new run"),
                          (["--phase-minutes", "a,b,c"], "expected three numbers"),
                          (["--phase-minutes", "1,2"], "one number >= 0 per phase"),
                          (["--budget-minutes", "-1"], "--budget-minutes -1"),
                          (["--max-steps", "-1"], "--max-steps -1"),
                          (["--device", "foo"], "unsupported device"),
                          (["--set", "foo=1"], "expected FIELD=VALUE"),
                          (["--set", "causal_batch=abc"], "causal_batch takes a int")):
        with pytest.raises(SystemExit) as exc:
            parse_args(["--out", str(tmp_path), *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_decoder_finetune_keeps_the_encoder_and_writes_every_folder(resumed_run, tmp_path):
    """training.decoder trains the VAE decoder alone on longer clips: the encoder (the latent space the transformers
    were trained on) stays bit-for-bit, the decoder moves, and every folder named gets the same new VAE."""
    folders = [tmp_path / "demo", tmp_path / "demo-causal"]
    for name, folder in zip(("demo", "demo-causal"), folders):
        shutil.copytree(resumed_run[0] / "export" / name, folder)
    before = load_file(folders[0] / "vae" / "diffusion_pytorch_model.safetensors")
    config_before = json.loads((folders[0] / "vae" / "config.json").read_text())
    report = tmp_path / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "training.decoder", "--model", str(folders[0]), "--also",
                           str(folders[1]), "--frames", "9", "--batch", "1", "--max-steps", "2", "--val-clips", "1",
                           "--check-frames", "13", "--device", "cpu", "--force", "--report", str(report)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = [load_file(f / "vae" / "diffusion_pytorch_model.safetensors") for f in folders]
    assert after[0].keys() == after[1].keys() == before.keys()
    assert all(torch.equal(after[0][k], after[1][k]) for k in before)
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(after[0][k], before[k]) for k in frozen)
    assert any(not torch.equal(after[0][k], before[k]) for k in before if k.startswith("decoder."))
    assert json.loads((folders[0] / "vae" / "config.json").read_text())["latents_std"] == config_before["latents_std"]
    result = json.loads(report.read_text())
    assert result["steps"] == 2 and result["written"] == [str(f) for f in folders]
    # The stream check decoded one 13-frame clip (1 + 3 latent frames: 1 + 12 frames) block by block, before and after.
    for key in ("stream_round_trip_before", "stream_round_trip_after"):
        check = result[key]
        assert check["clips"] == 1 and check["frames"] == 13 and check["blocks"] >= 1
        assert 0 <= check["colour_right_blocks"] <= check["blocks"]
    assert not (folders[0] / "vae.tmp").exists() and not (folders[0] / "vae.old").exists()
    pipe = VideoPipeline.from_pretrained(str(folders[0]), device="cpu")
    chunks = list(pipe.generate(GenerationParams(prompt="a red circle moving left on a blue background", frames=5,
                                                 steps=2, seed=0)))
    assert sum(c.num_frames for c in chunks) == 5 and chunks[0].frames.shape[1:] == (64, 64, 3)


def test_decoder_finetune_checks_its_arguments(tmp_path):
    for argv, message in ((["--model", str(tmp_path), "--frames", "9"], "not a pipeline folder"),
                          (["--model", str(ROOT / "engine" / "weights" / "demo"), "--frames", "10"], "4k+1"),
                          (["--model", str(ROOT / "engine" / "weights" / "demo"), "--check-frames", "12"],
                           "--check-frames must be 4k+1")):
        proc = subprocess.run([sys.executable, "-m", "training.decoder", *argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_training_stream_blocks_are_the_whole_decode():
    """--stream-frames trains on blocks decoded with the cache the blocks before left: put together, they are the
    whole clip's decode, and each comes with its own frames of the clip."""
    from diffusers import AutoencoderKLWan

    from training.decoder import TrainingStream

    vae = AutoencoderKLWan.from_pretrained(ROOT / "engine" / "weights" / "demo-causal" / "vae").float().eval()
    stream = TrainingStream(vae, 2, 25, 2, seed=0, device=torch.device("cpu"))  # 7 latent frames: blocks 3, 2, 2
    with torch.no_grad():
        blocks = [stream.next_block() for _ in stream.blocks]
        whole = vae.decode(stream.z).sample
    assert [b[0].shape[2] for b in blocks] == [9, 8, 8]
    assert torch.equal(torch.cat([b[0] for b in blocks], 2).clamp(-1, 1), whole)
    assert torch.equal(torch.cat([b[1] for b in blocks], 2), stream.video)
    assert torch.equal(torch.cat([b[2] for b in blocks], 2), stream.alpha)
    first_clips = stream.video
    with torch.no_grad():
        stream.next_block()  # past the end: new clips, from their first frame
    assert stream.round == 2 and not torch.equal(stream.video, first_clips) and stream.frame == 9


def _decoder_run(folder: Path, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "training.decoder", "--model", str(folder), "--batch", "1",
                           "--max-steps", "2", "--val-clips", "1", "--device", "cpu", "--force", *argv], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_decoder_finetune_with_the_encoder_or_as_a_stream(resumed_run, tmp_path):
    """--encoder --tail-weight moves the encoder too (the latent space changes; its statistics stay in the config);
    --stream-frames trains the decoder alone, block by block."""
    for argv, encoder_moves in ((["--frames", "9", "--encoder", "--tail-weight", "1"], True),
                                (["--frames", "9", "--stream-frames", "13", "--stream-groups", "2",
                                  "--check-frames", "13"], False)):
        folder = tmp_path / f"run{len(argv)}"
        shutil.copytree(resumed_run[0] / "export" / "demo-causal", folder)
        before = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
        std = json.loads((folder / "vae" / "config.json").read_text())["latents_std"]
        report = tmp_path / f"report{len(argv)}.json"
        proc = _decoder_run(folder, *argv, "--report", str(report))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        after = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
        encoder = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
        assert any(not torch.equal(after[k], before[k]) for k in encoder) == encoder_moves, argv
        assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("decoder."))
        assert json.loads((folder / "vae" / "config.json").read_text())["latents_std"] == std
        result = json.loads(report.read_text())
        assert result["steps"] == 2 and "fresh_tail_loss" in result["validation_after"]


def test_decoder_stream_options_are_checked():
    folder = str(ROOT / "engine" / "weights" / "demo-causal")
    for argv, message in ((["--stream-frames", "20", "--check-frames", "13"], "--stream-frames must be 4k+1"),
                          (["--stream-frames", "13"], "needs --check-frames"),
                          (["--stream-frames", "13", "--check-frames", "13", "--encoder"], "decoder alone"),
                          (["--stream-frames", "13", "--check-frames", "13", "--stream-groups", "0"],
                           "--stream-groups must be at least 1")):
        proc = subprocess.run([sys.executable, "-m", "training.decoder", "--model", folder, *argv], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, (argv, proc.stderr)
