"""How a video's frame features become a fixed number of LLM tokens.

PLLaVA's answer is adaptive average pooling in 3-D: (T, H, W) features -> (T', H', W') tokens, so the
LLM sees every frame's place in time (T' = T = 16) at a quarter of the spatial grid (24x24 -> 12x12).
Beside it are the two strategies the seed argues against, kept for teaching and for the toy ablations:

  "pllava"  (B, T, H, W, D) -> (B, T'*H'*W', D)   adaptive 3-D average pooling
  "vcgpt"   (B, T, H, W, D) -> (B, T + H*W, D)      Video-ChatGPT: per-frame mean over space, followed
                                                    by the per-position mean over time
  "concat"  (B, T, H, W, D) -> (B, T*H*W, D)        every token of every frame (compute-bound)
"""

import math

import torch

STRATEGIES = ("pllava", "vcgpt", "concat")


def pooling_matrix(n_in: int, n_out: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D adaptive average pooling.

    Output cell i averages inputs [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out)), the same windows
    torch's AdaptiveAvgPool uses. Windows may overlap (non-divisible sizes) and, when n_out > n_in,
    an input is copied into several outputs, which is how T < T' frames get stretched in time."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, math.ceil((i + 1) * n_in / n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m.to(dtype=dtype, device=device)


def adaptive_avg_pool3d(x: torch.Tensor, out_shape) -> torch.Tensor:
    """(B, T, H, W, D) -> (B, T', H', W', D).

    An average over a box is the product of three 1-D averages, so the 3-D pooling is three small
    matrix products, one per axis: no loops over output cells, and it runs in the features' dtype."""
    _, T, H, W, _ = x.shape
    t, h, w = out_shape
    pt, ph, pw = (pooling_matrix(n, m, x.dtype, x.device) for n, m in ((T, t), (H, h), (W, w)))
    return torch.einsum("pt,qh,rw,bthwd->bpqrd", pt, ph, pw, x)


def pool_tokens(x: torch.Tensor, strategy: str, out_shape) -> torch.Tensor:
    """(B, T, H, W, D) frame features -> (B, N, D) visual tokens, flattened in (t, h, w) order."""
    B, T, H, W, D = x.shape
    if strategy == "pllava":
        return adaptive_avg_pool3d(x, out_shape).reshape(B, -1, D)
    if strategy == "vcgpt":
        temporal = x.mean(dim=(2, 3))                    # (B, T, D): what happens, frame by frame
        spatial = x.mean(dim=1).reshape(B, H * W, D)     # (B, H*W, D): where things are, time averaged
        return torch.cat([temporal, spatial], dim=1)
    if strategy == "concat":
        return x.reshape(B, T * H * W, D)
    raise ValueError(f"unknown pooling {strategy!r}; expected one of {STRATEGIES}")


def num_tokens(strategy: str, out_shape, frames: int, grid: int) -> int:
    """How many visual tokens one video becomes (grid: patches per side of a frame)."""
    if strategy == "pllava":
        return math.prod(out_shape)
    if strategy == "vcgpt":
        return frames + grid * grid
    if strategy == "concat":
        return frames * grid * grid
    raise ValueError(f"unknown pooling {strategy!r}; expected one of {STRATEGIES}")
