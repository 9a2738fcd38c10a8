"""shots.py on synthetic videos with known cuts: a long static shot, fast motion, a camera pan,
shots a few frames long, a fade out and in; and caption.py --shots / --window rows per shot."""

import os

import numpy as np
import pytest

import shots
from data import VideoError

from videos import write_video

FPS = 25


def texture(seed, w=96, h=64):
    return np.random.default_rng(seed).integers(0, 256, (h * 2, w * 3, 3)).astype(np.uint8)


def scene_frames():
    """(frames, the frame indices where a hard cut starts a shot, (first, last) frame of each
    fade)."""
    tex_b, tex_c, tex_e = texture(1), texture(2), texture(3)
    frames, cuts, fades = [], [], []

    def add(n, fn, cut=True):
        if frames and cut:
            cuts.append(len(frames))
        frames.extend(fn(i) for i in range(n))
    yy, xx = np.mgrid[0:64, 0:96]
    # long, static
    add(100, lambda i: np.stack([xx * 2, yy * 3, np.full_like(xx, 90)], -1).astype(np.uint8))
    # fast motion
    add(40, lambda i: fast_square(tex_b, i))
    # a camera pan
    add(40, lambda i: tex_c[8:72, 4 * i:4 * i + 96])
    # a 3-frame shot
    add(3, lambda i: np.full((64, 96, 3), (250, 40, 40), np.uint8))
    add(30, lambda i: np.full((64, 96, 3), (30, 200, 60), np.uint8))
    start = len(frames)
    add(
        20,
        lambda i: (np.full((64, 96, 3), (30, 200, 60)) * (1 - (i + 1) / 20)).astype(np.uint8),
        cut=False,
    )  # to black
    # from black
    add(20, lambda i: (tex_e[:64, :96].astype(float) * (i + 1) / 20).astype(np.uint8), cut=False)
    fades.append((start, len(frames) - 1))
    add(50, lambda i: tex_e[:64, :96], cut=False)
    # 5 frames
    add(5, lambda i: np.full((64, 96, 3), (200, 200, 30), np.uint8))
    add(40, lambda i: np.full((64, 96, 3), (20, 20, 220), np.uint8))
    return frames, cuts, fades


def fast_square(tex, i):
    a = tex[:64, :96].copy()
    x = (i * 13) % 80
    a[20:44, x:x + 16] = 255
    return a


@pytest.fixture(scope="module")
def cut_video(tmp_path_factory):
    frames, cuts, fades = scene_frames()
    path = write_video(str(tmp_path_factory.mktemp("shots") / "cuts.mp4"), n_frames=len(frames),
                       fps=FPS, size=(96, 64), frame_fn=lambda i, w, h: frames[i],
                       options={"crf": "18"})
    return path, cuts, fades, len(frames)


def test_every_hard_cut_within_a_frame_and_none_in_motion(cut_video):
    path, cuts, fades, n = cut_video
    found = list(shots.boundaries(path))
    hard = [t for t, kind in found if kind == "cut"]
    matched = [c for c in cuts if any(abs(t - c / FPS) <= 1 / FPS + 1e-6 for t in hard)]
    false = [t for t in hard if not any(abs(t - c / FPS) <= 1 / FPS + 1e-6 for c in cuts)]
    precision, recall = (len(hard) - len(false)) / max(len(hard), 1), len(matched) / len(cuts)
    assert recall == 1.0 and precision == 1.0, (hard, [c / FPS for c in cuts])
    f0, f1 = fades[0]
    gradual = [t for t, kind in found if kind == "fade"]
    assert len(gradual) == 1 and f0 / FPS <= gradual[0] <= (f1 + 1) / FPS, gradual
    assert found[-1][0] == pytest.approx(n / FPS, abs=1 / FPS) and found[-1][1] == "end"


def blobs(seed, w=96, h=64, cell=6):
    """A smooth random picture (blobs with soft edges, like a painted or filmed background), 3x the
    frame."""
    small = (np.random.default_rng(seed) .integers(0, 256,
                                                   (h * 3 // cell + 2, w * 3 // cell + 2,
                                                    3)) .astype(np.float32))
    big = np.repeat(np.repeat(small, cell, 0), cell, 1)
    box = np.ones(cell) / cell
    for axis in (0, 1):
        big = np.apply_along_axis(lambda r: np.convolve(r, box, "same"), axis, big)
    return big[:h * 3, :w * 3].astype(np.uint8)


