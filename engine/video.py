"""H.264 video output: fragmented MP4 for live MediaSource playback, MP4 files, and decoding for checks.

Segment layout (what a MediaSource player receives from ``FragmentedMP4Encoder``)
------------------------------------------------------------------------------
* ``init_segment()``: ``ftyp`` + ``moov``. The ``moov`` has no samples (``empty_moov``); it carries the
  ``avcC`` decoder configuration (SPS/PPS, so it exists before any frame is encoded) and ``mvex/trex``.
  Append it first, once, to a SourceBuffer created with ``mime_type`` (``video/mp4; codecs="avc1.PPCCLL"``).
* ``encode_chunk(frames)``: one media segment holding exactly those frames, complete when the call returns:
  one ``moof`` + ``mdat`` pair per GOP, and a chunk is normally one GOP (a new GOP is forced at every chunk
  start; the encoder starts another by itself only inside a chunk longer than ``4 * fps`` frames).
  - the chunk's first frame is an IDR frame, so a segment decodes without any earlier one;
  - ``tfhd`` uses default-base-is-moof (data offsets relative to the ``moof``), so a segment is
    position-independent: bytes may be dropped or re-sent by whole segments;
  - ``tfdt`` holds the absolute decode time of the chunk's first frame: frame ``i`` is at ``i / fps`` s,
    in a track timescale of ``1000 * fps`` ticks per second; timestamps continue across chunks;
  - ``mfhd`` sequence numbers count fragments from 1 across the whole stream;
  - no B-frames and no encoder look-ahead (x264 ``tune=zerolatency``): decode order equals display order
    and no frame is held back to a later call.
* ``close()``: trailing bytes; ``b""`` in practice (nothing is buffered between calls). Append it if non-empty,
  then call ``MediaSource.endOfStream()``.

The concatenation ``init + segment_0 + ... + segment_k`` is a valid fragmented MP4 after every k, so the same
bytes can also be written to disk (``Mp4FileWriter``) and served as a growing file. A viewer that joins late
can be sent ``init`` followed by any later segment (each starts with an IDR frame); the buffered range then
starts at that segment's timestamp, so the player seeks ``video.currentTime`` to
``sourceBuffer.buffered.start(0)``.

Browser side, in short::

    const ms = new MediaSource(); video.src = URL.createObjectURL(ms);
    ms.onsourceopen = () => {
      const sb = ms.addSourceBuffer('video/mp4; codecs="avc1.64001f"');   // encoder.mime_type
      // appendBuffer(init), then each segment after the previous 'updateend'
    };

Colour: RGB is converted with BT.709 coefficients to limited-range yuv420p, and the stream is tagged BT.709
(primaries, transfer, matrix), so browsers and ``read_video`` convert back with the same matrix.
"""

from __future__ import annotations

import io
import os
import secrets
import struct
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.frame import PictureType
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc

from engine.errors import InvalidParams

X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")

_FRAGMENT_FLAGS = "frag_keyframe+empty_moov+default_base_moof"


def _check_video_params(width: int, height: int, fps: int, crf: int = 20, preset: str = "veryfast") -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0 or value % 2:
            raise InvalidParams(name, f"got {value!r}", "a positive even integer (yuv420p halves both axes)")
    if not isinstance(fps, (int, np.integer)) or isinstance(fps, bool) or fps <= 0:
        raise InvalidParams("fps", f"got {fps!r}", "a positive integer")
    if not isinstance(crf, (int, np.integer)) or isinstance(crf, bool) or not 0 <= crf <= 51:
        raise InvalidParams("crf", f"got {crf!r}", "an integer from 0 (lossless) to 51")
    if preset not in X264_PRESETS:
        raise InvalidParams("preset", f"got {preset!r}", ", ".join(X264_PRESETS))


def _check_frames(frames: object, width: int, height: int) -> np.ndarray:
    """Return ``frames`` as a C-contiguous uint8 [F, H, W, 3] array, or raise InvalidParams saying why not."""
    expected = f"a uint8 RGB numpy array of shape [F, {height}, {width}, 3] with F >= 1"
    if not isinstance(frames, np.ndarray):
        raise InvalidParams("frames", f"got {type(frames).__name__}", expected)
    if frames.dtype != np.uint8:
        raise InvalidParams("frames", f"dtype is {frames.dtype}", expected)
    if frames.ndim != 4 or frames.shape[1:] != (height, width, 3) or frames.shape[0] < 1:
        raise InvalidParams("frames", f"shape is {list(frames.shape)}", expected)
    return np.ascontiguousarray(frames)


def _yuv_frame(rgb: np.ndarray, pts: int, keyframe: bool = False) -> av.VideoFrame:
    """One [H, W, 3] uint8 RGB image as a BT.709 limited-range yuv420p frame at ``pts`` (units of 1/fps)."""
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
        format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG
    )
    frame.pts = pts
    if keyframe:
        frame.pict_type = PictureType.I  # with forced-idr=1, x264 makes it an IDR frame: a new GOP
    return frame


