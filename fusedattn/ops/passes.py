"""The six generic attention passes as ops (math: fusedattn/spec/passes.md; eager statement:
``fusedattn.ops.pass_reference``): ``fusedattn::<pass>`` (C++, CPU and CUDA kernels) and
``fusedattn::<pass>_triton`` (custom ops over ``triton_kernels/passes.py``), one contract, fake
kernels for both. :func:`passes` gives a backend's six ops; SE, ECA, CBAM and HAM call nothing
else on full-size tensors."""
from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch

Tensor = torch.Tensor
NAMES = ("pool_pixels", "pool_channels", "gate", "gate_grad_s", "grad_a", "grad_x")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fakes():
    def small(x, *shape, dtype=None):
        return x.new_empty(shape, dtype=dtype or acc_dtype(x.dtype))

    def groups(group):
        return 1 if group is None else 2

    def pool_pixels(x, with_max):
        N, C = x.shape[:2]
        if not with_max:
            return small(x, N, C), small(x, 0), small(x, 0, dtype=torch.int32)
        return small(x, N, C), small(x, N, C), small(x, N, C, dtype=torch.int32)

    def pool_channels(x, a, group, size0, size1):
        N, G, P = x.shape[0], groups(group), x.shape[2] * x.shape[3]
        return small(x, N, G, P), small(x, N, G, P), small(x, N, G, P, dtype=torch.int32)

    def gate(x, a, s, group):
        return torch.empty_like(x)

    def gate_grad_s(dy, x, a, group):
        return small(x, x.shape[0], groups(group), x.shape[2] * x.shape[3])

    def grad_a(x, dy, s, group, d_avg, d_max, argmax, size0, size1):
        return small(x, x.shape[0], x.shape[1])

    def grad_x(dy, a, s, group, d_avg, d_max, argmax, size0, size1, d_mean_c, d_max_c, argmax_c):
        return torch.empty_like(dy)

    return dict(zip(NAMES, (pool_pixels, pool_channels, gate, gate_grad_s, grad_a, grad_x)))


def _register_fakes(suffix: str = "") -> None:
    for name, fake in _fakes().items():
        torch.library.register_fake(f"fusedattn::{name}{suffix}")(fake)


if dispatch._native()[0] is not None:  # the C++ schemas exist only when _C loaded
    _register_fakes()


# ----------------------------------------------------------------------------- Triton ops

def _kernels():
    from ..triton_kernels import passes as kernels
    return kernels


@torch.library.custom_op("fusedattn::pool_pixels_triton", mutates_args=())
def _pool_pixels_triton(x: Tensor, with_max: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().pool_pixels(x, with_max)


@torch.library.custom_op("fusedattn::pool_channels_triton", mutates_args=())
def _pool_channels_triton(x: Tensor, a: Tensor, group: Optional[Tensor], size0: int,
                          size1: int) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels().pool_channels(x, a, group, size0, size1)


@torch.library.custom_op("fusedattn::gate_triton", mutates_args=())
def _gate_triton(x: Tensor, a: Tensor, s: Optional[Tensor], group: Optional[Tensor]) -> Tensor:
    return _kernels().gate(x, a, s, group)


@torch.library.custom_op("fusedattn::gate_grad_s_triton", mutates_args=())
def _gate_grad_s_triton(dy: Tensor, x: Tensor, a: Tensor, group: Optional[Tensor]) -> Tensor:
    return _kernels().gate_grad_s(dy, x, a, group)


@torch.library.custom_op("fusedattn::grad_a_triton", mutates_args=())
def _grad_a_triton(x: Tensor, dy: Tensor, s: Optional[Tensor], group: Optional[Tensor],
                   d_avg: Optional[Tensor], d_max: Optional[Tensor], argmax: Optional[Tensor],
                   size0: int, size1: int) -> Tensor:
    return _kernels().grad_a(x, dy, s, group, d_avg, d_max, argmax, size0, size1)


@torch.library.custom_op("fusedattn::grad_x_triton", mutates_args=())
def _grad_x_triton(dy: Tensor, a: Tensor, s: Optional[Tensor], group: Optional[Tensor],
                   d_avg: Optional[Tensor], d_max: Optional[Tensor], argmax: Optional[Tensor],
                   size0: int, size1: int, d_mean_c: Tensor, d_max_c: Optional[Tensor],
                   argmax_c: Optional[Tensor]) -> Tensor:
    return _kernels().grad_x(dy, a, s, group, d_avg, d_max, argmax, size0, size1, d_mean_c,
                             d_max_c, argmax_c)


_register_fakes("_triton")


def op(name: str):
    return getattr(torch.ops.fusedattn, name).default


def passes(backend: str) -> dict:
    """The six pass ops of a fused backend, by pass name: the C++ ops (their CPU or CUDA kernel
    by the tensor's device) for ``cpu`` and ``cuda``, the Triton custom ops for ``triton``."""
    suffix = "_triton" if backend == "triton" else ""
    return {name: op(name + suffix) for name in NAMES}