def hard_frames():
    """Harder shots: a pan too fast for the motion search (4.7 pixels a frame at 64x36) starting at
    once, camera shake, a zoom, a cut to another angle of the same scene, film grain, a dissolve, a
    white flash of two frames inside a shot. (frames, the frame indices of the hard cuts, (first,
    last) of the dissolve)."""
    a, b, c, d = blobs(11), blobs(12), blobs(13), blobs(14)
    rng = np.random.default_rng(0)
    frames, cuts = [], []

    def add(n, fn, cut=True):
        if frames and cut:
            cuts.append(len(frames))
        frames.extend(fn(i) for i in range(n))

    def crop(t, x, y):
        return t[y:y + 64, x:x + 96]

    def zoom(i):
        s = 1 + 0.02 * i
        ys, xs = (
            ((np.arange(64) - 32) / s + 96).astype(int),
            ((np.arange(96) - 48) / s + 144).astype(int),
        )
        return c[ys[:, None], xs[None, :]]
    add(30, lambda i: crop(a, 0, 40))
    # the fast pan
    add(27, lambda i: crop(a, 7 * i, 40), cut=False)
    add(40, lambda i: crop(b, 60 + rng.integers(-3, 4), 60 + rng.integers(-3, 4)))         # shake
    add(40, zoom)
    # same scene, another angle
    add(30, lambda i: crop(c, 100, 20))
    add(30,
        lambda i: np.clip(crop(d, 50, 50) + rng.integers(-12, 13, (64, 96, 3)), 0,
                          255).astype(np.uint8))
    dissolve = (len(frames), len(frames) + 14)
    add(
        15,
        lambda i: (crop(d, 50, 50) * (1 - (i + 1) / 16) + crop(b, 10, 10) * ((i + 1) / 16)).astype(
            np.uint8
        ),
        cut=False,
    )
    add(20, lambda i: crop(b, 10, 10), cut=False)
    # the flash
    add(30, lambda i: np.full((64, 96, 3), 255, np.uint8) if i in (12, 13) else crop(a, 0, 100))
    return frames, cuts, dissolve


def test_hard_shots_pan_shake_zoom_grain_and_a_flash(tmp_path):
    """Every cut within a frame and no false one, in the shots and in the raw boundaries."""
    frames, cuts, (d0, d1) = hard_frames()
    path = write_video(str(tmp_path / "hard.mp4"), n_frames=len(frames), fps=FPS, size=(96, 64),
                       frame_fn=lambda i, w, h: frames[i], options={"crf": "18"})
    starts = [a for a, _, kind in shots.shots(path, min_shot=0.1) if kind == "cut"]
    assert len(starts) == len(cuts) and all(
        abs(a - c / FPS) <= 1 / FPS + 1e-6 for a, c in zip(starts, cuts)
    ), (starts, [c / FPS for c in cuts])
    raw = [t for t, kind in shots.boundaries(path) if kind == "cut"]
    # the dissolve is no cut (nor found)
    assert not [t for t in raw if d0 / FPS <= t <= (d1 + 1) / FPS]
    # the flash: the picture came back
    assert not [t for t in raw if t > (len(frames) - 30) / FPS]


def test_short_flickers_merge_and_long_shots_split(cut_video):
    path, cuts, _, n = cut_video
    out = shots.shots(path, min_shot=0.5, max_shot=2.0)
    starts = [a for a, _, _ in out]
    assert starts[0] == 0 and out[-1][1] == pytest.approx(n / FPS, abs=1 / FPS)
    # the 4 s static shot is 2 windows
    assert all(b - a <= 2.0 + 1e-6 for a, b, _ in out)
    # they tile the video
    assert all(abs(a - b) < 1e-9 for (_, a, _), (b, _, _) in zip(out, out[1:]))
    # the ends of the 3- and 5-frame shots: within 0.5 s of a cut
    for merged in (cuts[3], cuts[5]):
        assert not any(abs(a - merged / FPS) <= 1 / FPS for a in starts)
    assert sum(kind == "window" for _, _, kind in out) >= 1
    assert shots.windows(5.0, 2.0) == [(0.0, 2.0, "window"), (2.0, 4.0, "window"),
                                       (4.0, 5.0, "window")]


