"""Attention-augmented convolution: the fused 2-D relative self-attention (math: below,
``fusedattn.reference.rel_attention`` and ``AugmentedConv2d``, fusedattn/spec/aaconv.md).

Ops (namespace ``fusedattn``), one contract for every backend:

  ``rel_attention(q, k, v, rel_h, rel_w, H, W, scale) -> (out, lse)``            C++ (CPU)
  ``rel_attention_backward(dout, q, k, v, rel_h, rel_w, out, lse, H, W, scale)
      -> (dq, dk, dv, drel_h, drel_w)``                                          C++ (CPU)
  ``rel_attention_triton`` / ``rel_attention_backward_triton``                   Triton
      (``triton_kernels.aaconv.forward`` / ``.backward`` with the same arguments and results)

Per (n, head), with L = H W and query pixel i = iy W + ix, key pixel j = jy W + jx::

    logit[i, j] = scale (q_i . k_j + q_i . rel_w[jx - ix + W - 1] + q_i . rel_h[jy - iy + H - 1])
    out_i = sum_j softmax_j(logit[i, :]) v_j;   lse_i = log sum_j exp(logit[i, j])

Inputs:
  q, k   (N, Nh, L, dkh), v (N, Nh, L, dvh): any strides (the module passes strided views of the
         qkv convolution's output, element (n, h, i, d) at n s0 + h s1 + i s2 + d s3 with s2 = 1,
         s3 = L), one floating dtype (fp16, bf16, fp32, fp64), one device; dkh >= 1, dvh >= 1.
  rel_h  (2H - 1, dkh), rel_w (2W - 1, dkh): q's dtype and device, any strides; both given or both
         None (relative=False: the two terms are absent). Shared by all heads.
  H, W   the grid, H W = L <= 4096 (larger grids raise a ValueError / RuntimeError naming the
         limit); scale a float (the module passes dkh ** -0.5).
  dout   like out (any strides); out, lse as the forward returned them.

Outputs (the layout every backend returns, and the fake kernels give):
  out    shape (N, Nh, L, dvh), q's dtype, with memory ordered (N, Nh, dvh, L): strides
         (Nh dvh L, dvh L, 1, L), i.e. ``torch.empty(N, Nh, dvh, L).transpose(2, 3)``. So
         ``out.transpose(2, 3).reshape(N, Nh * dvh, H, W)`` is a view: the attention output as
         the (N, dv, H, W) map, head-major channels, without a copy.
  lse    (N, Nh, L) contiguous; fp32 (fp64 for fp64 inputs).
  dq, dk, dv  shapes of q, k, v, q's dtype, memory ordered (N, Nh, d, L) like out:
         ``torch.empty(N, Nh, d, L).transpose(2, 3)`` (the qkv convolution's channel-major layout).
  drel_h, drel_w  (2H - 1, dkh), (2W - 1, dkh) contiguous, rel's dtype; None without tables.

Numerics: accumulation in fp32 (fp64 for fp64 inputs), softmax with a running maximum; the
backward recomputes the probabilities from q, k, the tables and lse (no (HW)^2 tensor anywhere);
results are bitwise the same from run to run and for any number of threads (no atomics; the
relative tables' gradients are reduced in a fixed order).
"""
from __future__ import annotations

import torch

from .. import dispatch, reference
from . import library
from .norm import first_order

_FWD = "fusedattn::rel_attention"
_BWD = "fusedattn::rel_attention_backward"
_FWD_TRITON = "fusedattn::rel_attention_triton"
_BWD_TRITON = "fusedattn::rel_attention_backward_triton"

MAX_PIXELS = 4096  # H W; csrc/aaconv_check.h kMaxPixels

_FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? rel_h, Tensor? rel_w, int H, int W, "
               "float scale) -> (Tensor out, Tensor lse)")
_BWD_SCHEMA = ("(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? rel_h, Tensor? rel_w, "
               "Tensor out, Tensor lse, int H, int W, float scale) "
               "-> (Tensor dq, Tensor dk, Tensor dv, Tensor? drel_h, Tensor? drel_w)")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_channel_major(like: torch.Tensor, d: int) -> torch.Tensor:
    """An (N, Nh, L, d) tensor in the ops' result layout: memory ordered (N, Nh, d, L)."""
    N, Nh, L = like.shape[:3]
    return like.new_empty(N, Nh, d, L).transpose(2, 3)


# --------------------------------------------------------------------------- fake kernels

def _fake_forward(q, k, v, rel_h, rel_w, H, W, scale):
    return (empty_channel_major(q, v.shape[3]),
            q.new_empty(q.shape[:3], dtype=_acc_dtype(q.dtype)))


def _fake_backward(dout, q, k, v, rel_h, rel_w, out, lse, H, W, scale):
    dkh, dvh = q.shape[3], v.shape[3]
    tables = [None if t is None else t.new_empty(t.shape) for t in (rel_h, rel_w)]
    return (empty_channel_major(q, dkh), empty_channel_major(q, dkh), empty_channel_major(q, dvh),
            *tables)


# --------------------------------------------------------------------------- Triton ops

