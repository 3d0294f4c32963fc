"""One entry per public op: what dispatch, the benchmark, the AOT check and the test matrix read.

Adding an op is one ``Op(...)`` in ``OPS``:

- ``kernel``: the ``fusedattn::`` C++ op whose registered CPU / CUDA kernels say whether the
  native backends run it (``status``);
- ``triton``: the module of ``triton_kernels`` holding its Triton kernels (None: no Triton
  backend); its ``aot_variants()`` are compiled by ``python -m fusedattn.aot``;
- ``fused`` / ``reference``: the module classes (``fusedattn.<X>`` / ``fusedattn.reference.<X>``),
  constructed as ``cls(channels)``, or by ``make(cls, shape)`` for an input shape (N, C, H, W)
  where the constructor needs more than the channels (AugmentedConv2d: its grid, its sizes);
  ``Op.build(cls, shape)`` does either;
- ``baseline``: the eager module a user holds, the benchmark's eager provider (timm's where one
  exists, else our reference), as ``callable(channels) -> nn.Module`` loaded into ``fused``;
- ``bench_providers``: the module holding the op's own benchmark providers for
  ``python -m fusedattn.bench`` (its ``PROVIDERS``, ``PARTS``, ``SHAPES``, ``case``,
  ``unsupported``, ...: see ``fusedattn.bench.op_bench``); None: the generic providers (eager
  baseline, torch.compile of it, fused, clone) on the generic shapes;
- ``adopts``: the qualified names of other libraries' eager classes with the reference's
  parameters, children and forward, which ``fusedattn.convert`` turns into ``fused`` (the fused
  class's ``adopt`` checks an instance's options).
"""
from __future__ import annotations

import importlib
import math
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
    make: Callable | None = None  # (cls, shape) -> module for (N, C, H, W) inputs; None: cls(C)
    bench_providers: str | None = None  # module of custom benchmark providers; None: generic

    def fused_cls(self):
        return getattr(importlib.import_module("fusedattn"), self.fused)

    def reference_cls(self):
        return getattr(importlib.import_module("fusedattn.reference"), self.reference)

    def build(self, cls, shape):
        """A module of class ``cls`` (the fused or the reference class) for inputs of
        ``shape`` (N, C, H, W)."""
        return self.make(cls, tuple(shape)) if self.make is not None else cls(shape[1])

    def baseline_module(self, channels: int, shape=None):
        """The eager module users hold (timm's if installed and there is one); an op built by
        ``make`` needs the input ``shape``."""
        if self.make is not None:
            if shape is None:
                raise ValueError(f"{self.name}: its modules are built for an input shape; "
                                 f"pass shape=(N, C, H, W)")
            return self.build(self.reference_cls(), shape)
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


def _aaconv(cls, shape):
    """The paper's ResNet setting for (N, C, H, W) inputs (fusedattn/spec/aaconv.md):
    out_channels = C, a 3x3 convolution, Nh = 8, dk = max(0.2 C, 20 Nh) and dv = 0.1 C rounded
    up to multiples of Nh, on the H x W grid."""
    C, H, W = shape[1:]
    nh = 8

    def up(v):
        return max(nh, -(-int(math.ceil(v)) // nh) * nh)
    return cls(C, C, 3, max(up(0.2 * C), 20 * nh), up(0.1 * C), nh, (H, W))


def _stn(cls, shape):
    """A spatial transformer for (N, C, H, W) inputs: the default localisation network for C
    channels, output of the input's size."""
    return cls(in_channels=shape[1])


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
    Op("aaconv", "rel_attention", "aaconv", "AugmentedConv2d", "AugmentedConv2d",
       doc="attention-augmented convolution (Bello et al. 2019), 2-D relative self-attention",
       make=_aaconv, bench_providers="fusedattn.bench_aaconv"),
    Op("stn", "affine_sample", "stn", "SpatialTransformer", "SpatialTransformer",
       doc="spatial transformer (Jaderberg et al. 2015), affine bilinear sampling",
       make=_stn, bench_providers="fusedattn.bench_stn"),
)}


def get(name: str) -> Op:
    try:
        return OPS[name]
    except KeyError:
        raise ValueError(f"fusedattn: unknown op {name!r}; expected one of {tuple(OPS)}") from None


def triton_modules() -> tuple[str, ...]:
    """The triton_kernels modules of all ops, each once (the AOT check compiles them)."""
    return tuple(dict.fromkeys(op.triton for op in OPS.values() if op.triton))
