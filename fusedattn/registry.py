"""One entry per public op: what dispatch, the benchmark, the AOT check and the test matrix read.

Adding an op is one ``Op(...)`` in ``OPS``:

- ``kernel``: the ``fusedattn::`` C++ op whose registered CPU / CUDA kernels say whether the
  native backends run it (``status``);
- ``triton``: the module of ``triton_kernels`` holding its Triton kernels (None: no Triton
  backend); its ``aot_variants()`` are compiled by ``python -m fusedattn.aot``;
- ``fused`` / ``reference``: the module classes (``fusedattn.<X>`` / ``fusedattn.reference.<X>``),
  constructed as ``cls(channels)``;
- ``baseline``: the eager module a user holds, the benchmark's eager provider (timm's where one
  exists, else our reference), as ``callable(channels) -> nn.Module`` loaded into ``fused``;
- ``adopts``: the qualified names of other libraries' eager classes with the reference's
  parameters, children and forward, which ``fusedattn.convert`` turns into ``fused`` (the fused
  class's ``adopt`` checks an instance's options).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Op:
    name: str
    kernel: str
    triton: str | None
    fused: str
    reference: str
    baseline: Callable | None = None  # None: the reference class
    adopts: tuple[str, ...] = ()
    doc: str = ""

    def fused_cls(self):
        return getattr(importlib.import_module("fusedattn"), self.fused)

    def reference_cls(self):
        return getattr(importlib.import_module("fusedattn.reference"), self.reference)

    def baseline_module(self, channels: int):
        """The eager module users hold (timm's if installed and there is one)."""
        if self.baseline is not None:
            try:
                return self.baseline(channels)
            except ImportError:
                pass
        return self.reference_cls()(channels)


def _timm(name):
    """timm's module for attention type ``name`` (``timm.layers.create_attn``)."""
    def make(channels):
        import timm.layers
        return timm.layers.create_attn(name, channels)
    make.__name__ = f"timm.layers.create_attn({name!r})"
    return make


OPS = {op.name: op for op in (
    Op("simam", "simam_forward", "simam", "SimAM", "SimAM",
       doc="SimAM (Yang et al. 2021), parameter-free"),
    Op("ham", "pool_pixels", "passes", "HAM", "HAM", doc="HAM (Li et al. 2022)"),
    Op("se", "pool_pixels", "passes", "SE", "SE", _timm("se"),
       adopts=("timm.layers.squeeze_excite.SEModule",), doc="squeeze-and-excitation, timm's SEModule"),
    Op("eca", "pool_pixels", "passes", "ECA", "ECA", _timm("eca"),
       adopts=("timm.layers.eca.EcaModule",), doc="efficient channel attention, timm's EcaModule"),
    Op("cbam", "pool_pixels", "passes", "CBAM", "CBAM", _timm("cbam"),
       adopts=("timm.layers.cbam.CbamModule",), doc="CBAM, timm's CbamModule"),
)}


def get(name: str) -> Op:
    try:
        return OPS[name]
    except KeyError:
        raise ValueError(f"fusedattn: unknown op {name!r}; expected one of {tuple(OPS)}") from None


def triton_modules() -> tuple[str, ...]:
    """The triton_kernels modules of all ops, each once (the AOT check compiles them)."""
    return tuple(dict.fromkeys(op.triton for op in OPS.values() if op.triton))
