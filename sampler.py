"""How data.read_frames finds the frame on screen at each time it asks for, in four named steps
(read):

1. by time: n times over the duration the file states (or over a span inside it), and the frame on
   screen at each, seeking to the keyframe before a far one and decoding forward (a _Cursor);
2. over the true end: when the file ends well before the end its header states, the times again over
   where it really ends;
3. no seeking: when FFmpeg cannot seek in the file, the same times read in one pass from the start;
4. by index: a file with no timestamps, or no duration to spread times over, gives frames by their
   index.

Opening a file is here too (open_video, time_span), with the error every reader of videos raises
(VideoError): data.py builds on this module, never the other way round.
"""

import os

import av
import numpy as np

from plumbing import workers
from plumbing.sources import TS_EXTENSIONS, UNREADABLE, VideoError  # noqa: F401


MAX_PIXELS = 1 << 25   # 33.5 M, an 8K frame: a frame (or its resized self) past this is refused
MAX_BAD_PACKETS = 50
GUESS_GOP = 10.0
SCAN_MARGIN = 8     # frames before a target from where every frame is decoded (B-frames: <= 4)

def open_video(path, keyframes_only=False):
    """(container, its first video stream), ready to decode: VideoError when the file has no
    video."""
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
    stream.codec_context.thread_count = workers.CODEC_THREADS
    if keyframes_only:
        stream.codec_context.skip_frame = "NONKEY"
    return container, stream


def time_span(container, stream):
    """(start, duration) in seconds; duration None when neither the stream nor the container knows
    it."""
    tb = stream.time_base
    start = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
    if stream.duration and tb:
        return start, float(stream.duration * tb)
    if container.duration:   # MKV / WebM: no stream duration, and frames == 0
        return start, container.duration / av.time_base
    return start, None


def read(path, n, offsets, size, keyframes_only, span=None):
    """n frames, one at each of n times: the four steps of this file's docstring."""
    with open_video(path, keyframes_only)[0] as container:
        start, duration = time_span(container, container.streams.video[0])
    try:
        if not duration or duration <= 0:
            raise _NoTimestamps
        times = _times(start, duration, n, offsets, span)                       # step 1
        frames, end = _sample_by_time(path, times, size, keyframes_only)
        if end is not None:                                                      # step 2
            times = _times(start, end - start, n, offsets, span)
            frames, _ = _sample_by_time(path, times, size, keyframes_only)
        return frames
    except _NoTimestamps:
        return _by_index(path, n, offsets, size, keyframes_only, span)


class _NoTimestamps(Exception):
    pass


class _NoSeek(Exception):
    pass


def _times(start, duration, n, offsets, span):
    """Step 1's times: one in each of n equal segments of [0, duration), or of the span inside
    it."""
    lo, hi = (0.0, duration) if span is None else (max(0.0, span[0]), min(duration, span[1]))
    if hi <= lo:
        raise VideoError(f"the span {span[0]:.3f}-{span[1]:.3f} s lies outside the video "
                         f"({duration:.3f} s)")
    return [start + lo + (i + u) * (hi - lo) / n for i, u in enumerate(offsets)]


def _sample_by_time(path, times, size, keyframes_only):
    """Steps 1 and 3: (frames, None), or (frames, the true end) when the file ended early (step 2's
    cue)."""
    for seekable in (True, False):
        with open_video(path, keyframes_only)[0] as container:
            try:
                stream = container.streams.video[0]
                return _by_time(path, container, stream, times, size, seekable, not keyframes_only)
            except _NoSeek:
                continue


def decoded(path, container, stream):
    """Frames in decode order, packet by packet, so that a corrupt packet costs that packet
    only."""
    bad = 0
    for packet in container.demux(stream):
        try:
            yield from packet.decode()
        except av.error.FFmpegError:
            bad += 1
            if bad > MAX_BAD_PACKETS:
                raise VideoError(f"{path}: more than {MAX_BAD_PACKETS} corrupt packets") from None


def to_rgb(frame, size):
    (short_side, max_side), w, h = size, frame.width, frame.height
    if short_side:   # transformers' CLIP resize: short side exact, long side truncated
        scale = short_side / min(w, h)
        w, h = (short_side, int(h * scale)) if w <= h else (int(w * scale), short_side)
    if max_side and max(w, h) > max_side:
        scale = max_side / max(w, h)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
    if max(w * h, frame.width * frame.height) > MAX_PIXELS:   # 1 x 4000 would become 336 x 1.3 M
        raise VideoError(f"frames of {frame.width}x{frame.height} pixels would take {w}x{h} after "
                         f"resizing: "
                         f"more than {MAX_PIXELS} pixels")
    a = frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="BICUBIC")
    if frame.rotation:   # display rotation, degrees counter-clockwise: undone, as ffmpeg does
        a = np.rot90(a, k=round(frame.rotation / 90) % 4)
    return np.ascontiguousarray(a)


def _by_time(path, container, stream, times, size, seekable, skip_b_frames=True):
    """The frame on screen at each of `times`: (frames, None), or (frames, true end) when the file
    ended well before the last (its header lied about the duration)."""
    cursor, frames = _Cursor(path, container, stream, skip_b_frames), []
    for t in times:
        if cursor.frames is None and not seekable:   # step 3: one pass from the start
            cursor.frames = decoded(path, container, stream)
        elif cursor.frames is None or (seekable and not cursor.eof and cursor.worth_seeking(t)):
            cursor.seek(t)
        frames.append(to_rgb(cursor.frame_at(t), size))
    step = 1 / float(stream.average_rate) if stream.average_rate else 0.04
    if cursor.eof and times[-1] > cursor.cur.time + 2 * step:
        return frames, cursor.cur.time + step
    return frames, None


