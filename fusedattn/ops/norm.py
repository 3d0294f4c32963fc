"""BatchNorm and autograd plumbing shared by the fused modules' autograd functions.

``Norm`` is what a fused forward takes from a BatchNorm module, at forward time: its options and
its running-statistic tensors (weight and bias travel as inputs of the autograd function, so
autograd tracks them). The backward reads the options and the statistics it saved, never the
module, so a change to the module between forward and backward (``eval()``, new statistics) does
not change the gradient, and an in-place change of a saved tensor is caught by autograd's
version counter.

BatchNorm's semantics (torch's ``_BatchNorm.forward``): in training, batch statistics, and the
running statistics move (``momentum``, or a cumulative average when it is None) when they are
tracked; in eval, the running statistics, or batch statistics when there are none.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Norm:
    training: bool
    track: bool  # running statistics move in training
    momentum: float | None
    eps: float
    running_mean: torch.Tensor | None = None
    running_var: torch.Tensor | None = None
    num_batches_tracked: torch.Tensor | None = None

    @classmethod
    def of(cls, bn: nn.Module) -> "Norm":
        return cls(bn.training, bool(bn.track_running_stats and bn.running_mean is not None),
                   bn.momentum, float(bn.eps), bn.running_mean, bn.running_var,
                   bn.num_batches_tracked)

    @property
    def batch_stats(self) -> bool:
        """Normalises with the batch's statistics (else with the running ones)."""
        return self.training or self.running_mean is None

    def forward(self, z: torch.Tensor, weight, bias, update: bool = True) -> torch.Tensor:
        """BatchNorm over dim 1 of z, moving the running statistics when ``update`` and tracked
        in training (as the module's forward does)."""
        if self.training and self.track and update:
            rm, rv = self.running_mean, self.running_var
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
            momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                        else self.momentum)
            return F.batch_norm(z.to(rm.dtype), rm, rv, weight, bias, True, momentum,
                                self.eps).to(z.dtype)
        if self.batch_stats:
            return F.batch_norm(z, None, None, weight, bias, True, 0.0, self.eps)
        return F.batch_norm(z, self.running_mean.to(z.dtype), self.running_var.to(z.dtype),
                            weight, bias, False, 0.0, self.eps)

    def stats(self, z: torch.Tensor):
        """(mean, rstd) that normalise z, a map of one channel: the batch's or the running ones."""
        if self.batch_stats:
            mean = z.mean()  # two passes: ~10x faster than var_mean on CPU for these small maps
            var = (z - mean).square().mean()
        else:
            mean, var = self.running_mean.to(z.dtype)[0], self.running_var.to(z.dtype)[0]
        return mean, torch.rsqrt(var + self.eps)

    # The backward's view: the running statistics it reads travel through save_for_backward.
    def to_save(self) -> tuple:
        return () if self.batch_stats else (self.running_mean, self.running_var)

    def detached(self) -> "Norm":
        return replace(self, running_mean=None if self.batch_stats else self.running_mean,
                       running_var=None if self.batch_stats else self.running_var,
                       num_batches_tracked=None)

    def restored(self, saved) -> "Norm":
        """This Norm with the statistics ``to_save()`` gave, as autograd hands them back."""
        if self.batch_stats:
            return self
        rm, rv = saved
        return replace(self, running_mean=rm, running_var=rv)


def no_autocast(x: torch.Tensor):
    """Autocast off for x's device while it is on (the fused functions pick their dtypes
    themselves); nothing otherwise, so that exported graphs carry no autocast region."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def first_order(name: str, grads: tuple) -> tuple:
    """The gradients a fused backward returns. Under ``create_graph=True`` they get a grad_fn
    that raises if anything differentiates through them: the fused backward is not itself
    differentiable, and a second derivative must not come out silently wrong."""
    if not torch.is_grad_enabled():
        return grads
    present = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)
               and g.is_floating_point()]
    if not present:
        return grads
    err = torch._C._functions.DelayedError(
        f"fusedattn: double backward through {name} is not supported (its fused backward is "
        f"not differentiable); for higher-order gradients run the eager module with "
        f"fusedattn.use_backend('eager')".encode(), len(present))
    inputs = [grads[i].detach().requires_grad_() for i in present]
    out = err(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    grads = list(grads)
    for i, g in zip(present, out):
        grads[i] = g
    return tuple(grads)
