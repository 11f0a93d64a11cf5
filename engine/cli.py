"""``sana-video``: generate videos, run the API, workers, quantization and TensorRT builds.

User errors (bad parameters, unknown models, unusable devices, mismatched checkpoints) print one clear message
and exit with code 2, leaving no output file behind.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="SANA-Video inference server and engine.")

DEFAULT_MODEL_ENV = "SANA_MODEL"
FALLBACK_MODEL = "demo"


def default_model() -> str:
    return os.environ.get(DEFAULT_MODEL_ENV) or FALLBACK_MODEL


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


def _check_settings() -> None:
    """The server and worker settings (SANA_* variables, REDIS_URL) parse, or exit 2 naming the variable."""
    from server.settings import settings_error

    error = settings_error()
    if error:
        _fail(error)


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="What the video shows."),
    model: Optional[str] = typer.Option(None, help="Preset name (tiny, tiny-causal, 480p, ...), folder or hub id."),
    mode: Optional[str] = typer.Option(None, help="clip (bidirectional) or stream (block-causal); default per model."),
    frames: Optional[int] = typer.Option(None, help="Number of frames, 4k+1."),
    width: Optional[int] = typer.Option(None, help="Width in pixels (multiple of 16)."),
    height: Optional[int] = typer.Option(None, help="Height in pixels (multiple of 16)."),
    fps: Optional[int] = typer.Option(None, help="Frames per second of the output."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps (per block in stream mode)."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", help="Classifier-free guidance scale."),
    negative_prompt: str = typer.Option("", "--negative-prompt"),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same video."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda if available)."),
    dtype: Optional[str] = typer.Option(None, help="fp32, bf16 or fp16 (default: bf16 on cuda, fp32 on cpu)."),
    fast: str = typer.Option("auto", help="Fast path: auto (kernels + torch.compile on CUDA), on, off or fp8."),
    out: Path = typer.Option(Path("video.mp4"), "--out", "-o", help="Output MP4 path."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Generate a video and write it as H.264 MP4 (streams are written block by block as they are made)."""
    import signal

    from engine.errors import EngineError
    from engine.types import GenerationParams

    def _terminated(signum, frame):  # docker stop, systemd, timeout, a closed terminal: unwind as Ctrl-C does
        raise SystemExit(128 + signum)  # (the partial file goes)

    signal.signal(signal.SIGTERM, _terminated)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, _terminated)
    model = model or default_model()
    try:
        if out.exists() and out.is_dir():
            _fail(f"--out {out} is a directory; expected a file path ending in .mp4")
        if out.suffix.lower() != ".mp4":  # the file is H.264 in MP4 whatever its name says
            _fail(f"--out {out}: the video is written as MP4 (accepted: a path ending in .mp4)")
        if not out.parent.exists():
            _fail(f"--out: folder {out.parent} does not exist")
        from engine.loading import unwritable_folder

        reason = unwritable_folder(out.parent)  # before a model load that can take minutes
        if reason is not None:
            _fail(f"--out: cannot write a file in {out.parent} ({reason})")
        from engine.fast import FAST_MODES, apply_fast_path
        from engine.pipeline import VideoPipeline

        if fast.lower() not in FAST_MODES:  # before a model load that can take minutes
            _fail(f"--fast {fast!r} (accepted: {', '.join(FAST_MODES)})")
        pipe = VideoPipeline.from_pretrained(model, device=device, dtype=dtype)
        apply_fast_path(pipe, fast)
        params = pipe.resolve(
            GenerationParams(
                prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, frames=frames, fps=fps,
                steps=steps, guidance_scale=guidance_scale, seed=seed, mode=mode,
            )
        )
        try:
            _run_generation(pipe, params, out, quiet)
        except OSError as exc:  # the file could not be made or written (its name too long, the disk full...)
            _fail(f"--out {out}: {exc.strerror or exc} (nothing was written)")
    except EngineError as exc:
        _fail(str(exc))


def _run_generation(pipe, params, out: Path, quiet: bool) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from engine.video import Mp4FileWriter

    plan = pipe.plan(params)
    total = plan["blocks_total"] * plan["steps_per_block"]
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TextColumn("{task.fields[frames]} frames"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=quiet, transient=False) as bar:
        task = bar.add_task(f"{params.mode} {params.width}x{params.height}", total=total, frames=0)

        def on_progress(p) -> None:
            bar.update(task, completed=(p.block - 1) * p.steps_total + p.step, frames=p.frames_done)

        with Mp4FileWriter(out, params.width, params.height, params.fps) as writer:
            for chunk in pipe.generate(params, on_progress=on_progress):
                writer.write(chunk.frames)
    if not quiet:
        typer.echo(f"wrote {out} ({params.frames} frames, {params.width}x{params.height} @ {params.fps} fps)")