@pytest.mark.slow
def test_caption_per_shot_with_times_and_a_killed_run_redoes_no_shot(cut_video, ckpt, tmp_path):
    import os
    import signal
    import time

    from plumbing.jsonl import read_rows

    from tools import run_tool
    path, _, _, n = cut_video
    want = shots.shots(path, 0.6, 20.0)
    out = tmp_path / "c.jsonl"
    args = [path, "--model", ckpt, "--out", out, "--shots", "--max-new-tokens", "24",
            "--batch-size", "1", "--workers", "1"]
    proc = run_tool("caption.py", args, wait=False)
    while len(read_rows(str(out))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    first = read_rows(str(out))
    assert 2 <= len(first) < len(want)
    r = run_tool("caption.py", args)
    assert r.returncode == 0, r.stderr
    rows = sorted(read_rows(str(out)), key=lambda row: row["shot"])
    assert [row["shot"] for row in rows] == list(range(len(want)))          # each shot exactly once
    for row, (start, end, _) in zip(rows, want):
        assert (row["start"], row["end"], row["of"]) == (round(start, 3), round(end, 3),
                                                         len(want)) and "caption" in row
    # all done: no shot detected again
    again = run_tool("caption.py", args)
    assert (
        again.returncode == 0
        and len(read_rows(str(out))) == len(want)
        and "1 already done" in again.stderr
    )


@pytest.mark.slow
def test_caption_and_label_per_window_and_label_per_shot(cut_video, ckpt, tmp_path):
    from plumbing.jsonl import read_rows

    from fake_api import KEY, FakeAPI
    from tools import run_tool
    path, _, _, n = cut_video
    r = run_tool("caption.py",
                 [path, "--model", ckpt, "--out", tmp_path / "c.jsonl", "--window", "5",
                  "--max-new-tokens", "3"])
    assert r.returncode == 0, r.stderr
    spans = [(row["start"], row["end"]) for row in sorted(read_rows(str(tmp_path / "c.jsonl")),
                                                          key=lambda x: x["shot"])]
    assert spans == [(0.0, 5.0), (5.0, 10.0), (10.0, round(n / FPS, 3))]
    api = FakeAPI(lambda body: "x", lambda body, item: "A shot of the video.")
    try:
        r = run_tool("label.py",
                     [path, "--out", tmp_path / "l.jsonl", "--api-base", api.url, "--window", "5"],
                     env={"DASHSCOPE_API_KEY": KEY})
    finally:
        api.close()
    assert r.returncode == 0, r.stderr
    rows = read_rows(str(tmp_path / "l.jsonl"))
    assert sorted((row["start"],
                   row["end"]) for row in rows) == spans and all("caption" in row for row in rows)
    api = FakeAPI(lambda body: "x", lambda body, item: "A shot of the video.")
    try:
        r = run_tool("label.py",
                     [path, "--out", tmp_path / "s.jsonl", "--api-base", api.url, "--shots"],
                     env={"DASHSCOPE_API_KEY": KEY})
    finally:
        api.close()
    assert r.returncode == 0, r.stderr
    want = [(round(a, 3), round(b, 3)) for a, b, _ in shots.shots(path)]
    assert (sorted((row["start"],
                    row["end"]) for row in read_rows(str(tmp_path / "s.jsonl"))) == want)


def test_a_small_file_of_many_frames_and_cuts_is_bounded_in_shots_and_in_time(tmp_path):
    """A hostile file: 16x16 frames at 250 a second, a cut every 0.7 s. Its shots (each a paid
    request in label.py) are capped by --max-shots, the frames compared by RATE a second of video,
    and the time spent by a budget that grows with the video's time, not with its heartbeats."""
    colours = [(250, 20, 20), (20, 250, 20), (20, 20, 250)]
    path = write_video(
        str(tmp_path / "h.mp4"),
        n_frames=2500,
        fps=250,
        size=(16, 16),
        frame_fn=lambda i, w, h: np.full((h, w, 3), colours[int(i / 250 / 0.7) % 3], np.uint8),
    )
    assert os.path.getsize(path) < 200_000
    found = shots.spans(path, min_shot=0.5, max_shot=20.0, max_shots=5)
    assert (len(found) == 5 and found[0][0] == 0 and all(a[1] == b[0] for a,
                                                         b in zip(found, found[1:])))
    uncapped = shots.spans(path, min_shot=0.5, max_shot=20.0)
    assert 12 <= len(uncapped) <= 16                                       # 10 s of video: 14 shots
    compared = []
    real = shots.changed
    shots.changed = lambda cur, prev: compared.append(1) or real(cur, prev)
    try:
        shots.spans(path, min_shot=0.5)
    finally:
        shots.changed = real
    # about 300 frames compared (and the cuts checked), not 2,500
    assert len(compared) < 2500 / 5
    # a budget far too small: refused
    with pytest.raises(VideoError) as e:
        shots.spans(path, budget=1e-4)
    assert e.value.code == "decode_timeout" and "finding shots took" in str(e.value)
