"""nn.Modules over the fused ops (same constructors and state_dicts as ``fusedattn.reference``)."""
from __future__ import annotations

import torch
from torch import nn

from . import dispatch, reference
from .ops import simam
from .ops.ham import ham as ham_op
from .ops.simam import check_lambda


class SimAM(nn.Module):
    """Fused SimAM (spec/simam.md). No parameters; ``channels`` is accepted and ignored
    (YOLO-style parsers pass it), so its state_dict is empty like ``nn.Identity``'s."""

    def __init__(self, channels: int | None = None, e_lambda: float = 1e-4):
        super().__init__()
        check_lambda(e_lambda)
        self.e_lambda = e_lambda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return simam(x, self.e_lambda)

    def extra_repr(self) -> str:
        return f"e_lambda={self.e_lambda}"


class HAM(reference.HAM):
    """Fused HAM (spec/ham.md): the eager reference's constructor, parameters and state_dict
    (it subclasses ``fusedattn.reference.HAM``, so ``load_state_dict`` moves weights both ways),
    with the passes over full-size tensors fused (``fusedattn.ops.ham``). Backend ``eager`` runs
    the reference forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reference.check_ham_input(x, self.channels)
        if x.numel() == 0:
            return x.clone()
        backend = dispatch.select("ham", x)
        if backend == "eager":
            return super().forward(x)
        return ham_op(self, x, backend)
