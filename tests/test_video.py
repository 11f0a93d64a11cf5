"""Video output: fragmented MP4 for MediaSource, MP4 files, decoding. Real libx264, real decoders, real files."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import struct
import tracemalloc
from fractions import Fraction

import av
import numpy as np
import pytest

from engine.errors import InvalidParams
from engine.video import FragmentedMP4Encoder, Mp4FileWriter, iter_boxes, probe, read_video, write_mp4

FPS = 16
CHUNKS = (1, 4, 4, 8)  # a causal video VAE yields 1 + 4k frames: first block 1 frame, then 4k per block
SIZES = [(64, 64), (96, 64)]  # (width, height)


def make_frames(n: int, height: int, width: int, start: int = 0) -> np.ndarray:
    """Frames start..start+n-1 of a smooth, colourful, moving test clip: uint8 [n, H, W, 3]."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for i in range(start, start + n):
        t = 0.4 * i
        rgb = [np.sin(x / 9 + t), np.sin(y / 7 - t), np.sin((x + y) / 13 + 2 * t)]
        frames.append(np.stack(rgb, -1) * 110 + 128)
    return np.clip(np.rint(np.stack(frames)), 0, 255).astype(np.uint8)


def encode_chunks(width: int, height: int, sizes=CHUNKS):
    """(init segment, [segment per chunk], close() bytes, [frames per chunk])."""
    encoder = FragmentedMP4Encoder(width, height, FPS)
    init = encoder.init_segment()
    chunks, segments, start = [], [], 0
    for n in sizes:
        chunks.append(make_frames(n, height, width, start))
        segments.append(encoder.encode_chunk(chunks[-1]))
        start += n
    return init, segments, encoder.close(), chunks


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def assert_frames_close(decoded: np.ndarray, expected: np.ndarray) -> None:
    assert decoded.shape == expected.shape
    for i, (got, want) in enumerate(zip(decoded, expected)):  # per frame: catches dropped or reordered frames
        assert mean_abs_error(got, want) < 6, f"frame {i}: mean abs error {mean_abs_error(got, want):.2f}"


def child_boxes(data: bytes, offset: int, size: int, full_box: bool = False) -> dict[str, tuple[int, int]]:
    """Children of the box at ``offset`` as {type: (offset, size)} (last one of each type)."""
    start = offset + 8 + (4 if full_box else 0)
    return {kind: (pos, length) for kind, pos, length in iter_boxes(data, start, offset + size)}


@pytest.mark.parametrize("width,height", SIZES)
def test_round_trip_decodes_to_the_same_frames(width, height):
    init, segments, tail, chunks = encode_chunks(width, height)
    assert tail == b""
    decoded = read_video(init + b"".join(segments) + tail)
    assert_frames_close(decoded, np.concatenate(chunks))


@pytest.mark.parametrize("width,height", SIZES)
def test_every_prefix_of_segments_decodes_to_all_frames_so_far(width, height):
    """The live player's property: after encode_chunk(k) returns, nothing of chunks 0..k is still held back."""
    encoder = FragmentedMP4Encoder(width, height, FPS)
    stream, expected, start = encoder.init_segment(), [], 0
    for n in CHUNKS:
        expected.append(make_frames(n, height, width, start))
        start += n
        stream += encoder.encode_chunk(expected[-1])
        assert_frames_close(read_video(stream), np.concatenate(expected))
    assert encoder.close() == b""


def test_each_segment_decodes_alone_after_the_init_segment():
    """Every chunk starts with an IDR frame: a viewer joining late needs only init + the newest segments."""
    init, segments, _, chunks = encode_chunks(64, 64)
    for segment, frames in zip(segments, chunks):
        assert_frames_close(read_video(init + segment), frames)


def test_timestamps_continue_across_chunks_and_keyframes_start_chunks():
    init, segments, tail, chunks = encode_chunks(96, 64)
    chunk_starts = set(np.cumsum((0,) + CHUNKS[:-1]).tolist())
    with av.open(io.BytesIO(init + b"".join(segments) + tail)) as container:
        stream = container.streams.video[0]
        assert stream.average_rate == FPS
        frames = list(container.decode(stream))
    assert [f.pts * f.time_base for f in frames] == [Fraction(i, FPS) for i in range(sum(CHUNKS))]
    assert {i for i, f in enumerate(frames) if f.key_frame} == chunk_starts


