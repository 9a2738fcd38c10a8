"""Video in: n frames from whatever file people have, CLIP preprocessing, JPEG for the teacher.

Frames are chosen by *time*: the video is cut into n equal segments and we take the frame on screen at
the middle of each (`middle`, for captioning) or at a random moment inside it (`random`, for training).
Time, not frame index, because frame counts in headers lie and variable-frame-rate files make index
arithmetic land in the wrong place. A far target is reached by seeking to the keyframe before it and
decoding forward, so an hours-long file costs n short decodes, never a decode of every frame.
"""

import base64
import fractions
import os

import av
import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TS_EXTENSIONS = {".ts", ".m2ts", ".mts", ".m2t"}
MAX_PIXELS = 1 << 25   # 33.5 M, an 8K frame: a frame (or what resizing would make of it) past this is refused
MAX_BAD_PACKETS = 50
GUESS_GOP = 10.0
SCAN_MARGIN = 8     # frames before a target from which every frame is decoded again (B-frames: <= 4)
CODEC_THREADS = 0   # threads a decoder may use; 0: FFmpeg's choice (one per core). Decode workers set their share


def heartbeat():
    """Called as a long decode moves on (shot detection decodes every frame): a decode worker replaces it to
    tell its parent, whose time limit then counts from the last beat, not from the start."""


UNREADABLE = "unreadable_video"


class VideoError(Exception):
    """A file that cannot give frames; the message says which file and why. `code` says whether another try
    could help: UNREADABLE (the file itself: no), or, from the decode workers (plumbing/workers.py), a
    failure of the process that decoded it (a time or memory limit, a crash), which may not happen again."""

    def __init__(self, message, code=UNREADABLE):
        super().__init__(message)
        self.code = code

    def __reduce__(self):
        return VideoError, (str(self), self.code)


def read_frames(path, n: int, mode: str = "middle", short_side: int = None, keyframes_only: bool = False,
                rng: np.random.Generator = None, max_side: int = None, span: tuple = None) -> np.ndarray:
    """n RGB frames (n, H, W, 3) uint8, upright, one per equal segment of the video's duration, or of the
    span (start, end) in it, in seconds from its first frame (a shot: shots.py).

    short_side: shrink (or grow) each frame so its shorter side is this many pixels, inside FFmpeg's
    scaler (bicubic) before it becomes an array, so a 4K video never costs 4K arrays. max_side: shrink
    (never grow) so the longer side is at most this many pixels.
    keyframes_only: decode only keyframes (much faster, but a frame may be seconds from its target).
    A video shorter than n frames gives some frames twice, as the model expects."""
    if mode not in ("middle", "random"):
        raise ValueError(f"mode must be 'middle' or 'random', not {mode!r}")
    rng = rng if rng is not None else np.random.default_rng()
    offsets = [0.5] * n if mode == "middle" else rng.random(n).tolist()   # where in each segment
    if not os.path.isfile(path):
        raise VideoError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise VideoError(f"{path}: empty file")
    try:
        frames = _read(path, n, offsets, (short_side, max_side), keyframes_only, span)
    except av.error.FFmpegError as e:
        raise VideoError(f"{path}: not readable as a video ({e.strerror or e})") from None
    except VideoError as e:
        raise VideoError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
    shape = frames[0].shape   # a stream whose frame size changes (a capture joining 16:9 and portrait)
    return np.stack([f if f.shape == shape else _resized(f, shape) for f in frames])


def _resized(a, shape):
    """An RGB frame scaled (bicubic, in FFmpeg's scaler) to another frame's (H, W, 3)."""
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")
    return frame.to_ndarray(format="rgb24", width=shape[1], height=shape[0], interpolation="BICUBIC")


def open_video(path, keyframes_only=False):
    """(container, its first video stream), ready to decode: VideoError when the file has no video."""
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except av.error.FFmpegError:
        if os.path.splitext(str(path))[1].lower() not in TS_EXTENSIONS:
            raise
        # a capture of a few frames is too short for FFmpeg's format probe to be sure it is MPEG-TS
        container = av.open(str(path), format="mpegts", metadata_errors="ignore")
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"   # frame + slice threads; set before the first decode
    stream.codec_context.thread_count = CODEC_THREADS
    if keyframes_only:
        stream.codec_context.skip_frame = "NONKEY"
    return container, stream


