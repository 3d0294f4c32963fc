"""The six generic passes (fusedattn/spec/passes.md) in eager PyTorch: the statement every
backend's op is tested against (same arguments, shapes and dtypes as
``torch.ops.fusedattn.<pass>``).

Maxima: NaN largest, ties to the lowest index (written out, not left to ``torch.max``)."""
from __future__ import annotations

import torch


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def first_max(v: torch.Tensor, dim: int):
    """(max, first index attaining it) along dim, NaN the largest value."""
    nan = torch.isnan(v)
    best = torch.where(nan, torch.full_like(v, -float("inf")), v).amax(dim, keepdim=True)
    has_nan = nan.any(dim, keepdim=True)
    hit = torch.where(has_nan, nan, v == best)
    idx = torch.arange(v.shape[dim], device=v.device).view(
        [-1 if d == dim % v.dim() else 1 for d in range(v.dim())])
    first = torch.where(hit, idx, v.shape[dim]).amin(dim)
    value = torch.where(has_nan, torch.full_like(best, float("nan")), best).squeeze(dim)
    return value, first.to(torch.int32)


def _G(group):
    return 1 if group is None else 2


def _onehot(group, G):
    """(N, G, C) bool membership of each channel in each group."""
    return torch.stack([~group, group], 1)


def pool_pixels(x, with_max: bool):
    A = _acc(x)
    xf = x.to(A).flatten(2)
    mean = xf.sum(2) / max(xf.shape[2], 1)  # no pixels: zeros, as the ops give
    if not with_max:
        return mean, x.new_empty(0, dtype=A), x.new_empty(0, dtype=torch.int32)
    if xf.shape[2] == 0:
        return mean, torch.zeros_like(mean), torch.zeros_like(mean, dtype=torch.int32)
    mx, arg = first_max(xf, 2)
    return mean, mx, arg


def _sizes_inv(size0, size1, G, ref):
    sizes = (size0,) if G == 1 else (size0, size1)
    return torch.tensor([1.0 / s if s > 0 else 0.0 for s in sizes], dtype=ref.dtype), sizes


def pool_channels(x, a, group, size0, size1):
    A = _acc(x)
    G = _G(group)
    N, C, H, W = x.shape
    f = (a.to(A)[:, :, None] * x.to(A).flatten(2))  # (N, C, P)
    inv, sizes = _sizes_inv(size0, size1, G, f)
    if G == 1:
        masked = f[:, None]  # (N, 1, C, P)
    else:
        m = _onehot(group, G)[..., None]  # (N, 2, C, 1): masked-out channels count as 0
        masked = torch.where(m, f[:, None], torch.zeros((), dtype=A))
    avg = masked.sum(2) * inv.view(1, G, 1)
    if C == 0:
        return avg, torch.zeros_like(avg), torch.zeros_like(avg, dtype=torch.int32)
    mx, arg = first_max(masked, 2)
    for g, size in enumerate(sizes):
        if size == 0:
            mx[:, g] = 0
            arg[:, g] = 0
    return avg, mx, arg


def _per_channel(maps, group, G):
    """(N, G, P) -> (N, C, P): each channel's own group's row."""
    if G == 1:
        return maps[:, 0:1]
    return torch.where(group[:, :, None], maps[:, 1:2], maps[:, 0:1])


def gate(x, a, s, group):
    A = _acc(x)
    y = a.to(A)[:, :, None] * x.to(A).flatten(2)
    if s is not None:
        y = y * _per_channel(s, group, _G(group))
    return y.view_as(x).to(x.dtype).contiguous(memory_format=_fmt(x))


def gate_grad_s(dy, x, a, group):
    A = _acc(x)
    f = dy.to(A).flatten(2) * a.to(A)[:, :, None] * x.to(A).flatten(2)
    if group is None:
        return f.sum(1, keepdim=True)
    m = _onehot(group, 2)[..., None]
    return torch.where(m, f[:, None], torch.zeros((), dtype=A)).sum(2)


def _pool_grad(group, d_avg, d_max, argmax, size0, size1, C):
    """(N, C, P): d_avg_g inv_g + [argmax_g = c] d_max_g for each channel's group g."""
    G = _G(group)
    inv, _ = _sizes_inv(size0, size1, G, d_avg)
    w = _per_channel(d_avg * inv.view(1, G, 1), group, G)
    am = _per_channel(argmax, group, G)
    cs = torch.arange(C, device=d_avg.device).view(1, C, 1)
    return w + torch.where(am == cs, _per_channel(d_max, group, G), torch.zeros_like(w))


def grad_a(x, dy, s, group, d_avg, d_max, argmax, size0, size1):
    A = _acc(x)
    xf, df = x.to(A).flatten(2), dy.to(A).flatten(2)
    if s is None:
        return (xf * df).sum(2)
    G = _G(group)
    inner = df * _per_channel(s, group, G) + _pool_grad(group, d_avg, d_max, argmax, size0,
                                                        size1, x.shape[1])
    return (xf * inner).sum(2)


def grad_x(dy, a, s, group, d_avg, d_max, argmax, size0, size1, d_mean_c, d_max_c, argmax_c):
    A = _acc(dy)
    N, C, H, W = dy.shape
    P = H * W
    df = dy.to(A).flatten(2)
    ac = a.to(A)[:, :, None]
    if s is None:
        dx = df * ac
    else:
        G = _G(group)
        dx = df * _per_channel(s, group, G) * ac + ac * _pool_grad(
            group, d_avg, d_max, argmax, size0, size1, C)
    dx = dx + d_mean_c[:, :, None] / P
    if d_max_c is not None:
        ps = torch.arange(P, device=dy.device).view(1, 1, P)
        dx = dx + torch.where(ps == argmax_c[:, :, None], d_max_c[:, :, None], torch.zeros_like(dx))
    return dx.view_as(dy).to(dy.dtype).contiguous(memory_format=_fmt(dy))


def _fmt(x):
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format
