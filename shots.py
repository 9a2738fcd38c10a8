"""Shots: where a video cuts from one shot to the next, found with PyAV alone, streaming, at low
resolution.

    python shots.py episode.mkv [--min-shot 0.6] [--max-shot 20]

Every frame is decoded and shrunk inside FFmpeg's scaler to 64x36 (nothing bigger is ever made),
and two numbers compare it with the frame before: the share of its 4x4 blocks that changed once the
camera's move is taken out (the whole frame shifted by the best of the shifts within 4 pixels: a
pan moves the picture, a cut replaces it), and how far the colour histograms moved (16 bins a
channel, half the L1 distance). A hard cut is a frame whose changed share jumps far above what its
shot did in the last second and does in the next few frames: the bar adapts, so motion inside a
shot is not a cut. A fade or dissolve is a stretch of steady change that adds up (the frame now
against the one a few frames back) without any single jump: it is reported as a stretch. Cuts
closer than --min-shot to the last are flicker (a flash, a strobe) and merged; shots longer than
--max-shot are split into equal windows, so no caption has to cover minutes. Memory does not grow
with the video: a few frames of 64x36 and the last second of scores.
"""

import collections
import functools
import sys
import time

import av
import numpy as np

import data
from data import jpeg_data_urls, read_clip_frames
from plumbing import cli, workers
from plumbing.sources import row_name
from sampler import VideoError, open_video, time_span

W, H = 64, 36        # every frame is compared at this size
BINS = 16            # histogram bins per colour channel
SEARCH = 4           # pixels (at 64x36) the camera may move the picture between two frames
BLOCK = 4            # the changed share counts blocks of 4x4 pixels
LEVEL = 0.07         # a block changed: it differs by 7% of the luma range on average (18 of 255)
GRADUAL = 8          # frames back that a fade or dissolve is measured against
# frames a second of video compared at most: a file of 1,000 frames a second costs 30
RATE = 30
# rows a video gives at most (--max-shots): a 2-hour film has 1,000 to 2,000 shots
MAX_SHOTS = 1000
# --decode-timeout's: finding shots takes at most this many a 10 minutes of video
PER_TEN_MINUTES = 2


def _histogram(a):
    h = np.concatenate([np.bincount(a[..., c].ravel() // (256 // BINS),
                                    minlength=BINS) for c in range(3)])
    return h / h.sum()


def _luma(a):
    # (H, W) in [0, 1]
    return a.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255


def _best_shift(cur, prev, reach, around=(0, 0)):
    """(dy, dx) within `reach` of `around` for which prev, shifted by it, matches cur best (mean
    absolute difference over the middle, where no shift looks past the edge)."""
    m = max(abs(around[0]), abs(around[1])) + reach
    padded = np.pad(prev, m, mode="edge")
    best, where = None, around
    for dy in range(around[0] - reach, around[0] + reach + 1):
        for dx in range(around[1] - reach, around[1] + reach + 1):
            d = np.abs(padded[m + dy:m + dy + cur.shape[0],
                              m + dx:m + dx + cur.shape[1]] - cur)[m:-m, m:-m].mean()
            if best is None or d < best:
                best, where = d, (dy, dx)
    return where


