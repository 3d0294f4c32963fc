"""SimAM: fused backends against the eager reference (fusedattn/spec/simam.md)."""
import math

import pytest
import torch

import fusedattn
from fusedattn import reference
from helpers import LOW_PRECISION, assert_close64, assert_tolerance

SHAPES = [
    (2, 3, 7, 9),        # odd sizes
    (1, 3, 1, 1),        # 1x1 planes, batch 1
    (2, 5, 1, 7),
    (1, 4, 13),          # rank 3 (N, C, L)
    (2, 3, 4, 5, 6),     # rank 5
    (3, 17, 6, 5),       # channels beyond one channels-last tile
    (1, 2, 130, 131),    # planes beyond on-chip / one statistics chunk: the looped paths
]


def _layouts(shape):
    yield "contiguous", lambda t: t
    if len(shape) == 4:
        yield "channels_last", lambda t: t.to(memory_format=torch.channels_last)
    if len(shape) == 5:
        yield "channels_last_3d", lambda t: t.to(memory_format=torch.channels_last_3d)
    if len(shape) == 3:
        yield "channels_last_1d", lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)


CASES = [(s, name, fn) for s in SHAPES for name, fn in _layouts(s)]


def _input(shape, device, dtype=torch.float64, layout=lambda t: t, scale=2.0, shift=0.5):
    x = torch.randn(shape, dtype=torch.float64) * scale + shift
    return layout(x.to(device=device, dtype=dtype)).requires_grad_()


def _run(x, g, e_lambda=1e-4):
    y = fusedattn.simam(x, e_lambda)
    (dx,) = torch.autograd.grad(y, x, g)
    return y, dx


def _reference(x, g, e_lambda=1e-4):
    y = reference.simam(x, e_lambda)
    (dx,) = torch.autograd.grad(y, x, g)
    return y, dx


@pytest.mark.parametrize("shape,layout_name,layout", CASES,
                         ids=[f"{'x'.join(map(str, s))}-{n}" for s, n, _ in CASES])
def test_fp64_matches_reference(backend_device, shape, layout_name, layout):
    backend, device = backend_device
    x = _input(shape, device, layout=layout)
    g = layout(torch.randn(shape, dtype=torch.float64, device=device))
    y, dx = _run(x, g)
    assert fusedattn.last_backend() == backend
    y_ref, dx_ref = _reference(x, g)
    assert_close64(y, y_ref, "y")
    assert_close64(dx, dx_ref, "dx")
    # the output keeps the input's memory format; so does the grad
    assert y.stride() == x.stride() and dx.stride() == x.stride()


@pytest.mark.parametrize("e_lambda", [0.1, 0.0])
def test_fp64_other_lambda(backend_device, e_lambda):
    _, device = backend_device
    x = _input((2, 3, 5, 6), device)
    g = torch.randn_like(x)
    for got, want in zip(_run(x, g, e_lambda), _reference(x, g, e_lambda)):
        assert_close64(got, want)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_low_precision_tolerance(backend_device, dtype, channels_last):
    _, device = backend_device
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x64 = _input((2, 6, 9, 11), device, layout=lambda t: t.to(memory_format=fmt))
    g64 = torch.randn_like(x64)
    y64, dx64 = _reference(x64, g64)
    x = x64.detach().to(dtype).requires_grad_()
    g = g64.to(dtype)
    y, dx = _run(x, g)
    y_e, dx_e = _reference(x, g)
    assert y.dtype == dtype and dx.dtype == dtype
    assert_tolerance(y, y_e, y64, f"y {dtype}")
    assert_tolerance(dx, dx_e, dx64, f"dx {dtype}")