def _read(path, n, offsets, size, keyframes_only, span=None):
    """The sampler, in four named steps:
    1. plan by time: n times over the duration the file states (or over the span inside it), and the
       frame on screen at each, seeking to the keyframe before a far one;
    2. re-plan over the true end: when the file ends well before the end its header states, plan again
       over where it really ends;
    3. no seeking: when FFmpeg cannot seek in the file, the same plan read in one pass from the start;
    4. by index: a file with no timestamps, or no duration to plan over, gives frames by their index."""
    with open_video(path, keyframes_only)[0] as container:
        start, duration = _time_span(container, container.streams.video[0])
    try:
        if not duration or duration <= 0:
            raise _NoTimestamps
        frames, end = _sample_by_time(path, _plan(start, duration, n, offsets, span), size, keyframes_only)
        if end is not None:
            frames, _ = _sample_by_time(path, _plan(start, end - start, n, offsets, span), size, keyframes_only)
        return frames
    except _NoTimestamps:
        return _by_index(path, n, offsets, size, keyframes_only, span)


class _NoTimestamps(Exception):
    pass


class _NoSeek(Exception):
    pass


def _plan(start, duration, n, offsets, span):
    """Step 1's times: one in each of n equal segments of [0, duration), or of the span inside it."""
    lo, hi = (0.0, duration) if span is None else (max(0.0, span[0]), min(duration, span[1]))
    if hi <= lo:
        raise VideoError(f"the span {span[0]:.3f}-{span[1]:.3f} s lies outside the video ({duration:.3f} s)")
    return [start + lo + (i + u) * (hi - lo) / n for i, u in enumerate(offsets)]


def _sample_by_time(path, plan, size, keyframes_only):
    """Steps 1 and 3: (frames, None), or (frames, the true end) when the file ended early (step 2's cue)."""
    for seekable in (True, False):
        with open_video(path, keyframes_only)[0] as container:
            try:
                return _by_time(path, container, container.streams.video[0], plan, size, seekable, not keyframes_only)
            except _NoSeek:
                continue


def _time_span(container, stream):
    """(start, duration) in seconds; duration None when neither the stream nor the container knows it."""
    tb = stream.time_base
    start = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
    if stream.duration and tb:
        return start, float(stream.duration * tb)
    if container.duration:   # MKV / WebM: no stream duration, and frames == 0
        return start, container.duration / av.time_base
    return start, None


def _decoded(path, container, stream):
    """Frames in decode order, packet by packet, so that a corrupt packet costs that packet only."""
    bad = 0
    for packet in container.demux(stream):
        try:
            yield from packet.decode()
        except av.error.FFmpegError:
            bad += 1
            if bad > MAX_BAD_PACKETS:
                raise VideoError(f"{path}: more than {MAX_BAD_PACKETS} corrupt packets") from None


def _to_rgb(frame, size):
    (short_side, max_side), w, h = size, frame.width, frame.height
    if short_side:   # transformers' CLIP resize: short side exact, long side truncated
        scale = short_side / min(w, h)
        w, h = (short_side, int(h * scale)) if w <= h else (int(w * scale), short_side)
    if max_side and max(w, h) > max_side:
        scale = max_side / max(w, h)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
    if max(w * h, frame.width * frame.height) > MAX_PIXELS:   # 1 x 4000 would become 336 x 1.3 M
        raise VideoError(f"frames of {frame.width}x{frame.height} pixels would take {w}x{h} after resizing: "
                         f"more than {MAX_PIXELS} pixels")
    a = frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="BICUBIC")
    if frame.rotation:   # display rotation, degrees counter-clockwise: what ffmpeg's autorotate undoes
        a = np.rot90(a, k=round(frame.rotation / 90) % 4)
    return np.ascontiguousarray(a)


def _by_time(path, container, stream, plan, size, seekable, skip_b_frames=True):
    """The frame on screen at each planned time: (frames, None), or (frames, true end) when the file
    ended well before the plan (its header lied about the duration)."""
    cursor, frames = _Cursor(path, container, stream, skip_b_frames), []
    for t in plan:
        if cursor.frames is None and not seekable:   # a file FFmpeg cannot seek in: one pass from the start
            cursor.frames = _decoded(path, container, stream)
        elif cursor.frames is None or (seekable and not cursor.eof and cursor.worth_seeking(t)):
            cursor.seek(t)
        frames.append(_to_rgb(cursor.frame_at(t), size))
    step = 1 / float(stream.average_rate) if stream.average_rate else 0.04
    if cursor.eof and plan[-1] > cursor.cur.time + 2 * step:
        return frames, cursor.cur.time + step
    return frames, None


