"""SE, ECA and CBAM (fusedattn.SE / ECA / CBAM) against timm's own modules (timm==1.0.31) and
against fusedattn.reference, on every backend that runs here."""
import warnings

import pytest
import torch
from torch import nn

import fusedattn
from fusedattn import reference
from helpers import LOW_PRECISION, Block, assert_close64, assert_tolerance, check_compiled_block

timm_layers = pytest.importorskip("timm.layers")

# the registry's ops whose eager baseline is a timm module
NAMES = tuple(n for n, op in fusedattn.registry.OPS.items() if op.baseline is not None)


def timm_module(name, C, **kw):
    """timm's module for attention type ``name``, as timm's models build it."""
    return timm_layers.create_attn(name, C, **kw)


def randomize(m: nn.Module, seed=0):
    """Non-trivial weights and BatchNorm statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if not t.is_floating_point():
                continue
            v = torch.randn(t.shape, generator=gen, dtype=torch.float64) * 0.5
            if "running_var" in name:
                v = v.abs() + 0.5
            t.copy_(v)
    return m


def pair(name, C, device="cpu", dtype=torch.float64, **kw):
    theirs = randomize(timm_module(name, C, **kw)).to(device, dtype)
    ours = fusedattn.registry.get(name).fused_cls()(C, **kw).to(device, dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return theirs, ours


def run(m, x, g):
    x = x.detach().requires_grad_()
    y = m(x)
    grads = torch.autograd.grad(y, [x, *m.parameters()], g)
    return y, grads


def compare(theirs, ours, x, what):
    g = torch.randn_like(x)
    y1, d1 = run(theirs, x, g)
    y2, d2 = run(ours, x, g)
    assert y2.stride() == x.stride(), f"{what}: output layout"
    assert_close64(y2, y1, f"{what} y")
    names = ["x"] + [n for n, _ in ours.named_parameters()]
    for n, a, b in zip(names, d2, d1):
        assert_close64(a, b, f"{what} d{n}")
    for (n, b1), b2 in zip(theirs.named_buffers(), ours.buffers()):
        if b1.is_floating_point():
            assert_close64(b2, b1, f"{what} {n}")
        else:
            assert torch.equal(b1, b2), n


@pytest.mark.parametrize("name", NAMES)
def test_matches_timm_fp64(backend_device, name):
    backend, device = backend_device
    small = device == "cpu" and backend == "triton"  # the interpreter is slow
    channels = (2, 3, 16, 19) if small else (2, 3, 16, 19, 64, 257, 2048)
    for C in channels:
        for train in (True, False):
            for cl in (False, True):
                theirs, ours = pair(name, C, device)
                theirs.train(train), ours.train(train)
                hw = (3, 5) if C > 256 else (7, 9)
                x = torch.randn(2, C, *hw, dtype=torch.float64, device=device)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                compare(theirs, ours, x, f"{name} C={C} train={train} cl={cl}")
                assert fusedattn.last_backend(name) == backend


@pytest.mark.parametrize("name", NAMES)
def test_edge_shapes(backend_device, name):
    backend, device = backend_device
    for shape, train in (((2, 8, 1, 1), True), ((1, 8, 5, 4), False), ((1, 8, 1, 1), False),
                         ((3, 5, 1, 7), True)):
        theirs, ours = pair(name, shape[1], device)
        theirs.train(train), ours.train(train)
        compare(theirs, ours, torch.randn(shape, dtype=torch.float64, device=device),
                f"{name} {shape}")


OPTIONS = {
    "se": [dict(add_maxpool=True), dict(norm_layer=nn.BatchNorm2d), dict(bias=False),
           dict(act_layer=nn.SiLU, gate_layer="hard_sigmoid"), dict(rd_channels=5),
           dict(act_layer="mish")],  # a name outside our table: looked up in timm
    "eca": [dict(use_mlp=True), dict(gate_layer="hard_sigmoid"), dict(gamma=1, beta=2)],
    "cbam": [dict(spatial_kernel_size=3), dict(mlp_bias=True), dict(gate_layer="hard_sigmoid"),
             dict(act_layer=nn.SiLU, rd_ratio=0.5)],
}


@pytest.mark.parametrize("name", NAMES)
def test_options_run_fused(name):
    """timm's other options: the small parts change, the passes stay fused."""
    for kw in OPTIONS[name]:
        for train in (True, False):
            theirs, ours = pair(name, 24, **kw)
            theirs.train(train), ours.train(train)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                compare(theirs, ours, torch.randn(3, 24, 6, 5, dtype=torch.float64),
                        f"{name} {kw} train={train}")
            assert fusedattn.last_backend(name) == "cpu", kw


