"""fusedattn: fused GPU and CPU kernels for CNN attention modules.

    from fusedattn import SimAM, simam
    fusedattn.backends()            # which backends run here, and why the others do not
    with fusedattn.use_backend("triton"): ...
    fusedattn.last_backend()        # which backend the last SimAM call used

Importing never fails because a backend is missing; asking for that backend does.
"""
from . import reference
from .dispatch import BackendUnavailable, backends, last_backend, use_backend
from .modules import HAM, SimAM
from .ops import simam

__all__ = ["SimAM", "simam", "HAM", "reference", "backends", "use_backend", "last_backend",
           "BackendUnavailable"]
__version__ = "0.1.0"
