"""HAM, fused (math: ``fusedattn.reference.HAM``, fusedattn/spec/ham.md).

The passes over full-size tensors are the generic passes (``fusedattn.ops.passes``,
fusedattn/spec/passes.md) with two channel groups; the backend chosen for "ham" runs all six. The
work indexed by (n, c) or (n, pixel) — the channel conv, the channel split, the 7x7 conv,
BatchNorm, ReLU, sigmoid — stays in torch. Forward (x read three times, y written once)::

    mean_c, max_c, argmax_c = pool_pixels(x, with_max=True)     # pass 1
    a = sigmoid(conv1d(add_c)); group = not important(a)        # small
    avg_g, max_g, argmax_g = pool_channels(x, a, group)         # pass 2: f = a x never stored
    s_g = sigmoid(relu(bn(conv7x7([avg_g, max_g]))))            # small, per group
    y = gate(x, a, s, group)                                    # pass 3

Backward (x read twice, dy three times, dx written once, no full-size temporaries)::

    ds = gate_grad_s(dy, x, a, group)                           # sum over the group's channels
    z = conv7x7(saved conv input); s, d_avg, d_max, d(conv, bn) <- spatial_backward (by hand; the
                                 input's gradient as a conv with the flipped kernel)
    da = grad_a(x, dy, s, group, d_avg, d_max, argmax_g)        # sum over pixels
    d_mean_c, d_max_c, d(alpha, beta, conv1d) <- channel_backward (by hand, from a)
    dx = grad_x(dy, a, s, group, d_avg, d_max, argmax_g, d_mean_c, d_max_c, argmax_c)

Autograd keeps x plus small tensors: per (n, c) the channel statistics, a and the split; per
(n, pixel) the conv's input and the groups' argmax (int32); the conv's output z and s are
recomputed from them (one small conv).
Maxima send their gradient to the first index attaining them; a group's max that is a 0 of a
masked-out channel sends none to x. BatchNorm's running statistics move once per non-empty group
in the forward, as in the reference; the backward uses the same normalisation (from what the
forward saved, not from the module) without touching them. Both groups share one conv call (stacked on the batch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import layout
from .conv import same_conv, same_conv_input_grad, same_conv_weight_grad
from .norm import Norm, first_order, no_autocast
from .passes import passes

# ----------------------------------------------------------------------------- small branches

def channel_attention(mean_c, max_c, alpha, beta, w1):
    """a = sigmoid(conv1d_k((avg + max)/2 + alpha avg + beta max)), (N, C) in mean_c's dtype."""
    dt = mean_c.dtype
    add = 0.5 * (mean_c + max_c) + alpha.to(dt) * mean_c + beta.to(dt) * max_c
    return torch.sigmoid(channel_conv(add, w1.to(dt)))


