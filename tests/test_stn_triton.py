"""The Triton kernels of the fused spatial-transformer sampler (fusedattn.triton_kernels.stn)
against ``fusedattn.reference.affine_sample`` (F.affine_grid + F.grid_sample) and its autograd,
per the contract of fusedattn/ops/stn.py: y, dx and dtheta in fp64 to round-off for identity,
rotations, scalings, far translations, shear, singular theta (zero linear part, rank 1), output
sizes other than the input's (1x1, 1xW), both align_corners, both layouts, N = 1, C = 1, odd
sizes; need_dx / need_dtheta; fp32 / fp16 / bf16 under the tolerance rule; several tiles and a
multi-step dtheta sum; bitwise repeatability; dy with any strides; empty batches; the ops
(opcheck, fusedattn.affine_sample under use_backend("triton"), gradcheck); every launch is an
AOT variant.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (TRITON_INTERPRET=1 is
set before triton is imported, here and in conftest); with one, on CUDA tensors. Nothing here
needs the C++ extension."""
import inspect
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import fusedattn  # noqa: E402
from fusedattn import reference  # noqa: E402
from helpers import ATOL, GPU, INTERPRET, assert_close64, max_err  # noqa: E402

DEVICE = "cuda" if GPU and not INTERPRET else "cpu"


@pytest.fixture(scope="module")
def k():
    from fusedattn.triton_kernels import stn
    return stn


# ----------------------------------------------------------------------------- cases


def _rot(deg, s=1.0, t=(0.0, 0.0)):
    a = math.radians(deg)
    return [[s * math.cos(a), -s * math.sin(a), t[0]], [s * math.sin(a), s * math.cos(a), t[1]]]


# name -> (theta (2, 3), exact): "exact" thetas put sampling points on integer pixel
# coordinates, where dtheta (a one-sided derivative of a piecewise-linear function) depends on
# rounding; their dtheta is compared on a slightly jittered theta. The others use numbers that
# put no sampling point on an integer coordinate in the shapes below.
THETAS = {
    "identity": ([[1, 0, 0], [0, 1, 0]], True),
    "rot30": (_rot(30, t=(0.0123, -0.0456)), False),
    "rot90": (_rot(90), True),
    "rot180": (_rot(180), True),
    "scale0.5": ([[0.5, 0, 0], [0, 0.5, 0]], True),
    "scale2": ([[2, 0, 0], [0, 2, 0]], True),
    "scale0.1": ([[0.1, 0, 0.0517], [0, 0.1, -0.0213]], False),
    "trans5": ([[1, 0, 5], [0, 1, -5]], True),
    "trans1e4": ([[0.9, 0.1, 1e4], [-0.1, 0.9, -1e4]], False),  # reads nothing
    "shear": ([[1.03, 0.47, 0.113], [0.21, 0.97, -0.147]], False),
    "zero_linear": ([[0, 0, 0.31], [0, 0, -0.17]], False),
    "rank1": ([[0.53, 1.06, 0.117], [1.1, 2.2, -0.093]], False),
    "rank1_row": ([[0.81, 0.33, 0.057], [0, 0, 0.261]], False),
}

# (N, C, H, W, Ho, Wo)
MAIN = (2, 3, 7, 9, 6, 5)
SHAPES = [(1, 1, 7, 9, 9, 7), (2, 2, 5, 4, 1, 1), (1, 3, 4, 6, 1, 5), (2, 1, 3, 3, 4, 1)]