def _add_h264_stream(container, width: int, height: int, fps: int, crf: int, preset: str, live: bool):
    """Add a configured libx264 stream. ``live``: no B-frames, no look-ahead, IDR on request (for fMP4)."""
    options = {"preset": preset, "crf": str(crf)}
    if live:
        # zerolatency: bframes=0, rc-lookahead=0, sync-lookahead=0, sliced threads -> one packet per frame at once.
        # keyint: the encoder's own GOPs only split chunks longer than 4 s; scenecut off keeps them regular.
        options.update({"tune": "zerolatency", "forced-idr": "1", "x264-params": f"keyint={4 * fps}:scenecut=0"})
    stream = container.add_stream("libx264", rate=fps, options=options)
    stream.width = width
    stream.height = height
    stream.pix_fmt = "yuv420p"
    stream.time_base = Fraction(1, fps)
    ctx = stream.codec_context
    ctx.color_range = ColorRange.MPEG
    ctx.colorspace = 1  # AVCOL_SPC_BT709 (the SPS VUI matrix)
    ctx.color_primaries = ColorPrimaries.BT709
    ctx.color_trc = ColorTrc.BT709
    return stream


class _ByteSink:
    """Write-only, non-seekable file object collecting what a muxer writes."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def write(self, data) -> int:
        self._buf += data
        return len(data)

    def take(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


def iter_boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[str, int, int]]:
    """The ISO-BMFF boxes lying directly in ``data[start:end]`` (top level by default) as (type, offset, size)."""
    end = len(data) if end is None else end
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:
            (size,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise ValueError(f"truncated or corrupt MP4 box {kind!r} at byte {pos}")
        yield kind.decode("latin-1"), pos, size
        pos += size


class FragmentedMP4Encoder:
    """Encode RGB frames, chunk by chunk, to fragmented MP4 (H.264) for MediaSource; see the module docstring.

    Memory is bounded: nothing but the encoder state persists between chunks. Not thread-safe.
    """

    def __init__(self, width: int, height: int, fps: int, crf: int = 20, preset: str = "veryfast"):
        _check_video_params(width, height, fps, crf, preset)
        self.width, self.height, self.fps = int(width), int(height), int(fps)
        # Fixed track timescale (1000 ticks per frame), so the init segment and every chunk's muxer agree.
        self._mux_options = {
            "video_track_timescale": str(1000 * self.fps),
            "use_editlist": "0",
            # mp4 fragments otherwise shift each muxer's first timestamp to 0; ours are >= 0 already.
            "avoid_negative_ts": "make_non_negative",
        }
        # The header muxer owns the encoder and writes the init segment; it never receives a packet.
        self._header_sink = _ByteSink()
        self._header = av.open(
            self._header_sink, "w", format="mp4", container_options={**self._mux_options, "movflags": _FRAGMENT_FLAGS}
        )
        self._stream = _add_h264_stream(self._header, self.width, self.height, self.fps, crf, preset, live=True)
        self._header.start_encoding()  # opens libx264 (SPS/PPS known now) and writes ftyp + moov
        self._init = self._header_sink.take()
        self._codec = self._stream.codec_context
        self._codec_string = _avc1_codec_string(self._init)
        self.frames_encoded = 0
        self.fragments = 0
        self._closed = False

    @property
    def codec_string(self) -> str:
        """RFC 6381 codec of the stream, e.g. ``avc1.64001f`` (profile, constraint flags, level from the SPS)."""
        return self._codec_string

    @property
    def mime_type(self) -> str:
        """Argument for ``MediaSource.isTypeSupported`` / ``addSourceBuffer``."""
        return f'video/mp4; codecs="{self._codec_string}"'

    def init_segment(self) -> bytes:
        """ftyp + moov; available before any frame is encoded and the same on every call."""
        return self._init

    def encode_chunk(self, frames: np.ndarray) -> bytes:
        """Encode uint8 RGB frames [F, H, W, 3] (F >= 1) into one media segment, returned complete.

        The frames get timestamps ``frames_encoded / fps`` onwards; the first is an IDR frame.
        """
        if self._closed:
            raise RuntimeError("FragmentedMP4Encoder is closed")
        frames = _check_frames(frames, self.width, self.height)
        packets = []
        for i, rgb in enumerate(frames):
            packets += self._codec.encode(_yuv_frame(rgb, self.frames_encoded + i, keyframe=i == 0))
        if len(packets) != len(frames):  # zerolatency guarantees one packet per frame; never emit a partial chunk
            raise RuntimeError(f"x264 returned {len(packets)} packets for {len(frames)} frames")
        self.frames_encoded += len(frames)
        return self._mux_fragment(packets)

    def close(self) -> bytes:
        """Flush the encoder and release it. Returns trailing bytes to append (normally b"")."""
        if self._closed:
            return b""
        self._closed = True
        packets = self._codec.encode(None)
        tail = self._mux_fragment(packets) if packets else b""
        self._header.close()  # its trailer (an empty mfra) is not part of the stream
        self._header_sink.take()
        return tail

    def __enter__(self) -> FragmentedMP4Encoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _mux_fragment(self, packets: list) -> bytes:
        """Mux encoded packets with a throw-away mp4 muxer and keep its moof+mdat pairs.

        The libavformat mp4 muxer only closes a fragment when the next one starts or when the file ends, and
        PyAV cannot send it the flush request (a NULL packet). Ending a short-lived muxer per chunk emits the
        chunk now; ``frag_discont`` makes its ``tfdt`` the absolute time of the first packet, ``fragment_index``
        continues the sequence numbers, and the header bytes it writes are the init segment again (dropped).
        """
        sink = _ByteSink()
        mux = av.open(
            sink,
            "w",
            format="mp4",
            container_options={
                **self._mux_options,
                "movflags": _FRAGMENT_FLAGS + "+frag_discont+skip_trailer",
                "fragment_index": str(self.fragments + 1),
            },
        )
        try:
            stream = mux.add_stream_from_template(self._stream)
            mux.start_encoding()
            sink.take()
            for packet in packets:
                packet.duration = 1  # one frame, in 1/fps: the muxer needs it for the fragment's last sample
                packet.stream = stream
                mux.mux(packet)
        finally:
            mux.close()
        data = sink.take()
        boxes = list(iter_boxes(data))
        if not boxes or any(kind not in ("moof", "mdat") for kind, _, _ in boxes):
            raise RuntimeError(f"unexpected boxes from the mp4 muxer: {[kind for kind, _, _ in boxes]}")
        self.fragments += sum(kind == "moof" for kind, _, _ in boxes)
        return data


def _avc1_codec_string(init: bytes) -> str:
    """``avc1.PPCCLL`` from the avcC box of an init segment (its bytes 1-3: profile, constraints, level)."""
    at = init.find(b"avcC")
    if at < 0 or len(init) < at + 8:
        raise RuntimeError("init segment has no avcC box")
    return "avc1." + init[at + 5 : at + 8].hex()


class Mp4FileWriter:
    """Stream frames to an MP4 file chunk by chunk; use as a context manager.

    Writes to ``<path>.<8 hex digits>.partial`` (its own name: two writers of one path never share a file) and
    renames it to ``path`` on a clean exit; on an exception the partial file is deleted, so ``path`` only ever holds
    a complete video (the last writer's, when several write it).

    ``fragmented=True``: the bytes of ``FragmentedMP4Encoder`` (init + one segment per ``write``), flushed to
    the partial file after every chunk, so it can be read while it grows; memory stays flat whatever the length.
    ``fragmented=False``: a classic MP4 (``moov`` moved to the front at close, B-frames allowed); libavformat
    keeps its sample index in memory until close, a few dozen bytes per frame.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        width: int,
        height: int,
        fps: int,
        fragmented: bool = True,
        *,
        crf: int = 20,
        preset: str = "veryfast",
    ):
        _check_video_params(width, height, fps, crf, preset)
        self.path = Path(path)
        self.partial_path = self.path.with_name(f"{self.path.name}.{secrets.token_hex(4)}.partial")
        self.width, self.height, self.fps = int(width), int(height), int(fps)
        self.fragmented = fragmented
        self.frames_written = 0
        self._crf, self._preset = crf, preset
        self._file = None  # fragmented: the partial file and its encoder
        self._encoder: FragmentedMP4Encoder | None = None
        self._container = None  # classic: PyAV writes the partial file itself
        self._stream = None
        self._state = "new"  # new -> open -> done

    def __enter__(self) -> Mp4FileWriter:
        self._open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open(self) -> None:
        if self._state != "new":
            return
        self._state = "open"
        try:
            if self.fragmented:
                self._encoder = FragmentedMP4Encoder(self.width, self.height, self.fps, self._crf, self._preset)
                self._file = open(self.partial_path, "wb")
                self._file.write(self._encoder.init_segment())
            else:
                self._container = av.open(
                    str(self.partial_path), "w", format="mp4", container_options={"movflags": "+faststart"}
                )
                self._stream = _add_h264_stream(
                    self._container, self.width, self.height, self.fps, self._crf, self._preset, live=False
                )
                self._container.start_encoding()  # opens the encoder and creates the partial file now
        except BaseException:
            self.abort()
            raise

    def write(self, frames: np.ndarray) -> None:
        """Append uint8 RGB frames [F, H, W, 3]."""
        if self._state == "done":
            raise RuntimeError(f"Mp4FileWriter for {self.path} is already closed")
        frames = _check_frames(frames, self.width, self.height)
        self._open()
        if self.fragmented:
            self._file.write(self._encoder.encode_chunk(frames))
            self._file.flush()
        else:
            for i, rgb in enumerate(frames):
                self._container.mux(self._stream.encode(_yuv_frame(rgb, self.frames_written + i)))
        self.frames_written += len(frames)

    def close(self) -> Path:
        """Finish the file and move it to ``path``. Raises (and deletes the partial file) if nothing was written."""
        if self._state == "done":
            return self.path
        if self.frames_written == 0:
            self.abort()
            raise InvalidParams("frames", "no frames were written", "at least one frame before close")
        try:
            if self.fragmented:
                self._file.write(self._encoder.close())
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
            else:
                self._container.mux(self._stream.encode(None))
                self._container.close()
                with open(self.partial_path, "rb") as f:
                    os.fsync(f.fileno())
            os.replace(self.partial_path, self.path)
        except BaseException:
            self.abort()
            raise
        self._state = "done"
        return self.path

    def abort(self) -> None:
        """Stop writing and delete the partial file; ``path`` is left untouched."""
        self._state = "done"
        for release in (
            lambda: self._file and self._file.close(),
            lambda: self._encoder and self._encoder.close(),
            lambda: self._container and self._container.close(),
        ):
            try:
                release()
            except Exception:
                pass  # already failing; the partial file goes regardless
        self.partial_path.unlink(missing_ok=True)


