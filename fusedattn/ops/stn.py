"""Affine sampling of the spatial transformer (Jaderberg et al. 2015), fused: the math of
``F.grid_sample(x, F.affine_grid(theta, (N, C, Ho, Wo), align_corners), "bilinear", "zeros",
align_corners)`` with the sampling coordinates computed inside the kernel (no grid tensor).

Ops (namespace ``fusedattn``), one contract for every backend:

  ``affine_sample(x, theta, Ho, Wo, align_corners) -> y``                         C++ (CPU, CUDA)
  ``affine_sample_backward(dy, x, theta, align_corners, need_dx, need_dtheta)
      -> (dx | None, dtheta | None)``                                             C++ (CPU, CUDA)
  ``affine_sample_triton`` / ``affine_sample_backward_triton``                    Triton
      (``triton_kernels.stn.forward`` / ``.backward`` with the same arguments and results)

Math (``csrc/stn_math.h`` holds the C++ form, shared by the CPU and CUDA kernels). Output pixel
(i, j) of sample n reads input point (ix, iy), in pixels of the H x W input. affine_grid's base
grid is xb = u bsx, yb = v bsy with u = j - (Wo-1)/2, v = i - (Ho-1)/2, and grid_sample maps
gx = t00 xb + t01 yb + t02 (t = theta[n]) to ix = (gx + 1) sx - off; composed, with the scale
factors folded into the coefficients (evaluated in this order)::

    ix = (Ax u + Bx v) + Cx,  Ax = t00 rxw, Bx = t01 rxh, Cx = t02 sx + (W-1)/2
    iy = (Ay u + By v) + Cy,  Ay = t10 ryw, By = t11 ryh, Cy = t12 sy + (H-1)/2
    align_corners=False: bsx = 2/Wo, sx = W/2, rxw = W/Wo, rxh = W/Ho, ryw = H/Wo, ryh = H/Ho
    align_corners=True:  bsx = 2/(Wo-1), sx = (W-1)/2, rxw = (W-1)/(Wo-1), ... (a ratio or
                         bsx with a zero denominator, i.e. a size-1 output, is 0)
    x0 = floor(ix), tx = ix - x0, y0, ty alike;
    y[n, c, i, j] = sum over the corners (x0 | x0+1, y0 | y0+1) inside the image of
                    (1-tx | tx) (1-ty | ty) x[n, c, corner]          (zeros padding)

This form is exact where samples meet pixel lines most: the identity, flips and quarter turns
(entries exactly 0, +-1) between equal sizes give whole or half pixel coordinates without
rounding. On a pixel line bilinear sampling has a kink; dtheta there is the derivative on the
side floor() picks (the corner at and after the line). PyTorch's grid rounds such coordinates
up or down pixel by pixel (differently on CPU and CUDA), so there its dtheta mixes the two sides:
a tie-break, not a difference in the function.
A coordinate whose floor is outside [-1, W-1] (far outside the image, inf, NaN) has no corner: 0.
Gradients (grid_sample's and affine_grid's backward, composed):

    dx[n, c, p, q] = sum of w dy[n, c, i, j] over the output pixels (i, j) that read (p, q) with
                     weight w: gathered per input pixel, candidates visited row-major over the
                     preimage of [q-1, q+1] x [p-1, p+1] (rows, then each row's columns;
                     ``stn_math.h``), no atomics
    gix = sum_c dy[n,c,i,j] ((v_ne - v_nw)(1 - ty) + (v_se - v_sw) ty) sx
    giy = sum_c dy[n,c,i,j] ((v_sw - v_nw)(1 - tx) + (v_se - v_ne) tx) sy   (v: corner values,
                     0 outside the image)
    dtheta[n] = sum over (i, j) of [gix; giy] (xb, yb, 1)    a per-sample reduction, fixed order
                     (sx = W/2 or (W-1)/2, sy alike, as grid_sample's unnormalisation)

A singular theta (a rank-1 or zero linear part) is sampled as PyTorch samples it: many output
pixels read the same input points; the gather then scans all output rows (slower, same result).

Arguments:
  x      (N, C, H, W), fp16 / bf16 / fp32 / fp64, contiguous or dense channels-last (anything else:
         the caller copies it to contiguous); H, W >= 1.
  theta  (N, 2, 3) contiguous, in the accumulation dtype: fp32 (fp64 for fp64 x). The public
         function casts any floating theta to it (autograd takes dtheta back to theta's dtype).
  Ho, Wo >= 1; align_corners as in affine_grid / grid_sample.
  dy     (N, C, Ho, Wo), x's dtype, any strides (read in y's layout; copied when different).
  need_dx, need_dtheta: which gradients to compute (the other comes back None).
Every tensor and y below 2^31 elements (the GPU kernels index with 32 bits).

Results: y (N, C, Ho, Wo) in x's dtype and memory format (channels-last x: channels-last y);
dx like x (its strides); dtheta (N, 2, 3) contiguous in theta's dtype. N = 0 or C = 0: empty
results and dtheta zeros. Accumulation in fp32 (fp64 for fp64 x). Results are bitwise the same
from run to run and for any number of threads: every output element and every theta row has one
summation order, fixed by the shape.
"""
from __future__ import annotations

