"""Spatial transformer (issue 13): fusedattn.affine_sample and fusedattn.SpatialTransformer
against F.affine_grid + F.grid_sample (fusedattn.reference), on every backend that runs here."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedattn
from fusedattn import reference
from fusedattn.ops import stn as stn_ops
from helpers import ATOL, assert_tolerance, max_err

F64 = torch.float64
# PyTorch's note on affine_grid for size-1 outputs with align_corners=True (the reference's
# behaviour, which the fused op follows)
pytestmark = pytest.mark.filterwarnings("ignore:Since version 1.3.0, affine_grid behavior")


def rot(a, s=1.0, tx=0.0, ty=0.0, sy=None):
    sy = s if sy is None else sy
    return torch.tensor([[s * math.cos(a), -s * math.sin(a), tx],
                         [sy * math.sin(a), sy * math.cos(a), ty]], dtype=F64)


# transforms away from pixel lines (a tiny random nudge is added per case): bilinear sampling
# has a kink on them, where the derivative depends on the side (see test_kinks_take_floor_side)
THETAS = {
    "identity": rot(0.0),
    "rot30": rot(math.pi / 6),
    "rot90": rot(math.pi / 2),
    "rot180": rot(math.pi),
    "zoom_in": rot(0.3, 0.5, 0.2, -0.1),
    "zoom_out": rot(-0.7, 2.0),
    "tiny": rot(0.2, 0.1),
    "shear": torch.tensor([[1.0, 0.4, 0.1], [-0.3, 0.8, 0.05]], dtype=F64),
    "far": rot(0.1, 1.0, 5.0, -7.0),
    "very_far": rot(0.0, 1.0, 1e4, 3.0),
    "zero": torch.tensor([[0.0, 0.0, 0.13], [0.0, 0.0, -0.31]], dtype=F64),
    "rank1": torch.tensor([[0.3, 0.6, 0.1], [0.6, 1.2, 0.2]], dtype=F64),
    "rank1_rows": torch.tensor([[1.1, 0.0, 0.07], [0.0, 0.0, 0.21]], dtype=F64),
    "random": torch.tensor([[0.9, -0.35, 0.2], [0.25, 1.15, -0.3]], dtype=F64),
}
SINGULAR = ("zero", "rank1", "rank1_rows")


def nudged(theta: torch.Tensor, N: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = theta.expand(N, 2, 3).clone()
    t[1:] *= 0.93  # samples differ
    if theta[:, :2].abs().sum() == 0 or torch.linalg.matrix_rank(theta[:, :2]) < 2:
        return t + 1e-6 * torch.randn(N, 2, 3, generator=g, dtype=F64) * (t != 0)
    return t + 1e-6 * torch.randn(N, 2, 3, generator=g, dtype=F64)


def layout(x, name):
    return x.contiguous(memory_format=torch.channels_last) if name == "cl" else x


def ref_run(x, theta, size, align, g):
    x, theta = x.detach().requires_grad_(), theta.detach().requires_grad_()
    y = reference.affine_sample(x, theta, size, align)
    dx, dt = torch.autograd.grad(y, (x, theta), g)
    return y, dx, dt


def fused_run(x, theta, size, align, g):
    x, theta = x.detach().requires_grad_(), theta.detach().requires_grad_()
    y = fusedattn.affine_sample(x, theta, size, align)
    dx, dt = torch.autograd.grad(y, (x, theta), g)
    return y, dx, dt


def close64(a, b, what, rel=1e-11):
    scale = max(1.0, b.abs().max().item())
    assert max_err(a, b) <= rel * scale, f"{what}: {max_err(a, b):.3g} (scale {scale:.3g})"


# ----------------------------------------------------------------------------- fp64 vs PyTorch

@pytest.mark.parametrize("name", list(THETAS))
@pytest.mark.parametrize("size", [None, (5, 11), (1, 1), (1, 6), (12, 4)],
                         ids=["same", "5x11", "1x1", "1x6", "12x4"])
@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("lay", ["planar", "cl"])
def test_fp64_matches_affine_grid_grid_sample(backend_device, name, size, align, lay):
    backend, device = backend_device
    if backend == "triton" and device == "cpu" and (size not in (None, (1, 6)) or lay == "cl"):
        pytest.skip("interpreter: a subset of sizes and layouts")
    x = layout(torch.randn(2, 3, 7, 9, dtype=F64, device=device), lay)
    theta = nudged(THETAS[name], 2).to(device)
    y_ref = reference.affine_sample(x, theta, size, align)
    g = torch.randn_like(y_ref)
    want = ref_run(x, theta, size, align, g)
    got = fused_run(x, theta, size, align, g)
    assert fusedattn.last_backend("stn") == backend
    for what, a, b in zip(("y", "dx", "dtheta"), got, want):
        close64(a, b, f"{name} {what}")
    assert got[0].is_contiguous(memory_format=torch.channels_last if lay == "cl" and
                                x.shape[1] > 1 else torch.contiguous_format)
    assert got[1].stride() == x.stride()


@pytest.mark.parametrize("align", [False, True])
def test_kinks_take_floor_side(backend_device, align):
    """Identity, flips and quarter turns with exact entries sample on pixel lines (align False:
    pixel centres; True: pixels), without rounding: y = x exactly for the identity, dx as
    PyTorch's, and dtheta is the derivative from the side floor() picks -- PyTorch's with theta
    nudged so that every coordinate lies just after its line."""
    _, device = backend_device
    x = torch.randn(2, 3, 8, 8, dtype=F64, device=device)
    exact = {"identity": [[1, 0, 0], [0, 1, 0]], "flip": [[-1, 0, 0], [0, 1, 0]],
             "quarter": [[0, -1, 0], [1, 0, 0]], "half_shift": [[1, 0, 0.25], [0, -1, 0]]}
    for name, t in exact.items():
        theta = torch.tensor(t, dtype=F64, device=device).expand(2, 2, 3).contiguous()
        g = torch.randn(2, 3, 8, 8, dtype=F64, device=device)
        y, dx, dt = fused_run(x, theta, None, align, g)
        y_ref, dx_ref, _ = ref_run(x, theta, None, align, g)
        close64(y, y_ref, f"{name} y")
        close64(dx, dx_ref, f"{name} dx")
        if name == "identity":
            assert torch.equal(y, x)
        # just after the line: +1e-9 pixel (theta's translation is in half-widths)
        step = 1e-9 * 2 / (7 if align else 8)
        nudge = torch.tensor([[0, 0, step], [0, 0, step]], dtype=F64, device=device)
        _, _, dt_after = ref_run(x, theta + nudge, None, align, g)
        close64(dt, dt_after, f"{name} dtheta", rel=1e-7)


def test_far_outside_and_nan(backend_device):
    """Samples far outside the image read zeros and give zero gradients, also for an infinite
    translation; a NaN coordinate is treated as outside (zero output; PyTorch gives NaN)."""
    _, device = backend_device
    x = torch.randn(2, 3, 5, 6, dtype=F64, device=device)
    for t in (1e10, -1e30, float("inf")):
        theta = torch.tensor([[1.0, 0.0, t], [0.0, 1.0, 0.0]], dtype=F64,
                             device=device).expand(2, 2, 3).contiguous()
        g = torch.randn(2, 3, 5, 6, dtype=F64, device=device)
        y, dx, dt = fused_run(x, theta, None, False, g)
        assert torch.equal(y, torch.zeros_like(y)) and torch.equal(dx, torch.zeros_like(dx))
        assert torch.equal(dt, torch.zeros_like(dt))
    theta = torch.full((2, 2, 3), float("nan"), dtype=F64, device=device)
    assert torch.equal(fusedattn.affine_sample(x, theta), torch.zeros_like(x))


@pytest.mark.parametrize("align", [False, True])
def test_gradcheck(backend_device, align):
    _, device = backend_device
    x = torch.randn(2, 2, 4, 5, dtype=F64, device=device, requires_grad=True)
    theta = nudged(THETAS["random"], 2).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, t: fusedattn.affine_sample(a, t, (3, 6), align),
                                    (x, theta))


def test_gradcheck_singular(backend_device):
    _, device = backend_device
    x = torch.randn(1, 2, 4, 5, dtype=F64, device=device, requires_grad=True)
    theta = nudged(THETAS["rank1"], 1).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, t: fusedattn.affine_sample(a, t), (x, theta))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lay", ["planar", "cl"])
def test_low_precision_tolerance_rule(backend_device, dtype, lay):
    """y, dx and dtheta within 2x eager's error at the same dtype (eager computes the grid in
    that dtype too; the fused op's coordinates and sums are fp32)."""
    backend, device = backend_device
    if backend == "triton" and device == "cpu" and lay == "cl":
        pytest.skip("interpreter: one layout")
    x64 = layout(torch.randn(2, 4, 10, 12, dtype=F64, device=device), lay)
    theta64 = nudged(THETAS["random"], 2).to(device)
    g64 = torch.randn(2, 4, 9, 13, dtype=F64, device=device)
    exact = ref_run(x64, theta64, (9, 13), False, g64)
    eager = ref_run(x64.to(dtype), theta64.to(dtype), (9, 13), False, g64.to(dtype))
    got = fused_run(x64.to(dtype), theta64.to(dtype), (9, 13), False, g64.to(dtype))
    assert got[0].dtype == dtype and got[2].dtype == dtype
    for what, f, e, ex in zip(("y", "dx", "dtheta"), got, eager, exact):
        assert_tolerance(f, e, ex, what)