def make(shape, theta, dtype=torch.float64, cl=False, seed=0, jitter=0.0):
    """x, theta (N, 2, 3: theta per sample, the second sample's slightly changed) and dy."""
    N, C, H, W, Ho, Wo = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    th = torch.tensor(theta, dtype=torch.float64).expand(N, 2, 3).clone()
    if N > 1:
        th[1:] *= 1.0 + 0.01 * torch.arange(1, N, dtype=torch.float64)[:, None, None]
    if jitter:
        th += jitter * torch.randn(N, 2, 3, generator=gen, dtype=torch.float64)
    dy = torch.randn(N, C, Ho, Wo, generator=gen, dtype=torch.float64)
    x = x.to(dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return x.to(DEVICE), th.to(acc).to(DEVICE), dy.to(dtype).to(DEVICE)


def want(x, th, Ho, Wo, ac, dy, dtype=torch.float64):
    """(y, dx, dtheta) of the reference by autograd, in dtype on the CPU (theta leaves in their
    own dtype; the reference casts theta to x's dtype)."""
    xl = x.detach().cpu().to(dtype).requires_grad_()
    tl = th.detach().cpu().to(torch.float64 if dtype == torch.float64 else th.dtype)
    tl.requires_grad_()
    y = reference.affine_sample(xl, tl, (Ho, Wo), ac)
    y.backward(dy.detach().cpu().to(dtype))
    return y.detach(), xl.grad, tl.grad


def check_layouts(k, x, th, y, dx, dth, Ho, Wo):
    """The contract: y in x's memory format, dx with x's strides, dtheta (N, 2, 3) contiguous in
    theta's dtype."""
    N, C = x.shape[:2]
    assert y.shape == (N, C, Ho, Wo) and y.dtype == x.dtype
    fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    assert y.is_contiguous(memory_format=fmt), y.stride()
    if dx is not None:
        assert dx.shape == x.shape and dx.dtype == x.dtype and dx.stride() == x.stride()
    if dth is not None:
        assert dth.shape == (N, 2, 3) and dth.dtype == th.dtype and dth.is_contiguous()


def check64(k, shape, theta, ac, cl, exact):
    N, C, H, W, Ho, Wo = shape
    x, th, dy = make(shape, theta, cl=cl)
    y = k.forward(x, th, Ho, Wo, ac)
    dx, dth = k.backward(dy, x, th, ac, True, not exact)
    check_layouts(k, x, th, y, dx, dth, Ho, Wo)
    wy, wdx, wdth = want(x, th, Ho, Wo, ac, dy)
    assert_close64(y.cpu(), wy, "y")
    assert_close64(dx.cpu(), wdx, "dx")
    if exact:   # dtheta on a jittered theta (see THETAS)
        assert dth is None
        x, th, dy = make(shape, theta, cl=cl, jitter=1e-3)
        dx, dth = k.backward(dy, x, th, ac, True, True)
        wy, wdx, wdth = want(x, th, Ho, Wo, ac, dy)
        assert_close64(dx.cpu(), wdx, "dx (jittered)")
    assert_close64(dth.cpu(), wdth, "dtheta")


# (theta, align_corners, channels_last): every theta planar without and channels-last with
# align_corners; the four combinations for a generic, a sheared and the singular thetas
KEY_THETAS = ("rot30", "shear", "zero_linear", "rank1")
THETA_CASES = ([(n, False, False) for n in THETAS] + [(n, True, True) for n in THETAS]
               + [(n, True, False) for n in KEY_THETAS] + [(n, False, True) for n in KEY_THETAS])


def _case_id(c):
    return f"{c[0]}-ac{int(c[1])}-{'cl' if c[2] else 'planar'}"


@pytest.mark.parametrize("case", THETA_CASES, ids=_case_id)
def test_fp64_thetas(k, case):
    name, ac, cl = case
    theta, exact = THETAS[name]
    check64(k, MAIN, theta, ac, cl, exact)


# each shape with three thetas; layout and align_corners alternate
SHAPE_CASES = [(shape, name, (s + t) % 2 == 1, t % 2 == 1)
               for s, shape in enumerate(SHAPES)
               for t, name in enumerate(("rot30", "shear", "zero_linear"))]


@pytest.mark.parametrize("case", SHAPE_CASES,
                         ids=lambda c: "x".join(map(str, c[0])) + "-" + _case_id(c[1:]))
def test_fp64_shapes(k, case):
    """N = 1, C = 1, 1x1 and 1xW and Hx1 outputs, outputs larger than the input."""
    shape, name, ac, cl = case
    theta, exact = THETAS[name]
    check64(k, shape, theta, ac, cl, exact)


@pytest.mark.parametrize("ac", [False, True], ids=["ac0", "ac1"])
def test_exact_thetas_on_pixel_lines(k, ac):
    """The identity, a flip and a quarter turn between equal sizes sample on pixel lines without
    rounding (the contract's coordinate form): y is x exactly for the identity, and dtheta is
    the derivative on the side floor() picks, PyTorch's with the translation nudged just after
    the lines."""
    shape = (2, 2, 6, 6, 6, 6)
    for name, theta in (("identity", [[1, 0, 0], [0, 1, 0]]), ("flip", [[-1, 0, 0], [0, 1, 0]]),
                        ("rot90", [[0, -1, 0], [1, 0, 0]])):
        x, th, dy = make(shape, theta)
        th[1] = th[0]
        y = k.forward(x, th, 6, 6, ac)
        dx, dth = k.backward(dy, x, th, ac, True, True)
        wy, wdx, _ = want(x, th, 6, 6, ac, dy)
        assert_close64(y.cpu(), wy, f"{name} y")
        assert_close64(dx.cpu(), wdx, f"{name} dx")
        if name == "identity":
            assert torch.equal(y, x)
        step = 1e-9 * 2 / (5 if ac else 6)
        nudged = th + torch.tensor([[0, 0, step], [0, 0, step]], dtype=th.dtype, device=th.device)
        _, _, wdth = want(x, nudged, 6, 6, ac, dy)
        torch.testing.assert_close(dth.cpu(), wdth, rtol=1e-6, atol=1e-6, msg=f"{name} dtheta")


@pytest.mark.parametrize("cl", [False, True], ids=["planar", "cl"])
def test_need_flags(k, cl):
    """need_dx / need_dtheta: the other result is None; the computed one is the full run's."""
    shape = MAIN
    x, th, dy = make(shape, THETAS["shear"][0], cl=cl)
    dx, dth = k.backward(dy, x, th, True, True, True)
    dx1, none1 = k.backward(dy, x, th, True, True, False)
    none2, dth2 = k.backward(dy, x, th, True, False, True)
    assert none1 is None and none2 is None
    assert torch.equal(dx, dx1) and torch.equal(dth, dth2)
    assert k.backward(dy, x, th, True, False, False) == (None, None)


@pytest.mark.parametrize("cl", [False, True], ids=["planar", "cl"])
def test_several_tiles_and_sum_steps(k, cl, monkeypatch):
    """Small tiles (several programs per sample; planar: two channel blocks) and a dtheta sum
    of several steps: still the reference."""
    monkeypatch.setattr(k, "TILE", 32)
    monkeypatch.setattr(k, "SUM_BLOCK", 2)
    shape = (2, 5, 5, 6, 4, 5)
    for kernel, pixels in (("fwd", 20), ("dtheta", 20), ("dx", 30)):
        assert 2 <= pixels // k.config(kernel, 5, cl, 8).block_p
    check64(k, shape, THETAS["rot30"][0], False, cl, False)
    if not cl:
        check64(k, shape, THETAS["zero_linear"][0], True, cl, False)


def test_dy_any_strides(k):
    """dy is read in y's layout: a transposed copy, a stride-0 expansion and a channels-last dy
    for a planar y (and the reverse) give the same results."""
    shape = (2, 3, 5, 6, 4, 5)
    for cl in (False, True):
        x, th, dy = make(shape, THETAS["rot30"][0], cl=cl)
        base = k.backward(dy.contiguous(), x, th, False, True, True)
        for g in (dy.transpose(0, 1).contiguous().transpose(0, 1),
                  dy.contiguous(memory_format=torch.channels_last),
                  dy.contiguous()):
            got = k.backward(g, x, th, False, True, True)
            assert torch.equal(got[0], base[0]) and torch.equal(got[1], base[1])
        g = dy[:1, :1, :1, :1].expand(dy.shape)
        got = k.backward(g, x, th, False, True, True)
        wy, wdx, wdth = want(x, th, 4, 5, False, g)
        assert_close64(got[0].cpu(), wdx, "dx, stride-0 dy")
        assert_close64(got[1].cpu(), wdth, "dtheta, stride-0 dy")


def test_other_x_layouts(k):
    """x neither contiguous nor channels-last (read from a contiguous copy): y contiguous, dx
    with x's strides; a channels-last x with C = 1 or 1x1 planes is contiguous: planar."""
    x, th, dy = make((2, 3, 5, 6, 4, 5), THETAS["shear"][0])
    xv = x.transpose(2, 3).contiguous().transpose(2, 3)
    y = k.forward(xv, th, 4, 5, True)
    assert y.is_contiguous()
    dx, dth = k.backward(dy, xv, th, True, True, True)
    assert dx.stride() == xv.stride()
    wy, wdx, wdth = want(x, th, 4, 5, True, dy)
    assert_close64(y.cpu(), wy, "y")
    assert_close64(dx.cpu(), wdx, "dx")
    assert_close64(dth.cpu(), wdth, "dtheta")
    x1 = torch.randn(2, 1, 4, 5, dtype=torch.float64, device=DEVICE).to(
        memory_format=torch.channels_last)
    assert k.forward(x1, th, 3, 3, False).is_contiguous()


LOW_CASES = [(name, dtype, cl) for dtype in (torch.float32, torch.float16, torch.bfloat16)
             for name, cl in (("rot30", False), ("rot30", True), ("scale0.5", True),
                              ("shear", False), ("rank1", True))]


@pytest.mark.parametrize("case", LOW_CASES,
                         ids=lambda c: f"{c[0]}-{str(c[1])[6:]}-{'cl' if c[2] else 'planar'}")
def test_low_precision(k, case):
    """Against the fp64 result of the same (rounded) inputs, the kernels' error is at most twice
    eager PyTorch's error at the same precision (plus the dtype's small absolute slack, relative
    to the values' size)."""
    name, dtype, cl = case
    shape = (2, 3, 7, 9, 6, 5)
    theta, exact = THETAS[name]
    ac = name in ("rot30", "rank1")
    x, th, dy = make(shape, theta, dtype=dtype, cl=cl, jitter=1e-3 if exact else 0.0)
    N, C, H, W, Ho, Wo = shape
    y = k.forward(x, th, Ho, Wo, ac)
    dx, dth = k.backward(dy, x, th, ac, True, True)
    check_layouts(k, x, th, y, dx, dth, Ho, Wo)
    exact64 = want(x, th, Ho, Wo, ac, dy)
    eager = want(x, th, Ho, Wo, ac, dy, dtype)
    for what, got, e, lo in zip(("y", "dx", "dtheta"), (y, dx, dth), exact64, eager):
        ef, ee = max_err(got.cpu(), e), max_err(lo, e)
        bound = 2 * ee + ATOL[dtype] * max(1.0, e.abs().max().item())
        assert ef <= bound, f"{what} {dtype}: error {ef:.3g} > 2 x eager's {ee:.3g} + atol"


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_bitwise_repeatable(k, dtype):
    for cl in (False, True):
        x, th, dy = make(MAIN, THETAS["rot30"][0], dtype=dtype, cl=cl)
        first = (k.forward(x, th, 6, 5, True), *k.backward(dy, x, th, True, True, True))
        second = (k.forward(x, th, 6, 5, True), *k.backward(dy, x, th, True, True, True))
        for a, b in zip(first, second):
            assert torch.equal(a, b)


def test_empty(k):
    """N = 0 or C = 0: empty y and dx, zero dtheta."""
    for N, C in ((0, 3), (2, 0)):
        x = torch.randn(N, C, 4, 5, dtype=torch.float32, device=DEVICE)
        th = torch.randn(N, 2, 3, dtype=torch.float32, device=DEVICE)
        y = k.forward(x, th, 3, 2, False)
        assert y.shape == (N, C, 3, 2)
        dx, dth = k.backward(torch.zeros(N, C, 3, 2, device=DEVICE), x, th, False, True, True)
        assert dx.shape == x.shape and dth.shape == (N, 2, 3) and not dth.any()


def test_bad_input(k):
    x = torch.randn(1, 2, 4, 5)
    th = torch.zeros(1, 2, 3)
    with pytest.raises(TypeError, match="fp16, bf16, fp32 or fp64"):
        k.forward(x.int(), th, 3, 3, False)
    with pytest.raises(ValueError, match=r"theta of shape \(1, 2, 3\)"):
        k.forward(x, th[:, :1], 3, 3, False)
    with pytest.raises(ValueError, match="Ho must be a positive int"):
        k.forward(x, th, 0, 3, False)
    with pytest.raises(ValueError, match="expected dy"):
        k.backward(torch.zeros(1, 3, 3, 3), x, th, False, True, True)


# ----------------------------------------------------------------------------- the ops


def test_opcheck(k):
    """The Triton ops' schemas, fake kernels (output strides included) and autograd
    registration."""
    from fusedattn.ops import stn as ops  # noqa: F401  (registers the ops)
    for cl in (False, True):
        x, th, dy = make((2, 3, 4, 3, 2, 3), THETAS["shear"][0], cl=cl)
        x.requires_grad_(), th.requires_grad_()
        torch.library.opcheck(torch.ops.fusedattn.affine_sample_triton.default,
                              (x, th, 2, 3, True))
        torch.library.opcheck(torch.ops.fusedattn.affine_sample_backward_triton.default,
                              (dy, x.detach(), th.detach(), True, True, True))


def _triton_backend():
    st = fusedattn.backends("stn")["triton"]
    if not st.available:
        pytest.skip(f"backend triton unavailable: {st.reason}")
    return fusedattn.use_backend("triton")


@pytest.mark.parametrize("cl", [False, True], ids=["planar", "cl"])
def test_public_function(k, cl):
    """fusedattn.affine_sample on the triton backend: the reference's y and gradients (theta in
    another dtype: its gradient comes back in it)."""
    x, th, dy = make((2, 3, 6, 5, 4, 7), THETAS["rot30"][0], cl=cl)
    th32 = th.float()
    with _triton_backend():
        xl, tl = x.clone().requires_grad_(), th32.clone().requires_grad_()
        y = fusedattn.affine_sample(xl, tl, (4, 7), align_corners=False)
        y.backward(dy)
        assert fusedattn.last_backend("stn") == "triton"
    assert tl.grad.dtype == torch.float32
    wy, wdx, wdth = want(x, th32.double(), 4, 7, False, dy)
    assert_close64(y.detach().cpu(), wy, "y")
    assert_close64(xl.grad.cpu(), wdx, "dx")
    torch.testing.assert_close(tl.grad.cpu().double(), wdth, rtol=1e-6, atol=1e-6)


def test_gradcheck():
    """torch.autograd.gradcheck in fp64 through fusedattn.affine_sample on the triton backend
    (a generic theta: no sampling point within the finite-difference step of a pixel)."""
    x, th, _ = make((1, 2, 3, 4, 2, 3), THETAS["shear"][0], jitter=1e-2)
    for ac in (False, True):
        with _triton_backend():
            assert torch.autograd.gradcheck(
                lambda a, b: fusedattn.affine_sample(a, b, (2, 3), align_corners=ac),
                (x.clone().requires_grad_(), th.clone().requires_grad_()), eps=1e-6,
                atol=1e-8)


# ----------------------------------------------------------------------------- AOT variants


class _Recorder:
    """Stands in for a kernel: records each launch's signature as the JIT would key it (pointer
    dtypes and constexprs; integers and pointer alignment unspecialised) instead of running it."""

    _TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
              torch.float64: "*fp64"}

    def __init__(self, k, kernel, log):
        self.k, self.kernel, self.log = k, kernel, log
        self.params = list(inspect.signature(kernel.fn).parameters)

    def __getitem__(self, grid):
        def launch(*args, num_warps, **consts):
            sig = {}
            for name, v in zip(self.params, args):
                if isinstance(v, torch.Tensor):
                    assert name in self.k._PTRS, f"{name}: pointer specialised on alignment"
                    sig[name] = self._TYPES[v.dtype]
                else:
                    assert isinstance(v, int) and not isinstance(v, bool), (name, v)
                    assert name in self.k._INTS, f"{name} would be specialised"
                    sig[name] = "i32"
            for name in consts:
                sig[name] = "constexpr"
            assert set(sig) == set(self.params), (self.params, sig)
            assert all(g >= 1 for g in grid)
            self.log.append((self.kernel, sig, dict(consts), num_warps))
        return launch


