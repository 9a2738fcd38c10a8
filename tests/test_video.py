"""data.py's frame reader on the videos people really have, and on files that are not videos."""

import math
import os
import time

import av
import numpy as np
import pytest

import sampler
from data import VideoError, read_frames
from plumbing.sources import find_videos
from plumbing.workers import imap_unordered

from videos import frame_times_ms, read_index, write_audio_only, write_video

N = 16
QUIET_X265 = {"x265-params": "log-level=error"}
CASES = {  # name: (file name, write_video arguments)
    "mp4-h264": ("a.mp4", dict(n_frames=50)),
    "mkv-h264": ("a.mkv", dict(n_frames=40)),
    "webm-vp9": ("a.webm", dict(codec="libvpx-vp9", n_frames=40)),
    "avi-mjpeg": ("a.avi", dict(codec="mjpeg", pix_fmt="yuvj420p", n_frames=33)),
    "mov-h264": ("a.mov", dict(n_frames=64)),
    "gif": ("a.gif", dict(codec="gif", pix_fmt="rgb8", n_frames=20)),
    "mpegts": ("a.ts", dict(codec="mpeg2video", n_frames=48)),
    "hevc-10bit": (
        "b.mkv",
        dict(codec="libx265", pix_fmt="yuv420p10le", n_frames=32, options=QUIET_X265),
    ),
    "h264-10bit": ("b10.mp4", dict(pix_fmt="yuv420p10le", n_frames=32)),
    "full-range": ("fr.mp4", dict(pix_fmt="yuvj420p", n_frames=32)),
    "vfr": ("vfr.mp4", dict(n_frames=45, durations_ms=[20, 70, 40])),
    "3-frames": ("f3.mp4", dict(n_frames=3)),
    "1-frame": ("f1.mp4", dict(n_frames=1)),
    "long-gop": ("gop.mp4", dict(n_frames=300, gop=100)),
}


def expected_indices(kw, path=None):
    """The frame on screen at the middle of each of the N equal segments of the video's duration."""
    F = kw["n_frames"]
    # the last frame's duration is the muxer's choice: take the file's duration
    if "durations_ms" in kw:
        with av.open(path) as c:
            s = c.streams.video[0]
            end = float(s.duration * s.time_base) * 1000
        times, _ = frame_times_ms(F, kw["durations_ms"])
        return [max(k for k, t in enumerate(times) if t <= (i + 0.5) * end / N) for i in range(N)]
    return [math.floor((i + 0.5) * F / N) for i in range(N)]


