"""fusedattn: fused GPU and CPU kernels for CNN attention modules.

    from fusedattn import SimAM, simam, HAM, SE, ECA, CBAM, AugmentedConv2d
    from fusedattn import SpatialTransformer, affine_sample   # spatial transformer, no grid tensor
    model = fusedattn.convert(model)   # timm's / the authors' / our eager modules -> fused, in place
    fusedattn.backends()            # per op: which backends run here, and why the others do not
    with fusedattn.use_backend("triton"): ...
    fusedattn.last_backend("cbam")  # which backend the last CBAM call used

Importing never fails because a backend is missing; asking for that backend does.
"""
from . import reference, registry
from .convert import convert
from .dispatch import BackendUnavailable, backends, last_backend, use_backend
from .modules import CBAM, ECA, HAM, SE, AugmentedConv2d, SimAM, SpatialTransformer
from .ops import simam
from .ops.stn import affine_sample

__all__ = ["SimAM", "simam", "HAM", "SE", "ECA", "CBAM", "AugmentedConv2d",
           "SpatialTransformer", "affine_sample", "convert", "reference",
           "registry", "backends", "use_backend", "last_backend", "BackendUnavailable"]
__version__ = "0.1.0"