class _Cursor:
    """Where decoding stands in one stream: the frame on screen (`cur`), the next one if it is already
    decoded (`ahead`), and what the frames so far told of the keyframes (`last_key`, and `gop`, the widest
    spacing between two seen one after the other)."""

    def __init__(self, path, container, stream, skip_b_frames):
        self.path, self.container, self.stream, self.skip_b_frames = path, container, stream, skip_b_frames
        self.start = _time_span(container, stream)[0]
        self.margin = SCAN_MARGIN / float(stream.average_rate) if stream.average_rate else 0.5
        self.frames, self.cur, self.ahead, self.eof = None, None, None, False
        self.last_key, self.gop, self.skipping = None, None, False

    def worth_seeking(self, t):
        """Seek only when it saves decoding. A seek lands on the keyframe before t, on average half a GOP
        before it, and only helps when a keyframe lies between the decoder and t. Until two keyframes have
        been seen, assume GUESS_GOP seconds, a common encoder default (250 frames at 25 fps)."""
        here = (self.ahead or self.cur).time if (self.ahead or self.cur) is not None else None
        if here is None:
            return True
        if t - here <= max(1.0, 0.5 * (self.gop or GUESS_GOP)):
            return False
        return self.last_key is None or t - self.last_key > (self.gop or GUESS_GOP)

    def seek(self, t):
        self.frames, self.cur, self.ahead = _seek(self.path, self.container, self.stream, t, self.start)
        self.last_key = None   # keyframe spacing is measured between keyframes decoded one after another

    def _next(self):
        frame, self.ahead = (self.ahead, None) if self.ahead is not None else (next(self.frames, None), None)
        if frame is not None and frame.time is not None and frame.key_frame:
            if self.last_key is not None and frame.time > self.last_key:
                self.gop = max(self.gop or 0.0, frame.time - self.last_key)
            self.last_key = frame.time
        return frame

    def frame_at(self, t):
        """Decode forward to the frame on screen at time t: the last one that starts at or before it."""
        while not self.eof:
            frame = self._next()
            if frame is None:
                self.eof = True
                break
            if frame.time is None:
                raise _NoTimestamps
            if frame.time > t + 1e-6 and self.cur is not None:   # 1e-6: a frame starting at t is on screen at t
                self.ahead = frame
                break
            self.cur = frame
            # frames no other frame refers to (B-frames, mostly) cannot be the one picked while t is far
            # ahead, and they are often most of the decoding work: skip them until t is near
            far = self.skip_b_frames and frame.time < t - self.margin
            if far != self.skipping:
                self.stream.codec_context.skip_frame = "NONREF" if far else "DEFAULT"
                self.skipping = far
        if self.cur is None:
            raise VideoError(f"{self.path}: no decodable frames")
        return self.cur


def _seek(path, container, stream, t, start):
    """A frame iterator positioned at or before time t: (iterator, cur=None, pending=its first frame).

    MPEG-TS seeks by guessing a byte position, so a backward seek can land after the target, or after the
    last keyframe before it (then nothing decodes until the next keyframe, and a short capture has only
    one): seek again 1, 2, 4 ... s earlier, down to the stream's start (broadcast captures start hours
    in, not at 0), and then to 0: with B-frames, a seek to the start time itself can land on the second
    keyframe. Nothing decodable even from there: _NoSeek, and the file is read in one pass."""
    back = 0.0
    while True:
        target = max(t - back, start) if back >= 0 else 0.0
        try:
            container.seek(int(target / stream.time_base), stream=stream, backward=True, any_frame=False)
        except av.error.FFmpegError:
            raise _NoSeek from None
        it = _decoded(path, container, stream)
        first = next(it, None)
        if first is not None and first.time is not None and first.time <= t + 1e-6:
            return it, None, first
        if first is not None and first.time is None:
            raise _NoTimestamps
        if target <= start and start > 0 and back >= 0:
            back = -1.0   # once more, from 0
            continue
        if target <= start:
            if first is None:
                raise _NoSeek
            return it, None, first   # the file's first frame comes after t: it is the one on screen
        back = 2 * back or 1.0


def _by_index(path, n, offsets, size, keyframes_only, span=None):
    """Step 4, for files without timestamps: count the frames in one pass, pick by index in a second; a
    span goes by the frame rate the stream states (25 when it states none)."""
    with open_video(path, keyframes_only)[0] as container:
        stream = container.streams.video[0]
        count, rate = sum(1 for _ in _decoded(path, container, stream)), float(stream.average_rate or 25)
    if count == 0:
        raise VideoError(f"{path}: no decodable frames")
    lo, hi = 0, count
    if span is not None:
        lo, hi = int(span[0] * rate), min(max(int(span[1] * rate), int(span[0] * rate) + 1), count)
        if lo >= count:
            raise VideoError(f"the span {span[0]:.3f}-{span[1]:.3f} s lies outside the video ({count / rate:.3f} s)")
    wanted = [min(lo + int((i + u) * (hi - lo) / n), hi - 1) for i, u in enumerate(offsets)]
    picked = {}
    with open_video(path, keyframes_only)[0] as container:
        for i, frame in enumerate(_decoded(path, container, container.streams.video[0])):
            if i in wanted:
                picked[i] = _to_rgb(frame, size)
            if i >= wanted[-1]:
                break
    return [picked[i] for i in wanted]