def test_segment_layout_is_what_mediasource_needs():
    init, segments, _, _ = encode_chunks(64, 64)
    assert [kind for kind, _, _ in iter_boxes(init)] == ["ftyp", "moov"]
    (_, moov_at, moov_size), = [box for box in iter_boxes(init) if box[0] == "moov"]
    assert "mvex" in child_boxes(init, moov_at, moov_size)  # declares a fragmented movie
    start_frame, sequence = 0, 1
    for segment, n in zip(segments, CHUNKS):
        boxes = list(iter_boxes(segment))
        assert [kind for kind, _, _ in boxes] == ["moof", "mdat"]  # one GOP per chunk: one pair
        _, moof_at, moof_size = boxes[0]
        moof = child_boxes(segment, moof_at, moof_size)
        mfhd_at, _ = moof["mfhd"]
        assert struct.unpack_from(">I", segment, mfhd_at + 12)[0] == sequence
        traf = child_boxes(segment, *moof["traf"])
        tfhd_flags = struct.unpack_from(">I", segment, traf["tfhd"][0] + 8)[0] & 0xFFFFFF
        assert tfhd_flags & 0x020000, "default-base-is-moof"
        tfdt_at, _ = traf["tfdt"]
        version = segment[tfdt_at + 8]
        decode_time = struct.unpack_from(">Q" if version else ">I", segment, tfdt_at + 12)[0]
        assert decode_time == start_frame * 1000  # track timescale is 1000 * fps
        trun_at, _ = traf["trun"]
        assert struct.unpack_from(">I", segment, trun_at + 12)[0] == n  # sample count
        start_frame, sequence = start_frame + n, sequence + 1


def test_init_segment_and_codec_string_exist_before_any_frame():
    encoder = FragmentedMP4Encoder(96, 64, FPS)
    init = encoder.init_segment()
    assert init[4:8] == b"ftyp"
    assert re.fullmatch(r"avc1\.[0-9a-f]{6}", encoder.codec_string)
    avcc = init.find(b"avcC")
    assert encoder.codec_string == "avc1." + init[avcc + 5 : avcc + 8].hex()  # profile, constraints, level
    assert encoder.mime_type == f'video/mp4; codecs="{encoder.codec_string}"'
    assert encoder.init_segment() == init
    encoder.close()


@pytest.mark.parametrize(
    "args,field,says",
    [
        ((63, 64, FPS), "width", "even"),
        ((64, 65, FPS), "height", "even"),
        ((0, 64, FPS), "width", "positive"),
        ((64, 64, 0), "fps", "positive"),
        ((64, 64, FPS, 60), "crf", "0"),
        ((64, 64, FPS, 20, "warp"), "preset", "veryfast"),
    ],
)
def test_bad_parameters_say_what_is_accepted(args, field, says):
    with pytest.raises(ValueError, match=says) as info:
        FragmentedMP4Encoder(*args)
    assert isinstance(info.value, InvalidParams) and info.value.field == field
    width, height, fps, *rest = args
    tuning = dict(zip(("crf", "preset"), rest))
    with pytest.raises(ValueError, match=says):
        Mp4FileWriter("never.mp4", width, height, fps, **tuning)
    assert not [name for name in os.listdir(".") if name.startswith("never.mp4")]