def read16(path, **kw):
    return read_frames(path, N, **kw)


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    """Every case read once, in worker processes bounded by a timeout: a hang fails, never
    blocks."""
    d = tmp_path_factory.mktemp("videos")
    paths = {name: write_video(d / fname, **kw) for name, (fname, kw) in CASES.items()}
    results = dict(imap_unordered(read16, paths.values(), workers=2, timeout=60))
    return {name: (results[p], p) for name, p in paths.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_sampled_frames_are_the_segment_middles(decoded, name):
    frames, path = decoded[name]
    assert not isinstance(frames, Exception), frames
    assert frames.shape == (N, 48, 64, 3) and frames.dtype == np.uint8
    assert [read_index(f) for f in frames] == expected_indices(CASES[name][1], path)


def test_rotation_metadata_gives_upright_frames(tmp_path):
    path = write_video(tmp_path / "rot.mp4", n_frames=32, rotation=90)
    frames = read16(path)
    assert frames.shape == (N, 64, 48, 3)          # 64x48 stored, displayed turned a quarter
    assert [read_index(np.rot90(f, k=-1)) for f in frames] == expected_indices({"n_frames": 32})


def test_random_mode_stays_inside_each_segment(tmp_path):
    path = write_video(tmp_path / "r.mp4", n_frames=160)
    a = [read_index(f) for f in read16(path, mode="random", rng=np.random.default_rng(1))]
    b = [read_index(f) for f in read16(path, mode="random", rng=np.random.default_rng(1))]
    c = [read_index(f) for f in read16(path, mode="random", rng=np.random.default_rng(2))]
    assert a == b and a != c
    assert all(10 * i <= k < 10 * (i + 1) for i, k in enumerate(a))


def test_short_side_resize_and_keyframes_only(tmp_path):
    path = write_video(tmp_path / "k.mp4", n_frames=200, gop=25, size=(128, 96))
    frames = read16(path, short_side=48)
    assert frames.shape == (N, 48, 64, 3)
    with av.open(path) as c:
        keyframes = {
            read_index(f.to_ndarray(format="rgb24")) for f in c.decode(video=0) if f.key_frame
        }
    picked = [read_index(f) for f in read16(path, keyframes_only=True)]
    assert set(picked) <= keyframes and len(set(picked)) >= 8 and picked == sorted(picked)


def counting_decoder(monkeypatch):
    seen = []
    real = sampler.decoded

    def counted(path, container, stream):
        for frame in real(path, container, stream):
            seen.append(frame.time)
            yield frame
    monkeypatch.setattr(sampler, "decoded", counted)
    return seen


def test_long_video_is_sampled_by_seeking_not_decoding_everything(tmp_path, monkeypatch):
    # 10 minutes at 10 fps, a keyframe every 5 s
    n_frames = 10 * 60 * 10
    path = write_video(tmp_path / "long.mp4", n_frames=n_frames, fps=10, gop=50, size=(64, 32),
                       options={"preset": "ultrafast"})
    seen = counting_decoder(monkeypatch)
    frames = read16(path)
    assert [read_index(f) for f in frames] == expected_indices({"n_frames": n_frames})
    # at most one GOP per sample, of 6,000 frames
    assert len(seen) <= N * 50 + 50


def test_b_frames_skipped_on_the_way_still_exact(tmp_path, monkeypatch):
    """x264 with B-frames and 10 s keyframe intervals: the scan to each target skips frames nothing
    refers to, and every sampled frame is still exactly the one on screen at its segment's
    middle."""
    n_frames = 1200                                        # 48 s at 25 fps
    path = write_video(tmp_path / "b.mp4", n_frames=n_frames, fps=25, gop=250, size=(64, 32),
                       options={"preset": "veryfast",
                                "x264-params": "bframes=3:b-adapt=0:scenecut=0"})
    seen = counting_decoder(monkeypatch)
    assert [read_index(f) for f in read16(path)] == expected_indices({"n_frames": n_frames})
    # B-pyramid: one B-frame in three is a reference
    assert len(seen) < 0.6 * n_frames


def test_header_duration_longer_than_the_file(tmp_path):
    """A truncated MKV keeps its header's full duration: sample the part that is really there."""
    path = write_video(tmp_path / "t.mkv", n_frames=400, gop=10)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    idx = [read_index(f) for f in read16(path)]
    assert idx == sorted(idx) and idx[-1] > 150 and idx[0] < 15 and len(set(idx)) >= 14


def test_raw_stream_without_timestamps_or_duration(tmp_path):
    path = write_video(tmp_path / "raw.h264", n_frames=64)
    with av.open(path) as c:
        assert not c.streams.video[0].duration and not c.duration
    assert [read_index(f) for f in read16(path)] == expected_indices({"n_frames": 64})


@pytest.mark.parametrize("name", ["a.mp4", "t.mkv", "raw.h264"])
def test_a_span_gives_its_own_segment_middles(tmp_path, name):
    """A shot (start, end) in seconds from the first frame: n frames at the middles of its n
    segments, in every sampler step (by time with seeking, over a lying header's true end, and by
    index)."""
    path = write_video(tmp_path / name, n_frames=100, gop=10)   # 4 s at 25 fps
    if name == "t.mkv":   # the header says 4 s, the file holds about 2
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    idx = [read_index(f) for f in read_frames(path, 4, span=(0.4, 1.2))]
    # 0.4 + (i + 0.5) * 0.2 s, at 25 fps
    assert idx == [12, 17, 22, 27]
    with pytest.raises(VideoError, match="outside the video"):
        read_frames(path, 4, span=(60.0, 61.0))


BROKEN = {"zero-byte": lambda p: open(p, "wb").close(),
          "text-named-mp4": lambda p: open(p, "w").write("this is not a video\n" * 20),
          "random-bytes": lambda p: open(p, "wb").write(np.random.default_rng(0).bytes(5000)),
          "audio-only": lambda p: write_audio_only(p),
          "truncated-mp4": lambda p: (write_video(p, n_frames=50),
                                      os.truncate(p, os.path.getsize(p) // 2))}


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    d = tmp_path_factory.mktemp("broken")
    paths = {}
    for name, make in BROKEN.items():
        paths[name] = str(d / f"{name}.mp4")
        make(paths[name])
    results = dict(imap_unordered(read16, paths.values(), workers=2, timeout=30))
    return {name: (results[p], p) for name, p in paths.items()}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_files_raise_one_clear_error(broken, name):
    result, path = broken[name]
    assert isinstance(result, VideoError)
    message = str(result)
    assert message.startswith(path) and "\n" not in message and len(message) < 300


def test_missing_file(tmp_path):
    with pytest.raises(VideoError, match="no such file"):
        read16(str(tmp_path / "nope.mp4"))


def _sleepy(x):
    if x == "hang":
        time.sleep(3600)
    if x == "crash":
        os._exit(3)
    if x == "raise":
        raise RuntimeError("boom")
    return x * 2


def test_workers_time_out_crash_and_raise_without_stopping_the_rest():
    start = time.monotonic()
    items = ["a", "hang", "b", "crash", "raise", "c"]
    got = dict(imap_unordered(_sleepy, items, workers=2, timeout=3))
    assert time.monotonic() - start < 30
    assert got["a"] == "aa" and got["b"] == "bb" and got["c"] == "cc"
    assert isinstance(got["hang"], VideoError) and "longer than 3 s" in str(got["hang"])
    assert isinstance(got["crash"], VideoError) and "died" in str(got["crash"])
    assert isinstance(got["raise"], VideoError) and "boom" in str(got["raise"])


def test_find_videos(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.mp4", "sub/b.MKV", "sub/c.txt", "d.gif"):
        (tmp_path / name).write_bytes(b"x")
    assert find_videos(str(tmp_path)) == sorted(
        str(tmp_path / n) for n in ("a.mp4", "sub/b.MKV", "d.gif")
    )
    (tmp_path / "list.txt").write_text("a.mp4\n\n# comment\n/abs/x.mp4\n")
    assert find_videos(str(tmp_path / "list.txt")) == [str(tmp_path / "a.mp4"), "/abs/x.mp4"]
    (tmp_path / "list.jsonl").write_text('{"video": "sub/b.MKV", "caption": "x"}\n')
    assert find_videos(str(tmp_path / "list.jsonl")) == [str(tmp_path / "sub/b.MKV")]
    assert find_videos(str(tmp_path / "a.mp4")) == [str(tmp_path / "a.mp4")]


def natural_frame(i, w, h):
    """Smooth gradients and flat shapes, like real footage; resampling filters differ most on
    noise."""
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // w, y * 255 // h, (x + y + 7 * i) % 256], -1).astype(np.uint8)
    a[h // 4:h // 2, w // 3:w // 2] = (200, 30, 30)
    a[(x - w * 0.6 - 3 * i) ** 2 + (y - h * 0.6) ** 2 < (h / 6) ** 2] = (20, 180, 60)
    return a


def test_clip_preprocessing_matches_transformers(tmp_path):
    """Ours resizes inside FFmpeg's scaler (bicubic) as it decodes; transformers resizes full-size
    RGB frames with PIL. Measured here: mean |difference| ~1.5/255, 99th percentile ~8/255 (at hard
    edges)."""
    import torch
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from data import CLIP_STD, normalize, read_clip_frames
    path = write_video(tmp_path / "hd.mp4", n_frames=16, size=(854, 480), frame_fn=natural_frame,
                       options={"crf": "10"})
    with av.open(path) as c:
        # 16 frames: all picked
        full = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    reference = CLIPImageProcessorPil(size={"shortest_edge": 336},
                                      crop_size={"height": 336, "width": 336})
    want = reference(images=list(full), return_tensors="pt")["pixel_values"]
    # back to 0-255 units
    scale = torch.tensor(CLIP_STD)[:, None, None] * 255
    ours = normalize(read_clip_frames(path, 16, 336))
    assert ours.shape == want.shape == (16, 3, 336, 336)
    diff = ((ours - want).abs() * scale).flatten()
    assert diff.mean() < 2.5 and diff[::13].quantile(0.99) < 16


def test_pixels_are_normalized_in_fp32_and_cast_once():
    """bf16 arithmetic would round three times (the /255, the - mean, the / std): on a GPU the
    frames are normalized in fp32 and cast to the compute dtype at the end, as transformers'
    processor does."""
    import torch

    from data import normalize
    frames = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    fp32 = normalize(frames)
    assert fp32.dtype == torch.float32
    assert torch.equal(normalize(frames, dtype=torch.bfloat16), fp32.to(torch.bfloat16))
    # what rounding in bf16 would give
    x = torch.as_tensor(frames).movedim(-1, -3).to(torch.bfloat16) / 255
    m, s = (
        torch.tensor((0.48145466, 0.4578275, 0.40821073))[:, None, None],
        torch.tensor((0.26862954, 0.26130258, 0.27577711))[:, None, None],
    )
    in_bf16 = (x - m.to(torch.bfloat16)) / s.to(torch.bfloat16)
    # the difference is real
    assert not torch.equal(in_bf16, fp32.to(torch.bfloat16))


def test_a_fifo_named_like_a_video_is_said_to_be_no_regular_file_and_never_opened(tmp_path):
    fifo = tmp_path / "clip.mp4"
    os.mkfifo(fifo)
    # opening it would block the decoder for good
    with pytest.raises(VideoError) as e:
        read_frames(str(fifo), 4)
    assert "not a regular file" in str(e.value) and "no such file" not in str(e.value)
    with pytest.raises(VideoError):
        import shots
        shots.spans(str(fifo))


def test_mpeg_ts_with_b_frames_samples_its_first_gop(tmp_path):
    """x264 with B-frames in MPEG-TS: a seek to the stream's start time lands on the second
    keyframe; the frames of the first half second (red) must still be sampled."""
    def red_then_blue(i, w, h):
        return np.full((h, w, 3), (255, 0, 0) if i < 12 else (0, 0, 255), np.uint8)

    path = write_video(str(tmp_path / "b.ts"), n_frames=100, frame_fn=red_then_blue,
                       container="mpegts", options={"bf": "3", "g": "12"})
    assert read_frames(path, 8)[0][10, 10, 0] > 200
    assert all(f[10, 10, 0] > 200 for f in read_frames(path, 4, span=(0.0, 0.4)))
