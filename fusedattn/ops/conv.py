"""Same-padded stride-1 convolutions without bias for the thin (n, pixel) maps of HAM's and CBAM's
spatial branches: ``fusedattn::same_conv2d`` / ``same_conv2d_weight_grad`` on CPU tensors
(csrc/cpu/conv.cpp; oneDNN is slow for maps with a few channels), cuDNN elsewhere."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch


def _register_fakes() -> None:
    @torch.library.register_fake("fusedattn::same_conv2d")
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[0], *x.shape[2:])

    @torch.library.register_fake("fusedattn::same_conv2d_weight_grad")
    def _(dy, x, k):
        return x.new_empty(dy.shape[1], x.shape[1], k, k)


if dispatch._native()[0] is not None:  # the C++ schemas exist only when _C loaded
    _register_fakes()


def _op(name: str):
    return getattr(torch.ops.fusedattn, name).default


def same_conv(x, w):
    """Same-padded conv without bias: ``fusedattn::same_conv2d`` on CPU (oneDNN is slow for maps
    with a few channels), F.conv2d (cuDNN) elsewhere."""
    if x.device.type == "cpu":
        return _op("same_conv2d")(x, w)
    return F.conv2d(x, w, padding=w.shape[-1] // 2)


def same_conv_weight_grad(dy, x, k):
    """The weight gradient of same_conv(x, w) for a k x k kernel."""
    if x.device.type == "cpu":
        return _op("same_conv2d_weight_grad")(dy, x, k)
    w = x.new_empty(dy.shape[1], x.shape[1], k, k)
    return torch.ops.aten.convolution_backward(
        dy, x, w, None, [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], 1, [False, True, False])[1]


def same_conv_input_grad(dz, w):
    """The input gradient of same_conv(x, w): the same-padded conv of dz with the flipped,
    transposed kernel (oneDNN's convolution_backward for the input is ~10x slower than a forward
    conv on CPU)."""
    return same_conv(dz, w.flip(-1, -2).transpose(0, 1).contiguous())
