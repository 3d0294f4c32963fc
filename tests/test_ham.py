"""Fused HAM against the eager reference (fusedattn/spec/ham.md)."""
import pytest
import torch

import fusedattn
from fusedattn import reference
from helpers import LOW_PRECISION, Block, assert_close64, assert_tolerance, check_compiled_block


def _pair(channels, dtype=torch.float64, train=False, device="cpu", **kw):
    torch.manual_seed(channels)
    ref = reference.HAM(channels, **kw).to(device, dtype)
    with torch.no_grad():  # parameters away from their initial values
        ref.alpha.fill_(0.3), ref.beta.fill_(0.8)
        ref.bn.weight.fill_(1.4), ref.bn.bias.fill_(0.15)
        ref.bn.running_mean.fill_(0.05), ref.bn.running_var.fill_(1.7)
    fused = fusedattn.HAM(channels, **kw).to(device, dtype)
    fused.load_state_dict(ref.state_dict())
    return ref.train(train), fused.train(train)


def _run(m, x, g):
    y = m(x)
    grads = torch.autograd.grad(y, [x, *m.parameters()], g)
    return y, grads


CASES = [((3, 16, 7, 9), False), ((3, 16, 7, 9), True), ((2, 2, 5, 6), True),   # C = 2: empty group
         ((2, 4, 6, 6), True), ((2, 19, 5, 4), False), ((2, 2048, 3, 3), True),     # k = 1, 7
         ((2, 24, 1, 1), True), ((1, 32, 6, 7), False), ((2, 64, 17, 15), True)]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape,train", CASES, ids=[f"{'x'.join(map(str, s))}-{'train' if t else 'eval'}"
                                                    for s, t in CASES])
def test_fp64_matches_reference(backend_device, shape, train, channels_last):
    backend, device = backend_device
    ref, fused = _pair(shape[1], train=train, device=device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, dtype=torch.float64, device=device).to(memory_format=fmt).requires_grad_()
    g = torch.randn(shape, dtype=torch.float64, device=device).to(memory_format=fmt)
    y_r, g_r = _run(ref, x, g)
    y_f, g_f = _run(fused, x, g)
    assert fusedattn.last_backend("ham") == backend
    assert_close64(y_f, y_r, "y")
    assert y_f.stride() == x.stride() and g_f[0].stride() == x.stride()
    names = ["x"] + [n for n, _ in fused.named_parameters()]
    for name, a, b in zip(names, g_f, g_r):
        assert_close64(a, b, f"grad {name}")
    for buf in ("running_mean", "running_var"):
        assert_close64(getattr(fused.bn, buf), getattr(ref.bn, buf), buf)
    assert torch.equal(fused.bn.num_batches_tracked, ref.bn.num_batches_tracked)


def test_gradcheck_eval(backend_device):
    _, device = backend_device
    _, fused = _pair(6, device=device)
    x = torch.randn(2, 6, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(fused, (x,))
    assert torch.autograd.gradcheck(lambda a: fused(x.detach()) * a, (fused.alpha,))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_tolerance(backend_device, dtype):
    _, device = backend_device
    ref, fused = _pair(16, device=device)
    x64 = torch.randn(2, 16, 8, 8, dtype=torch.float64, device=device)
    g64 = torch.randn_like(x64)
    x = x64.to(dtype)
    y64 = ref(x.double())
    fused_lp = fusedattn.HAM(16).to(device, dtype).eval()
    ref_lp = reference.HAM(16).to(device, dtype).eval()
    fused_lp.load_state_dict(ref.state_dict())
    ref_lp.load_state_dict(ref.state_dict())
    y = fused_lp(x)
    assert y.dtype == dtype
    assert_tolerance(y, ref_lp(x), y64, f"HAM y {dtype}")
    xg = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(fused_lp(xg), xg, g64.to(dtype))
    x64g = x.double().requires_grad_()
    (dx64,) = torch.autograd.grad(ref(x64g), x64g, g64.to(dtype).double())
    xe = x.clone().requires_grad_()
    (dx_e,) = torch.autograd.grad(ref_lp(xe), xe, g64.to(dtype))
    assert_tolerance(dx, dx_e, dx64, f"HAM dx {dtype}")


def test_ties_select_the_same_channels_as_the_reference(backend_device):
    """Identical channels give identical a_c: the split must take the lower indices."""
    _, device = backend_device
    ref, fused = _pair(8, separation_rate=0.5, device=device)
    base = torch.randn(2, 1, 5, 5, dtype=torch.float64, device=device)
    x = base.repeat(1, 8, 1, 1).requires_grad_()
    g = torch.randn_like(x)
    for a, b in zip(_run(fused, x, g)[1], _run(ref, x, g)[1]):
        assert_close64(a, b)
    assert_close64(fused(x), ref(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_channel_split_matches_the_stable_sort(dtype):
    from fusedattn.ops.ham import important_mask
    for N, C in [(8, 2048), (5, 64), (3, 5), (2, 2), (4, 19)]:
        a = torch.rand(N, C, dtype=dtype)
        a[:, : C // 3] = a[:, C - C // 3:]  # exact ties
        for q in (None, 4, 1):
            b = a if q is None else torch.round(a * q) / q
            b[0, min(5, C - 1)] = float("nan")
            for important in sorted({0, 1, C // 2, reference.ham_important_channels(C, 0.6), C}):
                assert torch.equal(important_mask(b, important),
                                   reference.ham_important_mask(b, important)), (N, C, important)


def test_max_ties_send_the_gradient_to_the_first_index(backend_device):
    _, device = backend_device
    ref, fused = _pair(4, device=device)
    x = torch.zeros(1, 4, 4, 4, dtype=torch.float64, device=device)
    x[0, :, 0, 1] = 3.0
    x[0, :, 2, 2] = 3.0
    x[0, 1, 3, 3] = -1.0
    x.requires_grad_()
    g = torch.randn_like(x)
    for a, b in zip(_run(fused, x, g)[1], _run(ref, x, g)[1]):
        assert_close64(a, b)


def test_deterministic(backend_device):
    _, device = backend_device
    _, fused = _pair(32, dtype=torch.float32, train=True, device=device)
    x = torch.randn(2, 32, 9, 9, device=device, requires_grad=True)
    g = torch.randn_like(x)
    y1, g1 = _run(fused, x, g)
    y2, g2 = _run(fused, x, g)
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_empty_batch_and_eager_backend():
    _, fused = _pair(8)
    x = torch.empty(0, 8, 4, 4, dtype=torch.float64)
    assert fused(x).shape == x.shape
    ref, fused = _pair(8)
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    with fusedattn.use_backend("eager"):
        assert_close64(fused(x), ref(x))
    assert fusedattn.last_backend("ham") == "eager"


def test_a_backend_that_cannot_run_raises():
    x = torch.randn(1, 8, 4, 4)
    with fusedattn.use_backend("cuda"):
        with pytest.raises(fusedattn.BackendUnavailable, match="ham"):
            fusedattn.HAM(8)(x)


def test_bad_separation_rate():
    with pytest.raises(ValueError, match="separation_rate"):
        fusedattn.HAM(8, separation_rate=2.0)


@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
def test_compile_fullgraph_resnet_block(backend_device, compiler):
    _, device = backend_device
    torch.manual_seed(0)
    ref = Block(reference.HAM).to(device, torch.float64)
    fused = Block(fusedattn.HAM).to(device, torch.float64)
    check_compiled_block(ref, fused, device, compiler)