def test_theta_of_another_dtype(backend_device):
    """theta is used in fp32 (fp64 for fp64 x) whatever its dtype; its gradient keeps its dtype."""
    _, device = backend_device
    x = torch.randn(2, 3, 6, 7, device=device)
    theta = nudged(THETAS["rot30"], 2).to(device, torch.float64).requires_grad_()
    y = fusedattn.affine_sample(x, theta)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert theta.grad.dtype == torch.float64
    want = reference.affine_sample(x.double(), theta.detach())
    assert max_err(y, want) < 1e-5


def test_only_the_needed_gradients(backend_device):
    """x that does not require grad (STN on input images): only dtheta is computed, and the
    backward op is asked for it alone; likewise theta."""
    backend, device = backend_device
    x = torch.randn(2, 3, 6, 7, dtype=F64, device=device)
    theta = nudged(THETAS["rot30"], 2).to(device)
    fwd = stn_ops._FORWARD_OF_BACKEND[backend]
    bwd = stn_ops._op(stn_ops._BACKWARD_OF[fwd])
    g = torch.randn(2, 3, 6, 7, dtype=F64, device=device)
    dx, dt = bwd(g, x, theta, False, False, True)
    assert dx is None and dt is not None
    dx2, dt2 = bwd(g, x, theta, False, True, False)
    assert dt2 is None and dx2 is not None
    want = ref_run(x, theta, None, False, g)
    close64(dt, want[2], "dtheta"), close64(dx2, want[1], "dx")
    t = theta.clone().requires_grad_()
    fusedattn.affine_sample(x, t).sum().backward()
    assert t.grad is not None


