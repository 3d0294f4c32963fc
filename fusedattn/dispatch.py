"""Which backends can run here, which one an op uses, and how a user chooses.

Backends:
  ``cpu``     C++ kernels in ``fusedattn._C`` for CPU tensors.
  ``cuda``    CUDA C++ kernels in ``fusedattn._C`` for CUDA tensors.
  ``triton``  Triton kernels for CUDA tensors; for CPU tensors only under ``TRITON_INTERPRET=1``
              (set before triton is imported).
  ``eager``   the eager reference (``fusedattn.reference``), for any device.

Ops are named by their public names (``fusedattn.registry.OPS``: "simam", "ham", "se", "eca",
"cbam", "aaconv", "stn"). Default: CPU tensors use ``cpu``; CUDA tensors use ``triton``, then ``cuda`` if triton cannot run
(with a warning that names the reason). A backend chosen with :func:`use_backend` or the
environment variable ``FUSEDATTN_BACKEND`` must run, or the op raises
:class:`BackendUnavailable` with the reason: nothing falls back silently.
:func:`last_backend` tells which backend the last call of an op used (``eager`` included).
:func:`backends` says, per op, which backends run here and why the others do not.

The choice is a :class:`contextvars.ContextVar`: :func:`use_backend` holds for the thread (and
the asyncio task) that entered it, never for another one; a new thread starts from the process
default. ``FUSEDATTN_BACKEND`` is that process default, read once, when fusedattn is imported (a
later change of ``os.environ`` is not honoured; the next op call warns about it once).

torch.compile: a compiled function reads the choice as eager code does, and dynamo guards on the
value it read (it traces ``ContextVar.get()`` and installs a guard on the result), so after
``use_backend`` changes the choice the function recompiles for the new backend (each choice is
compiled once and cached, like any guarded value). What the default picks for a device type is
fixed for the process.

Export: ``torch.export`` and ``torch.compile`` record the fused ops. ``torch.jit.trace`` and
``torch.onnx.export`` record the eager reference's math instead (standard ATen / ONNX ops, so the
saved graph runs without fusedattn, in libtorch or onnxruntime): the fused ops' autograd lives in
Python, which a TorchScript graph cannot hold, and ONNX has no kernels of ours. ``last_backend``
then says ``eager``.
"""
from __future__ import annotations

import contextlib
import contextvars
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
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedattn::{op}", key)
    except RuntimeError:  # a build from before the op was added has no schema for it
        return False


def status(name: str, op: str) -> Status:
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


def backends(op: str | None = None) -> dict:
    """Which backends can run here, and for the others why not, per public op: ``backends()``
    gives ``{op: {backend: Status}}`` for every op of :data:`fusedattn.registry.OPS`;
    ``backends("ham")`` the ``{backend: Status}`` of one op.

    Per op, because the answer belongs to one op: the native backends run an op when
    ``fusedattn._C`` has a kernel registered for it (a build from before the op was added has
    none), ``triton`` when the op has Triton kernels. A backend available for one op says nothing
    about another."""
    if op is not None:
        return {name: status(name, op) for name in NAMES}  # status: ValueError for an unknown op
    return {name: backends(name) for name in registry.OPS}


def _env_choice() -> str | None:
    return os.environ.get("FUSEDATTN_BACKEND", "").strip() or None


_ENV = _env_choice()  # the process default, read once (see the module docstring)
# This thread's / asyncio task's choice: the innermost use_backend(), else FUSEDATTN_BACKEND. Read
# in traced code (select()): dynamo guards on its value.
_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar("fusedattn_backend",
                                                                       default=_ENV)
_env_warned: set = set()


class _Last:
    """The backend of each op's last call, an attribute per op. Compiled functions set it too (a
    side effect that dynamo replays at each call); an attribute store, unlike a dict store, puts
    no guard on the other ops' entries, so an eager call of another op recompiles nothing."""


_last = _Last()


@contextlib.contextmanager
def use_backend(name: str):
    """Run fused ops inside the block on backend ``name`` (raises if it cannot run them). The
    choice holds for the calling thread (and asyncio task) only; blocks nest. A compiled function
    called inside the block recompiles for the choice (once per choice; then it is cached)."""
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; expected one of {NAMES}")
    token = _choice.set(name)
    try:
        yield
    finally:
        _choice.reset(token)


def _check_choice(name: str | None) -> str | None:
    if name is not None and name not in NAMES:  # use_backend() checks its names: the variable's
        raise ValueError(f"FUSEDATTN_BACKEND={name!r} is not a backend; expected one of {NAMES}")
    return name


def chosen() -> str | None:
    """This thread's explicitly chosen backend: the innermost use_backend(), else
    FUSEDATTN_BACKEND (as read at import), else None."""
    return _check_choice(_choice.get())


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
    recorded for TorchScript or ONNX (see the module docstring).

    Under torch.compile this runs when dynamo traces: the choice is read here, outside
    ``_select``, so that dynamo guards on its value (a compiled function recompiles when
    use_backend changes it), and ``_select`` (an assumed constant) decides from the choice and
    the device type. Noting the backend for :func:`last_backend` is an attribute store, a side
    effect that dynamo replays at every call of the compiled function."""
    if exporting():
        return _record(op, "eager")
    if not torch.compiler.is_compiling():
        _warn_env_changed()
    return _record(op, _select(op, x.device.type, _choice.get()))


def _warn_env_changed() -> None:
    now = _env_choice()
    if now != _ENV and now not in _env_warned:
        _env_warned.add(now)
        warnings.warn(f"fusedattn: FUSEDATTN_BACKEND is now {now!r}, but it is read once, when "
                      f"fusedattn is imported ({_ENV!r} then), and that stays the default; use "
                      f"fusedattn.use_backend(...) to choose a backend while running",
                      stacklevel=4)


@torch.compiler.assume_constant_result
def _select(op: str, device_type: str, name: str | None) -> str:
    device = torch.device(device_type)
    name = _check_choice(name)
    if name is not None:
        st = status(name, op)
        why = _runs_on(name, device) or (st.reason if not st.available else "")
        if why:
            raise BackendUnavailable(f"fusedattn: backend {name!r} cannot run {op}: {why}")
        return name
    reasons = []
    for name in _DEFAULT_ORDER.get(device_type, ()):
        st = status(name, op)
        if st.available and not _runs_on(name, device):
            if reasons:
                warnings.warn(f"fusedattn: {op} runs on backend {name!r} because "
                              + "; ".join(reasons), stacklevel=4)
            return name
        reasons.append(f"{name!r} cannot run: {st.reason or _runs_on(name, device)}")
    raise BackendUnavailable(
        f"fusedattn: no fused backend runs {op} on a {device_type} tensor here"
        + (": " + "; ".join(reasons) if reasons else "")
        + ". Use fusedattn.use_backend('eager') for the eager reference.")


def _record(op: str, name: str) -> str:
    setattr(_last, op, name)
    return name


def record(op: str, name: str) -> None:
    """Note that ``op`` ran on backend ``name`` (for the eager fallbacks of the modules)."""
    _record(registry.get(op).name, name)


def last_backend(op: str = "simam") -> str | None:
    """The backend that the last call of ``op`` (a public op name: "simam", "ham", "se", "eca",
    "cbam") ran on, in any thread (None before any call); calls of compiled functions included."""
    return getattr(_last, registry.get(op).name, None)
