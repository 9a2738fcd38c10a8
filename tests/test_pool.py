"""pool.py: the 3-D pooling equals its windows written out (a box average is three 1-D averages), on
every shape, and the token order and the other strategies are what they say."""

import itertools
import math

import pytest
import torch

from pool import adaptive_avg_pool3d, num_tokens, pool_tokens


def window_matrix(n_in, n_out):
    """(n_out, n_in): output i averages inputs [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out))."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, math.ceil((i + 1) * n_in / n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def reference(x, out_shape):
    (_, T, H, W, _), (t, h, w) = x.shape, out_shape
    pt, ph, pw = (window_matrix(n, m).to(x.dtype) for n, m in ((T, t), (H, h), (W, w)))
    return torch.einsum("pt,qh,rw,bthwd->bpqrd", pt, ph, pw, x)

SHAPES = [((16, 24, 24), (16, 12, 12)), ((16, 24, 24), (1, 12, 12)), ((7, 5, 9), (3, 2, 4)),
          ((3, 24, 24), (16, 12, 12)), ((1, 4, 4), (4, 3, 3)), ((5, 7, 7), (5, 7, 7)),
          ((9, 11, 13), (4, 5, 6)), ((2, 3, 3), (5, 5, 5))]


@pytest.mark.parametrize("in_shape, out_shape", SHAPES)
def test_equals_its_windows_written_out(in_shape, out_shape):
    x = torch.randn(2, *in_shape, 6, dtype=torch.float64)           # (B, T, H, W, D)
    want = reference(x, out_shape)
    got = adaptive_avg_pool3d(x, out_shape)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_every_small_shape_float32():
    for T, H, t, h in itertools.product(range(1, 6), range(1, 6), range(1, 6), range(1, 6)):
        x = torch.randn(1, T, H, H + 1, 3)
        assert torch.allclose(adaptive_avg_pool3d(x, (t, h, h)), reference(x, (t, h, h)),
                              atol=1e-6), (T, H, t, h)


def test_tokens_in_t_h_w_order_and_other_strategies():
    x = torch.randn(2, 4, 6, 6, 5)
    tokens = pool_tokens(x, "pllava", (4, 3, 3))
    assert tokens.shape == (2, num_tokens("pllava", (4, 3, 3), 4, 6), 5)
    # token (t, h, w) is the mean of the 2x2 patch block (2h:2h+2, 2w:2w+2) of frame t
    assert torch.allclose(
        tokens[:, 1 * 9 + 2 * 3 + 0], x[:, 1, 4:6, 0:2].mean(dim=(1, 2)), atol=1e-6
    )
    vc = pool_tokens(x, "vcgpt", None)
    assert vc.shape == (2, num_tokens("vcgpt", None, 4, 6), 5) == (2, 4 + 36, 5)
    # frame 2, space-averaged
    assert torch.allclose(vc[:, 2], x[:, 2].mean(dim=(1, 2)), atol=1e-6)
    # position (1, 1), time-averaged
    assert torch.allclose(vc[:, 4 + 7], x[:, :, 1, 1].mean(dim=1), atol=1e-6)
    cat = pool_tokens(x, "concat", None)
    assert cat.shape == (2, 4 * 36, 5) and torch.equal(cat[:, 36 + 7], x[:, 1, 1, 1])
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_tokens(x, "max", None)