def test_empty(backend_device):
    _, device = backend_device
    for shape in ((0, 3, 5, 6), (2, 0, 5, 6)):
        x = torch.randn(shape, dtype=F64, device=device, requires_grad=True)
        theta = torch.randn(shape[0], 2, 3, dtype=F64, device=device, requires_grad=True)
        y = fusedattn.affine_sample(x, theta, (4, 4))
        assert y.shape == (shape[0], shape[1], 4, 4)
        y.sum().backward()
        assert torch.equal(theta.grad, torch.zeros_like(theta))


# ----------------------------------------------------------------------------- determinism

def test_bitwise_across_runs_and_thread_counts(backend_device):
    """Forward and both gradients give the same bits from run to run and for 1, 2 and 3 threads,
    both layouts, a singular theta (the gather's scanning path) included."""
    backend, device = backend_device
    interp = backend == "triton" and device == "cpu"
    N, C, H, W = (2, 3, 6, 7) if interp else (3, 5, 37, 45)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in ((1, 2) if interp else (1, 2, 3, 1)):
            torch.set_num_threads(n)
            for dtype in (torch.float32, torch.bfloat16):
                for lay in ("planar", "cl"):
                    for name in ("random", "zero", "zoom_in"):
                        gen = torch.Generator().manual_seed(5)
                        x = layout(torch.randn(N, C, H, W, generator=gen).to(device, dtype), lay)
                        theta = nudged(THETAS[name], N).to(device, torch.float32)
                        g = torch.randn(N, C, H + 3, W - 2, generator=gen).to(device, dtype)
                        results.append(((dtype, lay, name), n,
                                        fused_run(x, theta, (H + 3, W - 2), False, g)))
    finally:
        torch.set_num_threads(threads)
    for key, n, got in results:
        first = next(r for k, _, r in results if k == key)
        assert all(torch.equal(a, b) for a, b in zip(got, first)), (key, n)


