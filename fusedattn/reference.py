"""Eager PyTorch modules: the ground truth that every fused kernel is tested against.

Each follows its spec in ``shared/spec`` line by line, with plain autograd for the gradients.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["SimAM", "simam"]


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
