"""The six generic passes (fusedattn/spec/passes.md) on every backend that runs here, against their
eager statement (fusedattn.ops.pass_reference): every optional combination the modules use (one or
two channel groups, with and without the spatial maps, the max and the pixel max), both layouts, odd
sizes; opcheck of every op; clear errors for bad arguments."""
import itertools

import pytest
import torch

import fusedattn  # noqa: F401  (loads the C++ ops)
from fusedattn.ops import pass_reference as ref
from fusedattn.ops.passes import passes
from helpers import assert_close64

SHAPES = [(2, 6, 3, 5), (1, 3, 1, 1), (2, 19, 4, 4)]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_args(shape, dtype=torch.float64, channels_last=False, G=2, device="cpu", seed=0):
    """Inputs of all six passes; ties and repeated values in x for the maxima."""
    gen = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    P = H * W
    acc = _acc(dtype)
    x = torch.randint(-3, 4, shape, generator=gen).to(dtype) + 0.25 * torch.randn(
        shape, generator=gen, dtype=torch.float64).to(dtype).round()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
    a = torch.rand(N, C, generator=gen, dtype=acc) + 0.1
    if G == 2:
        k1 = C // 2
        group = torch.zeros(N, C, dtype=torch.bool)
        for n in range(N):
            group[n, torch.randperm(C, generator=gen)[:k1]] = True
        sizes = (C - k1, k1)
    else:
        group, sizes = None, (C, 0)
    maps = dict(s=torch.rand(N, G, P, generator=gen, dtype=acc),
                d_avg=torch.randn(N, G, P, generator=gen, dtype=acc),
                d_max=torch.randn(N, G, P, generator=gen, dtype=acc))
    maps["argmax"] = ref.pool_channels(x, a, group, *sizes)[2]
    pix = dict(d_mean_c=torch.randn(N, C, generator=gen, dtype=acc),
               d_max_c=torch.randn(N, C, generator=gen, dtype=acc),
               argmax_c=ref.pool_pixels(x, True)[2])
    out = dict(x=x, dy=dy, a=a, group=group, sizes=sizes, **maps, **pix)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in out.items()}


def calls(t, G):
    """(name, args) of every pass in every optional combination."""
    x, dy, a, group, (s0, s1) = t["x"], t["dy"], t["a"], t["group"], t["sizes"]
    maps = (t["s"], group, t["d_avg"], t["d_max"], t["argmax"])
    none = (None, group, None, None, None)
    out = [("pool_pixels", (x, True)), ("pool_pixels", (x, False)),
           ("pool_channels", (x, a, group, s0, s1)),
           ("gate", (x, a, t["s"], group)), ("gate_grad_s", (dy, x, a, group)),
           ("grad_a", (x, dy, *maps, s0, s1))]
    if G == 1:  # the channel-only forms: no groups, no spatial maps (SE, ECA)
        out += [("gate", (x, a, None, None)), ("grad_a", (x, dy, *none, s0, s1))]
    for m, px in itertools.product((maps, none) if G == 1 else (maps,), (True, False)):
        extra = (t["d_max_c"], t["argmax_c"]) if px else (None, None)
        out.append(("grad_x", (dy, a, *m, s0, s1, t["d_mean_c"], *extra)))
    return out


def _same(got, want, name, exact_ints=True):
    if isinstance(want, tuple):
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{name}[{i}]")
        return
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape)
    assert got.stride() == want.stride() or got.numel() <= 1, (name, got.stride(), want.stride())
    if want.dtype == torch.int32:
        assert torch.equal(got.cpu(), want.cpu()), name
    elif want.numel():
        assert_close64(got.cpu().double(), want.cpu().double(), name)