# ----------------------------------------------------------------------------- torch integration

def test_opcheck(backend_device):
    backend, device = backend_device
    fwd_name = stn_ops._FORWARD_OF_BACKEND[backend]
    fwd, bwd = stn_ops._op(fwd_name), stn_ops._op(stn_ops._BACKWARD_OF[fwd_name])
    for dtype, lay in ((F64, "planar"), (torch.float32, "cl")):
        x = layout(torch.randn(2, 3, 5, 6, dtype=dtype, device=device), lay).requires_grad_()
        theta = nudged(THETAS["random"], 2).to(device, stn_ops.acc_dtype(dtype)).requires_grad_()
        torch.library.opcheck(fwd, (x, theta, 4, 7, False))
        g = torch.randn(2, 3, 4, 7, dtype=dtype, device=device)
        for need in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(bwd, (g, x.detach(), theta.detach(), True, *need))


class STNClassifier(nn.Module):
    """The spatial transformer tutorial's MNIST classifier: STN, then a small CNN."""

    def __init__(self, stn_cls):
        super().__init__()
        self.stn = stn_cls(in_channels=1)
        self.conv = nn.Conv2d(1, 4, 5)
        self.fc = nn.Linear(4 * 12 * 12, 10)

    def forward(self, x):
        x = self.stn(x)
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return F.log_softmax(self.fc(x.flatten(1)), dim=1)


def test_compile_fullgraph_stn_classifier(backend_device):
    """torch.compile(fullgraph=True) of an STN classifier (inductor on CPU) against the eager
    reference model: outputs and every parameter gradient, the localisation's included (moved
    off the identity first, so that gradients flow everywhere)."""
    backend, device = backend_device
    torch.manual_seed(0)
    ref = STNClassifier(reference.SpatialTransformer).to(device, F64)
    with torch.no_grad():
        ref.stn.localization[-1].weight.normal_(std=0.01)
        ref.stn.localization[-1].bias.add_(torch.tensor([0.01, 0.02, -0.03, 0.01, -0.02, 0.04],
                                                        dtype=F64))
    fused = STNClassifier(fusedattn.SpatialTransformer).to(device, F64)
    fused.load_state_dict(ref.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True,
                             backend="aot_eager" if backend == "triton" else "inductor")
    x = torch.randn(3, 1, 28, 28, dtype=F64, device=device)
    target = torch.tensor([1, 5, 7], device=device)
    out, want = compiled(x), ref(x)
    F.nll_loss(out, target).backward()
    F.nll_loss(want, target).backward()
    close64(out, want, "logits")
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        close64(p.grad, q.grad, name, rel=1e-9)
    assert fusedattn.last_backend("stn") == backend


