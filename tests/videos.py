"""Synthetic test videos written with PyAV. Each frame carries its own index in its top half: 16
bits as two rows of 8 black/white stripes (most significant first), big enough to survive lossy
codecs; the bottom half is a colour."""

import av
import numpy as np

from lab import synthetic

STRIPES = 8


def index_frame(i, width=64, height=48):
    a = np.zeros((height, width, 3), np.uint8)
    q = height // 4
    for row, byte in enumerate(((i >> 8) & 255, i & 255)):
        for b in range(STRIPES):
            if (byte >> (STRIPES - 1 - b)) & 1:
                a[row * q:(row + 1) * q, b * width // STRIPES:(b + 1) * width // STRIPES] = 255
    a[height // 2:] = ((i * 37) % 256, (i * 91) % 256, 128)
    return a


def read_index(frame):
    """The index written by index_frame, read back from a decoded (H, W, 3) frame of any size."""
    h, w = frame.shape[:2]
    q, value = h // 4, 0
    for row in range(2):
        # away from the edges
        band = frame[row * q + q // 4:(row + 1) * q - q // 4].mean(axis=(0, 2))
        for b in range(STRIPES):
            x0, x1 = b * w // STRIPES, (b + 1) * w // STRIPES
            value = value * 2 + int(band[x0 + (x1 - x0) // 4: x1 - (x1 - x0) // 4].mean() > 128)
    return value


def write_video(path, n_frames=32, fps=25, size=(64, 48), frame_fn=index_frame, **kw):
    """n_frames of frame_fn(i, width, height), written by synthetic.write_video (its keywords pass
    on)."""
    w, h = size
    return synthetic.write_video(path, (frame_fn(i, w, h) for i in range(n_frames)), fps=fps, **kw)


def solid_videos(folder, n, n_frames=10, size=(96, 64)):
    """n videos of one flat colour each, all different (a fake API tells them apart by it): (paths,
    colours)."""
    import os
    os.makedirs(folder, exist_ok=True)
    colours = [((37 * i) % 256, (255 - 53 * i) % 256, (91 * i) % 256) for i in range(n)]
    paths = [write_video(os.path.join(folder, f"v{i:02d}.mp4"), n_frames=n_frames, size=size,
                         frame_fn=lambda j, w, h, c=c: np.full((h, w, 3), c, np.uint8)) for i,
             c in enumerate(colours)]
    return paths, colours


def frame_times_ms(n_frames, durations_ms):
    t, times = 0, []
    for i in range(n_frames):
        times.append(t)
        t += durations_ms[i % len(durations_ms)]
    return times, t


def write_audio_only(path, seconds=1.0):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        samples = int(16000 * seconds)
        frame_size = 1024
        for start in range(0, samples, frame_size):
            data = np.zeros((1, frame_size), np.float32)
            frame = av.AudioFrame.from_ndarray(data, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)