@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_passes_match_reference_fp64(backend_device, shape, channels_last, G):
    backend, device = backend_device
    if G == 2 and shape[1] < 2:
        pytest.skip("two groups need two channels")
    op = passes(backend)
    t = make_args(shape, channels_last=channels_last, G=G, device=device)
    for name, args in calls(t, G):
        want = getattr(ref, name)(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
        _same(op[name](*args), want, f"{name} G={G}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_passes_low_precision(backend_device, dtype):
    backend, device = backend_device
    op = passes(backend)
    for G in (1, 2):
        t = make_args((2, 6, 5, 3), dtype=dtype, G=G, device=device)
        for name, args in calls(t, G):
            got = op[name](*args)
            want = getattr(ref, name)(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
            got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
            for g, w in zip(got, want):
                assert g.dtype == w.dtype and g.shape == w.shape, name
                if w.dtype == torch.int32 or not w.numel():
                    continue
                tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
                scale = max(1.0, w.abs().max().item())
                assert (g.cpu().double() - w.double()).abs().max().item() <= tol * scale, name


def test_nan_and_ties_in_maxima(backend_device):
    backend, device = backend_device
    op = passes(backend)
    x = torch.zeros(1, 4, 2, 3, dtype=torch.float64)
    x[0, 1, 1, 2] = float("nan")
    x[0, 2] = -float("inf")
    x[0, 3, 0, 1] = x[0, 3, 1, 0] = 5.0
    for cl in (False, True):
        t = x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        t = t.to(device)
        a = torch.ones(1, 4, dtype=torch.float64, device=device)
        for g, w in zip(op["pool_pixels"](t, True), ref.pool_pixels(x, True)):
            torch.testing.assert_close(g.cpu(), w, equal_nan=True, rtol=0, atol=1e-12)
        for group, sizes in ((None, (4, 0)),
                             (torch.tensor([[False, True, True, False]], device=device), (2, 2))):
            want = ref.pool_channels(x, a.cpu(), None if group is None else group.cpu(), *sizes)
            got = op["pool_channels"](t, a, group, *sizes)
            assert torch.equal(got[2].cpu(), want[2])
            assert torch.equal(torch.isnan(got[1]).cpu(), torch.isnan(want[1]))


def test_empty_group_and_empty_tensor(backend_device):
    backend, device = backend_device
    op = passes(backend)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, device=device)
    a = torch.rand(2, 4, dtype=torch.float64, device=device)
    group = torch.zeros(2, 4, dtype=torch.bool, device=device)
    avg, mx, arg = op["pool_channels"](x, a, group, 4, 0)
    assert avg[:, 1].abs().max() == 0 and mx[:, 1].abs().max() == 0 and arg[:, 1].abs().max() == 0
    e = torch.empty(0, 4, 3, 3, dtype=torch.float64, device=device)
    mean, mxe, arge = op["pool_pixels"](e, False)
    assert mean.shape == (0, 4) and mxe.shape == (0,) and arge.shape == (0,)
    assert op["gate"](e, a[:0], None, None).shape == e.shape


def test_opcheck_every_pass(backend_device):
    backend, device = backend_device
    op = passes(backend)
    for G, cl, dtype in itertools.product((1, 2), (False, True), (torch.float64, torch.float32)):
        t = make_args((2, 6, 3, 5), dtype=dtype, channels_last=cl, G=G, device=device)
        for name, args in calls(t, G):
            torch.library.opcheck(op[name], args)


def test_passes_check_their_arguments():
    """Direct calls with mismatched small tensors or options get a clear error, not an
    out-of-bounds read."""
    ops = torch.ops.fusedattn
    t = make_args((2, 6, 3, 5), G=2)
    x, dy, a, group, s = t["x"], t["dy"], t["a"], t["group"], t["s"]
    with pytest.raises(RuntimeError, match="gate_grad_s: a"):
        ops.gate_grad_s(dy, x, a[:1], group)
    with pytest.raises(RuntimeError, match="grad_a"):
        ops.grad_a(x, dy, s, group, t["d_avg"], t["d_max"], t["argmax"].long(), 3, 3)
    with pytest.raises(RuntimeError, match="given together"):
        ops.grad_a(x, dy, s, group, None, t["d_max"], t["argmax"], 3, 3)
    with pytest.raises(RuntimeError, match="grad_x"):
        ops.grad_x(dy, a, s, group, t["d_avg"], t["d_max"], t["argmax"], 3, 3, t["d_mean_c"],
                   t["d_max_c"], t["argmax_c"][:, :3])
    with pytest.raises(RuntimeError, match="d_max_c and argmax_c"):
        ops.grad_x(dy, a, s, group, t["d_avg"], t["d_max"], t["argmax"], 3, 3, t["d_mean_c"],
                   t["d_max_c"], None)
    with pytest.raises(RuntimeError, match="dy must have x's shape"):
        ops.gate_grad_s(dy[:1], x, a, group)
    with pytest.raises(RuntimeError, match="size0 = C"):
        ops.pool_channels(x, a, None, 3, 3)
    with pytest.raises(RuntimeError, match="size0 \\+ size1 = C"):
        ops.pool_channels(x, a, group, 3, 4)
    with pytest.raises(RuntimeError, match="gate: s"):
        ops.gate(x, a, s, None)  # two groups' maps without group flags
    with pytest.raises(RuntimeError, match="floating-point"):
        ops.pool_pixels(x.long(), True)