@pytest.mark.parametrize(
    "frames,says",
    [
        (np.zeros((2, 64, 96, 3), np.float32), "dtype is float32"),
        (np.zeros((64, 96, 3), np.uint8), r"shape is \[64, 96, 3\]"),
        (np.zeros((2, 96, 64, 3), np.uint8), r"shape is \[2, 96, 64, 3\]"),
        (np.zeros((2, 64, 96, 4), np.uint8), r"shape is \[2, 64, 96, 4\]"),
        (np.zeros((0, 64, 96, 3), np.uint8), r"shape is \[0, 64, 96, 3\]"),
        ([[0]], "got list"),
    ],
)
def test_bad_frames_say_what_was_expected(frames, says):
    encoder = FragmentedMP4Encoder(96, 64, FPS)
    with pytest.raises(ValueError, match=says) as info:
        encoder.encode_chunk(frames)
    assert r"uint8 RGB numpy array of shape [F, 64, 96, 3]" in str(info.value)
    # a rejected chunk leaves the stream usable
    assert_frames_close(read_video(encoder.init_segment() + encoder.encode_chunk(make_frames(1, 64, 96))),
                        make_frames(1, 64, 96))
    encoder.close()
    with pytest.raises(RuntimeError, match="closed"):
        encoder.encode_chunk(make_frames(1, 64, 96))


def test_two_writers_of_one_path_never_mix_their_bytes(tmp_path):
    """Two runs told to write the same file: each writes its own partial file, and the path ends up holding the
    whole video of whichever finished last (it used to hold a mix, and the other run failed in its rename)."""
    path = tmp_path / "same.mp4"
    first, second = make_frames(9, 64, 96, 0), make_frames(9, 64, 96, 40)
    a, b = Mp4FileWriter(path, 96, 64, FPS), Mp4FileWriter(path, 96, 64, FPS)
    with a, b:
        assert a.partial_path != b.partial_path
        for i in range(0, 9, 3):
            a.write(first[i : i + 3])
            b.write(second[i : i + 3])
        b.close()
        assert_frames_close(read_video(path), second)
    assert_frames_close(read_video(path), first)  # a closed last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.mp4"]


@pytest.mark.parametrize("fragmented", [True, False])
def test_file_writer_writes_the_final_file_only_at_clean_exit(tmp_path, fragmented):
    path = tmp_path / "out.mp4"
    chunks = [make_frames(n, 64, 96, start) for n, start in zip(CHUNKS, np.cumsum((0,) + CHUNKS[:-1]))]
    with Mp4FileWriter(path, 96, 64, FPS, fragmented=fragmented) as writer:
        for chunk in chunks:
            writer.write(chunk)
            assert not path.exists()
            assert writer.partial_path.parent == tmp_path and writer.partial_path.exists()
            assert re.fullmatch(r"out\.mp4\.[0-9a-f]{8}\.partial", writer.partial_path.name)
        if fragmented:  # flushed per chunk: the growing partial file is already a playable prefix
            assert_frames_close(read_video(writer.partial_path), np.concatenate(chunks))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
    assert_frames_close(read_video(path), np.concatenate(chunks))
    assert probe(path)["fragmented"] is fragmented


