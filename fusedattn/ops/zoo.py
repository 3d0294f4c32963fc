"""SE, ECA and CBAM, fused (math: ``fusedattn.reference``, fusedattn/spec/zoo.md) on the generic
passes (``fusedattn.ops.passes``, fusedattn/spec/passes.md) with one channel group.

A module describes its small parts; one autograd Function runs the passes around them::

    mean_c, max_c, argmax_c = pool_pixels(x, with_max)            # pass 1 (max: CBAM, add_maxpool)
    a = channel(mean_c, max_c)                                     # small, (N, C): SE's MLP, ECA's conv1d
    CBAM: avg, mx, argmax = pool_channels(x, a)                    # pass 2: a x never stored
          s = gate(bn(conv_k([avg, mx])))                          # small, (N, 1, P)
    y = gate(x, a, s or none)                                      # pass 3

Backward (x and dy read twice, or three times with CBAM's spatial part; dx written once)::

    CBAM: ds = gate_grad_s(dy, x, a); d_avg, d_mx, d(conv, bn) by hand (the conv's input
          gradient as a conv with the flipped kernel, as HAM's)
    da = grad_a(x, dy[, s, d_avg, d_mx, argmax])                  # sum over pixels
    d_mean_c, d_max_c, d(channel params) = channel_backward()      # small, recomputed, by hand
    dx = grad_x(dy, a, ..., d_mean_c, d_max_c, argmax_c)

The small parts run in the accumulation dtype (fp32; fp64 for fp64 x) with the parameters cast
to it; their gradients come back in the parameters' dtypes. BatchNorm (SE's norm_layer, CBAM's
spatial bn) moves its running statistics once, in the forward, as the eager module does; the
backward normalises with the same statistics without touching them. Autograd keeps x plus small
tensors: the channel statistics and a per (n, c), CBAM's conv input and argmax per (n, pixel).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import layout
from .conv import same_conv, same_conv_input_grad, same_conv_weight_grad
from .ham import channel_conv, channel_conv_weight_grad
from .norm import Norm, first_order, no_autocast
from .passes import passes


def unpack(params, present, dt):
    """The parameters in the accumulation dtype dt, one per slot of ``present``: the next of
    ``params`` where the slot is present (a module's optional biases), else None."""
    it = iter(params)
    return [next(it).to(dt) if there else None for there in present]


def fc(v, w, b):
    """A 1x1 conv on (N, C) vectors: v w^T + b."""
    return F.linear(v, w.reshape(w.shape[0], -1), b)


class ZooFunction(torch.autograd.Function):
    """Fused forward and backward of a module with ``channel_fn`` (and ``spatial`` parts, CBAM);
    see the module docstring. ``params`` are the module's ``fused_params()``, ``norms`` its
    BatchNorms (``Norm``, by name) at forward time: the backward reads what the forward saved,
    not the module. Autocast is off inside (the small parts run in fp32, fp64 for fp64 x)."""

    @staticmethod
    def forward(ctx, x, module, backend, norms, *params):
        with no_autocast(x):
            op = passes(backend)
            N, C = x.shape[:2]
            hw = tuple(x.shape[2:])
            nc = module.channel_param_count
            cparams, sparams = params[:nc], params[nc:]
            mean_c, max_c, arg_c = op["pool_pixels"](x, module.with_max)
            with torch.no_grad():
                a = module.channel_fn(mean_c, max_c, cparams, norms, update=True).contiguous()
            s = inp = arg_s = None
            if module.spatial_attention:
                avg, mx, arg_s = op["pool_channels"](x, a, None, C, 0)
                inp = torch.cat([avg, mx], 1).view(N, 2, *hw)
                with torch.no_grad():
                    s = module.spatial_fn(inp, sparams, norms).reshape(N, 1, -1).contiguous()
            y = op["gate"](x, a, s, None)
        names = sorted(norms)
        stats = [t for k in names for t in norms[k].to_save()]
        ctx.save_for_backward(x, mean_c, max_c, arg_c, a, inp, arg_s, *params, *stats)
        ctx.meta = (module, backend, nc, len(params), {k: norms[k].detached() for k in names})
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mean_c, max_c, arg_c, a, inp, arg_s, *rest = ctx.saved_tensors
        module, backend, nc, n_params, norms = ctx.meta
        params, stats = rest[:n_params], iter(rest[n_params:])
        norms = {k: n.restored([next(stats) for _ in n.to_save()]) for k, n in norms.items()}
        cparams, sparams = params[:nc], params[nc:]
        with no_autocast(x):
            op = passes(backend)
            N, C = x.shape[:2]
            dy = layout.in_layout_of(dy, x)
            d_sparams = []
            if module.spatial_attention:
                ds = op["gate_grad_s"](dy, x, a, None)
                s, d_inp, d_sparams = module.spatial_backward(ds, inp, sparams, norms)
                d_avg = d_inp[:, 0].reshape(N, 1, -1).contiguous()
                d_mx = d_inp[:, 1].reshape(N, 1, -1).contiguous()
                da = op["grad_a"](x, dy, s, None, d_avg, d_mx, arg_s, C, 0)
                maps = (s, None, d_avg, d_mx, arg_s)
            else:
                da = op["grad_a"](x, dy, None, None, None, None, None, C, 0)
                maps = (None, None, None, None, None)
            d_mean, d_max, d_cparams = module.channel_backward(da, mean_c, max_c, cparams, norms)
            dx = None
            if ctx.needs_input_grad[0]:
                pixel_max = (d_max.contiguous(), arg_c) if module.with_max else (None, None)
                dx = op["grad_x"](dy, a, *maps, C, 0, d_mean.contiguous(), *pixel_max)
        grads = (dx, *d_cparams, *d_sparams)
        need = ctx.needs_input_grad
        grads = tuple(g if n else None for g, n in zip(grads, (need[0], *need[4:])))
        out = first_order(type(module).__name__, grads)
        return (out[0], None, None, None, *out[1:])


def zoo(module, x: torch.Tensor, backend: str) -> torch.Tensor:
    """Fused forward of ``module`` (fusedattn.SE, ECA or CBAM) on x with the passes of
    ``backend`` (cpu, cuda or triton)."""
    return ZooFunction.apply(layout.readable(x), module, backend, module.norms(),
                             *module.fused_params())


# ----------------------------------------------------------------------------- channel parts

def channel_vjp(module, da, mean_c, max_c, params, norms):
    """Gradients of ``module.channel_fn`` by torch.func.vjp of its recomputation (the options
    without a hand-written backward): d_mean_c, d_max_c, [d_param...]."""
    _, vjp = torch.func.vjp(lambda m, mx, *p: module.channel_fn(m, mx, p, norms, update=False),
                            mean_c, max_c, *params)
    d_mean, d_max, *d_params = vjp(da)
    return d_mean, d_max, d_params


def apply_act(act, pre):
    """act(pre) without overwriting pre (timm builds activations with inplace=True)."""
    return act(pre.clone() if getattr(act, "inplace", False) else pre)


_SIXTH_F32 = float(torch.tensor(1 / 6, dtype=torch.float32))


def act_backward(act, pre, post, d_post):
    """The gradient through an elementwise activation post = act(pre): closed forms for the
    common ones, torch.func.vjp for the others."""
    if act is None or isinstance(act, nn.Identity):
        return d_post
    if isinstance(act, nn.Sigmoid):
        return d_post * post * (1 - post)
    if isinstance(act, nn.ReLU):
        return d_post * (post > 0).to(post.dtype)
    if isinstance(act, nn.Hardsigmoid):  # torch's slope is 1/6 rounded to fp32, in every dtype
        return d_post * ((pre > -3) & (pre < 3)).to(pre.dtype) * _SIXTH_F32
    if isinstance(act, nn.Tanh):
        return d_post * (1 - post * post)
    _, vjp = torch.func.vjp(lambda t: act(t.clone()), pre)
    return vjp(d_post)[0]


def mlp_forward(v, w1, b1, act, w2, b2):
    """z2 = fc2(act(fc1(v))) on (M, C) rows, with what its backward needs."""
    z1 = fc(v, w1, b1)
    h = apply_act(act, z1)
    return fc(h, w2, b2), (v, z1, h)


def mlp_backward(d_z2, saved, act, w1, w2, with_b1, with_b2):
    """Gradients of mlp_forward: d_v and the parameters' [d_w1, (d_b1), d_w2, (d_b2)] (the
    module's dtypes are restored by the caller)."""
    v, z1, h = saved
    W1, W2 = w1.reshape(w1.shape[0], -1), w2.reshape(w2.shape[0], -1)
    d_w2 = (d_z2.t() @ h).view_as(w2)
    d_h = d_z2 @ W2
    d_z1 = act_backward(act, z1, h, d_h)
    d_w1 = (d_z1.t() @ v).view_as(w1)
    d_v = d_z1 @ W1
    grads = [d_w1] + ([d_z1.sum(0)] if with_b1 else []) + [d_w2] + ([d_z2.sum(0)] if with_b2 else [])
    return d_v, grads


def cast_like(grads, params):
    return [g.to(p.dtype) for g, p in zip(grads, params)]


def eca_channel_backward(gate, da, mean_c, w):
    """ECA's a = gate(conv1d_k(mean_c)) backward by hand: d_mean_c, [d_w] (the input's gradient:
    the conv with the flipped kernel)."""
    k = w.shape[-1]
    wk = w.to(mean_c.dtype)
    pre = channel_conv(mean_c, wk)
    a = apply_act(gate, pre)
    d_pre = act_backward(gate, pre, a, da)
    d_mean = channel_conv(d_pre, wk.flip(-1))
    d_w = channel_conv_weight_grad(d_pre, mean_c, k).view_as(w)
    return d_mean, [d_w.to(w.dtype)]


# ----------------------------------------------------------------------------- CBAM's spatial part

def spatial_fn(gate, inp, params, norm: Norm):
    """s = gate(bn(conv_k(inp))) of CBAM's spatial attention (forward: the BatchNorm's running
    statistics move once, as in the eager module)."""
    w_sp, bn_w, bn_b = params
    z = same_conv(inp, w_sp.to(inp.dtype))
    return gate(norm.forward(z.to(bn_w.dtype), bn_w, bn_b).to(z.dtype))


def spatial_backward(gate, ds, inp, params, norm: Norm):
    """CBAM's spatial part again from the conv's input (BatchNorm without touching its running
    statistics) and its gradients by hand: s (N, 1, P), d_inp (N, 2, H, W), [d_conv_weight,
    d_bn_weight, d_bn_bias]."""
    w_sp, bn_w, bn_b = params
    dt = inp.dtype
    z = same_conv(inp, w_sp.to(dt))
    mean, rstd = norm.stats(z)
    xhat = (z - mean) * rstd
    gamma = bn_w.to(dt)
    b = xhat * gamma + bn_b.to(dt)
    s, vjp = torch.func.vjp(gate, b)
    (db,) = vjp(ds.view_as(b))
    d_gamma = (db * xhat).sum()
    d_beta = db.sum()
    dxhat = db * gamma
    if norm.batch_stats:
        dxhat = dxhat - dxhat.mean() - xhat * (dxhat * xhat).mean()
    dz = dxhat * rstd
    d_inp = same_conv_input_grad(dz, w_sp.to(dt))
    d_w = same_conv_weight_grad(dz, inp, w_sp.shape[-1])
    return (s.reshape(s.shape[0], 1, -1).contiguous(), d_inp,
            [d_w.to(w_sp.dtype), d_gamma.to(bn_w.dtype).view_as(bn_w),
             d_beta.to(bn_b.dtype).view_as(bn_b)])