def write_mp4(
    path: str | os.PathLike,
    frames_or_chunks: np.ndarray | Iterable[np.ndarray],
    fps: int,
    *,
    fragmented: bool = False,
    crf: int = 20,
    preset: str = "veryfast",
) -> Path:
    """Write a whole video: uint8 RGB frames [F, H, W, 3], or an iterable of such chunks. Returns ``path``.

    Classic (non-fragmented, faststart) MP4 by default, the most widely playable file; ``fragmented=True``
    writes the same bytes the live stream sends.
    """
    chunks = iter([frames_or_chunks] if isinstance(frames_or_chunks, np.ndarray) else frames_or_chunks)
    first = next(chunks, None)
    if not isinstance(first, np.ndarray) or first.ndim != 4:
        got = "no chunks" if first is None else f"a first chunk of shape {list(np.shape(first))}"
        raise InvalidParams("frames", f"got {got}", "a uint8 array [F, H, W, 3] or an iterable of them (at least one)")
    height, width = first.shape[1:3]
    with Mp4FileWriter(path, width, height, fps, fragmented, crf=crf, preset=preset) as writer:
        writer.write(first)
        for chunk in chunks:
            writer.write(chunk)
    return writer.path


def _open_input(path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview):
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return av.open(io.BytesIO(bytes(path_or_bytes)), "r")
    return av.open(str(path_or_bytes), "r")


