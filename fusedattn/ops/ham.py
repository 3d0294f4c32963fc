"""HAM, fused (math: ``fusedattn.reference.HAM``, spec/ham.md).

The passes over full-size tensors are ops (``fusedattn::ham_*``, kernels in csrc/cpu/ham.cpp);
the work indexed by (n, c) or (n, pixel) — the channel conv, the channel split, the 7x7 conv,
BatchNorm, ReLU, sigmoid — stays in torch. Forward (x read three times, y written once)::

    mean_c, max_c, argmax_c = ham_pool_pixels(x)               # pass 1
    a = sigmoid(conv1d(add_c)); group = not important(a)        # small
    avg_g, max_g, argmax_g = ham_pool_channels(x, a, group)     # pass 2: f = a x never stored
    s_g = sigmoid(relu(bn(conv7x7([avg_g, max_g]))))            # small, per group
    y = ham_gate(x, a, s, group)                                # pass 3

Backward (x read twice, dy three times, dx written once, no full-size temporaries)::

    ds = ham_gate_grad_s(dy, x, a, group)                       # sum over the group's channels
    d_avg, d_max, d(conv, bn) <- autograd of the small spatial branch, recomputed
    da = ham_grad_a(x, dy, s, group, d_avg, d_max, argmax_g)    # sum over pixels
    d_mean_c, d_max_c, d(alpha, beta, conv1d) <- autograd of the small channel branch
    dx = ham_grad_x(dy, a, s, group, d_avg, d_max, argmax_g, d_mean_c, d_max_c, argmax_c)

Autograd keeps x plus small tensors (s is recomputed from the saved pooled maps; argmax indices
are int32). Maxima send their gradient to the first index attaining
them; a group's max that is a 0 of a masked-out channel sends none to x. BatchNorm runs through
the module itself in the forward (running statistics move once per non-empty group, as in the
reference) and is recomputed from the saved small maps in the backward without touching them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch
from . import layout

_OPS = ("ham_pool_pixels", "ham_pool_channels", "ham_gate", "ham_gate_grad_s", "ham_grad_a",
        "ham_grad_x")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_fakes() -> None:
    def small(x, *shape, dtype=None):
        return x.new_empty(shape, dtype=dtype or _acc(x.dtype))

    @torch.library.register_fake("fusedattn::ham_pool_pixels")
    def _(x):
        N, C = x.shape[:2]
        return small(x, N, C), small(x, N, C), small(x, N, C, dtype=torch.int32)

    @torch.library.register_fake("fusedattn::ham_pool_channels")
    def _(x, a, group, size0, size1):
        N, P = x.shape[0], x.shape[2] * x.shape[3]
        return small(x, N, 2, P), small(x, N, 2, P), small(x, N, 2, P, dtype=torch.int32)

    @torch.library.register_fake("fusedattn::ham_gate")
    def _(x, a, s, group):
        return torch.empty_like(x)

    @torch.library.register_fake("fusedattn::ham_gate_grad_s")
    def _(dy, x, a, group):
        return small(x, x.shape[0], 2, x.shape[2] * x.shape[3])

    @torch.library.register_fake("fusedattn::ham_grad_a")
    def _(x, dy, s, group, d_avg, d_max, argmax, size0, size1):
        return small(x, x.shape[0], x.shape[1])

    @torch.library.register_fake("fusedattn::ham_grad_x")
    def _(dy, a, s, group, d_avg, d_max, argmax, size0, size1, d_mean_c, d_max_c, argmax_c):
        return torch.empty_like(dy)


if dispatch._native()[0] is not None:  # the C++ schemas exist only when _C loaded
    _register_fakes()


def _op(name: str):
    return getattr(torch.ops.fusedattn, name).default


# ----------------------------------------------------------------------------- small branches

def channel_attention(mean_c, max_c, alpha, beta, w1):
    """a = sigmoid(conv1d_k((avg + max)/2 + alpha avg + beta max)), (N, C) in mean_c's dtype."""
    dt = mean_c.dtype
    add = 0.5 * (mean_c + max_c) + alpha.to(dt) * mean_c + beta.to(dt) * max_c
    k = w1.shape[-1]
    return torch.sigmoid(F.conv1d(add.unsqueeze(1), w1.to(dt), padding=k // 2)).squeeze(1)


def spatial_attention(avg, mx, hw, w_sp, bn_apply, sizes):
    """s (N, 2, P): per non-empty group g, sigmoid(relu(bn(conv([avg_g, max_g])))); zeros for an
    empty group (it gates no channel)."""
    N, _, P = avg.shape
    dt = avg.dtype
    out = []
    for g in (0, 1):
        if sizes[g] == 0:
            out.append(avg.new_zeros(N, 1, P))
            continue
        z = F.conv2d(torch.stack([avg[:, g], mx[:, g]], 1).view(N, 2, *hw), w_sp.to(dt),
                     padding=w_sp.shape[-1] // 2)
        out.append(torch.sigmoid(torch.relu(bn_apply(z))).view(N, 1, P))
    return torch.cat(out, 1)


def _bn_for_backward(bn, training: bool, weight, bias):
    """BatchNorm as the forward applied it, without touching the running statistics."""
    if training or bn.running_mean is None:
        return lambda z: F.batch_norm(z, None, None, weight.to(z.dtype), bias.to(z.dtype),
                                      True, 0.0, bn.eps)
    rm, rv = bn.running_mean.to(torch.float64), bn.running_var.to(torch.float64)
    return lambda z: F.batch_norm(z, rm.to(z.dtype), rv.to(z.dtype), weight.to(z.dtype),
                                  bias.to(z.dtype), False, 0.0, bn.eps)


def _bn_forward(bn):
    """The module's BatchNorm on a small map of the accumulation dtype (statistics update as in
    the reference: once per call)."""
    def apply(z):
        return bn(z.to(bn.weight.dtype)).to(z.dtype)
    return apply


class HAMFunction(torch.autograd.Function):
    """Fused HAM forward and backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, alpha, beta, w1, w_sp, bn_weight, bn_bias, module):
        C, hw = x.shape[1], tuple(x.shape[2:])
        sizes = (module.important, C - module.important)
        mean_c, max_c, arg_c = _op("ham_pool_pixels")(x)
        a = channel_attention(mean_c, max_c, alpha, beta, w1)
        from ..reference import ham_important_mask
        group = ~ham_important_mask(a, module.important)  # True: sub-important
        avg, mx, arg_g = _op("ham_pool_channels")(x, a, group, *sizes)
        training = module.bn.training
        s = spatial_attention(avg, mx, hw, w_sp, _bn_forward(module.bn), sizes)
        y = _op("ham_gate")(x, a, s, group)
        ctx.save_for_backward(x, mean_c, max_c, arg_c, a, group, avg, mx, arg_g, alpha, beta,
                              w1, w_sp, bn_weight, bn_bias)
        ctx.meta = (sizes, hw, training, module.bn)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x, mean_c, max_c, arg_c, a, group, avg, mx, arg_g, alpha, beta, w1, w_sp, bn_w,
         bn_b) = ctx.saved_tensors
        sizes, hw, training, bn = ctx.meta
        dy = layout.in_layout_of(dy, x)
        ds = _op("ham_gate_grad_s")(dy, x, a, group)
        # the small spatial branch recomputed (s is not saved) with its vjp (torch.func: traceable
        # by torch.compile)
        s, vjp_s = torch.func.vjp(
            lambda av, m, w, bw, bb: spatial_attention(av, m, hw, w, _bn_for_backward(bn, training, bw, bb), sizes),
            avg, mx, w_sp, bn_w, bn_b)
        d_avg, d_max, d_wsp, d_bnw, d_bnb = vjp_s(ds)
        d_avg, d_max = d_avg.contiguous(), d_max.contiguous()
        da = _op("ham_grad_a")(x, dy, s, group, d_avg, d_max, arg_g, *sizes)
        _, vjp_a = torch.func.vjp(channel_attention, mean_c, max_c, alpha, beta, w1)
        d_mean, d_maxc, d_alpha, d_beta, d_w1 = vjp_a(da)
        dx = _op("ham_grad_x")(dy, a, s, group, d_avg, d_max, arg_g, *sizes,
                               d_mean.contiguous(), d_maxc.contiguous(), arg_c)
        return dx, d_alpha, d_beta, d_w1, d_wsp, d_bnw, d_bnb, None


def ham(module, x: torch.Tensor) -> torch.Tensor:
    """Fused HAM forward of ``module`` (a fusedattn.HAM) on x in a readable layout."""
    return HAMFunction.apply(layout.readable(x), module.alpha, module.beta, module.conv1d.weight,
                             module.spatial_conv.weight, module.bn.weight, module.bn.bias, module)