def windows(v, k):
    """(N, C, k): the k-wide zero-padded windows of v (N, C) a same-padded 1-D conv reads."""
    return F.pad(v, (k // 2, k // 2)).unfold(-1, k, 1)


def channel_conv(v, w1):
    """conv1d over the channels of v (N, C), same-padded, no bias: k shifted multiply-adds
    (oneDNN's conv1d costs ~0.1-0.2 ms of setup for this on CPU, a windows-times-kernel bmm
    about twice the multiply-adds)."""
    k, C = w1.shape[-1], v.shape[1]
    p = F.pad(v, (k // 2, k // 2))
    w = w1.reshape(k)
    out = p[:, :C] * w[0]
    for j in range(1, k):
        out = out + p[:, j:j + C] * w[j]
    return out


def channel_conv_weight_grad(d_out, v, k):
    """The gradient of channel_conv(v, w1) for its k weights (flat)."""
    return (d_out.unsqueeze(-1) * windows(v, k)).sum((0, 1))


def important_mask(a: torch.Tensor, important: int) -> torch.Tensor:
    """The reference's channel split (``ham_important_mask``: the ``important`` largest a per
    sample, ties to the lower index, NaN largest) without a sort: the threshold is the
    important-th largest value (kthvalue, O(C)); values above it are in, and of the values equal
    to it the lowest-indexed ones fill the rest."""
    C = a.shape[1]
    if important <= 0 or important >= C:
        return torch.full_like(a, important > 0, dtype=torch.bool)
    key = torch.nan_to_num(a.detach(), nan=2.0)  # a is a sigmoid: NaN above every value
    t = key.kthvalue(C - important + 1, dim=1, keepdim=True).values
    above, tie = key > t, key == t
    need = important - above.sum(1, keepdim=True)
    return above | (tie & (tie.cumsum(1) <= need))


def channel_backward(da, a, mean_c, max_c, alpha, beta, w1):
    """Gradients of channel_attention from a = sigmoid(conv1d(add)), by hand: d_mean_c, d_max_c
    (N, C) and d_alpha, d_beta, d_w1 in the parameters' dtypes."""
    dt = mean_c.dtype
    k = w1.shape[-1]
    add = 0.5 * (mean_c + max_c) + alpha.to(dt) * mean_c + beta.to(dt) * max_c
    d_pre = da * a * (1 - a)
    d_add = channel_conv(d_pre, w1.to(dt).flip(-1))  # the input's gradient: the flipped kernel
    d_w1 = channel_conv_weight_grad(d_pre, add, k).view_as(w1).to(w1.dtype)
    d_mean = d_add * (0.5 + alpha.to(dt))
    d_max = d_add * (0.5 + beta.to(dt))
    d_alpha = (d_add * mean_c).sum().to(alpha.dtype)
    d_beta = (d_add * max_c).sum().to(beta.dtype)
    return d_mean, d_max, d_alpha, d_beta, d_w1


def _groups(sizes):
    return [g for g in (0, 1) if sizes[g] > 0]


def spatial_input(avg, mx, hw, sizes):
    """The 7x7 conv's input of every non-empty group, stacked along the batch: (G N, 2, H, W)."""
    groups = _groups(sizes)
    inp = torch.stack([avg, mx], 2).transpose(0, 1)  # (2, N, 2, P): group, sample, [avg, max]
    if len(groups) < 2:
        inp = inp[groups[0]:groups[0] + 1]
    return inp.reshape(-1, 2, *hw)


def spatial_logits(inp, w_sp):
    """z = conv7x7(inp): one convolution for both groups (G N, 1, H, W)."""
    return same_conv(inp, w_sp.to(inp.dtype))


def spatial_gates(z, sizes, norm: Norm, weight, bias):
    """s (N, 2, P) = sigmoid(relu(bn(z_g))) per non-empty group (zeros for an empty one: it gates
    no channel); the BatchNorm's running statistics move once per group, as in the reference."""
    groups = _groups(sizes)
    N = z.shape[0] // len(groups)
    s = z.new_zeros(N, 2, z[0].numel())
    for i, g in enumerate(groups):
        b = norm.forward(z[i * N:(i + 1) * N].to(weight.dtype), weight, bias).to(z.dtype)
        s[:, g] = torch.sigmoid(torch.relu(b)).view(N, -1)
    return s


def spatial_backward(ds, z, inp, w_sp, sizes, norm: Norm, bn_weight, bn_bias, need_w: bool = True):
    """The spatial branch again from the conv's input and output z (BatchNorm's normalisation
    without touching its running statistics), and its gradients by hand: returns s (N, 2, P),
    d_avg, d_max (N, 2, P), d_weight of the conv (None unless ``need_w``), d_weight and d_bias of
    the BatchNorm."""
    groups = _groups(sizes)
    N = z.shape[0] // len(groups)
    dt = z.dtype
    gamma = bn_weight.to(dt)
    s = z.new_zeros(ds.shape)
    d_gamma = torch.zeros((), dtype=dt, device=z.device)
    d_beta = torch.zeros((), dtype=dt, device=z.device)
    dz = []
    for i, g in enumerate(groups):
        zg = z[i * N:(i + 1) * N]
        mean, rstd = norm.stats(zg)
        xhat = (zg - mean) * rstd
        b = xhat * gamma + bn_bias.to(dt)
        sg = torch.sigmoid(torch.relu(b))
        s[:, g] = sg.view(N, -1)
        db = ds[:, g].view_as(zg) * sg * (1 - sg) * (b > 0).to(dt)
        d_gamma = d_gamma + (db * xhat).sum()
        d_beta = d_beta + db.sum()
        dxhat = db * gamma
        if norm.batch_stats:
            dxhat = dxhat - dxhat.mean() - xhat * (dxhat * xhat).mean()
        dz.append(dxhat * rstd)
    k = w_sp.shape[-1]
    dz = torch.cat(dz)
    w = w_sp.to(dt)
    d_inp = same_conv_input_grad(dz, w)
    d_w = same_conv_weight_grad(dz, inp, k) if need_w else None
    d_avg = torch.zeros_like(ds)
    d_max = torch.zeros_like(ds)
    for i, g in enumerate(groups):
        part = d_inp[i * N:(i + 1) * N].flatten(2)
        d_avg[:, g] = part[:, 0]
        d_max[:, g] = part[:, 1]
    return s, d_avg, d_max, d_w, d_gamma, d_beta


class HAMFunction(torch.autograd.Function):
    """Fused HAM forward and backward (see the module docstring). Stateless: the parameters and
    the BatchNorm (``Norm``) come in as arguments; autocast is off inside (the small parts run in
    fp32, or fp64 for fp64 x)."""

    @staticmethod
    def forward(ctx, x, alpha, beta, w1, w_sp, bn_weight, bn_bias, norm, important, backend):
        with no_autocast(x):
            op = passes(backend)
            C, hw = x.shape[1], tuple(x.shape[2:])
            sizes = (important, C - important)
            mean_c, max_c, arg_c = op["pool_pixels"](x, True)
            a = channel_attention(mean_c, max_c, alpha, beta, w1)
            group = ~important_mask(a, important)  # True: sub-important
            avg, mx, arg_g = op["pool_channels"](x, a, group, *sizes)
            inp = spatial_input(avg, mx, hw, sizes)
            z = spatial_logits(inp, w_sp)
            s = spatial_gates(z, sizes, norm, bn_weight, bn_bias)
            y = op["gate"](x, a, s, group)
        ctx.save_for_backward(x, mean_c, max_c, arg_c, a, group, arg_g, inp, alpha, beta, w1, w_sp,
                              bn_weight, bn_bias, *norm.to_save())
        ctx.meta = (sizes, norm.detached(), backend)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x, mean_c, max_c, arg_c, a, group, arg_g, inp, alpha, beta, w1, w_sp, bn_w, bn_b,
         *stats) = ctx.saved_tensors
        sizes, norm, backend = ctx.meta
        norm = norm.restored(stats)
        need = ctx.needs_input_grad
        with no_autocast(x):
            op = passes(backend)
            dy = layout.in_layout_of(dy, x)
            z = spatial_logits(inp, w_sp)  # recomputed: cheaper than keeping it (2 maps per sample)
            ds = op["gate_grad_s"](dy, x, a, group)
            s, d_avg, d_max, d_wsp, d_bnw, d_bnb = spatial_backward(
                ds, z, inp, w_sp, sizes, norm, bn_w, bn_b, need_w=need[4])
            da = op["grad_a"](x, dy, s, group, d_avg, d_max, arg_g, *sizes)
            d_mean, d_maxc, d_alpha, d_beta, d_w1 = channel_backward(da, a, mean_c, max_c, alpha,
                                                                     beta, w1)
            dx = None
            if need[0]:
                dx = op["grad_x"](dy, a, s, group, d_avg, d_max, arg_g, *sizes,
                                  d_mean.contiguous(), d_maxc.contiguous(), arg_c)
        grads = (dx, d_alpha, d_beta, d_w1, None if d_wsp is None else d_wsp.to(w_sp.dtype),
                 d_bnw.to(bn_w.dtype).view_as(bn_w), d_bnb.to(bn_b.dtype).view_as(bn_b))
        grads = tuple(g if n else None for g, n in zip(grads, need))
        return first_order("HAM", grads) + (None, None, None)


def ham(module, x: torch.Tensor, backend: str) -> torch.Tensor:
    """Fused HAM forward of ``module`` (a fusedattn.HAM) on x with the passes of ``backend``
    (cpu, cuda or triton)."""
    bn = module.bn
    return HAMFunction.apply(layout.readable(x), module.alpha, module.beta, module.conv1d.weight,
                             module.spatial_conv.weight, bn.weight, bn.bias, Norm.of(bn),
                             module.important, backend)
