"""``fusedattn.convert``: swap the attention modules of a model for their fused twins, or back.

What is recognised (fusedattn/spec/zoo.md), per op of ``fusedattn.registry``:

- our eager reference classes (``fusedattn.reference.SimAM``, ``HAM``, ``SE``, ``ECA``, ``CBAM``;
  the exact class, not a user's subclass, whose forward may differ);
- other libraries' classes the registry lists under ``adopts`` (timm's ``SEModule``,
  ``EcaModule``, ``CbamModule``, also inside timm's models);
- SimAM by behaviour: a module without parameters or buffers, of a class defined outside torch,
  whose output on two fp64 probe inputs is SimAM's for one ``e_lambda`` (estimated from the first
  probe, checked on the second) — the authors' module pasted into user code under any name.

A recognised module becomes its fused twin in place (its ``__class__`` is swapped), so weights,
buffers, hooks on the module, train/eval state, device, dtype, ``requires_grad`` and the identity
of every parameter stay: an optimizer built before conversion keeps working. A SimAM found by
probing is replaced by a ``fusedattn.SimAM`` with its ``e_lambda`` (it holds no state); the
original object is kept and put back by ``to="eager"``. ``to="eager"`` swaps fused modules back to
the class they came from (timm's, the user's) or to the reference class, none of which needs the
extension.

Left as they are, with the reason in the report: a recognised module whose fused twin would run
eager anyway (a norm layer other than BatchNorm, an activation with parameters, hooks on its
parts), a subclass of a reference class, and a module whose class name says SimAM but whose
forward does not match it. Each swap and each module left is logged (logger
``fusedattn.convert``, level INFO) and returned on request.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from . import reference, registry

__all__ = ["convert", "Report"]

log = logging.getLogger("fusedattn.convert")

_ORIGIN = "_fusedattn_origin"  # instance attribute: the class (or SimAM object) it came from


@dataclass
class Report:
    """What ``convert`` did: ``swapped`` as (path, from, to), ``left`` as (path, class, reason)."""

    to: str
    swapped: list = field(default_factory=list)
    left: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fusedattn.convert(to={self.to!r}): {len(self.swapped)} swapped, "
                 f"{len(self.left)} left"]
        lines += [f"  swapped {p or '<model>'}: {a} -> {b}" for p, a, b in self.swapped]
        lines += [f"  left    {p or '<model>'}: {c}: {why}" for p, c, why in self.left]
        return "\n".join(lines)


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _ops():
    return list(registry.OPS.values())


# ----------------------------------------------------------------------------- SimAM by probing

def _probe_inputs():
    g = torch.Generator().manual_seed(1234)
    # small variances, so that e_lambda (~1e-4) is not lost next to sum(d) / n
    x1 = 0.02 * torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64) + 0.1
    x2 = 0.05 * torch.randn(1, 4, 6, 6, generator=g, dtype=torch.float64) - 0.2
    return x1, x2


def _is_parameter_free(m: nn.Module) -> bool:
    return next(m.parameters(), None) is None and next(m.buffers(), None) is None


def _simam_lambda(m: nn.Module) -> float | None:
    """The e_lambda for which m's forward is SimAM's on the probe inputs, else None."""
    x1, x2 = _probe_inputs()
    try:
        with torch.no_grad():
            y1, y2 = m(x1.clone()), m(x2.clone())
    except Exception:
        return None
    if not all(isinstance(y, torch.Tensor) and y.shape == x.shape and y.dtype == x.dtype
               for x, y in ((x1, y1), (x2, y2))):
        return None
    # y = x sigmoid(t + 1/2), t = d / (4 (sum(d) / n + lambda))  =>  lambda = d / (4 t) - sum(d) / n
    d = (x1 - x1.mean(dim=(2, 3), keepdim=True)) ** 2
    s_n = d.sum(dim=(2, 3), keepdim=True) / (x1[0, 0].numel() - 1)
    r = (y1 / x1).clamp(1e-12, 1 - 1e-12)
    t = torch.log(r / (1 - r)) - 0.5
    big = d > 0.5 * d.amax(dim=(2, 3), keepdim=True)  # well-conditioned elements only
    if not bool(big.any()) or not bool((t[big] > 0).all()):
        return None
    lam = (d / (4 * t) - s_n)[big].median().item()
    if not math.isfinite(lam) or lam < -1e-9:
        return None
    lam = max(lam, 0.0)
    for x, y in ((x1, y1), (x2, y2)):
        if not torch.allclose(y, reference.simam(x, lam), rtol=1e-9, atol=1e-12):
            return None
    return float(f"{lam:.10g}")  # 1e-4 comes back as 1e-4, not 1.0000000000012e-4


def _simam_candidate(m: nn.Module) -> bool:
    mod = type(m).__module__
    return (_is_parameter_free(m) and not mod.startswith("torch.")
            and not (m._forward_hooks or m._forward_pre_hooks))


# ----------------------------------------------------------------------------- the walk

def _to_fused(m: nn.Module, report: Report, path: str):
    """The fused module for m (m itself, class swapped; or a new SimAM), or None."""
    cls = type(m)
    name = _qualname(cls)
    for op in _ops():
        fused, ref = op.fused_cls(), op.reference_cls()
        if cls is fused:
            return None
        if cls is ref or name in op.adopts:
            why = fused.adopt(m) if hasattr(fused, "adopt") else ""
            if not why:
                m.__dict__[_ORIGIN] = cls
                m.__class__ = fused
                why = m._unfusable() if hasattr(m, "_unfusable") else ""
                if why:
                    m.__class__ = cls
                    del m.__dict__[_ORIGIN]
            if why:
                report.left.append((path, name, f"{why}: the fused module would run eager"))
                return None
            report.swapped.append((path, name, _qualname(fused)))
            return m
        if isinstance(m, ref) and not isinstance(m, fused):
            report.left.append((path, name, f"a subclass of {_qualname(ref)}: its forward may "
                                            "differ from the reference's"))
            return None
    if _simam_candidate(m):
        lam = _simam_lambda(m)
        if lam is not None:
            from .modules import SimAM
            new = SimAM(e_lambda=lam)
            new.train(m.training)
            new.__dict__[_ORIGIN] = m
            report.swapped.append((path, name, f"{_qualname(SimAM)}(e_lambda={lam:g})"))
            return new
        if "simam" in cls.__name__.lower():
            report.left.append((path, name, "its forward does not match SimAM on probe inputs"))
    elif "simam" in cls.__name__.lower() and (m._forward_hooks or m._forward_pre_hooks):
        report.left.append((path, name, "it has forward hooks (not probed)"))
    return None


def _to_eager(m: nn.Module, report: Report, path: str):
    cls = type(m)
    for op in _ops():
        if cls is op.fused_cls():
            origin = m.__dict__.pop(_ORIGIN, None)
            if isinstance(origin, nn.Module):  # a SimAM found by probing: the user's object
                origin.train(m.training)
                report.swapped.append((path, _qualname(cls), _qualname(type(origin))))
                return origin
            target = origin if isinstance(origin, type) else op.reference_cls()
            m.__class__ = target
            if _qualname(target) in op.adopts and "channels" in m.__dict__:
                del m.__dict__["channels"]  # set by adopt(); the other library's class has none
            report.swapped.append((path, _qualname(cls), _qualname(target)))
            return m
    return None


def _walk(model: nn.Module, swap, report: Report) -> nn.Module:
    """Apply swap top-down; a swapped module's children are not visited. Shared instances are
    swapped once and replaced in every parent."""
    done: dict[int, nn.Module | None] = {}

    def visit(m: nn.Module, path: str) -> nn.Module:
        if id(m) in done:
            return done[id(m)] or m
        new = swap(m, report, path)
        done[id(m)] = new
        if new is not None:
            return new
        for name, child in list(m._modules.items()):
            if child is not None:
                replaced = visit(child, f"{path}.{name}" if path else name)
                if replaced is not child:
                    m._modules[name] = replaced
        return m

    return visit(model, "")


def convert(model: nn.Module, to: str = "fused", *, return_report: bool = False):
    """Swap, in place, every attention module of ``model`` that fusedattn recognises for its
    fused twin (``to="fused"``), or every fused module back to an eager one (``to="eager"``).

    Returns the model (a new object only when the model itself is a replaced SimAM), or
    ``(model, Report)`` with ``return_report=True``. See the module docstring for what is
    recognised and what is kept.
    """
    if to not in ("fused", "eager"):
        raise ValueError(f"fusedattn.convert: to must be 'fused' or 'eager', got {to!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"fusedattn.convert: expected an nn.Module, got {type(model).__name__}")
    report = Report(to)
    model = _walk(model, _to_fused if to == "fused" else _to_eager, report)
    for p, a, b in report.swapped:
        log.info("swapped %s: %s -> %s", p or "<model>", a, b)
    for p, c, why in report.left:
        log.info("left %s (%s): %s", p or "<model>", c, why)
    return (model, report) if return_report else model