def read_video(path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview) -> np.ndarray:
    """Decode the first video stream of an MP4 (path or bytes) to uint8 RGB [F, H, W, 3]."""
    with _open_input(path_or_bytes) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        if not frames:
            return np.zeros((0, stream.height, stream.width, 3), np.uint8)
        return np.stack(frames)


def probe(path: str | os.PathLike | bytes | bytearray | memoryview) -> dict:
    """Stream facts of an MP4 (path or bytes): frames, width, height, fps, codec, pix_fmt, duration (s), fragmented.

    ``frames`` counts the video packets (fragmented files have no sample table to read it from); no decoding.
    """
    with _open_input(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        frames = sum(1 for packet in container.demux(stream) if packet.size)
        return {
            "frames": frames,
            "width": stream.width,
            "height": stream.height,
            "fps": fps,
            "codec": stream.codec_context.name,
            "pix_fmt": stream.codec_context.pix_fmt,
            "duration": frames / fps if fps else 0.0,
            "fragmented": "moof" in _top_level_box_types(path),
        }


def _top_level_box_types(path: str | os.PathLike | bytes | bytearray | memoryview) -> list[str]:
    """Types of the top-level boxes of an MP4, reading only box headers."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        return [kind for kind, _, _ in iter_boxes(bytes(path))]
    kinds = []
    with open(path, "rb") as f:
        end = f.seek(0, io.SEEK_END)
        pos = 0
        while pos + 8 <= end:
            f.seek(pos)
            header = f.read(16)
            size, kind = struct.unpack_from(">I4s", header)
            if size == 1:
                (size,) = struct.unpack_from(">Q", header, 8)
            elif size == 0:
                size = end - pos
            if size < 8:
                break
            kinds.append(kind.decode("latin-1"))
            pos += size
    return kinds