import torch

from .. import dispatch, reference
from . import layout, library
from .norm import first_order

_FWD = "fusedattn::affine_sample"
_BWD = "fusedattn::affine_sample_backward"
_FWD_TRITON = "fusedattn::affine_sample_triton"
_BWD_TRITON = "fusedattn::affine_sample_backward_triton"

_FWD_SCHEMA = "(Tensor x, Tensor theta, int Ho, int Wo, bool align_corners) -> Tensor"
_BWD_SCHEMA = ("(Tensor dy, Tensor x, Tensor theta, bool align_corners, bool need_dx, "
               "bool need_dtheta) -> (Tensor? dx, Tensor? dtheta)")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The format of y and of what the kernels read: x's (contiguous unless x is dense
    channels-last and not also contiguous)."""
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last


def empty_output(x: torch.Tensor, Ho: int, Wo: int) -> torch.Tensor:
    return torch.empty((x.shape[0], x.shape[1], Ho, Wo), dtype=x.dtype, device=x.device,
                       memory_format=memory_format(x))


# --------------------------------------------------------------------------- fake kernels

def _fake_forward(x, theta, Ho, Wo, align_corners):
    return empty_output(x, Ho, Wo)


def _fake_backward(dy, x, theta, align_corners, need_dx, need_dtheta):
    return (torch.empty_like(x) if need_dx else None,
            torch.empty_like(theta) if need_dtheta else None)


# --------------------------------------------------------------------------- Triton ops

@torch.library.custom_op(_FWD_TRITON, mutates_args=(), schema=_FWD_SCHEMA)
def _forward_triton(x, theta, Ho, Wo, align_corners):
    from ..triton_kernels import stn as kernels
    return kernels.forward(x, theta, Ho, Wo, align_corners)


@torch.library.custom_op(_BWD_TRITON, mutates_args=(), schema=_BWD_SCHEMA)
def _backward_triton(dy, x, theta, align_corners, need_dx, need_dtheta):
    from ..triton_kernels import stn as kernels
    return kernels.backward(dy, x, theta, align_corners, need_dx, need_dtheta)


# --------------------------------------------------------------------------- registration

_BACKWARD_OF = {_FWD: _BWD, _FWD_TRITON: _BWD_TRITON}


_op = library.op


def _setup_context(ctx, inputs, output):
    x, theta, Ho, Wo, align_corners = inputs
    ctx.save_for_backward(x, theta)  # x and theta only: the coordinates are recomputed
    ctx.align_corners = align_corners


def _make_backward(bwd_name: str):
    def backward(ctx, dy):
        x, theta = ctx.saved_tensors
        need_dx, need_dtheta = ctx.needs_input_grad[:2]
        if not (need_dx or need_dtheta):
            return None, None, None, None, None
        dx, dtheta = _op(bwd_name)(dy, x, theta, ctx.align_corners, need_dx, need_dtheta)
        return first_order("SpatialTransformer", (dx, dtheta, None, None, None))
    return backward


def _register(fwd: str) -> None:
    library.register(fwd, _BACKWARD_OF[fwd], _fake_forward, _fake_backward,
                     _make_backward(_BACKWARD_OF[fwd]), _setup_context)


_register(_FWD_TRITON)
if library.native_schema(_FWD):
    _register(_FWD)

_FORWARD_OF_BACKEND = {"cpu": _FWD, "cuda": _FWD, "triton": _FWD_TRITON}


# --------------------------------------------------------------------------- public function

def output_size(x: torch.Tensor, size) -> tuple[int, int]:
    """(Ho, Wo) from ``size``: None (x's H, W), (Ho, Wo), or affine_grid's (N, C, Ho, Wo) with
    x's N and C."""
    if size is None:
        return int(x.shape[2]), int(x.shape[3])
    if isinstance(size, int) or not all(isinstance(s, (int, torch.SymInt)) and
                                        not isinstance(s, bool) for s in size):
        raise TypeError(f"affine_sample: size must be None, (Ho, Wo) or (N, C, Ho, Wo) of ints, "
                        f"got {size!r}")
    size = tuple(size)
    if len(size) == 4:
        if tuple(size[:2]) != tuple(x.shape[:2]):
            raise ValueError(f"affine_sample: size {size} must have x's N and C "
                             f"{tuple(x.shape[:2])}")
        size = size[2:]
    if len(size) != 2:
        raise ValueError(f"affine_sample: size must be (Ho, Wo) or (N, C, Ho, Wo), got {size}")
    if size[0] < 1 or size[1] < 1:
        raise ValueError(f"affine_sample: the output size must be positive, got {size}")
    return size[0], size[1]


def check_args(x, theta, align_corners) -> None:
    """The contract's bad-input rules: TypeError / ValueError naming the problem."""
    for name, t in (("x", x), ("theta", theta)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"affine_sample: {name} must be a floating-point tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"affine_sample: x must have shape (N, C, H, W), got {tuple(x.shape)}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"affine_sample: x must have a positive H and W, got {tuple(x.shape)}")
    if tuple(theta.shape) != (x.shape[0], 2, 3):
        raise ValueError(f"affine_sample: theta must have shape (N, 2, 3) = "
                         f"{(x.shape[0], 2, 3)}, got {tuple(theta.shape)}")
    if theta.device != x.device:
        raise ValueError(f"affine_sample: theta is on {theta.device}, x on {x.device}")
    if not isinstance(align_corners, bool):
        raise TypeError(f"affine_sample: align_corners must be a bool, got {align_corners!r}")


def affine_sample(x: torch.Tensor, theta: torch.Tensor, size=None,
                  align_corners: bool = False) -> torch.Tensor:
    """``F.grid_sample(x, F.affine_grid(theta, size, align_corners), mode="bilinear",
    padding_mode="zeros", align_corners=align_corners)`` without the grid tensor, on the backend
    chosen by :mod:`fusedattn.dispatch` for "stn" (``eager`` runs exactly that pair).

    x (N, C, H, W) and theta (N, 2, 3); ``size`` None (x's H, W), (Ho, Wo) or affine_grid's
    (N, C, Ho, Wo). y (N, C, Ho, Wo) has x's dtype and memory format. theta may have any
    floating dtype: it is used in fp32 (fp64 for fp64 x) and its gradient comes back in its own
    dtype. Under autocast the op runs in the dtype x arrives in (no autocast kernel: the
    coordinates and sums are fp32 anyway). Autograd keeps x and theta only. See the module
    docstring for the math, the gradients and singular theta."""
    check_args(x, theta, align_corners)
    Ho, Wo = output_size(x, size)
    backend = dispatch.select("stn", x)
    if backend == "eager":
        return reference.affine_sample(x, theta, (Ho, Wo), align_corners)
    x = layout.readable(x)
    theta = theta.to(acc_dtype(x.dtype)).contiguous()
    return _op(_FORWARD_OF_BACKEND[backend])(x, theta, Ho, Wo, align_corners)
