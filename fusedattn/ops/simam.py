"""SimAM ops and their dispatch (math: ``fusedattn.reference.simam``, fusedattn/spec/simam.md).

Ops (namespace ``fusedattn``):
  ``simam_forward(x, e_lambda) -> (y, mu, inv)``   C++; CPU kernel (and CUDA when built)
  ``simam_backward(grad, x, mu, inv) -> dx``       C++
  ``simam_forward_triton`` / ``simam_backward_triton``  the same contract, Triton kernels

``mu`` and ``inv = 1/(4 (v + e_lambda))`` are per plane, shape (N, C), fp32 (fp64 for fp64 x);
autograd saves x, mu and inv, nothing of x's size beyond x. Every op has a fake kernel giving the
real strides (output in the layout the kernel reads: x's own when contiguous or dense
channels-last, else contiguous), and the backward is an op too, so torch.compile traces through
with no graph break.

Decisions where the spec is silent: under autocast the op runs in the input's dtype (its math is
fp32 anyway; no autocast kernel is registered); ``e_lambda = 0`` with a constant plane gives NaN,
as the authors' formula does.
"""
from __future__ import annotations

import math

import torch

from .. import dispatch, reference
from . import layout, library
from .norm import first_order

_FWD = "fusedattn::simam_forward"
_BWD = "fusedattn::simam_backward"
_FWD_TRITON = "fusedattn::simam_forward_triton"
_BWD_TRITON = "fusedattn::simam_backward_triton"


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(x: torch.Tensor, e_lambda: float):
    x = layout.readable(x)
    stats = x.new_empty(x.shape[:2], dtype=_stat_dtype(x.dtype))
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _fake_backward(grad, x, mu, inv):
    return torch.empty_like(layout.readable(x))


# --------------------------------------------------------------------------- Triton ops

@torch.library.custom_op(_FWD_TRITON, mutates_args=())
def _forward_triton(x: torch.Tensor, e_lambda: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..triton_kernels import simam as kernels
    return kernels.forward(layout.readable(x), e_lambda)


@torch.library.custom_op(_BWD_TRITON, mutates_args=())
def _backward_triton(grad: torch.Tensor, x: torch.Tensor, mu: torch.Tensor,
                     inv: torch.Tensor) -> torch.Tensor:
    from ..triton_kernels import simam as kernels
    x = layout.readable(x)
    return kernels.backward(layout.in_layout_of(grad, x), x, mu, inv)


# --------------------------------------------------------------------------- registration

_BACKWARD_OF = {_FWD: _BWD, _FWD_TRITON: _BWD_TRITON}


_op = library.op


def _setup_context(ctx, inputs, output):
    x, _ = inputs
    _, mu, inv = output
    ctx.save_for_backward(x, mu, inv)
    ctx.mark_non_differentiable(mu, inv)


def _make_backward(bwd_name: str):
    def backward(ctx, grad_y, grad_mu, grad_inv):
        x, mu, inv = ctx.saved_tensors
        return first_order("SimAM", (_op(bwd_name)(grad_y, x, mu, inv), None))
    return backward


def _register(fwd: str) -> None:
    library.register(fwd, _BACKWARD_OF[fwd], _fake_forward, _fake_backward,
                     _make_backward(_BACKWARD_OF[fwd]), _setup_context)


_register(_FWD_TRITON)
if library.native_schema(_FWD):
    _register(_FWD)

_FORWARD_OF_BACKEND = {"cpu": _FWD, "cuda": _FWD, "triton": _FWD_TRITON}


# --------------------------------------------------------------------------- public function

def check_args(x: torch.Tensor, e_lambda: float) -> None:
    """The spec's bad-input rules: TypeError / ValueError naming the problem."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"simam: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"simam: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 3:
        raise ValueError(f"simam: expected shape (N, C, *spatial) with at least one spatial "
                         f"dim, got shape {tuple(x.shape)}")
    check_lambda(e_lambda)


def check_lambda(e_lambda: float) -> None:
    if not isinstance(e_lambda, (int, float)) or isinstance(e_lambda, bool):
        raise TypeError(f"simam: e_lambda must be a real number, got {type(e_lambda).__name__}")
    if not math.isfinite(e_lambda) or e_lambda < 0:
        raise ValueError(f"simam: e_lambda must be finite and >= 0, got {e_lambda}")


def simam(x: torch.Tensor, e_lambda: float = 1e-4) -> torch.Tensor:
    """SimAM: ``y = x * sigmoid((x - mu)^2 / (4 (v + e_lambda)) + 1/2)`` per (n, c) plane, on the
    backend chosen by :mod:`fusedattn.dispatch`. ``x``: (N, C, *spatial), fp16/bf16/fp32/fp64;
    the output has x's dtype and memory format."""
    check_args(x, e_lambda)
    if x.numel() == 0:
        return x.clone()
    backend = dispatch.select("simam", x)
    if backend == "eager":
        return reference.simam(x, e_lambda)
    y, _, _ = _op(_FORWARD_OF_BACKEND[backend])(layout.readable(x), float(e_lambda))
    return y
