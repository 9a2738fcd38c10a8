"""Videos and stills written with PyAV: the synthetic data of the tests, the toy world and the
benchmark.

One writer for all of them, so that the files a test makes are made the way the tools' own are.
"""

import fractions
import itertools
import os

import av
import numpy as np


def write_video(path, frames, fps=25, codec="libx264", pix_fmt="yuv420p", options=None,
                durations_ms=None, start_s=0.0, rotation=0, gop=None, container=None) -> str:
    """Encode `frames` (an iterable of (H, W, 3) uint8 RGB arrays, a generator for long clips) to
    `path`.

    durations_ms (cycled over the frames) makes a variable-frame-rate file; start_s starts its
    timestamps later than 0, as broadcast captures do; rotation is display metadata (degrees);
    container names the format when the extension does not (e.g. "mpegts"). Written under a
    temporary name and renamed when whole, so a file that exists is complete."""
    frames = iter(frames)
    first = next(frames)
    h, w = first.shape[:2]
    folder, name = os.path.split(str(path))
    tmp = os.path.join(folder, f".tmp-{name}")
    timed = durations_ms is not None or start_s
    with av.open(tmp, "w", format=container) as out:
        stream = out.add_stream(codec, rate=1000 // min(durations_ms) if durations_ms else fps)
        if durations_ms:   # a variable frame rate: the encoder counts in milliseconds too
            stream.time_base = stream.codec_context.time_base = fractions.Fraction(1, 1000)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if gop:
            stream.codec_context.gop_size = gop
        if options:
            stream.options = options
        if rotation:
            stream.set_display_rotation(rotation)
        pts = round(start_s * 1000)
        steps = itertools.cycle(durations_ms or [round(1000 / fps)])
        for image in itertools.chain([first], frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if timed:
                frame.pts, frame.time_base = pts, fractions.Fraction(1, 1000)
                pts += next(steps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    os.replace(tmp, path)
    return str(path)


def write_image(path, image) -> str:
    """A still (PNG, or what the extension names) from one (H, W, 3) uint8 RGB array."""
    with av.open(str(path), "w", format="image2") as out:
        stream = out.add_stream("png")
        stream.height, stream.width = image.shape[:2]
        stream.pix_fmt = "rgb24"
        out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image),
                                                         format="rgb24")))
        out.mux(stream.encode())
    return str(path)


def clip(path, w, h, frames, k=0, **options):
    """A synthetic clip of moving gradients (cached: made once, kept in --cache)."""
    if not os.path.exists(path):
        y, x = np.mgrid[0:h, 0:w]
        write_video(path,
                    (np.stack([(x + 3 * i + 40 * k) % 256, (y + i) % 256, (x + y + k) % 256],
                              -1).astype(np.uint8) for i in range(frames)), fps=25, options=options)
    return path
