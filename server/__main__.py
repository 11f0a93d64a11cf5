"""``python -m server [--host H] [--port P]``: the API alone (workers run separately)."""

import argparse

from server.app import run_api


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m server", description="Run the SANA-Video job API.")
    parser.add_argument("--host", default=None, help="default: SANA_HOST")
    parser.add_argument("--port", type=int, default=None, help="default: SANA_PORT")
    args = parser.parse_args()
    run_api(args.host, args.port)


if __name__ == "__main__":
    main()