def test_autocast_runs_in_the_input_dtype():
    """Under CPU autocast the localisation's Linear gives a bf16 theta; the sampler runs in x's
    dtype (fp32 here) with theta in fp32, and its gradient reaches the bf16 theta."""
    torch.manual_seed(0)
    m = fusedattn.SpatialTransformer(in_channels=3)
    x = torch.randn(2, 3, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, theta = m(x, return_theta=True)
    assert theta.dtype == torch.bfloat16 and y.dtype == torch.float32
    assert max_err(y, reference.affine_sample(x.double(), theta.double())) < 1e-5
    y.square().sum().backward()
    assert m.localization[-1].bias.grad is not None


def test_autograd_keeps_x_and_theta_only(backend_device):
    """The fused sampler saves x and theta for backward, no grid (the eager pair saves the
    (N, Ho, Wo, 2) grid too)."""
    _, device = backend_device
    x = torch.randn(2, 1, 12, 10, device=device, requires_grad=True)
    theta = nudged(THETAS["rot30"], 2).to(device, torch.float32).requires_grad_()

    def saved(fn):
        got = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: got.append(t) or t, lambda t: t):
            fn(x, theta).sum().backward()
        return got
    got = saved(fusedattn.affine_sample)
    assert sorted(t.numel() for t in got) == sorted([theta.numel(), x.numel()])
    assert any(t.data_ptr() == x.data_ptr() for t in got)
    eager = saved(reference.affine_sample)
    assert any(t.shape == (2, 12, 10, 2) for t in eager)  # the check can see a grid


def test_double_backward_refused():
    x = torch.randn(1, 2, 5, 5, dtype=F64, requires_grad=True)
    theta = nudged(THETAS["rot30"], 1).requires_grad_()
    (dx,) = torch.autograd.grad(fusedattn.affine_sample(x, theta).square().sum(), x,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through SpatialTransformer"):
        dx.sum().backward()


# ----------------------------------------------------------------------------- bad input

def test_bad_input():
    x = torch.randn(2, 3, 5, 6)
    theta = torch.randn(2, 2, 3)
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\)"):
        fusedattn.affine_sample(x[0], theta)
    with pytest.raises(ValueError, match=r"theta must have shape"):
        fusedattn.affine_sample(x, theta[:1])
    with pytest.raises(ValueError, match=r"theta must have shape"):
        fusedattn.affine_sample(x, torch.randn(2, 3, 3))
    with pytest.raises(TypeError, match="floating-point"):
        fusedattn.affine_sample(x.long(), theta)
    with pytest.raises(TypeError, match="floating-point"):
        fusedattn.affine_sample(x, theta.int())
    with pytest.raises(ValueError, match="x's N and C"):
        fusedattn.affine_sample(x, theta, (2, 4, 5, 5))
    with pytest.raises(ValueError, match="positive"):
        fusedattn.affine_sample(x, theta, (0, 5))
    with pytest.raises(TypeError, match="size must be"):
        fusedattn.affine_sample(x, theta, 5)
    with pytest.raises(ValueError, match="size must be"):
        fusedattn.affine_sample(x, theta, (5, 5, 5))
    with pytest.raises(TypeError, match="align_corners"):
        fusedattn.affine_sample(x, theta, None, 1)
    with pytest.raises(ValueError, match="positive H and W"):
        fusedattn.affine_sample(torch.randn(2, 3, 0, 4), theta)


