#!/usr/bin/env python3
"""Generate a video and save it while it streams: POST /generate, then follow WS /jobs/{id}/stream.

    pip install websockets
    python examples/stream_client.py "a red ball bouncing on a wooden floor" -o ball.mp4 --frames 161
    python examples/stream_client.py --job 3f2a... -o ball.mp4          # watch (or fetch) an existing job

The file grows as the server sends each block (a fragmented MP4: init segment, then one media segment per
block), so a player can open ``ball.mp4.part`` before the job ends; it is renamed to ``ball.mp4`` when the job
succeeds and removed when it fails. A dropped connection resumes from the next chunk (``?from_chunk=K``).

Server URL and key: ``--server`` / ``$SANA_SERVER`` (default http://localhost:8000), ``--api-key`` /
``$SANA_API_KEY`` (only when the server sets SANA_API_KEYS).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

MAX_RECONNECTS = 10


class JobFailed(Exception):
    pass


def submit(server: str, api_key: str | None, params: dict) -> dict:
    """POST /generate; returns the 202 answer ({id, status, status_url, video_url, stream_url})."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(f"{server}/generate", data=json.dumps(params).encode(), headers=headers,
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise JobFailed(f"POST /generate: HTTP {exc.code}: {exc.read().decode(errors='replace')}") from None


def websocket_url(server: str, job_id: str, from_chunk: int) -> str:
    base = urllib.parse.urlsplit(server)
    scheme = "wss" if base.scheme == "https" else "ws"
    path = f"{base.path.rstrip('/')}/jobs/{job_id}/stream"
    return urllib.parse.urlunsplit((scheme, base.netloc, path, f"from_chunk={from_chunk}", ""))


class StreamWriter:
    """Writes one attempt's init segment and media segments, in order, to ``<out>.part``."""

    def __init__(self, out: Path):
        self.out = out
        self.part = out.with_name(out.name + ".part")
        self.file = None
        self.attempt: int | None = None
        self.init_attempt: int | None = None
        self.next_chunk = 0
        self.frames = 0

    def restart(self) -> None:
        """A new attempt (the job's worker was lost and another took over): start the file again."""
        if self.file:
            self.file.close()
        self.file = open(self.part, "wb")
        self.init_attempt = None
        self.next_chunk = 0
        self.frames = 0

    def write_init(self, data: bytes) -> None:
        if self.init_attempt == self.attempt:
            return  # resent after a reconnect
        if self.file is None or self.init_attempt is not None:
            self.restart()
        self.file.write(data)
        self.init_attempt = self.attempt

    def write_chunk(self, index: int, frames: int, data: bytes) -> None:
        if index < self.next_chunk:
            return
        if index != self.next_chunk:
            raise JobFailed(f"chunk {index} arrived while {self.next_chunk} was expected")
        self.file.write(data)
        self.file.flush()
        self.next_chunk = index + 1
        self.frames += frames

    def write_tail(self, data: bytes) -> None:
        self.file.write(data)

    def finish(self) -> Path:
        self.file.close()
        self.file = None
        os.replace(self.part, self.out)
        return self.out

    def discard(self) -> None:
        if self.file:
            self.file.close()
            self.file = None
        self.part.unlink(missing_ok=True)


def show_progress(event: dict) -> None:
    eta = event.get("eta_s")
    line = (f"\rblock {event.get('block', 0)}/{event.get('blocks_total', 0)}  "
            f"step {event.get('step', 0)}/{event.get('steps_total', 0)}  "
            f"frames {event.get('frames_done', 0)}/{event.get('frames_total', 0)}  "
            f"{100 * event.get('fraction', 0.0):5.1f}%" + (f"  ETA {eta:.0f}s" if eta is not None else ""))
    print(line, end="", file=sys.stderr, flush=True)


