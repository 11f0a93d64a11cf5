"""``python -m workers [--model M] [--device D] [--precision P] [--metrics-port N] [--burst]``."""

import argparse

from workers.worker import run_worker


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m workers", description="Run one SANA-Video GPU worker.")
    parser.add_argument("--model", default=None, help="preset name, folder or hub id (default: SANA_MODEL)")
    parser.add_argument("--device", default=None, help="cuda:N or cpu (default: SANA_WORKER_DEVICE, else auto)")
    parser.add_argument("--precision", default=None, choices=["auto", "bf16", "fp8", "nvfp4"])
    parser.add_argument("--engine-path", default=None)
    parser.add_argument("--metrics-port", type=int, default=None, help="0 turns /metrics off")
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    args = parser.parse_args()
    run_worker(args.model, args.device, args.precision, args.engine_path, args.metrics_port, args.burst)


if __name__ == "__main__":
    main()