@pytest.mark.parametrize("fragmented", [True, False])
def test_file_writer_leaves_no_file_on_exception(tmp_path, fragmented):
    path = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="generation failed"):
        with Mp4FileWriter(path, 64, 64, FPS, fragmented=fragmented) as writer:
            writer.write(make_frames(5, 64, 64))
            raise RuntimeError("generation failed")
    assert list(tmp_path.iterdir()) == []

    path.write_bytes(b"previous video")  # an existing file is only ever replaced by a complete one
    with pytest.raises(ValueError, match="dtype"):
        with Mp4FileWriter(path, 64, 64, FPS, fragmented=fragmented) as writer:
            writer.write(make_frames(1, 64, 64))
            writer.write(make_frames(4, 64, 64).astype(np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
    assert path.read_bytes() == b"previous video"


def test_file_writer_with_no_frames_is_an_error_and_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        with Mp4FileWriter(tmp_path / "out.mp4", 64, 64, FPS):
            pass
    assert list(tmp_path.iterdir()) == []


def test_fragmented_file_writer_memory_stays_flat(tmp_path):
    """Python-side memory after 120 chunks equals that after 20: nothing per chunk is kept."""
    chunk = make_frames(4, 64, 64)
    with Mp4FileWriter(tmp_path / "long.mp4", 64, 64, FPS) as writer:
        tracemalloc.start()
        try:
            for i in range(120):
                writer.write(chunk)
                if i == 19:
                    after_20, _ = tracemalloc.get_traced_memory()
            after_120, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert after_120 - after_20 < 16 * 1024, f"grew {after_120 - after_20} bytes over 100 chunks"
    assert probe(tmp_path / "long.mp4")["frames"] == 480


@pytest.mark.parametrize("fragmented", [False, True])
def test_write_mp4_and_probe(tmp_path, fragmented):
    frames = make_frames(9, 64, 96)
    path = write_mp4(tmp_path / "whole.mp4", frames, FPS, fragmented=fragmented)
    assert path == tmp_path / "whole.mp4"
    info = probe(path)
    assert {k: info[k] for k in ("frames", "width", "height", "fps", "codec")} == {
        "frames": 9, "width": 96, "height": 64, "fps": 16.0, "codec": "h264"
    }
    assert info["pix_fmt"] == "yuv420p" and info["fragmented"] is fragmented
    assert info["duration"] == pytest.approx(9 / FPS)
    assert_frames_close(read_video(path), frames)
    assert_frames_close(read_video(path.read_bytes()), frames)  # bytes in, too

    chunked = write_mp4(tmp_path / "chunked.mp4", iter([frames[:1], frames[1:5], frames[5:]]), FPS,
                        fragmented=fragmented)
    assert_frames_close(read_video(chunked), frames)


def test_write_mp4_rejects_nothing_to_write(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        write_mp4(tmp_path / "x.mp4", [], FPS)
    assert list(tmp_path.iterdir()) == []


def _browser():
    """A headless Chromium driven by Selenium, or None where this machine has none."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not (binary and driver):
        return None
    options = Options()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(driver))


_MEDIASOURCE_PLAYER = """
const [mime, segments, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
const out = {supported: MediaSource.isTypeSupported(mime), buffered: [], errors: []};
const video = document.createElement('video');
video.muted = true;
document.body.appendChild(video);
const source = new MediaSource();
video.src = URL.createObjectURL(source);
video.onerror = () => { out.errors.push('video: ' + (video.error && video.error.message)); done(out); };
setTimeout(() => { out.errors.push('timeout at ' + video.currentTime); done(out); }, 10000);
source.addEventListener('sourceopen', async () => {
  try {
    const buffer = source.addSourceBuffer(mime);
    for (const b64 of segments) {
      const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
      await new Promise((ok, fail) => {
        buffer.onupdateend = ok; buffer.onerror = () => fail('SourceBuffer error'); buffer.appendBuffer(bytes);
      });
      const ranges = [];
      for (let i = 0; i < buffer.buffered.length; i++) ranges.push([buffer.buffered.start(i), buffer.buffered.end(i)]);
      out.buffered.push(ranges);
    }
    source.endOfStream();
    video.onended = () => {
      const quality = video.getVideoPlaybackQuality();
      Object.assign(out, {ended: true, size: [video.videoWidth, video.videoHeight],
                          decoded: quality.totalVideoFrames, dropped: quality.droppedVideoFrames});
      done(out);
    };
    await video.play();
  } catch (err) { out.errors.push(String(err)); done(out); }
});
"""


@pytest.mark.slow
def test_chromium_mediasource_plays_segments_as_they_arrive():
    driver = _browser()
    if driver is None:
        pytest.skip("needs selenium, chromium and chromedriver")
    try:
        init, segments, tail, _ = encode_chunks(96, 64)
        encoder_mime = FragmentedMP4Encoder(96, 64, FPS).mime_type
        driver.get("data:text/html,<body></body>")
        driver.set_script_timeout(20)
        result = driver.execute_async_script(
            _MEDIASOURCE_PLAYER, encoder_mime, [base64.b64encode(b).decode() for b in [init, *segments] if b]
        )
    finally:
        driver.quit()
    assert result["supported"] and result["errors"] == []
    ends = np.cumsum(CHUNKS) / FPS
    # after appending init: nothing; after each segment: exactly its frames are playable, from t=0
    assert result["buffered"] == [[]] + [[[0, pytest.approx(end)]] for end in ends]
    assert result["ended"] and result["size"] == [96, 64]
    assert result["decoded"] == sum(CHUNKS) and result["dropped"] == 0