async def follow(server: str, job_id: str, out: Path, api_key: str | None, quiet: bool = False) -> dict:
    """Follow job ``job_id`` to its end, writing the video to ``out``. Returns the final event."""
    writer = StreamWriter(out)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    reconnects = 0
    try:
        while True:
            requested = writer.next_chunk
            try:
                async with connect(websocket_url(server, job_id, requested), additional_headers=headers,
                                   max_size=None) as ws:
                    pending = None  # what the next binary message is, announced by the JSON event before it
                    async for message in ws:
                        if isinstance(message, bytes):
                            kind, event = pending
                            pending = None
                            if kind == "start":
                                writer.write_init(message)
                            elif kind == "chunk":
                                writer.write_chunk(event["index"], event["frames"], message)
                            elif kind == "tail":
                                writer.write_tail(message)
                            continue
                        event = json.loads(message)
                        kind = event["type"]
                        if kind == "start":
                            if writer.attempt is not None and event["attempt"] != writer.attempt and requested:
                                # A new attempt began while we were away: its chunks must come from 0.
                                writer.attempt = event["attempt"]
                                writer.restart()
                                break
                            writer.attempt = event["attempt"]
                            if not quiet:
                                print(f"streaming {event['frames_total']} frames {event['width']}x{event['height']}"
                                      f" @ {event['fps']} fps ({event['mime']})", file=sys.stderr)
                        if kind in ("start", "chunk", "tail"):
                            pending = (kind, event)
                        elif kind == "restart":
                            writer.attempt = None
                            writer.restart()
                            if not quiet:
                                print("\nthe job restarted on another worker", file=sys.stderr)
                        elif kind == "progress" and not quiet:
                            show_progress(event)
                        elif kind == "status" and event.get("status") == "queued" and not quiet:
                            print(f"queued{': ' + event['reason'] if event.get('reason') else ''}", file=sys.stderr)
                        elif kind == "done":
                            if not quiet:
                                print(file=sys.stderr)
                            if event.get("status") != "succeeded":
                                raise JobFailed(f"job {job_id} {event.get('status')}: "
                                                f"{(event.get('error') or {}).get('message', '')}")
                            path = writer.finish()
                            return dict(event, path=str(path), frames_written=writer.frames)
                        elif kind == "error":
                            error = event.get("error") or {}
                            raise JobFailed(f"job {job_id} {event.get('status')}: {error.get('message', error)}")
                    else:
                        raise ConnectionError("the server closed the stream before the job ended")
            except (ConnectionClosed, ConnectionError, OSError) as exc:
                reconnects += 1
                if reconnects > MAX_RECONNECTS:
                    raise JobFailed(f"gave up after {MAX_RECONNECTS} reconnects: {exc}") from None
                if not quiet:
                    print(f"\nconnection lost ({exc}); resuming from chunk {writer.next_chunk}", file=sys.stderr)
                await asyncio.sleep(min(0.5 * reconnects, 5.0))
            except InvalidStatus as exc:
                raise JobFailed(f"stream refused: HTTP {exc.response.status_code}") from None
    except BaseException:
        writer.discard()
        raise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", nargs="?", help="what the video shows (omit with --job)")
    parser.add_argument("-o", "--out", type=Path, default=Path("video.mp4"), help="output MP4 (default video.mp4)")
    parser.add_argument("--server", default=os.environ.get("SANA_SERVER", "http://localhost:8000"))
    parser.add_argument("--api-key", default=os.environ.get("SANA_API_KEY"))
    parser.add_argument("--job", help="follow this existing job instead of submitting one")
    parser.add_argument("--model")
    parser.add_argument("--mode", choices=("stream", "clip"))
    for name in ("frames", "width", "height", "fps", "steps", "seed"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--negative-prompt")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the final summary")
    args = parser.parse_args(argv)
    if not args.job and not args.prompt:
        parser.error("give a prompt, or --job ID")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = args.server.rstrip("/")
    try:
        job_id = args.job
        if not job_id:
            params = {"prompt": args.prompt}
            for name in ("model", "mode", "frames", "width", "height", "fps", "steps", "seed", "guidance_scale",
                         "negative_prompt"):
                if getattr(args, name) is not None:
                    params[name] = getattr(args, name)
            job_id = submit(server, args.api_key, params)["id"]
            if not args.quiet:
                print(f"job {job_id}", file=sys.stderr)
        result = asyncio.run(follow(server, job_id, args.out, args.api_key, quiet=args.quiet))
    except JobFailed as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(json.dumps({"id": job_id, "path": result["path"], "frames": result["frames_written"],
                      "chunks": result.get("chunks"), "bytes": result.get("bytes")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
