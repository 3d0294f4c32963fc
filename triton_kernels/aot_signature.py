"""The AOT signature of a Triton kernel, as its launcher calls it (for ``aot_variants()``)."""
from __future__ import annotations

import inspect


def params(fn) -> list[str]:
    """The kernel's parameter names (a JITFunction or, under the interpreter, InterpretedFunction)."""
    return list(inspect.signature(fn.fn).parameters)


def signature(kernel, t: str, st: str, consts: dict, full_ptrs, ints=None) -> dict:
    """Parameter -> Triton type: "constexpr" for ``consts``, ``*t`` for the pointers to
    full-size tensors (``full_ptrs``), ``*st`` for the other pointers (statistics, workspaces),
    "i32" for the rest (each of them in ``ints`` when given)."""
    sig = {}
    for k in params(kernel):
        if k in consts:
            sig[k] = "constexpr"
        elif k in full_ptrs:
            sig[k] = f"*{t}"
        elif k.endswith("_ptr"):
            sig[k] = f"*{st}"
        else:
            assert ints is None or k in ints, k
            sig[k] = "i32"
    assert set(consts) <= set(sig), (kernel, consts)
    return sig