def test_unfusable_options_fall_back_with_one_warning():
    theirs, ours = pair("se", 16, norm_layer=lambda c, **kw: nn.GroupNorm(1, c, **kw))
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="norm_layer GroupNorm"):
        compare(theirs, ours, x, "se groupnorm")
    assert fusedattn.last_backend("se") == "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(x)  # warned once


def test_activation_with_parameters_falls_back():
    ref = randomize(reference.SE(16, act_layer=nn.PReLU)).double()
    ours = fusedattn.SE(16, act_layer=nn.PReLU).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="activation PReLU has parameters"):
        compare(ref, ours, x, "se prelu")
    assert fusedattn.last_backend("se") == "eager"


def test_hooks_on_a_part_run_eager_on_the_module_fused():
    theirs, ours = pair("cbam", 16)
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    seen = []
    h = ours.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    compare(theirs, ours, x, "cbam hooked module")
    assert fusedattn.last_backend("cbam") == "cpu" and seen == [x.shape]
    h.remove()
    h = ours.channel.fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with pytest.warns(UserWarning, match="Conv2d has forward hooks"):
        compare(theirs, ours, x, "cbam hooked part")
    assert fusedattn.last_backend("cbam") == "eager" and len(seen) == 3  # fc1 on mean and max
    h.remove()


@pytest.mark.parametrize("name", NAMES)
def test_reference_matches_timm_both_ways(name):
    for C in (2, 7, 64):
        theirs = randomize(timm_module(name, C)).double()
        ours = fusedattn.registry.get(name).reference_cls()(C).double()
        ours.load_state_dict(theirs.state_dict(), strict=True)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        x = torch.randn(2, C, 5, 6, dtype=torch.float64)
        assert_close64(ours(x), theirs(x), name)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck(backend_device, name):
    _, device = backend_device
    _, ours = pair(name, 6, device)
    ours.eval()  # gradcheck needs a pure function: BatchNorm on running statistics
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(ours, (x,), eps=1e-6, atol=1e-7)
    ours.train()
    params = list(ours.parameters())

    def f(x, *ps):
        return torch.func.functional_call(ours, dict(zip([n for n, _ in ours.named_parameters()], ps)), (x,))
    # parameters as inputs (training mode moves BN statistics; the values stay a function of x)
    assert torch.autograd.gradcheck(f, (x, *[p.detach().requires_grad_() for p in params]),
                                    eps=1e-6, atol=1e-6, nondet_tol=1e-12)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_tolerance_rule(backend_device, name, dtype):
    _, device = backend_device
    theirs, ours = pair(name, 32, device)
    for m in (theirs, ours):
        m.eval()
    x64 = torch.randn(2, 32, 6, 7, dtype=torch.float64, device=device)
    g64 = torch.randn_like(x64)
    y_exact, d_exact = run(theirs, x64, g64)
    t_lo, o_lo = pair(name, 32, device, dtype)
    t_lo.eval(), o_lo.eval()
    y_e, d_e = run(t_lo, x64.to(dtype), g64.to(dtype))
    y_f, d_f = run(o_lo, x64.to(dtype), g64.to(dtype))
    assert y_f.dtype == dtype
    assert_tolerance(y_f, y_e, y_exact, f"{name} {dtype} y")
    assert_tolerance(d_f[0], d_e[0], d_exact[0], f"{name} {dtype} dx")


@pytest.mark.parametrize("name", NAMES)
def test_bad_input(name):
    cls = fusedattn.registry.get(name).fused_cls()
    m = cls(8)
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(1, 8, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="N, C, H, W"):
        m(torch.randn(8, 3, 3))
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(1, 9, 3, 3))
    with pytest.raises(ValueError, match="channels"):
        cls(0)


@pytest.mark.parametrize("name", NAMES)
def test_compile_fullgraph_resnet_block(backend_device, name):
    backend, device = backend_device
    entry = fusedattn.registry.get(name)
    torch.manual_seed(0)
    ref = Block(entry.reference_cls()).to(device, torch.float64)
    randomize(ref)
    fused = Block(entry.fused_cls()).to(device, torch.float64)
    check_compiled_block(ref, fused, device, "aot_eager" if backend == "triton" else "inductor")
