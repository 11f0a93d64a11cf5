"""``python -m workers [--model M] [--device D] [--precision P] [--fast F] [--metrics-port N] [--burst]``."""

import argparse
import sys

from engine.errors import EngineError
from server.settings import settings_error

from workers.worker import run_worker


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (accepted: 0..65535)")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m workers", description="Run one SANA-Video GPU worker.")
    parser.add_argument("--model", default=None, help="preset name, folder or hub id (default: SANA_MODEL)")
    parser.add_argument("--device", default=None, help="cuda:N or cpu (default: SANA_WORKER_DEVICE, else auto)")
    parser.add_argument("--precision", default=None, choices=["auto", "torch", "nvfp4", "fp8", "bf16"],
                        help="denoiser: auto (best available), torch, or a TensorRT engine precision")
    parser.add_argument("--fast", default=None, choices=["auto", "on", "off", "fp8"],
                        help="fast path of a PyTorch denoiser: auto (on CUDA), on, off, or fp8 (FP8 GPU) "
                        "(default: SANA_WORKER_FAST, else auto)")
    parser.add_argument("--engine", dest="engine_path", default=None, help="TensorRT engine folder(s)")
    parser.add_argument("--metrics-port", type=_port, default=None, help="0 turns /metrics off (0..65535)")
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    args = parser.parse_args()
    error = settings_error()
    if error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        run_worker(args.model, args.device, args.precision, args.engine_path, args.metrics_port, args.burst,
                   args.fast)
    except EngineError as exc:  # a model, device or engine that cannot serve: say what, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
