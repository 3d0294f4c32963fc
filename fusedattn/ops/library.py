"""What every op family needs of torch.library: an op by its qualified name, whether a C++
schema exists, and the registration of a forward op with its backward op."""
from __future__ import annotations

from typing import Callable

import torch

from .. import dispatch


def op(name: str):
    """The OpOverload of ``"namespace::op"``."""
    ns, name = name.split("::")
    return getattr(getattr(torch.ops, ns), name).default


def native_schema(name: str) -> bool:
    """The C++ schema of ``"fusedattn::op"`` exists: ``_C`` loaded, and built with this op (an
    older build has none)."""
    if dispatch._native()[0] is None:
        return False
    try:
        op(name)
    except (AttributeError, RuntimeError):
        return False
    return True


def register(fwd: str, bwd: str, fake_forward: Callable, fake_backward: Callable,
             backward: Callable, setup_context: Callable) -> None:
    """Fake kernels for ``fwd`` and ``bwd``, and ``fwd``'s autograd (``backward`` calls ``bwd``)."""
    torch.library.register_fake(fwd)(fake_forward)
    torch.library.register_fake(bwd)(fake_backward)
    torch.library.register_autograd(fwd, backward, setup_context=setup_context)