def _key(fn, sig, cons):
    return (fn, tuple(sorted(sig.items())), tuple(sorted(cons.items())))


def test_aot_variants_are_well_formed(k):
    variants = list(k.aot_variants())
    names = [v[0] for v in variants]
    assert len(names) == len(set(names))
    for name, fn, sig, consts, attrs, warps in variants:
        assert name.startswith("stn_")
        assert list(sig) == list(inspect.signature(fn.fn).parameters), name
        assert attrs == {} and warps in (1, 2, 4, 8, 16)
        for c in ("BLOCK_C", "BLOCK_P", "BLOCK_T"):
            if c in consts:
                assert consts[c] >= 1 and consts[c] & (consts[c] - 1) == 0, name


def test_launches_are_aot_variants(k, monkeypatch):
    """Every kernel form the launchers launch (each dtype, layout and channel count at the
    boundaries of the channel blocks; forward, dx, dtheta and its sum) is one that
    aot_variants() lists, with its warps, and every variant is launched by some shape.
    Launches are recorded, not run."""
    aot = {}
    for name, fn, sig, consts, attrs, warps in k.aot_variants():
        key = _key(fn, sig, consts)
        assert key not in aot, name
        aot[key] = (name, warps)
    log = []
    for attr in ("_fwd_kernel", "_dtheta_kernel", "_dtheta_sum_kernel", "_dx_kernel"):
        monkeypatch.setattr(k, attr, _Recorder(k, getattr(k, attr), log))
    seen = set()
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for C in (1, 2, 3, 4, 5, 16, 17, 40, 100):
            for cl in (False, True):
                x = torch.zeros(2, C, 3, 4, dtype=dtype, device=DEVICE)
                if cl:
                    x = x.to(memory_format=torch.channels_last)
                th = torch.zeros(2, 2, 3, dtype=torch.float64 if dtype == torch.float64
                                 else torch.float32, device=DEVICE)
                k.forward(x, th, 5, 2, True)
                dy = torch.zeros(2, C, 5, 2, dtype=dtype, device=DEVICE)
                k.backward(dy, x, th, False, True, True)
                for fn, sig, cons, warps in log:
                    key = _key(fn, sig, cons)
                    assert key in aot, f"launch not in aot_variants: {sig} {cons}"
                    assert aot[key][1] == warps, aot[key]
                    seen.add(aot[key][0])
                log.clear()
    missing = {v for v, _ in aot.values()} - seen
    assert not missing, sorted(missing)


def test_shape_choices_ignore_the_device(k):
    """Tiles are functions of the kernel, channel count, layout and element size alone."""
    assert list(inspect.signature(k.config).parameters) == ["kernel", "C", "channels_last",
                                                            "elem_bytes"]