@torch.library.custom_op(_FWD_TRITON, mutates_args=(), schema=_FWD_SCHEMA)
def _forward_triton(q, k, v, rel_h, rel_w, H, W, scale):
    from ..triton_kernels import aaconv as kernels
    return kernels.forward(q, k, v, rel_h, rel_w, H, W, scale)


@torch.library.custom_op(_BWD_TRITON, mutates_args=(), schema=_BWD_SCHEMA)
def _backward_triton(dout, q, k, v, rel_h, rel_w, out, lse, H, W, scale):
    from ..triton_kernels import aaconv as kernels
    return kernels.backward(dout, q, k, v, rel_h, rel_w, out, lse, H, W, scale)


# --------------------------------------------------------------------------- registration

_BACKWARD_OF = {_FWD: _BWD, _FWD_TRITON: _BWD_TRITON}


_op = library.op


def _setup_context(ctx, inputs, output):
    q, k, v, rel_h, rel_w, H, W, scale = inputs
    out, lse = output
    # q, k, v: the module's views of the qkv convolution's output (its storage, nothing more)
    ctx.save_for_backward(q, k, v, rel_h, rel_w, out, lse)
    ctx.grid = (H, W, scale)
    ctx.mark_non_differentiable(lse)


def _make_backward(bwd_name: str):
    def backward(ctx, dout, _dlse):
        q, k, v, rel_h, rel_w, out, lse = ctx.saved_tensors
        H, W, scale = ctx.grid
        if dout is None:
            dout = torch.zeros_like(out)
        grads = _op(bwd_name)(dout, q, k, v, rel_h, rel_w, out, lse, H, W, scale)
        return first_order("AugmentedConv2d", (*grads, None, None, None))
    return backward


def _register(fwd: str) -> None:
    library.register(fwd, _BACKWARD_OF[fwd], _fake_forward, _fake_backward,
                     _make_backward(_BACKWARD_OF[fwd]), _setup_context)


_register(_FWD_TRITON)
if library.native_schema(_FWD):
    _register(_FWD)

_FORWARD_OF_BACKEND = {"cpu": _FWD, "cuda": _FWD, "triton": _FWD_TRITON}


# --------------------------------------------------------------------------- public function

def check_args(q, k, v, rel_h, rel_w, H, W) -> None:
    """The contract's bad-input rules: TypeError / ValueError naming the problem."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"rel_attention: {name} must be a floating-point tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"rel_attention: {name} must have shape (N, Nh, H W, d), got "
                             f"{tuple(t.shape)}")
    if not all(isinstance(s, (int, torch.SymInt)) and not isinstance(s, bool) for s in (H, W)) \
            or H < 1 or W < 1:
        raise ValueError(f"rel_attention: H and W must be positive ints, got {H!r}, {W!r}")
    if H * W > MAX_PIXELS:
        raise ValueError(f"rel_attention: the attention grid {H} x {W} = {H * W} pixels exceeds "
                         f"the limit of {MAX_PIXELS} pixels (64 x 64)")
    N, Nh, L, dkh = q.shape
    if L != H * W:
        raise ValueError(f"rel_attention: q has {L} pixels, expected H W = {H} x {W} = {H * W}")
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"rel_attention: expected k of q's shape {tuple(q.shape)} and v of shape "
                         f"{(N, Nh, L)} + (dvh,), got {tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"rel_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}")
    if dkh < 1 or v.shape[3] < 1:
        raise ValueError(f"rel_attention: head sizes must be >= 1, got dkh = {dkh}, "
                         f"dvh = {v.shape[3]}")
    if (rel_h is None) != (rel_w is None):
        raise ValueError("rel_attention: rel_h and rel_w must be given together or not at all")
    if rel_h is not None:
        for name, t, side in (("rel_h", rel_h, H), ("rel_w", rel_w, W)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (2 * side - 1, dkh):
                raise ValueError(f"rel_attention: expected {name} of shape "
                                 f"{(2 * side - 1, dkh)}, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else t!r}")


def rel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor | None,
                  rel_w: torch.Tensor | None, H: int, W: int, scale: float) -> torch.Tensor:
    """2-D relative self-attention, ``out`` of shape (N, Nh, H W, dvh) (see the module docstring
    for the math and the layouts), on the backend chosen by :mod:`fusedattn.dispatch` for
    "aaconv"; ``eager`` runs ``fusedattn.reference.rel_attention``.

    dtypes: q, k, v share one (fp16, bf16, fp32, fp64); the tables are cast to it (autograd
    takes their gradients back to theirs). Under autocast the op runs in the dtype q, k, v
    arrive in (no autocast kernel is registered: its accumulation is fp32 anyway), and the
    output has that dtype."""
    check_args(q, k, v, rel_h, rel_w, H, W)
    if rel_h is not None:
        rel_h, rel_w = rel_h.to(q.dtype), rel_w.to(q.dtype)
    backend = dispatch.select("aaconv", q)
    if backend == "eager":
        return reference.rel_attention(q, k, v, rel_h, rel_w, H, W, scale)
    out, _ = _op(_FORWARD_OF_BACKEND[backend])(q, k, v, rel_h, rel_w, H, W, float(scale))
    return out