def test_op_checks_its_arguments():
    ops = torch.ops.fusedattn
    x = torch.randn(2, 3, 5, 6)
    theta = torch.randn(2, 2, 3)
    with pytest.raises(RuntimeError, match="contiguous theta of dtype Float"):
        ops.affine_sample(x, theta.double(), 4, 4, False)
    with pytest.raises(RuntimeError, match="contiguous theta"):
        ops.affine_sample(x, theta.transpose(1, 2).contiguous().transpose(1, 2), 4, 4, False)
    with pytest.raises(ValueError, match="contiguous or channels-last x"):
        ops.affine_sample(x.transpose(2, 3), theta, 4, 4, False)
    with pytest.raises(ValueError, match="positive input and output sizes"):
        ops.affine_sample(x, theta, 0, 4, False)
    with pytest.raises(RuntimeError, match="dy in x's dtype"):
        ops.affine_sample_backward(torch.randn(2, 3, 4, 4).double(), x, theta, False, True, True)
    with pytest.raises(ValueError, match="expected dy of shape"):
        ops.affine_sample_backward(torch.randn(2, 4, 4, 4), x, theta, False, True, True)


# ----------------------------------------------------------------------------- module

def test_module_starts_at_identity_and_matches_reference(backend_device):
    _, device = backend_device
    torch.manual_seed(0)
    ref = reference.SpatialTransformer(in_channels=3, out_size=(6, 10)).to(device, F64)
    fused = fusedattn.SpatialTransformer(in_channels=3, out_size=(6, 10)).to(device, F64)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 12, 20, dtype=F64, device=device)
    y, theta = fused(x, return_theta=True)
    ident = torch.tensor(reference.IDENTITY_THETA, dtype=F64, device=device).view(2, 3)
    assert torch.equal(theta, ident.expand(2, 2, 3))
    close64(y, ref(x), "y")
    same = fusedattn.SpatialTransformer(in_channels=3).to(device, F64)
    assert torch.equal(same(x), x)  # the identity at the input's size is exact


def test_module_with_a_user_localization():
    loc = nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 6))
    m = fusedattn.SpatialTransformer(loc)
    assert torch.equal(loc[1].weight, torch.zeros_like(loc[1].weight))
    x = torch.randn(3, 2, 4, 4)
    assert m(x).shape == x.shape
    with pytest.raises(ValueError, match="6 outputs"):
        fusedattn.SpatialTransformer(nn.Sequential(nn.Flatten(), nn.Linear(32, 4)))
    keep = nn.Sequential(nn.Flatten(), nn.Linear(32, 6, bias=False))
    w = keep[1].weight.clone()
    fusedattn.SpatialTransformer(keep, init_identity=False)
    assert torch.equal(keep[1].weight, w)
    with pytest.raises(ValueError, match="in_channels"):
        fusedattn.SpatialTransformer()
    with pytest.raises(TypeError, match="nn.Module"):
        fusedattn.SpatialTransformer(lambda x: x)
    with pytest.raises(ValueError, match="6 numbers per sample"):
        fusedattn.SpatialTransformer(nn.Sequential(nn.Flatten(), nn.Linear(32, 6), nn.Linear(6, 5)),
                                     init_identity=False)(x)
    with pytest.raises(ValueError, match="out_size"):
        fusedattn.SpatialTransformer(in_channels=2, out_size=(0, 3))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        m(x[0])


def test_module_theta_and_sampler_share_the_reference_state_dict():
    ref = reference.SpatialTransformer(in_channels=1)
    fused = fusedattn.SpatialTransformer(in_channels=1)
    assert ref.state_dict().keys() == fused.state_dict().keys()
    assert isinstance(fused, reference.SpatialTransformer)
    assert "out_size=None" in repr(fused)


def test_convert_swaps_both_ways():
    torch.manual_seed(0)
    net = nn.Sequential(reference.SpatialTransformer(in_channels=2, out_size=5), nn.ReLU())
    with torch.no_grad():
        net[0].localization[-1].bias.add_(0.05)
    x = torch.randn(2, 2, 7, 6, dtype=F64)
    net = net.double()
    want = net(x)
    net, report = fusedattn.convert(net, return_report=True)
    assert type(net[0]) is fusedattn.SpatialTransformer and len(report.swapped) == 1
    close64(net(x), want, "y")
    assert fusedattn.last_backend("stn") == "cpu"
    fusedattn.convert(net, to="eager")
    assert type(net[0]) is reference.SpatialTransformer
