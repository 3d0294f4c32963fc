"""Test configuration. Without a GPU the Triton kernels run in the interpreter on CPU tensors:
TRITON_INTERPRET must be set before triton is imported, so it is set here, first."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Compile from scratch in tests: the on-disk caches of inductor and AOT autograd key on the graph,
# not on the fake kernels of our ops, so a stale entry could outlive a change to them.
torch._inductor.config.fx_graph_cache = False  # noqa: E402
torch._functorch.config.enable_autograd_cache = False  # noqa: E402

import fusedattn  # noqa: E402
from helpers import BACKEND_DEVICES  # noqa: E402


@pytest.fixture(params=BACKEND_DEVICES, ids=[f"{b}-{d}" for b, d in BACKEND_DEVICES])
def backend_device(request):
    """(backend, device) pairs that run here: C++ on CPU tensors, Triton in the interpreter
    without a GPU, and the GPU backends on CUDA tensors when a GPU is present."""
    backend, device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (none visible to torch here)")
    # skipped when the backend runs no op here; one it runs for some ops but not the op under
    # test fails there (BackendUnavailable), as a missing kernel should
    report = [per_op[backend] for per_op in fusedattn.backends().values()]
    if not any(st.available for st in report):
        reasons = "; ".join(dict.fromkeys(st.reason for st in report))
        pytest.skip(f"backend {backend} unavailable here: {reasons}")
    with fusedattn.use_backend(backend):
        yield backend, device


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
