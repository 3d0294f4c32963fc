"""torch.library ops (schemas, fake kernels, autograd) and backend dispatch: the one place that
knows about backends."""
from .simam import simam

__all__ = ["simam"]
