"""Which backends can run here, which one an op uses, and how a user chooses.

Backends:
  ``cpu``     C++ kernels in ``fusedattn._C`` for CPU tensors.
  ``cuda``    CUDA C++ kernels in ``fusedattn._C`` for CUDA tensors.
  ``triton``  Triton kernels for CUDA tensors; for CPU tensors only under ``TRITON_INTERPRET=1``
              (set before triton is imported).
  ``eager``   the eager reference (``fusedattn.reference``), for any device.

Ops are named by their public names (``fusedattn.registry.OPS``: "simam", "ham", "se", "eca",
"cbam"). Default: CPU tensors use ``cpu``; CUDA tensors use ``triton``, then ``cuda`` if triton cannot run
(with a warning that names the reason). A backend chosen with :func:`use_backend` or the
environment variable ``FUSEDATTN_BACKEND`` must run, or the op raises
:class:`BackendUnavailable` with the reason: nothing falls back silently.
:func:`last_backend` tells which backend the last call of an op used (``eager`` included).

Export: ``torch.export`` and ``torch.compile`` record the fused ops. ``torch.jit.trace`` and
``torch.onnx.export`` record the eager reference's math instead (standard ATen / ONNX ops, so the
saved graph runs without fusedattn, in libtorch or onnxruntime): the fused ops' autograd lives in
Python, which a TorchScript graph cannot hold, and ONNX has no kernels of ours. ``last_backend``
then says ``eager``.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from dataclasses import dataclass

import torch

from . import registry

NAMES = ("cpu", "cuda", "triton", "eager")
_DEFAULT_ORDER = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}


class BackendUnavailable(RuntimeError):
    """The chosen backend cannot run this call; the message says why."""


@dataclass(frozen=True)
class Status:
    available: bool
    reason: str  # why not, or what it runs on


def _built_torch() -> str | None:
    """The torch version ``fusedattn._C`` was built against (``fusedattn/_build_info.py``, written
    by setup.py beside the .so), or None for a build that predates that file."""
    try:
        from . import _build_info
    except ImportError:
        return None
    return getattr(_build_info, "TORCH_VERSION", None)


@functools.cache
def _native():
    """``fusedattn._C`` or why it cannot be loaded, as text with the torch it was built against
    and the one running. A build for another torch is not loaded at all: C++ extensions have no
    ABI guarantee across torch versions, so it could crash or misbehave instead of failing."""
    built, running = _built_torch(), torch.__version__
    rebuild = ("; rebuild it against the running torch: `pip install --no-build-isolation .` "
               "(`-e .` in a checkout; see the README's Install section)")
    if built is not None and built != running:
        return None, (f"fusedattn._C was not loaded: built against torch {built}, running torch "
                      f"{running}" + rebuild)
    try:
        return importlib.import_module("fusedattn._C"), ""
    except Exception as exc:  # a missing or mismatched build must not break `import fusedattn`
        built = f"built against torch {built}" if built else "no build record (_build_info.py)"
        return None, (f"fusedattn._C could not be loaded ({type(exc).__name__}: {exc}); {built}, "
                      f"running torch {running}" + rebuild)


def native():
    """The loaded extension module; raises :class:`BackendUnavailable` if it is missing."""
    mod, err = _native()
    if mod is None:
        raise BackendUnavailable(err)
    return mod


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_import_error() -> str:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return ""


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedattn::{op}", key)


def status(name: str, op: str = "simam") -> Status:
    """Whether backend ``name`` can run ``op`` (a public op name) on this machine, and if not,
    why."""
    entry = registry.get(op)
    kernel = entry.kernel
    if name == "eager":
        return Status(True, "eager PyTorch reference, any device")
    if name in ("cpu", "cuda"):
        mod, err = _native()
        if mod is None:
            return Status(False, err)
        key = name.upper()
        if name == "cuda":
            if not mod.cuda_compiled():
                return Status(False, "fusedattn._C was built without CUDA sources (no nvcc or no "
                                     "CUDA build of torch at build time, or FUSEDATTN_CUDA=0)")
            if not _has_kernel(kernel, key):
                return Status(False, f"no CUDA kernel is registered for fusedattn::{kernel}")
            if not torch.cuda.is_available():
                return Status(False, "no CUDA device is visible to torch")
            return Status(True, "CUDA C++ kernels, CUDA tensors")
        if not _has_kernel(kernel, key):
            return Status(False, f"no CPU kernel is registered for fusedattn::{kernel}")
        return Status(True, "C++ kernels, CPU tensors")
    if name == "triton":
        if entry.triton is None:
            return Status(False, f"no Triton kernels for {op} yet")
        err = _triton_import_error()
        if err:
            return Status(False, err)
        if _interpreting():
            return Status(True, "Triton interpreter (TRITON_INTERPRET=1), CPU tensors")
        if not torch.cuda.is_available():
            return Status(False, "no CUDA device is visible to torch (set TRITON_INTERPRET=1 "
                                 "before importing triton to run the kernels on CPU tensors)")
        return Status(True, "Triton kernels, CUDA tensors")
    raise ValueError(f"unknown backend {name!r}; expected one of {NAMES}")


def backends() -> dict[str, Status]:
    """Every backend with whether it can run here and, for the others, why not."""
    return {name: status(name) for name in NAMES}


_chosen: list[str] = []  # stack of use_backend() choices
_last: dict[str, str] = {}


@contextlib.contextmanager
def use_backend(name: str):
    """Run fused ops inside the block on backend ``name`` (raises if it cannot run them)."""
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; expected one of {NAMES}")
    _chosen.append(name)
    try:
        yield
    finally:
        _chosen.pop()


def chosen() -> str | None:
    """The explicitly chosen backend: innermost use_backend(), else FUSEDATTN_BACKEND."""
    if _chosen:
        return _chosen[-1]
    name = os.environ.get("FUSEDATTN_BACKEND", "").strip()
    if name and name not in NAMES:
        raise ValueError(f"FUSEDATTN_BACKEND={name!r} is not a backend; expected one of {NAMES}")
    return name or None


def _runs_on(name: str, device: torch.device) -> str:
    """Why backend ``name`` cannot take a tensor on ``device`` ('' if it can)."""
    if name == "cpu" and device.type != "cpu":
        return f"backend 'cpu' runs CPU tensors, got a tensor on {device}"
    if name == "cuda" and device.type != "cuda":
        return f"backend 'cuda' runs CUDA tensors, got a tensor on {device}"
    if name == "triton":
        if device.type == "cpu" and not _interpreting():
            return ("backend 'triton' runs CPU tensors only in the interpreter "
                    "(TRITON_INTERPRET=1 before triton is imported)")
        if device.type not in ("cpu", "cuda"):
            return f"backend 'triton' runs CUDA tensors, got a tensor on {device}"
    return ""


def exporting() -> str:
    """'torch.jit.trace' or 'torch.onnx.export' while one records a graph, else ''."""
    if torch.jit.is_tracing():
        return "torch.jit.trace"
    if torch.onnx.is_in_onnx_export():
        return "torch.onnx.export"
    return ""


def select(op: str, x: torch.Tensor) -> str:
    """The backend that runs ``op`` (a public op name) on ``x``: ``eager`` while a graph is
    recorded for TorchScript or ONNX (see the module docstring). Under torch.compile the choice is
    made once, when the graph is traced."""
    if exporting():
        return _record(op, "eager")
    return _select(op, x.device.type)


@torch.compiler.assume_constant_result
def _select(op: str, device_type: str) -> str:
    device = torch.device(device_type)
    name = chosen()
    if name is not None:
        st = status(name, op)
        why = _runs_on(name, device) or (st.reason if not st.available else "")
        if why:
            raise BackendUnavailable(f"fusedattn: backend {name!r} cannot run {op}: {why}")
        return _record(op, name)
    reasons = []
    for name in _DEFAULT_ORDER.get(device_type, ()):
        st = status(name, op)
        if st.available and not _runs_on(name, device):
            if reasons:
                warnings.warn(f"fusedattn: {op} runs on backend {name!r} because "
                              + "; ".join(reasons), stacklevel=4)
            return _record(op, name)
        reasons.append(f"{name!r} cannot run: {st.reason or _runs_on(name, device)}")
    raise BackendUnavailable(
        f"fusedattn: no fused backend runs {op} on a {device_type} tensor here"
        + (": " + "; ".join(reasons) if reasons else "")
        + ". Use fusedattn.use_backend('eager') for the eager reference.")


def _record(op: str, name: str) -> str:
    _last[op] = name
    return name


def record(op: str, name: str) -> None:
    """Note that ``op`` ran on backend ``name`` (for the eager fallbacks of the modules)."""
    _record(registry.get(op).name, name)


def last_backend(op: str = "simam") -> str | None:
    """The backend that the last call of ``op`` (a public op name: "simam", "ham", "se", "eca",
    "cbam") ran on (None before any call)."""
    return _last.get(registry.get(op).name)