def changed(cur, prev) -> float:
    """The share of the frame's 4x4 blocks that changed since the frame before, once the camera's
    move is taken out: the whole picture shifted by the one shift (within SEARCH pixels) that
    matches it best, found at half the size first and refined (a fifth of the work of trying every
    shift), the SEARCH-pixel border left out (a pan brings new things in there). About 0 for a
    still shot or a pan, the moving things' share for motion inside a shot, nearly 1 at a cut."""
    # noqa: E731
    half = lambda a: a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2).mean(axis=(1, 3))
    coarse = _best_shift(half(cur), half(prev), SEARCH // 2)
    dy, dx = _best_shift(cur, prev, 1, (2 * coarse[0], 2 * coarse[1]))
    s = SEARCH + 2
    padded = np.pad(prev, s, mode="edge")
    diff = np.abs(padded[s + dy:s + dy + H, s + dx:s + dx + W] - cur)
    diff = diff[SEARCH:-SEARCH, SEARCH:-SEARCH]
    h, w = diff.shape[0] // BLOCK, diff.shape[1] // BLOCK
    return float((diff[:h * BLOCK, :w * BLOCK].reshape(h, BLOCK, w,
                                                       BLOCK).mean(axis=(1, 3)) > LEVEL).mean())


def _measured(container, stream, rate, budget=None):
    """(time from the first frame, changed share, histogram step, histogram, luma) of every frame,
    at most RATE a second of video; the first frame's changes are 0. A file without timestamps is
    timed by its frame rate. Past `budget` seconds (PER_TEN_MINUTES of them a 10 minutes of video
    reached): a VideoError, whatever the heartbeats said (a small file can hold 60,000 frames)."""
    prev, first, start = None, None, time.monotonic()
    for i, frame in enumerate(container.decode(stream)):
        # a long episode is moving: its decode worker's time limit starts again
        workers.heartbeat()
        t = frame.time if frame.time is not None else i / rate
        first = t if first is None else first
        spent = time.monotonic() - start
        if budget and spent > budget * PER_TEN_MINUTES * max(1.0, (t - first) / 600):
            raise VideoError(f"finding shots took {spent:.0f} s for {t - first:.0f} s of video, "
                             f"more than {PER_TEN_MINUTES} x --decode-timeout a 10 minutes",
                             "decode_timeout")
        if prev is not None and t - prev[2] < 0.9 / RATE:
            continue
        a = frame.to_ndarray(format="rgb24", width=W, height=H, interpolation="AREA")
        hist, luma = _histogram(a), _luma(a)
        change, step = ((changed(luma, prev[1]), 0.5 * float(np.abs(hist - prev[0]).sum()))
                        if prev else (0.0, 0.0))
        yield t - first, change, step, hist, luma
        prev = (hist, luma, t)


def boundaries(path, floor=0.5, margin=0.3, fade=0.35, window=1.0, ahead=5, budget=None):
    """Yield (time, kind) for every boundary, kind "cut" or "fade" (a fade's time is its middle),
    and at the end ("end", duration). Times in seconds from the video's first frame.

    A cut is a frame whose changed share (changed()) is above `floor`, and `margin` above both the
    median of the last `window` seconds of its shot and that of the `ahead` frames after it: a shot
    full of motion raises its own bar, and a pan too fast to follow, which changes every frame from
    its first on, is not a cut. Where nearly everything moves (the bar above 1), a cut still shows
    as a colour histogram that jumps four times as far as it has been moving. A flash (lightning, a
    camera flash, a frame or two of white) is no cut: within the `ahead` frames the picture comes
    back to the one before it. A fade or dissolve changes little from one frame to the next and
    much over GRADUAL frames: its histogram drifts past `fade` from GRADUAL frames back."""
    container, stream = open_video(path)
    with container:
        rate = min(float(stream.average_rate or 25), RATE)
        # (changed, step) of the shot so far
        recent = collections.deque(maxlen=max(4, int(window * rate)))
        # histograms of the last frames
        back = collections.deque(maxlen=GRADUAL + 1)
        queue = collections.deque()                                     # measured, not yet decided
        frames = _measured(container, stream, float(stream.average_rate or 25), budget)
        t, in_fade = 0.0, None
        before, flash_until = None, -1.0   # the luma of the frame before; the last frame of a flash
        while True:
            while len(queue) <= ahead and (m := next(frames, None)) is not None:
                queue.append(m)
            if not queue:
                break
            t, change, step, hist, luma = queue.popleft()
            usual = np.median(np.array(recent), axis=0) if recent else (0.0, 0.0)
            later = np.median([q[1] for q in queue]) if queue else 0.0
            cut = change > max(floor, usual[0] + margin, later + margin) or \
                (change > floor and step > max(0.4, 4 * usual[1]) and change > later + margin)
            back_at = next((q[0] for q in queue if changed(q[4], before) < floor / 2),
                           None) if cut else None
            # a flash: the picture comes back; its frames count for nothing
            if back_at is not None:
                flash_until = back_at
            if t <= flash_until:
                continue
            before = luma
            if cut:
                yield t, "cut"
                recent.clear()
                back.clear()
                in_fade = None
            else:
                # the first frame has nothing to differ from
                recent.extend([(change, step)] if back else [])
                drift = 0.5 * np.abs(hist - back[0]).sum() if len(back) == back.maxlen else 0.0
                if drift > fade and in_fade is None:      # steady change that adds up: a transition
                    in_fade = t - GRADUAL / rate
                elif in_fade is not None and drift < fade / 2:
                    yield (in_fade + t) / 2, "fade"
                    back.clear()
                    in_fade = None
            back.append(hist)
        yield t + 1 / rate, "end"


def shots(path, min_shot=0.6, max_shot=20.0, max_shots=MAX_SHOTS, **detector):
    """[(start, end, kind)] covering the video: kind is how the shot began ("start", "cut", "fade"
    or "window" for a long shot split in equal parts). Boundaries within min_shot of the last are
    merged; more than max_shots (each a paid request in label.py) are merged down to it
    (at_most)."""
    cuts, end = [(0.0, "start")], 0.0
    for t, kind in boundaries(path, **detector):
        if kind == "end":
            end = t
        elif t - cuts[-1][0] >= min_shot:
            cuts.append((t, kind))
    if len(cuts) > 1 and end - cuts[-1][0] < min_shot:   # a last flicker: part of the shot before
        cuts.pop()
    out = []
    for (a, kind), b in zip(cuts, [c[0] for c in cuts[1:]] + [end]):
        parts = max(1, int(np.ceil((b - a) / max_shot)))
        for i in range(parts):
            out.append((a + (b - a) * i / parts, a + (b - a) * (i + 1) / parts,
                        kind if i == 0 else "window"))
    return at_most(out, max_shots)


def at_most(spans, n):
    """Spans merged into the one before until at most n are left: a span starts a new one only when
    it begins 1/n of the video or more after the last one kept."""
    if len(spans) <= n:
        return spans
    gap, kept = spans[-1][1] / n, []
    for a, b, kind in spans:
        if kept and a - kept[-1][0] < gap:
            kept[-1][1] = b
        else:
            kept.append([a, b, kind])
    return [tuple(k) for k in kept]


def windows(duration, seconds):
    """Fixed windows of `seconds` over [0, duration): the last one is what is left."""
    n = max(1, int(np.ceil(duration / seconds - 1e-9)))
    return [(i * seconds, min(duration, (i + 1) * seconds), "window") for i in range(n)]


def duration(path):
    """Seconds from the first frame to the end, from the headers (what fixed windows cover)."""
    container, stream = open_video(path)
    with container:
        seconds = time_span(container, stream)[1]
    # no header says: decode it
    return seconds or next(t for t, kind in boundaries(path) if kind == "end")


def spans(path, window=None, min_shot=0.6, max_shot=20.0, max_shots=MAX_SHOTS, budget=None):
    """A decode worker's job (workers.imap_unordered): the video's shots, or its fixed windows of
    `window` s, at most max_shots; a VideoError when it cannot be read or takes past its budget."""
    data.must_be_a_file(path)
    try:
        if window:
            return at_most(windows(duration(path), window), max_shots)
        return shots(path, min_shot, max_shot, max_shots, budget=budget)
    except (av.error.FFmpegError, IndexError, StopIteration, OSError) as e:
        raise VideoError(f"{path}: not readable as a video ({e})") from None


def shot_frames(job, n, size, keyframes_only=False):
    """A decode worker's job: (video, (shot, of, start, end), None) -> the shot's n frames, sampled
    inside it as a whole video's are (data.read_clip_frames); (video, None, why): that
    VideoError."""
    return read_clip_frames(job[0], n, size, keyframes_only=keyframes_only, span=_span(job))


def shot_urls(job, n, max_side, q):
    """The same for label.py: the shot's n frames as JPEG data URLs (data.jpeg_data_urls)."""
    return jpeg_data_urls(job[0], n, max_side, q, span=_span(job))


def _span(job):
    """A job's (start, end), None for a whole video; its VideoError when its shots could not be
    found."""
    _, shot, why = job
    if why:
        raise VideoError(why)
    return None if shot is None else (shot[2], shot[3])


# ------------------------------------------------- rows per shot, for caption.py and label.py
# --shots / --window


def add_flags(p):
    """The flags of per-shot rows, one meaning in every tool."""
    p.add_argument("--shots", action="store_true",
                   help="a row per shot (shots.py), with its start and end in seconds")
    p.add_argument("--window", type=cli.positive,
                   help="a row per window of this many seconds, instead of per shot")
    p.add_argument("--min-shot", type=cli.positive, default=0.6,
                   help="--shots: seconds; closer cuts are merged")
    p.add_argument("--max-shot", type=cli.positive, default=20.0,
                   help="--shots: seconds; longer shots are split")
    p.add_argument("--max-shots", type=cli.positive_int, default=MAX_SHOTS,
                   help="--shots / --window: a video's rows at most (each a request in label.py); "
                        "more are merged with their neighbours")


def finder(args):
    """The decode workers' job that finds a video's spans for these flags; None for whole
    videos."""
    if not (args.shots or args.window):
        return None
    return functools.partial(spans, window=args.window, min_shot=args.min_shot,
                             max_shot=args.max_shot, max_shots=args.max_shots,
                             budget=args.decode_timeout)


def row_key(row, names=None):
    """What a row is the answer for: (the video's name, its shot or None) (sources.row_name; `names`
    for rows written before names); None for a row that says neither."""
    shot, name = row.get("shot"), row_name(row, names)
    if name is None or not isinstance(row.get("video"),
                                      str) or (shot is not None and type(shot) is not int):
        return None
    return name, shot


def whole(video, done, of):
    """Is nothing left to do for this video: its own row, or every one of its `of` shots?"""
    key = video.name
    return (key, None) in done or (key in of and all((key, i) in done for i in range(of[key])))


def counted(found, stats):
    """The shot finders' stream, counting the videos it has cut in stats["cut"] (for a progress
    line)."""
    for got in found:
        stats["cut"] += 1
        yield got


def jobs(found, done):
    """(video, (shot, of, start, end), None) for every shot not done yet of every video, from the
    decode workers' stream of spans(); (video, None, why) for a video whose shots cannot be found
    (decoding it then fails with that reason, so it comes back as any unreadable video does)."""
    for video, found_spans in found:
        if isinstance(found_spans, VideoError):
            yield video, None, str(found_spans)
            continue
        for i, (start, end, _) in enumerate(found_spans):
            if (video.name, i) not in done:
                yield video, (i, len(found_spans), round(start, 3), round(end, 3)), None


def shot_of(row):
    """A row's (shot, of, start, end), None when it is for a whole video or its fields are not a
    shot's."""
    shot = tuple(row.get(k) for k in ("shot", "of", "start", "end"))
    number = all(isinstance(x, int | float) and not isinstance(x, bool) for x in shot)
    ordered = number and isinstance(shot[0], int) and 0 <= shot[0] < shot[1]
    return shot if ordered and 0 <= shot[2] < shot[3] else None


def identity(video, shot=None) -> dict:
    """The fields that say which video (and shot) a row is for: its path here, its name
    everywhere."""
    return {"video": str(video), "name": video.name, **fields(shot)}


def fields(shot):
    """A shot's fields in its row."""
    if shot is None:
        return {}
    i, of, start, end = shot
    return {"shot": i, "of": of, "start": start, "end": end}


def main(argv=None):
    p = cli.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("video", help="a video file")
    p.add_argument("--min-shot", type=cli.positive, default=0.6,
                   help="seconds: boundaries closer than this are merged")
    p.add_argument("--max-shot", type=cli.positive, default=20.0,
                   help="seconds: longer shots are split into windows")
    args = p.parse_args(argv)
    try:
        for i, (a, b, kind) in enumerate(shots(args.video, args.min_shot, args.max_shot)):
            print(f"{i:4d}  {a:9.3f}  {b:9.3f}  {kind}")
    except (av.error.FFmpegError, IndexError, OSError) as e:
        sys.exit(f"error: {args.video}: not readable as a video ({e})")


if __name__ == "__main__":
    main()
