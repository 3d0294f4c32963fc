"""Memory layouts the kernels read in place; mirrors ``csrc/layout.h`` so fake kernels give the
same output strides as the real ones.

A tensor ``(N, C, *S)`` is read without a copy when it is contiguous ("planar") or dense
channels-last of any rank (``channels_last``, ``channels_last_3d``, or ``(N, L, C)`` storage for
rank 3). Anything else is copied to contiguous first. Outputs are ``empty_like`` of what the
kernel reads, so they keep the input's memory format.
"""
from __future__ import annotations

import torch


def is_dense_channels_last(x: torch.Tensor) -> bool:
    """Strides of ``(N, C, S1..Sk)`` stored as ``(N, S1..Sk, C)``; size-1 dims are ignored."""
    expected = 1
    for dim in (1, *range(x.dim() - 1, 1, -1), 0):
        if x.shape[dim] != 1 and x.stride(dim) != expected:
            return False
        expected *= x.shape[dim]
    return True


def is_readable(x: torch.Tensor) -> bool:
    return x.is_contiguous() or is_dense_channels_last(x)


def readable(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when the kernels read its layout in place, else a contiguous copy."""
    return x if is_readable(x) else x.contiguous()


def in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with exactly the strides of ``like`` (copied only when they differ): grads can
    arrive with any strides, stride 0 included."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)
