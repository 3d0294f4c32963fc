"""Attention-augmented convolution (fusedattn/spec/aaconv.md): the reference against the written-out
per-pixel formula and the paper's relative-to-absolute formulation; the fused op and module on
every backend that runs here against the reference (fp64, gradcheck, the tolerance rule),
layouts, bad input, opcheck, torch.compile, bitwise repeatability and what autograd keeps."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import fusedattn
from fusedattn import reference
from fusedattn.ops import aaconv as aa_ops
from helpers import LOW_PRECISION, assert_close64, assert_tolerance, check_compiled_block

# (N, C_in, F_out, k, dk, dv, Nh, (H, W) of the input, relative, stride)
CONFIGS = {
    "square": (2, 5, 12, 3, 8, 4, 2, (6, 6), True, 1),
    "non_square": (2, 4, 10, 3, 6, 3, 3, (5, 7), True, 1),
    "one_pixel": (2, 3, 6, 1, 4, 2, 2, (1, 1), True, 1),
    "batch_1": (1, 4, 9, 3, 10, 5, 1, (4, 3), True, 1),
    "stride_2": (2, 4, 8, 3, 4, 4, 2, (7, 6), True, 2),
    "absolute": (2, 4, 8, 3, 6, 4, 2, (5, 4), False, 1),
    "wide_heads": (1, 3, 80, 3, 64, 64, 1, (3, 5), True, 1),
}


def grid_of(hw, stride):
    return tuple((s - 1) // stride + 1 for s in hw)


def make(cfg, cls=reference.AugmentedConv2d, dtype=torch.float64, device="cpu", seed=0):
    N, cin, fout, k, dk, dv, nh, hw, rel, stride = cfg
    torch.manual_seed(seed)
    m = cls(cin, fout, k, dk, dv, nh, grid_of(hw, stride), relative=rel, stride=stride)
    with torch.no_grad():  # biases and tables that are not the trivial init
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.to(device, dtype)


def pair(cfg, dtype=torch.float64, device="cpu"):
    ref = make(cfg, dtype=dtype, device=device)
    fused = make(cfg, fusedattn.AugmentedConv2d, dtype=dtype, device=device)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def run(m, x, g):
    """Output, input gradient and every parameter's gradient (by name) of m at x."""
    x = x.detach().requires_grad_()
    m.zero_grad()
    y = m(x)
    y.backward(g)
    return y.detach(), x.grad, {n: p.grad for n, p in m.named_parameters()}


def inputs(cfg, dtype=torch.float64, device="cpu", seed=1):
    N, cin, fout, _, _, _, _, hw, _, stride = cfg
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, cin, *hw, generator=gen, dtype=torch.float64)
    g = torch.randn(N, fout, *grid_of(hw, stride), generator=gen, dtype=torch.float64)
    return x.to(device, dtype), g.to(device, dtype)


# ----------------------------------------------------------------------------- the reference