@app.command()
def models() -> None:
    """List the model presets."""
    from engine.presets import ALIASES, PRESETS

    for name, p in PRESETS.items():
        aliases = [a for a, t in ALIASES.items() if t == name]
        kind = "stream" if p.causal else "clip"
        src = p.source or "built locally (random weights)"
        typer.echo(f"{name:28s} {kind:6s} {p.width}x{p.height} {p.frames}f  {src}" + (f"  aliases: {', '.join(aliases)}" if aliases else ""))


@app.command()
def api(
    host: Optional[str] = typer.Option(None, help="Bind address (default: SANA_HOST or 0.0.0.0)."),
    port: Optional[int] = typer.Option(None, min=1, max=65535, help="Port (default: SANA_PORT or 8000)."),
) -> None:
    """Run the HTTP/websocket API (jobs go to Redis; workers run them)."""
    _check_settings()
    from server.app import run_api

    run_api(host=host, port=port)


@app.command()
def worker(
    model: Optional[str] = typer.Option(None, help="Model to serve (default: SANA_MODEL)."),
    device: Optional[str] = typer.Option(None, help="Device to pin this worker to, e.g. cuda:0."),
    precision: Optional[str] = typer.Option(None, help="auto, torch, bf16, fp8 or nvfp4 (TensorRT precisions need --engine)."),
    engine_path: Optional[str] = typer.Option(None, "--engine", help="A TensorRT engine folder to run the transformer."),
    fast: Optional[str] = typer.Option(None, help="Fast path of a PyTorch denoiser: auto, on, off or fp8 (default: SANA_WORKER_FAST, else auto)."),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", min=0, max=65535,
                                               help="Port of this worker's /metrics (0 = off)."),
    burst: bool = typer.Option(False, help="Exit when the queue is empty."),
) -> None:
    """Run a GPU worker: loads the engine once, then runs jobs from its model's queue."""
    _check_settings()
    from engine.errors import EngineError
    from workers.worker import run_worker

    try:
        run_worker(model=model, device=device, precision=precision, engine_path=engine_path,
                   metrics_port=metrics_port, burst=burst, fast=fast)
    except EngineError as exc:
        _fail(str(exc))


@app.command()
def serve(
    host: Optional[str] = typer.Option(None, help="Bind address (default: SANA_HOST or 0.0.0.0)."),
    port: Optional[int] = typer.Option(None, min=1, max=65535, help="Port (default: SANA_PORT or 8000)."),
    model: Optional[str] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
) -> None:
    """API and one worker in one command, for a single box."""
    _check_settings()
    from server.serve import run_serve

    code = run_serve(host=host, port=port, model=model, device=device)
    if code:
        raise typer.Exit(code)


@app.command()
def quantize(
    model: str = typer.Option(..., help="Model preset, folder or hub id."),
    precision: str = typer.Option(..., help="nvfp4 or fp8."),
    out: Path = typer.Option(..., help="Output folder (new or empty)."),
    calib_prompts: Optional[Path] = typer.Option(None, "--calib-prompts", help="Text file, one calibration prompt a line."),
    device: Optional[str] = typer.Option(None),
    keep_first_blocks: int = typer.Option(1, "--keep-first-blocks", min=0,
                                          help="Transformer blocks left unquantized at the start (0 for 2-block models)."),
    keep_last_blocks: int = typer.Option(1, "--keep-last-blocks", min=0,
                                         help="Transformer blocks left unquantized at the end."),
) -> None:
    """Quantize the transformer with NVIDIA ModelOpt (calibrated on real denoising runs)."""
    from engine.errors import EngineError

    try:
        from quantization import cli_quantize
        from quantization.policy import LayerPolicy

        policy = LayerPolicy(keep_first_blocks=keep_first_blocks, keep_last_blocks=keep_last_blocks)
        summary = cli_quantize(model=model, precision=precision, out=out, calib_prompts=calib_prompts, device=device,
                               policy=policy, log=_log)
    except (EngineError, ValueError) as exc:
        _fail(str(exc))
    _print_summary(summary)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _print_summary(summary: dict) -> None:
    import json

    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command("build-engine")
def build_engine(
    model: str = typer.Option(...),
    precision: str = typer.Option(..., help="nvfp4, fp8 or bf16."),
    height: int = typer.Option(...),
    width: int = typer.Option(...),
    frames: int = typer.Option(...),
    out: Path = typer.Option(...),
) -> None:
    """Export the transformer to ONNX and build a strongly typed TensorRT engine for this GPU."""
    from engine.errors import EngineError

    try:
        from quantization import cli_build_engine

        summary = cli_build_engine(model=model, precision=precision, height=height, width=width, frames=frames, out=out,
                                   log=_log)
    except (EngineError, ValueError) as exc:
        _fail(str(exc))
    _print_summary(summary)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