def test_gradcheck_fp64(backend_device):
    _, device = backend_device
    for shape in [(1, 2, 3, 4), (2, 1, 5), (1, 2, 1, 1), (1, 1, 2, 2, 2)]:
        x = _input(shape, device)
        assert torch.autograd.gradcheck(lambda t: fusedattn.simam(t), (x,))
    x = _input((1, 3, 2, 4), device, layout=lambda t: t.to(memory_format=torch.channels_last))
    assert torch.autograd.gradcheck(lambda t: fusedattn.simam(t, 0.05), (x,))


@pytest.mark.parametrize("view", ["channel_slice", "spatial_slice", "transposed", "expanded"])
def test_non_contiguous_inputs(backend_device, view):
    _, device = backend_device
    base = torch.randn(2, 6, 8, 9, dtype=torch.float64, device=device)
    x = {"channel_slice": lambda: base[:, ::2],
         "spatial_slice": lambda: base[..., 1:-1],
         "transposed": lambda: base.transpose(2, 3),
         "expanded": lambda: base[:, :1].expand(2, 4, 8, 9)}[view]().requires_grad_()
    g = torch.randn(x.shape, dtype=torch.float64, device=device)
    for got, want in zip(_run(x, g), _reference(x, g)):
        assert_close64(got, want, view)


@pytest.mark.parametrize("grad_kind", ["stride0", "transposed", "channels_last_grad"])
def test_grad_with_odd_strides(backend_device, grad_kind):
    _, device = backend_device
    x = _input((2, 3, 6, 7), device)
    g = {"stride0": lambda: torch.ones((), dtype=x.dtype, device=device).expand(x.shape),
         "transposed": lambda: torch.randn(2, 3, 7, 6, dtype=x.dtype, device=device).transpose(2, 3),
         "channels_last_grad": lambda: torch.randn_like(x).to(memory_format=torch.channels_last),
         }[grad_kind]()
    for got, want in zip(_run(x, g), _reference(x, g)):
        assert_close64(got, want, grad_kind)


def test_constant_and_single_element_planes(backend_device):
    _, device = backend_device
    x = torch.full((2, 3, 4, 5), 3.0, dtype=torch.float64, device=device)
    expected = x * torch.sigmoid(torch.tensor(0.5, dtype=torch.float64))
    assert_close64(fusedattn.simam(x), expected)
    x1 = torch.randn(2, 3, 1, 1, dtype=torch.float64, device=device)
    assert_close64(fusedattn.simam(x1), x1 * torch.sigmoid(torch.tensor(0.5, dtype=torch.float64)))


def test_nan_stays_in_its_plane(backend_device):
    _, device = backend_device
    x = torch.randn(2, 3, 5, 6, dtype=torch.float32, device=device)
    x[1, 2, 3, 4] = float("nan")
    x[0, 1, 0, 0] = float("inf")
    y = fusedattn.simam(x)
    assert torch.isnan(y[1, 2]).all() and torch.isnan(y[0, 1]).any()
    clean = torch.ones(2, 3, dtype=torch.bool)
    clean[1, 2] = clean[0, 1] = False
    ref = reference.simam(x.double()).float()
    assert torch.isfinite(y[clean]).all()
    torch.testing.assert_close(y[clean], ref[clean], rtol=1e-5, atol=1e-5)


def test_fp16_overflow_stays_finite(backend_device):
    """(x - mu)^2 overflows fp16 for |x - mu| > 256: the eager fp16 module gives inf/NaN, the
    fused op computes in fp32 and stays finite and accurate."""
    _, device = backend_device
    x = (torch.randn(1, 2, 8, 8, dtype=torch.float64) * 400).to(device)
    x16 = x.half().requires_grad_()
    y = fusedattn.simam(x16)
    assert not torch.isfinite(reference.simam(x16.detach())).all()  # the eager module overflows
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), reference.simam(x16.detach().double()),
                               rtol=2e-3, atol=1e-2)
    (dx,) = torch.autograd.grad(y, x16, torch.ones_like(y))
    assert torch.isfinite(dx).all()


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4), (2, 3, 4, 0, 2)])
def test_empty(backend_device, shape):
    _, device = backend_device
    x = torch.empty(shape, device=device, requires_grad=True)
    y = fusedattn.simam(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_deterministic(backend_device):
    _, device = backend_device
    x = _input((2, 8, 40, 41), device, dtype=torch.float32)
    g = torch.randn_like(x)
    y1, dx1 = _run(x, g)
    y2, dx2 = _run(x, g)
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)


