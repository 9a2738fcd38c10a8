"""Video in: n frames from whatever file people have, CLIP preprocessing, JPEG for the teacher.

Frames are chosen by *time*: the video is cut into n equal segments and we take the frame on screen
at the middle of each (`middle`, for captioning) or at a random moment inside it (`random`, for
training). Time, not frame index, because frame counts in headers lie and variable-frame-rate files
make index arithmetic land in the wrong place. A far target is reached by seeking to the keyframe
before it and decoding forward, so an hours-long file costs n short decodes (sampler.py); only a
file FFmpeg cannot seek in, or one without timestamps, is read from the start.
"""

import base64
import fractions
import os

import av
import numpy as np

import sampler
# the names callers use
from sampler import UNREADABLE, VideoError, open_video, time_span  # noqa: F401

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
def read_frames(path, n: int, mode: str = "middle", short_side: int = None,
                keyframes_only: bool = False, rng: np.random.Generator = None,
                max_side: int = None, span: tuple = None) -> np.ndarray:
    """n RGB frames (n, H, W, 3) uint8, upright, one per equal segment of the video's duration, or
    of the span (start, end) in it, in seconds from its first frame (a shot: shots.py).

    short_side: shrink (or grow) each frame so its shorter side is this many pixels, inside
    FFmpeg's scaler (bicubic) before it becomes an array, so a 4K video never costs 4K arrays.
    max_side: shrink (never grow) so the longer side is at most this many pixels. keyframes_only:
    decode only keyframes (much faster, but a frame may be seconds from its target). A video
    shorter than n frames gives some frames twice, as the model expects."""
    if mode not in ("middle", "random"):
        raise ValueError(f"mode must be 'middle' or 'random', not {mode!r}")
    rng = rng if rng is not None else np.random.default_rng()
    offsets = [0.5] * n if mode == "middle" else rng.random(n).tolist()   # where in each segment
    must_be_a_file(path)
    if os.path.getsize(path) == 0:
        raise VideoError(f"{path}: empty file")
    try:
        frames = sampler.read(path, n, offsets, (short_side, max_side), keyframes_only, span)
    except av.error.FFmpegError as e:
        raise VideoError(f"{path}: not readable as a video ({e.strerror or e})") from None
    except VideoError as e:
        raise VideoError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
    shape = frames[0].shape   # a stream whose frame size changes (a TS joining 16:9 and portrait)
    return np.stack([f if f.shape == shape else _resized(f, shape) for f in frames])


def _resized(a, shape):
    """An RGB frame scaled (bicubic, in FFmpeg's scaler) to another frame's (H, W, 3)."""
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")
    return frame.to_ndarray(format="rgb24", width=shape[1], height=shape[0],
                            interpolation="BICUBIC")


def must_be_a_file(path):
    """A VideoError unless `path` is a regular file: none there, or a FIFO, a device or a folder
    (never opened: a FIFO would block the decoder)."""
    if not os.path.exists(path):
        raise VideoError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise VideoError(f"{path}: not a regular file (a FIFO, a device or a folder)")


def read_image(path, short_side: int = None) -> np.ndarray:
    """A still image (any format FFmpeg reads: PNG, JPEG, WebP ...) as (1, H, W, 3) uint8: its
    first frame."""
    must_be_a_file(path)
    try:
        container, stream = open_video(path, False)
        with container:
            frame = next(sampler.decoded(path, container, stream), None)
            if frame is None:
                raise VideoError(f"{path}: no decodable image")
            return sampler.to_rgb(frame, (short_side, None))[None]
    except av.error.FFmpegError as e:
        raise VideoError(f"{path}: not readable as an image ({e.strerror or e})") from None
    except VideoError as e:
        raise VideoError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None


# -------------------------------------------------------------------------- CLIP preprocessing


def center_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """(n, H, W, 3) with min(H, W) >= size -> (n, size, size, 3), offsets as transformers computes
    them."""
    H, W = frames.shape[1:3]
    top, left = (H - size) // 2, (W - size) // 2
    return frames[:, top:top + size, left:left + size]


def read_clip_frames(path, n, size=336, mode="middle", keyframes_only=False, rng=None,
                     span=None) -> np.ndarray:
    """n frames resized (short side = size, bicubic) and center-cropped: (n, size, size, 3)
    uint8."""
    frames = read_frames(path, n, mode, size, keyframes_only, rng, span=span)
    return np.ascontiguousarray(center_crop(frames, size))


def read_sample(job) -> np.ndarray:
    """A training sample's frames, in a decode worker: job = (key, path, is_image, n, size, mode,
    seed, span), the seed (a list of ints) fixing the random frames whichever process reads them;
    (1, size, size, 3) for an image. Anything that goes wrong is a VideoError that starts with the
    path."""
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
    """The normalization a model was trained with: preprocessor_config.json's image_mean and
    image_std when its folder has one, else CLIP's. Captioning and training both take it from
    here."""
    import json
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return CLIP_MEAN, CLIP_STD
    with open(path) as f:
        config = json.load(f)
    mean, std = config.get("image_mean", CLIP_MEAN), config.get("image_std", CLIP_STD)
    if not all(isinstance(v, list | tuple) and len(v) == 3
               and all(isinstance(x, int | float) for x in v)
               for v in (mean, std)) or min(std) <= 0:
        raise ValueError(f"{path}: image_mean and image_std must be three numbers each (std > 0)")
    return tuple(mean), tuple(std)


def normalize(frames, mean=CLIP_MEAN, std=CLIP_STD, device=None, dtype=None):
    """(..., H, W, 3) uint8 -> (..., 3, H, W) normalized floats, on `device` (send uint8, not
    floats). Computed in fp32 and cast once to `dtype` at the end, as transformers' processor does
    (bf16 arithmetic would round three times)."""
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
    """A video's (or a span's) n frames (segment middles) as base64 JPEG data URLs, for a vision
    API."""
    frames = read_frames(path, n, "middle", max_side=max_side, span=span)
    return ["data:image/jpeg;base64," + base64.b64encode(jpeg(f, q)).decode() for f in frames]