def per_pixel(m, x):
    """The spec's formula, one output pixel at a time, from the module's weights (fp64)."""
    dk, dv, nh = m.dk, m.dv, m.num_heads
    dkh, dvh = dk // nh, dv // nh
    conv_out = F.conv2d(x, m.conv_out.weight, m.conv_out.bias, m.stride, m.kernel_size // 2)
    qkv = F.conv2d(x, m.qkv_conv.weight, m.qkv_conv.bias, m.stride)
    N, _, H, W = qkv.shape
    attn = torch.zeros(N, dv, H, W, dtype=x.dtype)
    for n, h, iy, ix in itertools.product(range(N), range(nh), range(H), range(W)):
        q = qkv[n, dk + h * dkh: dk + (h + 1) * dkh, iy, ix] * dkh ** -0.5  # k, q, v order
        logits = torch.zeros(H, W, dtype=x.dtype)
        for jy, jx in itertools.product(range(H), range(W)):
            key = qkv[n, h * dkh: (h + 1) * dkh, jy, jx]
            logit = q @ key
            if m.relative:
                logit = logit + q @ m.rel_w[jx - ix + W - 1] + q @ m.rel_h[jy - iy + H - 1]
            logits[jy, jx] = logit
        w = torch.softmax(logits.flatten(), 0).view(H, W)
        for c in range(dvh):
            vals = qkv[n, 2 * dk + h * dvh + c]
            attn[n, h * dvh + c, iy, ix] = (w * vals).sum()
    attn = F.conv2d(attn, m.attn_out.weight, m.attn_out.bias)
    return torch.cat([conv_out, attn], 1)


def rel_to_abs(x):
    """The appendix's rel_to_abs: (B, Nh, L, 2L - 1) relative -> (B, Nh, L, L) absolute."""
    B, Nh, L, _ = x.shape
    x = torch.cat([x, torch.zeros(B, Nh, L, 1, dtype=x.dtype)], 3)
    flat = torch.cat([x.reshape(B, Nh, L * 2 * L), torch.zeros(B, Nh, L - 1, dtype=x.dtype)], 2)
    return flat.reshape(B, Nh, L + 1, 2 * L - 1)[:, :, :L, L - 1:]


def relative_logits_1d(q, rel_k, H, W, Nh, transpose_mask):
    rel = torch.einsum("bhxyd,md->bhxym", q, rel_k)
    rel = rel_to_abs(rel.reshape(-1, Nh * H, W, 2 * W - 1))
    rel = rel.reshape(-1, Nh, H, W, W).unsqueeze(3).repeat(1, 1, 1, H, 1, 1)
    return rel.permute(*transpose_mask).reshape(-1, Nh, H * W, H * W)


def appendix(m, x):
    """The paper's TensorFlow code (appendix), channels-last, translated op by op."""
    dk, dv, Nh = m.dk, m.dv, m.num_heads
    dkh = dk // Nh
    nhwc = lambda t: t.permute(0, 2, 3, 1)  # noqa: E731
    conv_out = nhwc(m.conv_out(x))
    qkv = nhwc(m.qkv_conv(x))
    B, H, W, _ = qkv.shape
    k, q, v = torch.split(qkv, [dk, dk, dv], dim=3)
    split = lambda t: t.reshape(B, H, W, Nh, t.shape[-1] // Nh).permute(0, 3, 1, 2, 4)  # noqa
    q, k, v = split(q) * dkh ** -0.5, split(k), split(v)
    flat = lambda t: t.reshape(B, Nh, H * W, t.shape[-1])  # noqa: E731
    logits = flat(q) @ flat(k).transpose(-1, -2)
    if m.relative:
        logits = logits + relative_logits_1d(q, m.rel_w, H, W, Nh, [0, 1, 2, 4, 3, 5])
        logits = logits + relative_logits_1d(q.transpose(2, 3), m.rel_h, W, H, Nh,
                                             [0, 1, 4, 2, 5, 3])
    attn = (torch.softmax(logits, -1) @ flat(v)).reshape(B, Nh, H, W, dv // Nh)
    attn = attn.permute(0, 2, 3, 1, 4).reshape(B, H, W, dv)  # combine_heads_2d
    attn = nhwc(m.attn_out(attn.permute(0, 3, 1, 2)))
    return torch.cat([conv_out, attn], 3).permute(0, 3, 1, 2)


@pytest.mark.parametrize("name", ["square", "non_square", "one_pixel", "stride_2", "absolute"])
def test_reference_matches_the_per_pixel_formula(name):
    m = make(CONFIGS[name])
    x, _ = inputs(CONFIGS[name])
    with torch.no_grad():
        assert_close64(m(x), per_pixel(m, x), name)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reference_matches_the_appendix(name):
    m = make(CONFIGS[name])
    x, _ = inputs(CONFIGS[name])
    with torch.no_grad():
        assert_close64(m(x), appendix(m, x), name)


def test_reference_parameters_and_init():
    torch.manual_seed(0)
    m = reference.AugmentedConv2d(16, 32, 3, 40, 8, 4, (20, 30))
    assert [n for n, _ in m.named_parameters()] == [
        "rel_h", "rel_w", "conv_out.weight", "conv_out.bias", "qkv_conv.weight",
        "qkv_conv.bias", "attn_out.weight", "attn_out.bias"]
    assert m.conv_out.weight.shape == (24, 16, 3, 3) and m.conv_out.padding == (1, 1)
    assert m.qkv_conv.weight.shape == (88, 16, 1, 1) and m.attn_out.weight.shape == (8, 8, 1, 1)
    assert m.rel_h.shape == (39, 10) and m.rel_w.shape == (59, 10)
    for t in (m.rel_h, m.rel_w):  # std dkh^-0.5, mean 0 (not the appendix's mean dkh^-0.5)
        assert abs(t.std().item() - 10 ** -0.5) < 0.03 and abs(t.mean().item()) < 0.03
    plain = reference.AugmentedConv2d(16, 32, 3, 40, 8, 4, 20, relative=False)
    assert "rel_h" not in plain.state_dict() and plain.feat_size == (20, 20)


# ----------------------------------------------------------------------------- fused vs reference

@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp64_matches_reference(backend_device, name, layout):
    """Output, input gradient and every parameter's gradient (rel_h, rel_w included)."""
    backend, device = backend_device
    cfg = CONFIGS[name]
    ref, fused = pair(cfg, device=device)
    x, g = inputs(cfg, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    y_r, dx_r, gr = run(ref, x, g)
    y_f, dx_f, gf = run(fused, x, g)
    assert fusedattn.last_backend("aaconv") == backend
    assert_close64(y_f, y_r, "y")
    assert_close64(dx_f, dx_r, "dx")
    assert set(gf) == set(gr)
    for n in gr:
        assert_close64(gf[n], gr[n], n)


def heads(N, nh, H, W, dkh, dvh, dtype=torch.float64, device="cpu", seed=0):
    """q, k, v as the module makes them: strided views of one (N, 2 dk + dv, H, W) tensor."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(N, nh * (2 * dkh + dvh), H, W, generator=gen, dtype=torch.float64)
    qkv = qkv.to(device, dtype)
    k, q, v = torch.split(qkv, [nh * dkh, nh * dkh, nh * dvh], 1)
    return [t.reshape(N, nh, t.shape[1] // nh, H * W).transpose(2, 3) for t in (q, k, v)]


def tables(H, W, dkh, dtype=torch.float64, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(0.5 * torch.randn(2 * s - 1, dkh, generator=gen, dtype=torch.float64))
            .to(device, dtype) for s in (H, W)]


OP_SHAPES = [(2, 2, 5, 7, 3, 2), (1, 1, 1, 1, 4, 3), (2, 3, 6, 6, 20, 16), (1, 2, 3, 13, 33, 5),
             (1, 1, 9, 4, 1, 1)]


@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("shape", OP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_op_fp64_matches_the_eager_formula(backend_device, shape, relative):
    """The op itself: out (in its channel-major layout), lse, and every gradient against the eager
    formula (``fusedattn.reference.rel_attention``), with a dout of odd strides."""
    backend, device = backend_device
    N, nh, H, W, dkh, dvh = shape
    q, k, v = heads(N, nh, H, W, dkh, dvh, device=device)
    rh, rw = tables(H, W, dkh, device=device) if relative else (None, None)
    scale = dkh ** -0.5
    op = aa_ops._op(aa_ops._FORWARD_OF_BACKEND[backend])
    out, lse = op(q, k, v, rh, rw, H, W, scale)
    L = H * W
    assert out.shape == (N, nh, L, dvh) and out.stride() == (nh * dvh * L, dvh * L, 1, L)
    assert lse.shape == (N, nh, L) and lse.dtype == torch.float64 and lse.is_contiguous()
    want = reference.rel_attention(q, k, v, rh, rw, H, W, scale)
    assert_close64(out, want, "out")
    # lse: logits[i, 0] - log P[i, 0]
    eye = torch.eye(L, dtype=q.dtype, device=device).expand(N, nh, L, L)
    p = reference.rel_attention(q, k, eye, rh, rw, H, W, scale)
    logit0 = scale * (q @ k[..., :1, :].transpose(-1, -2))[..., 0]
    if relative:
        iy = torch.arange(H, device=device).repeat_interleave(W)
        ix = torch.arange(W, device=device).repeat(H)
        logit0 = logit0 + scale * ((q * rw[W - 1 - ix]).sum(-1) + (q * rh[H - 1 - iy]).sum(-1))
    assert_close64(lse, logit0 - torch.log(p[..., 0]), "lse")
    # gradients, dout expanded from one row (stride 0 along the pixels)
    dout = torch.randn(N, nh, 1, dvh, dtype=q.dtype, device=device).expand(N, nh, L, dvh)
    ins = [t.detach().requires_grad_() for t in (q, k, v)] + (
        [t.detach().requires_grad_() for t in (rh, rw)] if relative else [None, None])
    y = fusedattn.ops.aaconv.rel_attention(*ins, H, W, scale)
    assert fusedattn.last_backend("aaconv") == backend
    got = torch.autograd.grad(y, [t for t in ins if t is not None], dout)
    ref_ins = [t.detach().requires_grad_() if t is not None else None for t in ins]
    y_ref = reference.rel_attention(*ref_ins, H, W, scale)
    want = torch.autograd.grad(y_ref, [t for t in ref_ins if t is not None], dout)
    for name, a, b in zip(["dq", "dk", "dv", "drel_h", "drel_w"], got, want):
        assert_close64(a, b, name)


def test_cpu_head_sizes_beyond_64():
    """The C++ kernel takes any head size (Triton's stop at 64, the paper's largest)."""
    q, k, v = heads(2, 1, 4, 5, 80, 70)
    rh, rw = tables(4, 5, 80)
    ins = [t.detach().requires_grad_() for t in (q, k, v, rh, rw)]
    with fusedattn.use_backend("cpu"):
        y = fusedattn.ops.aaconv.rel_attention(*ins, 4, 5, 80 ** -0.5)
    ref_ins = [t.detach().requires_grad_() for t in ins]
    y_ref = reference.rel_attention(*ref_ins, 4, 5, 80 ** -0.5)
    assert_close64(y, y_ref)
    g = torch.randn_like(y_ref)
    for a, b in zip(torch.autograd.grad(y, ins, g), torch.autograd.grad(y_ref, ref_ins, g)):
        assert_close64(a, b)


@pytest.mark.parametrize("relative", [True, False])
def test_gradcheck(backend_device, relative):
    _, device = backend_device
    for N, nh, H, W, dkh, dvh in [(1, 2, 2, 3, 3, 2), (2, 1, 3, 1, 2, 1)]:
        q, k, v = [t.detach().clone().requires_grad_()
                   for t in heads(N, nh, H, W, dkh, dvh, device=device)]
        rel = ([t.requires_grad_() for t in tables(H, W, dkh, device=device)] if relative else [])

        def f(q, k, v, *rel):
            rh, rw = rel if rel else (None, None)
            return fusedattn.ops.aaconv.rel_attention(q, k, v, rh, rw, H, W, 0.7)
        assert torch.autograd.gradcheck(f, (q, k, v, *rel))


def test_gradcheck_module(backend_device):
    _, device = backend_device
    cfg = (1, 2, 5, 3, 4, 2, 2, (3, 2), True, 1)
    m = make(cfg, fusedattn.AugmentedConv2d, device=device)
    x, _ = inputs(cfg, device=device)
    names = [n for n, _ in m.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))
    ps = [p.detach().clone().requires_grad_() for p in m.parameters()]
    assert torch.autograd.gradcheck(f, (x.requires_grad_(), *ps))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("name", ["square", "non_square", "absolute"])
def test_low_precision_tolerance_rule(backend_device, name, dtype):
    """Against the fp64 reference, the fused module's error is at most twice the eager reference's
    at the same precision (plus a small slack): output, input gradient, every parameter's
    gradient; output in the input's dtype."""
    _, device = backend_device
    cfg = CONFIGS[name]
    x, g = inputs(cfg, device=device)
    exact = run(make(cfg, device=device), x, g)
    ref, fused = pair(cfg, dtype=dtype, device=device)
    eager = run(ref, x.to(dtype), g.to(dtype))
    ours = run(fused, x.to(dtype), g.to(dtype))
    assert ours[0].dtype == dtype
    assert_tolerance(ours[0], eager[0], exact[0], f"{name} {dtype} y")
    assert_tolerance(ours[1], eager[1], exact[1], f"{name} {dtype} dx")
    for n in exact[2]:
        assert_tolerance(ours[2][n], eager[2][n], exact[2][n], f"{name} {dtype} d{n}")


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_op_low_precision_tolerance_rule(backend_device, dtype):
    """The op alone (module-layout views), each gradient, under the tolerance rule."""
    _, device = backend_device
    N, nh, H, W, dkh, dvh = 2, 2, 6, 5, 20, 8
    q, k, v = heads(N, nh, H, W, dkh, dvh, device=device)
    rh, rw = tables(H, W, dkh, device=device)
    dout = torch.randn(N, nh, H * W, dvh, dtype=torch.float64, device=device)

    def grads(fn, ts):
        ts = [t.detach().requires_grad_() for t in ts]
        y = fn(*ts, H, W, dkh ** -0.5)
        return [y.detach(), *torch.autograd.grad(y, ts, dout.to(y.dtype))]
    exact = grads(reference.rel_attention, (q, k, v, rh, rw))
    low = [t.to(dtype) for t in (q, k, v, rh, rw)]
    eager = grads(reference.rel_attention, low)
    ours = grads(fusedattn.ops.aaconv.rel_attention, low)
    for name, a, b, c in zip(["out", "dq", "dk", "dv", "drel_h", "drel_w"], ours, eager, exact):
        assert a.dtype == dtype, name
        assert_tolerance(a, b, c, f"{dtype} {name}")


def test_autocast_runs_in_the_input_dtype():
    """Under CPU autocast (bf16) the convolutions give bf16 q, k, v; the op runs in bf16 with the
    tables cast, and the module's output and gradients follow the eager module's dtypes."""
    cfg = CONFIGS["square"]
    ref, fused = pair(cfg, dtype=torch.float32)
    x, g = inputs(cfg, dtype=torch.float32)
    outs = []
    for m in (ref, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(run(m, x, g.bfloat16()))
    exact = run(make(cfg), x.double(), g.double())
    assert outs[1][0].dtype == outs[0][0].dtype == torch.bfloat16
    assert fusedattn.last_backend("aaconv") == "cpu"
    for n, p in fused.named_parameters():
        assert outs[1][2][n].dtype == p.dtype
    assert_tolerance(outs[1][0], outs[0][0], exact[0], "y")


# ----------------------------------------------------------------------------- bad input

def test_bad_arguments():
    A = fusedattn.AugmentedConv2d
    with pytest.raises(ValueError, match="num_heads .3. must divide dk .8."):
        A(4, 16, 3, 8, 6, 3, 5)
    with pytest.raises(ValueError, match="must divide dk .12. and dv .4."):
        A(4, 16, 3, 12, 4, 3, 5)
    with pytest.raises(ValueError, match="dv .16. must be smaller than out_channels .16."):
        A(4, 16, 3, 8, 16, 2, 5)
    with pytest.raises(ValueError, match="feat_size"):
        A(4, 16, 3, 8, 4, 2, (5, 0))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        A(4, 16, 2, 8, 4, 2, 5)


def test_bad_input(backend_device):
    _, device = backend_device
    m = fusedattn.AugmentedConv2d(4, 12, 3, 8, 4, 2, (5, 6)).to(device, torch.float64)
    with pytest.raises(ValueError, match=r"feat_size = \(5, 6\).*\(6, 5\)"):
        m(torch.randn(1, 4, 6, 5, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match="stride 2 gives"):
        fusedattn.AugmentedConv2d(4, 12, 3, 8, 4, 2, (5, 6), stride=2)(torch.randn(1, 4, 5, 6))
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\)"):
        m(torch.randn(1, 5, 5, 6, dtype=torch.float64, device=device))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(1, 4, 5, 6, dtype=torch.int64, device=device))


def test_empty_batch(backend_device):
    _, device = backend_device
    m = make(CONFIGS["non_square"], fusedattn.AugmentedConv2d, device=device)
    x = torch.randn(0, 4, 5, 7, dtype=torch.float64, device=device, requires_grad=True)
    y = m(x)
    assert y.shape == (0, 10, 5, 7)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_grid_limit(backend_device):
    """H W up to 4096 runs; beyond, a ValueError naming the limit (module, function, op)."""
    backend, device = backend_device
    if backend == "cpu":  # the interpreter would take minutes on 64 x 64
        q, k, v = heads(1, 1, 64, 64, 2, 1, dtype=torch.float32, device=device)
        rh, rw = tables(64, 64, 2, dtype=torch.float32, device=device)
        out = fusedattn.ops.aaconv.rel_attention(q, k, v, rh, rw, 64, 64, 1.0)
        want = reference.rel_attention(q.double(), k.double(), v.double(), rh.double(), rw.double(),
                                       64, 64, 1.0)
        assert (out.double() - want).abs().max() < 1e-5
    m = fusedattn.AugmentedConv2d(2, 6, 3, 2, 2, 1, (65, 64)).to(device)
    with pytest.raises(ValueError, match="65 x 64 = 4160 pixels exceeds the limit of 4096"):
        m(torch.randn(1, 2, 65, 64, device=device))
    q, k, v = heads(1, 1, 65, 64, 2, 1, dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match="exceeds the limit of 4096"):
        fusedattn.ops.aaconv.rel_attention(q, k, v, None, None, 65, 64, 1.0)
    if backend == "cpu":
        with pytest.raises(ValueError, match="exceeds the limit of 4096"):
            torch.ops.fusedattn.rel_attention(q, k, v, None, None, 65, 64, 1.0)


def test_op_checks_its_arguments():
    """Direct calls of the C++ ops with inconsistent arguments get a clear error."""
    ops = torch.ops.fusedattn
    q, k, v = heads(1, 2, 3, 4, 5, 2)
    rh, rw = tables(3, 4, 5)
    with pytest.raises(ValueError, match="q has 12 pixels, expected H W = 4 x 4"):
        ops.rel_attention(q, k, v, None, None, 4, 4, 1.0)
    with pytest.raises(ValueError, match="rel_h and rel_w"):
        ops.rel_attention(q, k, v, rh, None, 3, 4, 1.0)
    with pytest.raises(ValueError, match="rel_w of shape"):
        ops.rel_attention(q, k, v, rh, rh, 3, 4, 1.0)
    with pytest.raises(RuntimeError, match="v in q's dtype"):
        ops.rel_attention(q, k, v.float(), rh, rw, 3, 4, 1.0)
    out, lse = ops.rel_attention(q, k, v, rh, rw, 3, 4, 1.0)
    with pytest.raises(ValueError, match="lse of shape"):
        ops.rel_attention_backward(out, q, k, v, rh, rw, out, lse[:, :1], 3, 4, 1.0)
    with pytest.raises(RuntimeError, match="lse in Double"):
        ops.rel_attention_backward(out, q, k, v, rh, rw, out, lse.float(), 3, 4, 1.0)


# ----------------------------------------------------------------------------- torch integration

def op_args(device, relative, dtype=torch.float64):
    q, k, v = heads(2, 2, 3, 5, 4, 3, dtype=dtype, device=device)
    rh, rw = tables(3, 5, 4, dtype=dtype, device=device) if relative else (None, None)
    return q, k, v, rh, rw


@pytest.mark.parametrize("relative", [True, False])
def test_opcheck(backend_device, relative):
    backend, device = backend_device
    fwd_name = aa_ops._FORWARD_OF_BACKEND[backend]
    fwd, bwd = aa_ops._op(fwd_name), aa_ops._op(aa_ops._BACKWARD_OF[fwd_name])
    for dtype in (torch.float64, torch.float32):
        q, k, v, rh, rw = op_args(device, relative, dtype)
        grads = [t.detach().requires_grad_() if t is not None else None for t in (q, k, v, rh, rw)]
        torch.library.opcheck(fwd, (*grads, 3, 5, 0.5))
        out, lse = fwd(q, k, v, rh, rw, 3, 5, 0.5)
        dout = torch.randn_like(out)
        torch.library.opcheck(bwd, (dout, q, k, v, rh, rw, out, lse, 3, 5, 0.5))


def test_compile_fullgraph_block(backend_device):
    """torch.compile(fullgraph=True) of a ResNet block holding the module (inductor on CPU)."""
    backend, device = backend_device
    torch.manual_seed(0)
    from helpers import Block

    def attn(cls):
        return lambda c: cls(c, c, 3, 8, 4, 2, (8, 8))
    ref = Block(attn(reference.AugmentedConv2d)).to(device, torch.float64)
    fused = Block(attn(fusedattn.AugmentedConv2d)).to(device, torch.float64)
    check_compiled_block(ref, fused, device, "aot_eager" if backend == "triton" else "inductor")


def test_double_backward_refused():
    cfg = CONFIGS["square"]
    m = make(cfg, fusedattn.AugmentedConv2d)
    x, _ = inputs(cfg)
    x.requires_grad_()
    (dx,) = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through AugmentedConv2d"):
        dx.sum().backward()


def test_convert_swaps_both_ways():
    cfg = CONFIGS["non_square"]
    net = torch.nn.Sequential(make(cfg), torch.nn.ReLU())
    x, _ = inputs(cfg)
    want = net(x)
    net, report = fusedattn.convert(net, return_report=True)
    assert type(net[0]) is fusedattn.AugmentedConv2d and len(report.swapped) == 1
    assert_close64(net(x), want)
    assert fusedattn.last_backend("aaconv") == "cpu"
    fusedattn.convert(net, to="eager")
    assert type(net[0]) is reference.AugmentedConv2d


# ----------------------------------------------------------------------------- determinism, memory

def test_op_bitwise_across_runs_and_thread_counts(backend_device):
    """The op's forward and backward give the same bits from run to run and for 1, 2 and 3
    threads (whole tasks per thread; the tables' gradients reduced in a fixed order; no
    atomics)."""
    backend, device = backend_device
    shape = (2, 4, 17, 19, 20, 8) if backend == "cpu" else (1, 2, 5, 6, 4, 3)
    N, nh, H, W, dkh, dvh = shape
    fwd_name = aa_ops._FORWARD_OF_BACKEND[backend]
    fwd, bwd = aa_ops._op(fwd_name), aa_ops._op(aa_ops._BACKWARD_OF[fwd_name])
    results = []
    threads = torch.get_num_threads()
    try:
        for n in ((1, 2, 3, 1) if backend == "cpu" else (1, 2)):
            torch.set_num_threads(n)
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                q, k, v = heads(N, nh, H, W, dkh, dvh, dtype=dtype, device=device)
                rh, rw = tables(H, W, dkh, dtype=dtype, device=device)
                dout = torch.randn(N, nh, H * W, dvh, generator=torch.Generator().manual_seed(3),
                                   dtype=torch.float64).to(device, dtype)
                out, lse = fwd(q, k, v, rh, rw, H, W, dkh ** -0.5)
                grads = bwd(dout, q, k, v, rh, rw, out, lse, H, W, dkh ** -0.5)
                results.append((n, dtype, [out, lse, *grads]))
    finally:
        torch.set_num_threads(threads)
    for n, dtype, got in results:
        first = next(r for _, d, r in results if d == dtype)
        assert all(torch.equal(a, b) for a, b in zip(got, first)), (n, dtype)


def test_module_bitwise_repeatable(backend_device):
    """Two training steps of the module give the same bits (at one thread count: torch's oneDNN
    convolutions are not bitwise the same across thread counts, the attention is)."""
    _, device = backend_device
    cfg = (2, 6, 24, 3, 16, 8, 4, (9, 7), True, 1)
    results = []
    for _ in range(2):
        m = make(cfg, fusedattn.AugmentedConv2d, dtype=torch.float32, device=device)
        x, g = inputs(cfg, dtype=torch.float32, device=device)
        y, dx, gp = run(m, x, g)
        results.append([y, dx, *gp.values()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_autograd_keeps_no_quadratic_tensor(backend_device):
    """Every tensor autograd saves for the fused module is smaller than (HW)^2 on a grid where q, k
    and v are (the eager reference saves (HW)^2 logits and weights)."""
    _, device = backend_device
    H, W = 16, 12
    L = H * W
    m_ref = reference.AugmentedConv2d(3, 10, 3, 8, 4, 2, (H, W)).to(device)
    m = fusedattn.AugmentedConv2d(3, 10, 3, 8, 4, 2, (H, W)).to(device)
    m.load_state_dict(m_ref.state_dict())
    x = torch.randn(1, 3, H, W, device=device, requires_grad=True)

    def saved_sizes(module):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = module(x)
        return sizes, y

    sizes, y = saved_sizes(m)
    assert sizes and max(sizes) < L * L, (max(sizes), L * L)
    ref_sizes, _ = saved_sizes(m_ref)
    assert max(ref_sizes) >= L * L  # the check can see a quadratic tensor
    y.sum().backward()
    assert x.grad is not None and m.rel_h.grad is not None