def test_large_mean_small_spread(backend_device):
    """|mu| >> std: a one-pass E[x^2] - E[x]^2 variance would cancel catastrophically."""
    _, device = backend_device
    x = (1e4 + 1e-2 * torch.randn(2, 3, 30, 30, dtype=torch.float64)).float().to(device)
    exact = reference.simam(x.double())
    assert_tolerance(fusedattn.simam(x), reference.simam(x), exact, "|mu| >> std")
    # the rounding of mu to fp32 (0.5 ulp of 1e4 = 5% of std) bounds what fp32 can do
    torch.testing.assert_close(fusedattn.simam(x).double(), exact, rtol=2e-2, atol=0)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("x,exc,match", [
    (torch.ones(2, 3, 4, 4, dtype=torch.int64), TypeError, "floating-point.*torch.int64"),
    (torch.ones(2, 3, 4, 4, dtype=torch.bool), TypeError, "floating-point.*torch.bool"),
    (torch.ones(2, 3), ValueError, r"at least one spatial dim.*\(2, 3\)"),
    (torch.ones(5), ValueError, r"shape \(5,\)"),
])
def test_bad_input(x, exc, match):
    with pytest.raises(exc, match=match):
        fusedattn.simam(x)


@pytest.mark.parametrize("lam", [-1e-4, math.nan, math.inf])
def test_bad_lambda(lam):
    with pytest.raises(ValueError, match="e_lambda"):
        fusedattn.simam(torch.ones(1, 2, 3, 3), lam)
    with pytest.raises(ValueError, match="e_lambda"):
        fusedattn.SimAM(e_lambda=lam)


def test_native_op_checks_its_arguments():
    """Direct calls of the C++ op get a clear error too, not a crash."""
    with pytest.raises(RuntimeError, match="floating-point"):
        torch.ops.fusedattn.simam_forward(torch.ones(1, 2, 3, 3, dtype=torch.int32), 1e-4)
    with pytest.raises(RuntimeError, match="e_lambda"):
        torch.ops.fusedattn.simam_forward(torch.ones(1, 2, 3, 3), -1.0)
    x = torch.ones(1, 2, 3, 3)
    _, mu, inv = torch.ops.fusedattn.simam_forward(x, 1e-4)
    with pytest.raises(RuntimeError, match="grad must match x"):
        torch.ops.fusedattn.simam_backward(torch.ones(1, 2, 3), x, mu, inv)
    with pytest.raises(RuntimeError, match=r"mu and inv must be \(N, C\)"):
        torch.ops.fusedattn.simam_backward(x, x, mu.double(), inv)


# ----------------------------------------------------------------------------- module

def test_module_api():
    m = fusedattn.SimAM(64, e_lambda=0.1)
    assert dict(m.state_dict()) == {} and list(m.parameters()) == []
    assert "e_lambda=0.1" in repr(m)
    r = reference.SimAM(64, e_lambda=0.1)
    m.load_state_dict(r.state_dict())
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert_close64(m(x), r(x))
    assert fusedattn.SimAM().e_lambda == 1e-4


def test_reference_is_the_authors_formula():
    """For M > 1 the reference is the authors' module (n = h*w - 1) verbatim."""
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    n = 6 * 7 - 1
    d = (x - x.mean(dim=[2, 3], keepdim=True)).pow(2)
    y = x * torch.sigmoid(d / (4 * (d.sum(dim=[2, 3], keepdim=True) / n + 1e-4)) + 0.5)
    assert_close64(reference.simam(x), y)
