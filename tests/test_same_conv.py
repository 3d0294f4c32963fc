"""fusedattn::same_conv2d and its weight gradient (HAM's spatial conv on CPU) against torch."""
import pytest
import torch
import torch.nn.functional as F

import fusedattn  # noqa: F401  (loads the ops)
from helpers import assert_close64

ops = torch.ops.fusedattn
SHAPES = [((2, 2, 7, 9), 1, 7), ((3, 1, 5, 4), 2, 7), ((1, 2, 3, 2), 1, 7), ((2, 3, 11, 6), 2, 3),
          ((1, 1, 1, 1), 1, 1), ((4, 2, 56, 56), 1, 7)]


@pytest.mark.parametrize("shape,out,k", SHAPES, ids=[f"{s}-{o}-{k}" for s, o, k in SHAPES])
def test_matches_torch_fp64(shape, out, k):
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(out, shape[1], k, k, dtype=torch.float64)
    y = ops.same_conv2d(x, w)
    assert_close64(y, F.conv2d(x, w, padding=k // 2), "y")
    dy = torch.randn_like(y)
    want = torch.ops.aten.convolution_backward(dy, x, w, None, [1, 1], [k // 2] * 2, [1, 1], False,
                                               [0, 0], 1, [False, True, False])[1]
    assert_close64(ops.same_conv2d_weight_grad(dy, x, k), want, "dw")


def test_fp32_close_and_views():
    x = torch.randn(4, 2, 28, 30)[:, :, 1:, ::1]  # a non-contiguous view
    w = torch.randn(1, 2, 7, 7).transpose(2, 3)
    torch.testing.assert_close(ops.same_conv2d(x, w), F.conv2d(x, w, padding=3), rtol=1e-5, atol=1e-5)
    dy = torch.randn(4, 1, 27, 30)
    want = torch.ops.aten.convolution_backward(dy, x, w, None, [1, 1], [3, 3], [1, 1], False,
                                               [0, 0], 1, [False, True, False])[1]
    torch.testing.assert_close(ops.same_conv2d_weight_grad(dy, x, 7), want, rtol=1e-4, atol=1e-4)


def test_opcheck():
    x, w = torch.randn(2, 2, 6, 5), torch.randn(1, 2, 3, 3)
    torch.library.opcheck(ops.same_conv2d, (x, w))
    torch.library.opcheck(ops.same_conv2d_weight_grad, (torch.randn(2, 1, 6, 5), x, 3))


def test_bad_input():
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(RuntimeError, match="odd k"):
        ops.same_conv2d(x, torch.randn(1, 2, 4, 4))
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.same_conv2d(x, torch.randn(1, 2, 3, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.same_conv2d(x.half(), torch.randn(1, 2, 3, 3).half())
    with pytest.raises(RuntimeError, match="must agree"):
        ops.same_conv2d_weight_grad(torch.randn(1, 1, 4, 5), x, 3)
    with pytest.raises(RuntimeError, match="k must be odd"):
        ops.same_conv2d_weight_grad(torch.randn(1, 1, 5, 5), x, 2)
