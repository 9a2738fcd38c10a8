"""How a video's frame features become a fixed number of LLM tokens.

PLLaVA's answer is adaptive average pooling in 3-D: (T, H, W) features -> (T', H', W') tokens, so
the LLM sees every frame's place in time (T' = T = 16) at a quarter of the spatial grid (24x24 ->
12x12). Beside it are the two strategies the report argues against: Video-ChatGPT's (the toy's
--ablations train with it) and plain concatenation (for teaching; tests/test_pool.py holds it):

  "pllava"  (B, T, H, W, D) -> (B, T'*H'*W', D)   adaptive 3-D average pooling
  "vcgpt"   (B, T, H, W, D) -> (B, T + H*W, D)      Video-ChatGPT: per-frame mean over space,
                                                    then the per-position mean over time
  "concat"  (B, T, H, W, D) -> (B, T*H*W, D)        every token of every frame (compute-bound)
"""

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F


def adaptive_avg_pool3d(x: torch.Tensor, out_shape) -> torch.Tensor:
    """(B, T, H, W, D) -> (B, T', H', W', D): PLLaVA's own op, torch's adaptive average pooling.

    Along each axis, output cell i averages inputs [floor(i*n/m), ceil((i+1)*n/m)) of n inputs for
    m outputs: windows may overlap when m does not divide n, and when m > n an input is copied into
    several outputs, which is how T < T' frames get stretched in time. A 3-D cell averages the box
    that its three windows span. (tests/test_pool.py holds this equal to those windows written
    out.)"""
    # D moved into the channels and back out
    return F.adaptive_avg_pool3d(x.movedim(-1, 1), tuple(out_shape)).movedim(1, -1)


def vcgpt(x: torch.Tensor) -> torch.Tensor:
    """(B, T, H, W, D) -> (B, T + H*W, D): Video-ChatGPT's pooling."""
    B, T, H, W, D = x.shape
    temporal = x.mean(dim=(2, 3))                    # (B, T, D): what happens, frame by frame
    spatial = x.mean(dim=1).reshape(B, H * W, D)     # (B, H*W, D): where, time averaged
    return torch.cat([temporal, spatial], dim=1)


class Strategy(NamedTuple):
    pool: Callable    # (x (B, T, H, W, D), out_shape) -> (B, N, D), flattened in (t, h, w) order
    count: Callable   # (out_shape, frames, grid) -> N, not run (Config.num_visual_tokens)


# A new strategy is a function and its token count, added here; Config(pooling=name) picks it.
STRATEGIES = {"pllava": Strategy(lambda x, shape: adaptive_avg_pool3d(x, shape).flatten(1, 3),
                                 lambda shape, frames, grid: math.prod(shape)),
              "vcgpt": Strategy(lambda x, shape: vcgpt(x),
                                lambda shape, frames, grid: frames + grid * grid),
              "concat": Strategy(lambda x, shape: x.flatten(1, 3),
                                 lambda shape, frames, grid: frames * grid * grid)}


def strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown pooling {name!r}; expected one of {tuple(STRATEGIES)}")
    return STRATEGIES[name]


def pool_tokens(x: torch.Tensor, name: str, out_shape) -> torch.Tensor:
    """(B, T, H, W, D) frame features -> (B, N, D) visual tokens, flattened in (t, h, w) order."""
    return strategy(name).pool(x, out_shape)


def num_tokens(name: str, out_shape, frames: int, grid: int) -> int:
    """How many visual tokens one video becomes (grid: patches per side of a frame)."""
    return strategy(name).count(out_shape, frames, grid)