class _Cursor:
    """Where decoding stands in one stream: the frame on screen (`cur`), the next one if it is
    already decoded (`ahead`), and what the frames so far told of the keyframes (`last_key`, and
    `gop`, the widest spacing between two seen one after the other)."""

    def __init__(self, path, container, stream, skip_b_frames):
        self.path, self.container, self.stream = path, container, stream
        self.skip_b_frames = skip_b_frames
        self.start = time_span(container, stream)[0]
        self.margin = SCAN_MARGIN / float(stream.average_rate) if stream.average_rate else 0.5
        self.frames, self.cur, self.ahead, self.eof = None, None, None, False
        self.last_key, self.gop, self.skipping = None, None, False

    def worth_seeking(self, t):
        """Seek only when it saves decoding. A seek lands on the keyframe before t, on average half
        a GOP before it, and only helps when a keyframe lies between the decoder and t. Until two
        keyframes have been seen, assume GUESS_GOP seconds, a common encoder default (250 frames at
        25 fps)."""
        here = (self.ahead or self.cur).time if (self.ahead or self.cur) is not None else None
        if here is None:
            return True
        if t - here <= max(1.0, 0.5 * (self.gop or GUESS_GOP)):
            return False
        return self.last_key is None or t - self.last_key > (self.gop or GUESS_GOP)

    def seek(self, t):
        self.frames, self.cur, self.ahead = _seek(self.path, self.container, self.stream, t,
                                                  self.start)
        self.last_key = None   # keyframe spacing is measured between keyframes decoded in a row

    def _next(self):
        frame = self.ahead if self.ahead is not None else next(self.frames, None)
        self.ahead = None
        if frame is not None and frame.time is not None and frame.key_frame:
            if self.last_key is not None and frame.time > self.last_key:
                self.gop = max(self.gop or 0.0, frame.time - self.last_key)
            self.last_key = frame.time
        return frame

    def frame_at(self, t):
        """Decode forward to the frame on screen at time t: the last one that starts at or before
        it."""
        while not self.eof:
            frame = self._next()
            if frame is None:
                self.eof = True
                break
            if frame.time is None:
                raise _NoTimestamps
            # 1e-6: a frame starting at t is on screen at t
            if frame.time > t + 1e-6 and self.cur is not None:
                self.ahead = frame
                break
            self.cur = frame
            # frames no other frame refers to (B-frames, mostly) cannot be the one picked while t is
            # far ahead, and they are often most of the decoding work: skip them until t is near
            far = self.skip_b_frames and frame.time < t - self.margin
            if far != self.skipping:
                self.stream.codec_context.skip_frame = "NONREF" if far else "DEFAULT"
                self.skipping = far
        if self.cur is None:
            raise VideoError(f"{self.path}: no decodable frames")
        return self.cur


def _seek(path, container, stream, t, start):
    """A frame iterator positioned at or before time t: (iterator, cur=None, pending=its first
    frame).

    MPEG-TS seeks by guessing a byte position, so a backward seek can land after the target, or
    after the last keyframe before it (then nothing decodes until the next keyframe, and a short
    capture has only one): seek again 1, 2, 4 ... s earlier, down to the stream's start (broadcast
    captures start hours in, not at 0), and then to 0: with B-frames, a seek to the start time
    itself can land on the second keyframe. Nothing decodable even from there: _NoSeek, and the
    file is read in one pass."""
    back = 0.0
    while True:
        target = max(t - back, start) if back >= 0 else 0.0
        try:
            container.seek(int(target / stream.time_base), stream=stream, backward=True,
                           any_frame=False)
        except av.error.FFmpegError:
            raise _NoSeek from None
        it = decoded(path, container, stream)
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
            return it, None, first   # the file's first frame comes after t: it is on screen
        back = 2 * back or 1.0


def _by_index(path, n, offsets, size, keyframes_only, span=None):
    """Step 4, for files without timestamps: count the frames in one pass, pick by index in a
    second; a span goes by the frame rate the stream states (25 when it states none)."""
    with open_video(path, keyframes_only)[0] as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in decoded(path, container, stream))
        rate = float(stream.average_rate or 25)
    if count == 0:
        raise VideoError(f"{path}: no decodable frames")
    lo, hi = 0, count
    if span is not None:
        lo, hi = int(span[0] * rate), min(max(int(span[1] * rate), int(span[0] * rate) + 1), count)
        if lo >= count:
            raise VideoError(f"the span {span[0]:.3f}-{span[1]:.3f} s lies outside the video "
                             f"({count / rate:.3f} s)")
    wanted = [min(lo + int((i + u) * (hi - lo) / n), hi - 1) for i, u in enumerate(offsets)]
    picked = {}
    with open_video(path, keyframes_only)[0] as container:
        for i, frame in enumerate(decoded(path, container, container.streams.video[0])):
            if i in wanted:
                picked[i] = to_rgb(frame, size)
            if i >= wanted[-1]:
                break
    return [picked[i] for i in wanted]
