"""Eager PyTorch modules: the ground truth that every fused kernel is tested against.

Each follows its spec in ``shared/spec`` line by line, with plain autograd for the gradients.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SimAM", "simam", "HAM"]


def simam(x: torch.Tensor, e_lambda: float = 1e-4) -> torch.Tensor:
    """SimAM (Yang et al., ICML 2021), the authors' formula over any rank >= 3.

    Per plane (n, c) of M = prod(spatial) elements, with n = max(M - 1, 1) (the spec's guard: the
    authors divide by M - 1 = 0 for 1x1 planes)::

        d = (x - mean(x))^2;  e = d / (4 (sum(d) / n + e_lambda)) + 1/2;  y = x sigmoid(e)
    """
    dims = tuple(range(2, x.dim()))
    n = max(x[0, 0].numel() - 1, 1) if x.numel() else 1
    d = (x - x.mean(dim=dims, keepdim=True)).pow(2)
    e = d / (4 * (d.sum(dim=dims, keepdim=True) / n + e_lambda)) + 0.5
    return x * torch.sigmoid(e)


class SimAM(nn.Module):
    """Eager SimAM; ``channels`` is accepted and ignored (YOLO-style parsers pass it)."""

    def __init__(self, channels: int | None = None, e_lambda: float = 1e-4):
        super().__init__()
        self.e_lambda = e_lambda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return simam(x, self.e_lambda)

    def extra_repr(self) -> str:
        return f"e_lambda={self.e_lambda}"


def ham_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """k of HAM's channel conv (Eq. 6): t = int(|log2(C)/gamma + b/gamma|), odd-up."""
    t = int(abs(math.log2(channels) / gamma + b / gamma))
    return t if t % 2 else t + 1


def ham_important_channels(channels: int, separation_rate: float) -> int:
    """C_im (Eq. 8): separation_rate * C rounded to an even number (int, +1 if odd), at most C."""
    h = int(separation_rate * channels)
    return min(h if h % 2 == 0 else h + 1, channels)


def ham_important_mask(a: torch.Tensor, important: int) -> torch.Tensor:
    """(N, C) bool: the ``important`` channels of largest a per sample, ties to the lower index
    (a stable descending sort), so that every backend selects the same channels."""
    order = torch.sort(a.detach(), dim=1, descending=True, stable=True).indices
    mask = torch.zeros_like(a, dtype=torch.bool)
    return mask.scatter(1, order[:, :important], True)


def check_ham_args(channels, separation_rate, spatial_kernel_size) -> None:
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"HAM: channels must be a positive int, got {channels!r}")
    if not (0.0 <= separation_rate <= 1.0):
        raise ValueError(f"HAM: separation_rate must lie in [0, 1], got {separation_rate!r}")
    if spatial_kernel_size < 1 or spatial_kernel_size % 2 == 0:
        raise ValueError(f"HAM: spatial_kernel_size must be odd and positive, got {spatial_kernel_size!r}")


def check_ham_input(x, channels: int) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"HAM: expected a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"HAM: expected a tensor of shape (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"HAM: expected {channels} channels, got shape {tuple(x.shape)}")


class HAM(nn.Module):
    """Hybrid attention module (Li et al., Pattern Recognition 129, 2022), spec/ham.md line by
    line. Channel attention (Eqs. 5-7)::

        add_c = (avg_c + max_c) / 2 + alpha avg_c + beta max_c;  a = sigmoid(conv1d_k(add_c))

    channel separation (Eq. 8): per sample, the C_im channels with the largest a (ties to the
    lower index: a stable descending sort) form the important group, the rest the sub-important
    one (hard masks, no gradient); spatial attention per group g (Eqs. 9-10) on f = a x::

        avg_g = sum_{c in g} f_c / |g|;  max_g = max over all C channels of f * mask_g
        s_g = sigmoid(relu(bn(conv7x7([avg_g, max_g]))))   (one conv and one BN for both groups)

    and y = s_{g(c)} f_c. Maxima take the first index that attains them (``torch.max``), so their
    gradient goes there; an empty group contributes nothing."""

    def __init__(self, channels: int, gamma: int = 2, b: int = 1, separation_rate: float = 0.6,
                 spatial_kernel_size: int = 7):
        super().__init__()
        check_ham_args(channels, separation_rate, spatial_kernel_size)
        self.channels = channels
        self.separation_rate = separation_rate
        self.important = ham_important_channels(channels, separation_rate)
        k = ham_kernel_size(channels, gamma, b)
        self.alpha = nn.Parameter(torch.tensor(0.5))
        self.beta = nn.Parameter(torch.tensor(0.5))
        self.conv1d = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)
        self.spatial_conv = nn.Conv2d(2, 1, spatial_kernel_size, padding=spatial_kernel_size // 2,
                                      bias=False)
        self.bn = nn.BatchNorm2d(1)

    def channel_attention(self, x: torch.Tensor) -> torch.Tensor:
        """a, shape (N, C)."""
        avg = x.mean(dim=(2, 3))
        mx = x.flatten(2).max(dim=2).values
        add = 0.5 * (avg + mx) + self.alpha * avg + self.beta * mx
        return torch.sigmoid(self.conv1d(add.unsqueeze(1))).squeeze(1)

    def important_mask(self, a: torch.Tensor) -> torch.Tensor:
        return ham_important_mask(a, self.important)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_ham_input(x, self.channels)
        a = self.channel_attention(x)
        f = a[:, :, None, None] * x
        imp = self.important_mask(a)
        y = torch.zeros_like(x)
        for mask, size in ((imp, self.important), (~imp, self.channels - self.important)):
            if size == 0:
                continue
            fg = f * mask[:, :, None, None].to(x.dtype)
            avg = fg.sum(dim=1, keepdim=True) / size
            mx = fg.max(dim=1, keepdim=True).values
            s = torch.sigmoid(torch.relu(self.bn(self.spatial_conv(torch.cat([avg, mx], dim=1)))))
            y = y + s * fg
        return y

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, important={self.important}, "
                f"separation_rate={self.separation_rate}, k={self.conv1d.kernel_size[0]}")