def read_image(path, short_side: int = None) -> np.ndarray:
    """A still image (any format FFmpeg reads: PNG, JPEG, WebP ...) as (1, H, W, 3) uint8: its first frame."""
    if not os.path.isfile(path):
        raise VideoError(f"{path}: no such file")
    try:
        container, stream = open_video(path, False)
        with container:
            frame = next(_decoded(path, container, stream), None)
            if frame is None:
                raise VideoError(f"{path}: no decodable image")
            return _to_rgb(frame, (short_side, None))[None]
    except av.error.FFmpegError as e:
        raise VideoError(f"{path}: not readable as an image ({e.strerror or e})") from None
    except VideoError as e:
        raise VideoError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None


# ------------------------------------------------------------------------------- CLIP preprocessing


def center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """(n, H, W, 3) with min(H, W) >= size -> (n, size, size, 3), offsets as transformers computes them."""
    H, W = frames.shape[1:3]
    top, left = (H - size) // 2, (W - size) // 2
    return frames[:, top:top + size, left:left + size]


def read_clip_frames(path, n, size=336, mode="middle", keyframes_only=False, rng=None, span=None) -> np.ndarray:
    """n frames resized (short side = size, bicubic) and center-cropped: (n, size, size, 3) uint8."""
    return np.ascontiguousarray(center_crop(read_frames(path, n, mode, size, keyframes_only, rng, span=span), size))


def read_sample(job) -> np.ndarray:
    """A training sample's frames, in a decode worker: job = (key, path, is_image, n, size, mode, seed, span),
    the seed (a list of ints) fixing the random frames whichever process reads them; (1, size, size, 3)
    for an image. Anything that goes wrong is a VideoError that starts with the path."""
    _, path, is_image, n, size, mode, seed, span = job
    try:
        if is_image:
            return center_crop(read_image(path, short_side=size), size)
        return read_clip_frames(path, n, size, mode, rng=np.random.default_rng(seed), span=span)
    except VideoError:
        raise
    except Exception as e:
        raise VideoError(f"{path}: {type(e).__name__}: {e}") from None


def mean_std(folder):
    """The normalization a model was trained with: preprocessor_config.json's image_mean and image_std
    when its folder has one, else CLIP's. Captioning and training both take it from here."""
    import json
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return CLIP_MEAN, CLIP_STD
    with open(path) as f:
        config = json.load(f)
    mean, std = config.get("image_mean", CLIP_MEAN), config.get("image_std", CLIP_STD)
    if not all(isinstance(v, list | tuple) and len(v) == 3 and all(isinstance(x, int | float) for x in v)
               for v in (mean, std)) or min(std) <= 0:
        raise ValueError(f"{path}: image_mean and image_std must be three numbers each (std above 0)")
    return tuple(mean), tuple(std)


def normalize(frames, mean=CLIP_MEAN, std=CLIP_STD, device=None, dtype=None):
    """(..., H, W, 3) uint8 -> (..., 3, H, W) normalized floats, on `device` (send uint8, not floats).
    Computed in fp32 and cast once to `dtype` at the end, as transformers' processor does (bf16 arithmetic
    would round three times)."""
    import torch  # here, not at the top: decode workers import this file and never need torch
    x = torch.as_tensor(frames).to(device).movedim(-1, -3).float() / 255.0
    m = torch.tensor(mean, device=x.device)[:, None, None]
    s = torch.tensor(std, device=x.device)[:, None, None]
    return ((x - m) / s).to(dtype or torch.float32)


# ------------------------------------------------------------------------------------------ JPEG


def jpeg(rgb, q):
    """RGB array -> JPEG bytes with FFmpeg's MJPEG encoder (full-range YUV, fixed quantizer)."""
    cc = av.CodecContext.create("mjpeg", "w")
    cc.width, cc.height, cc.pix_fmt = rgb.shape[1], rgb.shape[0], "yuvj420p"
    cc.time_base = fractions.Fraction(1, 25)
    cc.qscale = q
    cc.options = {"qmin": str(q), "qmax": str(q)}
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuvj420p")
    return b"".join(bytes(p) for p in cc.encode(frame) + cc.encode(None))


def jpeg_data_urls(path, n, max_side, q, span=None):
    """A video's (or a span's) n frames (segment middles) as base64 JPEG data URLs, for a vision API."""
    frames = read_frames(path, n, "middle", max_side=max_side, span=span)
    return ["data:image/jpeg;base64," + base64.b64encode(jpeg(f, q)).decode() for f in frames]
