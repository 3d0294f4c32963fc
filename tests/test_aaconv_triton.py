"""The Triton kernels of attention-augmented convolution's 2-D relative self-attention
(fusedattn.triton_kernels.aaconv) against the formula written out here, logits materialised in
fp64 (fusedattn/spec/aaconv.md):

    logit[i, j] = scale (q_i . k_j + q_i . rel_w[jx - ix + W - 1] + q_i . rel_h[jy - iy + H - 1])

forward (out, lse) and backward (dq, dk, dv, drel_h, drel_w) in fp64 to round-off, fp16 / bf16 /
fp32 under the tolerance rule, without tables, with the strided views the module passes, with
several query and key blocks, the dq kernel's grouped query blocks and the two-level sum of the
tables' gradients; bitwise repeatability; every launch is an AOT variant; the limits.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1); with one, on CUDA tensors. Nothing here needs the C++ extension."""
import inspect

import pytest
import torch

from helpers import ATOL, GPU, INTERPRET, assert_close64, max_err

DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(
               not INTERPRET, reason="CPU tensors run Triton only in the interpreter (TRITON_INTERPRET=1)")),
           pytest.param("cuda", marks=pytest.mark.skipif(
               not GPU or INTERPRET, reason="needs a CUDA device (none visible to torch here)"))]


@pytest.fixture(scope="module")
def k():
    from fusedattn.triton_kernels import aaconv
    return aaconv


# ----------------------------------------------------------------------------- the formula


def eager(q, k, v, rel_h, rel_w, H, W, scale):
    """(out, lse) in the inputs' dtype, the (HW)^2 logits materialised: the statement."""
    L = H * W
    logit = q @ k.transpose(-1, -2)
    if rel_h is not None:
        pix = torch.arange(L, device=q.device)
        iy, ix = pix // W, pix % W
        rel = rel_w[ix[None, :] - ix[:, None] + W - 1] + rel_h[iy[None, :] - iy[:, None] + H - 1]
        logit = logit + torch.einsum("nhid,ijd->nhij", q, rel)     # rel[i, j] = rows for (i, j)
    logit = logit * scale
    return torch.softmax(logit, -1) @ v, torch.logsumexp(logit, -1)


def make(N, Nh, H, W, dkh, dvh, dtype, relative=True, strided=False, seed=0, device="cpu"):
    """q, k, v, rel_h, rel_w (fp64 masters cast to dtype). strided: q, k, v as the module reads
    them, views of an (N, 2 dk + dv, H, W) convolution output split k, q, v along channels."""
    gen = torch.Generator().manual_seed(seed)
    L = H * W
    if strided:
        dk, dv = Nh * dkh, Nh * dvh
        qkv = torch.randn(N, 2 * dk + dv, H, W, generator=gen, dtype=torch.float64).to(dtype)
        qkv = qkv.to(device)
        kk = qkv[:, :dk].view(N, Nh, dkh, L).transpose(-1, -2)
        q = qkv[:, dk:2 * dk].view(N, Nh, dkh, L).transpose(-1, -2)
        v = qkv[:, 2 * dk:].view(N, Nh, dvh, L).transpose(-1, -2)
    else:
        q, kk = (torch.randn(N, Nh, L, dkh, generator=gen, dtype=torch.float64).to(dtype).to(device)
                 for _ in range(2))
        v = torch.randn(N, Nh, L, dvh, generator=gen, dtype=torch.float64).to(dtype).to(device)
    rel_h = rel_w = None
    if relative:
        std = dkh ** -0.5
        rel_h = (torch.randn(2 * H - 1, dkh, generator=gen, dtype=torch.float64) * std).to(dtype)
        rel_w = (torch.randn(2 * W - 1, dkh, generator=gen, dtype=torch.float64) * std).to(dtype)
        rel_h, rel_w = rel_h.to(device), rel_w.to(device)
    return q, kk, v, rel_h, rel_w


def reference(q, k, v, rel_h, rel_w, H, W, scale, dout, dtype=torch.float64):
    """(out, lse, dq, dk, dv, drel_h, drel_w) of the eager formula by autograd, computed in dtype
    on the CPU."""
    leaves = [None if t is None else t.detach().cpu().to(dtype).requires_grad_()
              for t in (q, k, v, rel_h, rel_w)]
    out, lse = eager(*leaves, H, W, scale)
    out.backward(dout.detach().cpu().to(dtype))
    return (out.detach(), lse.detach(),
            *(None if t is None else t.grad for t in leaves[:3]),
            None if rel_h is None else leaves[3].grad, None if rel_w is None else leaves[4].grad)


def run(k, q, kk, v, rel_h, rel_w, H, W, scale, dout):
    out, lse = k.forward(q, kk, v, rel_h, rel_w, H, W, scale)
    return (out, lse, *k.backward(dout, q, kk, v, rel_h, rel_w, out, lse, H, W, scale))


NAMES = ("out", "lse", "dq", "dk", "dv", "drel_h", "drel_w")


def check_layouts(got, q, v, rel_h, rel_w):
    """The contract of fusedattn/ops/aaconv.py: out, dq, dk, dv with memory (N, Nh, d, L); lse
    (N, Nh, L) contiguous in the accumulation dtype; drel_* contiguous in the tables' dtype."""
    out, lse, dq, dk, dv, drh, drw = got
    N, Nh, L, dkh = q.shape
    dvh = v.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    for t, d, name in ((out, dvh, "out"), (dq, dkh, "dq"), (dk, dkh, "dk"), (dv, dvh, "dv")):
        assert t.shape == (N, Nh, L, d) and t.dtype == q.dtype and t.device == q.device, name
        assert t.transpose(2, 3).is_contiguous(), (name, t.stride())
    assert lse.shape == (N, Nh, L) and lse.dtype == acc and lse.is_contiguous()
    if rel_h is None:
        assert drh is None and drw is None
    else:
        for t, r in ((drh, rel_h), (drw, rel_w)):
            assert t.shape == r.shape and t.dtype == r.dtype and t.is_contiguous()
        assert drh.data_ptr() != drw.data_ptr()
    # out viewed as the (N, Nh dvh, H, W) map without a copy (what the module does)
    assert out.transpose(2, 3).reshape(N, Nh * dvh, L).data_ptr() == out.data_ptr()


# (N, Nh, H, W, dkh, dvh): odd grids and head sizes, a 1x1 grid, a non-square one, dkh 20
SHAPES = [(1, 2, 3, 4, 3, 5), (2, 2, 5, 5, 20, 1), (2, 2, 1, 1, 3, 5), (1, 2, 4, 7, 20, 5)]
# several query and key blocks (64 for 2- and 4-byte types, 32 for fp64) with partial last ones
MULTI_BLOCK = (1, 2, 9, 8, 20, 5)


def _id(s):
    return "x".join(map(str, s[:2])) + f"-{s[2]}x{s[3]}-dk{s[4]}-dv{s[5]}"


def check_fp64(k, shape, device, relative=True, strided=False, dout_strided=False):
    N, Nh, H, W, dkh, dvh = shape
    q, kk, v, rel_h, rel_w = make(N, Nh, H, W, dkh, dvh, torch.float64, relative, strided,
                                  device=device)
    scale = dkh ** -0.5
    dout = torch.randn(N, Nh, H * W, dvh, dtype=torch.float64, device=device)
    if dout_strided:  # as AOT autograd may pass it: a transposed copy, or stride 0
        dout = dout.transpose(0, 1).contiguous().transpose(0, 1)
    got = run(k, q, kk, v, rel_h, rel_w, H, W, scale, dout)
    check_layouts(got, q, v, rel_h, rel_w)
    want = reference(q, kk, v, rel_h, rel_w, H, W, scale, dout)
    for name, g, w in zip(NAMES, got, want):
        if w is None:
            assert g is None, name
        else:
            assert_close64(g.cpu(), w, f"{name} {shape}")
    return got


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES + [MULTI_BLOCK], ids=_id)
def test_fp64_matches_formula(k, device, shape):
    check_fp64(k, shape, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]], ids=_id)
def test_without_tables(k, device, shape):
    check_fp64(k, shape, device, relative=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]], ids=_id)
def test_strided_views(k, device, shape):
    """q, k, v as views of the qkv convolution's output (pixels unit-stride, channels L apart,
    a batch stride of the whole map), dout with permuted strides and with stride 0."""
    check_fp64(k, shape, device, strided=True, dout_strided=True)
    N, Nh, H, W, dkh, dvh = shape
    q, kk, v, rel_h, rel_w = make(N, Nh, H, W, dkh, dvh, torch.float64, strided=True,
                                  device=device)
    dout = torch.randn(1, 1, 1, dvh, dtype=torch.float64, device=device).expand(v.shape)
    got = run(k, q, kk, v, rel_h, rel_w, H, W, 0.3, dout)
    want = reference(q, kk, v, rel_h, rel_w, H, W, 0.3, dout)
    for name, g, w in zip(NAMES, got, want):
        assert_close64(g.cpu(), w, f"{name} stride-0 dout")


def test_module_views_are_read_in_place(k):
    """The module's q, k, v (views of the qkv convolution: unit stride along the pixels), out
    and the results are passed to the kernels as they are; a tensor whose pixels are not unit-
    stride (a contiguous (N, Nh, L, d) one, an expanded gradient) is copied to that layout."""
    q, kk, v, _, _ = make(2, 2, 3, 4, 3, 5, torch.float32, strided=True)
    for t in (q, kk, v, k.new_result(2, 2, 12, 5, torch.float32, "cpu")):
        assert k._pixels_unit(t) is t
    for t in (torch.randn(2, 2, 12, 3), torch.randn(1, 1, 1, 3).expand(2, 2, 12, 3)):
        u = k._pixels_unit(t)
        assert u.stride(2) == 1 and torch.equal(u, t)
    one = torch.randn(2, 2, 1, 3)           # a 1x1 grid: any stride reads the same
    assert k._pixels_unit(one) is one


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_query_blocks_and_two_level_sum(k, device, monkeypatch):
    """More query blocks than dq programs (several waves; each workspace slot adds the
    tables' gradients of several blocks, in order) and a workspace summed in two levels: still
    the formula."""
    monkeypatch.setattr(k, "DQ_PROGRAMS", 3)
    monkeypatch.setattr(k, "SUM_CHUNK", 2)
    assert k.dq_waves(7) == (3, 3)   # MULTI_BLOCK: 2 heads x 2 to 5 query blocks > 3
    check_fp64(k, MULTI_BLOCK, device)
    check_fp64(k, (2, 3, 3, 4, 3, 5), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], MULTI_BLOCK], ids=_id)
def test_low_precision(k, device, dtype, shape):
    """flash-attention's rule: against the fp64 result, the kernels' error is at most twice the
    eager formula's error at the same precision (plus the dtype's small absolute slack)."""
    check_low_precision(k, device, dtype, shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 2, 5, 7, 40, 64), (1, 2, 5, 7, 64, 20)], ids=_id)
def test_fp32_wide_heads(k, device, shape):
    """fp32 with 64-wide q/k heads on a grid padding to G = 16: the dq kernel's 32-query
    blocks of the spill fixes (_SPILL_FIXES; two blocks, the last partial), read back by the
    tables-gradient kernel with the same block; under the rule of test_low_precision."""
    N, Nh, H, W, dkh, dvh = shape
    cfg = k.config("dq", 4, k._pad(dkh), k._pad(dvh), 16, True)
    assert cfg.block_m == 32 and k.rel_config(4, k._pad(dkh), 16)[0] == 32
    check_low_precision(k, device, torch.float32, shape)


def check_low_precision(k, device, dtype, shape):
    N, Nh, H, W, dkh, dvh = shape
    q, kk, v, rel_h, rel_w = make(N, Nh, H, W, dkh, dvh, dtype, strided=True, device=device)
    scale = dkh ** -0.5
    dout = torch.randn(N, Nh, H * W, dvh, dtype=torch.float64).to(dtype).to(device)
    got = run(k, q, kk, v, rel_h, rel_w, H, W, scale, dout)
    check_layouts(got, q, v, rel_h, rel_w)
    exact = reference(q, kk, v, rel_h, rel_w, H, W, scale, dout)
    low = reference(q, kk, v, rel_h, rel_w, H, W, scale, dout, dtype)
    for name, g, e, lo in zip(NAMES, got, exact, low):
        ef, ee = max_err(g.cpu(), e), max_err(lo, e)
        bound = 2 * ee + ATOL[dtype] * max(1.0, e.abs().max().item())
        assert ef <= bound, f"{name} {dtype}: error {ef:.3g} > 2 x eager's {ee:.3g} + atol"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_bitwise_repeatable(k, device, dtype, monkeypatch):
    """The same inputs give the same bits, run after run (no atomics; fixed orders), also with
    grouped query blocks in the dq kernel."""
    q, kk, v, rel_h, rel_w = make(*MULTI_BLOCK, dtype, strided=True, device=device)
    dout = torch.randn(*q.shape[:3], v.shape[-1], dtype=torch.float64).to(dtype).to(device)
    args = (q, kk, v, rel_h, rel_w, MULTI_BLOCK[2], MULTI_BLOCK[3], 0.25, dout)
    first = run(k, *args)
    for t, u in zip(first, run(k, *args)):
        assert torch.equal(t, u)
    monkeypatch.setattr(k, "DQ_PROGRAMS", 1)
    for t, u in zip(first, run(k, *args)):   # waves change the order of the table sums
        torch.testing.assert_close(t, u)


def test_shape_choices_ignore_the_device(k):
    """Blocks and the dq waves are functions of the shape and dtype alone: every GPU runs the
    same programs and adds in the same order."""
    assert list(inspect.signature(k.config).parameters) == ["kernel", "elem_bytes", "DK", "DV",
                                                            "G", "relative"]
    assert list(inspect.signature(k.tables_config).parameters) == ["elem_bytes"]
    assert list(inspect.signature(k.dq_waves).parameters) == ["units"]
    assert k.dq_waves(10) == (10, 1) and k.dq_waves(k.DQ_PROGRAMS + 1) == (k.DQ_PROGRAMS, 2)


def test_limits(k):
    def args(N=1, Nh=2, H=3, W=4, dkh=3, dvh=5, relative=True):
        q, kk, v, rh, rw = make(N, Nh, H, W, dkh, dvh, torch.float64, relative)
        return q, kk, v, rh, rw, H, W, 0.5

    with pytest.raises(ValueError, match="at most 4096 pixels"):
        k.forward(*args(H=65, W=64, dkh=1, dvh=1, relative=False))
    with pytest.raises(ValueError, match="H and W of at most 64"):
        k.forward(*args(H=1, W=65, dkh=1, dvh=1))
    with pytest.raises(ValueError, match="head sizes dkh, dvh of 1 to 64"):
        k.forward(*args(dkh=65))
    with pytest.raises(ValueError, match="head sizes dkh, dvh of 1 to 64"):
        k.forward(*args(dvh=65))
    q, kk, v, rh, rw, H, W, s = args()
    with pytest.raises(ValueError, match="does not match L"):
        k.forward(q, kk, v, rh, rw, 4, 4, s)
    with pytest.raises(ValueError, match="together or not at all"):
        k.forward(q, kk, v, rh, None, H, W, s)
    with pytest.raises(ValueError, match=r"rel_w of shape \(7, 3\)"):
        k.forward(q, kk, v, rh, rw[:-1], H, W, s)
    with pytest.raises(ValueError, match="share dtype"):
        k.forward(q, kk.float(), v, rh, rw, H, W, s)
    with pytest.raises(TypeError, match="fp16, bf16, fp32 or fp64"):
        k.forward(q.int(), kk.int(), v.int(), rh, rw, H, W, s)
    out, lse = k.forward(q, kk, v, rh, rw, H, W, s)
    with pytest.raises(ValueError, match="expected dout of v's shape"):
        k.backward(out[..., :1], q, kk, v, rh, rw, out, lse, H, W, s)
    with pytest.raises(ValueError, match="expected lse"):
        k.backward(out, q, kk, v, rh, rw, out, lse.float(), H, W, s)
    # the largest grid is accepted (not run: the interpreter is slow)
    k._check(*args(H=64, W=64, dkh=64, dvh=64)[:7], "t")


def test_empty_batch(k):
    q, kk, v, rh, rw = make(0, 2, 3, 4, 3, 5, torch.float64)
    out, lse = k.forward(q, kk, v, rh, rw, 3, 4, 0.5)
    assert out.shape == (0, 2, 12, 5) and lse.shape == (0, 2, 12)
    dq, dk, dv, drh, drw = k.backward(out, q, kk, v, rh, rw, out, lse, 3, 4, 0.5)
    assert dq.shape == q.shape and dv.shape == v.shape
    assert torch.equal(drh, torch.zeros_like(rh)) and torch.equal(drw, torch.zeros_like(rw))


# ----------------------------------------------------------------------------- AOT variants


class _Recorder:
    """Stands in for a kernel: records each launch's signature as the JIT would key it (pointer
    dtypes, None and constexprs; integers and pointer alignment unspecialised) instead of
    running it."""

    _TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
              torch.float64: "*fp64"}

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log
        self.params = list(inspect.signature(kernel.fn).parameters)

    def __getitem__(self, grid):
        def launch(*args, num_warps, num_stages, **consts):
            sig, cons = {}, dict(consts)
            for name, v in zip(self.params, args):
                if v is None:
                    sig[name], cons[name] = "constexpr", None
                elif isinstance(v, torch.Tensor):
                    assert name in k_module()._PTRS, f"{name}: pointer specialised on alignment"
                    sig[name] = self._TYPES[v.dtype]
                else:
                    assert isinstance(v, int) and not isinstance(v, bool), (name, v)
                    assert name in k_module()._INTS, f"{name} would be specialised"
                    sig[name] = "i32"
            for name in consts:
                sig[name] = "constexpr"
            assert set(sig) == set(self.params), (self.params, sig)
            assert all(g >= 1 for g in grid)
            self.log.append((self.kernel, sig, cons, num_warps, num_stages))
        return launch


def k_module():
    from fusedattn.triton_kernels import aaconv
    return aaconv


def _key(fn, sig, cons):
    return (fn, tuple(sorted(sig.items())), tuple(sorted(cons.items(), key=lambda kv: kv[0])))


def test_configs_and_aot_variants(k):
    """Names are unique and say what they are; every main kernel x dtype x DK x DV x (G or no
    tables), per dtype the D pre-pass per DV and the tables and tables-gradient kernels per DK
    x G, the workspace sum per accumulation dtype; tiles are powers of two of at least 16
    (tl.dot's smallest side)."""
    variants = list(k.aot_variants())
    names = [v[0] for v in variants]
    assert len(names) == len(set(names))
    # dq per padded grid side or none; fwd and dk/dv with or without tables (the side is an int)
    n_main = 4 * len(k.HEAD_PADS) ** 2 * (len(k.GRID_PADS) + 1 + 2 + 2)
    assert len(names) == (n_main + 4 * len(k.HEAD_PADS)
                          + 2 * 4 * len(k.HEAD_PADS) * len(k.GRID_PADS) + 2)
    for *_, cfg in k.specializations():
        for b in (cfg.block_m, cfg.block_n):
            assert b >= 16 and b & (b - 1) == 0
    # the tables-gradient kernel reads the dq kernel's scratch rows: one query block per
    # (dtype, DK, G), whatever DV
    for eb in (2, 4, 8):
        for DK in k.HEAD_PADS:
            for G in k.GRID_PADS:
                bms = {k.config("dq", eb, DK, DV, G, True).block_m for DV in k.HEAD_PADS}
                assert bms == {k.rel_config(eb, DK, G)[0]}, (eb, DK, G, bms)
    # every spill fix is a form the launchers can pick
    specs = {(k._eb(dtype), kernel, DK, DV, G if kernel == "dq" else None, rel): cfg
             for kernel, dtype, DK, DV, G, rel, cfg in k.specializations()}
    for key, fix in k._SPILL_FIXES.items():
        assert specs[key] == k.Config(*fix), key
    for n in ("aaconv_fwd_fp16_dk16_dv16_rel_", "aaconv_dq_bf16_dk64_dv32_g64_",
              "aaconv_dkdv_fp64_dk32_dv64_norel_", "aaconv_pre_fp32_dv64", "aaconv_sum_fp64",
              "aaconv_tables_bf16_dk16_g32", "aaconv_rel_fp32_dk64_g16"):
        assert any(v.startswith(n) for v in names), n
    for name, fn, sig, consts, attrs, warps, stages in variants:
        assert list(sig) == list(inspect.signature(fn.fn).parameters), name
        assert attrs == {} and warps in (1, 2, 4, 8, 16) and stages in (1, 2, 3, 4)


def test_launches_are_aot_variants(k, monkeypatch):
    """Every kernel form the launchers launch (every dtype, padded head size, padded grid side,
    with and without tables, forward and backward) is one that aot_variants() lists, with its
    warps and stages: the AOT check (python -m fusedattn.aot) compiles all that can run.
    Launches are recorded, not run."""
    aot = {}
    for name, fn, sig, consts, attrs, warps, stages in k.aot_variants():
        key = _key(fn, sig, consts)
        assert key not in aot, name
        aot[key] = (name, warps, stages)
    log = []
    for attr in ("_fwd_kernel", "_tables_kernel", "_bwd_pre_kernel", "_bwd_dq_kernel",
                 "_bwd_rel_kernel", "_bwd_dkdv_kernel", "_sum_rows_kernel"):
        monkeypatch.setattr(k, attr, _Recorder(getattr(k, attr), log))
    seen = set()
    # grids whose longer side pads to 16, 32 and 64; head sizes padding to 16, 32 and 64
    grids = ((3, 4), (5, 20), (2, 40))
    heads = (1, 20, 64)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for H, W in grids:
            for dkh in heads:
                for dvh in heads:
                    for relative in (True, False):
                        if not relative and (H, W) != grids[0]:
                            continue
                        q, kk, v, rh, rw = (t if t is None else t.to(dtype) for t in
                                            make(1, 2, H, W, dkh, dvh, torch.float64, relative))
                        out, lse = k.forward(q, kk, v, rh, rw, H, W, 0.5)
                        k.backward(out, q, kk, v, rh, rw, out, lse, H, W, 0.5)
                        for fn, sig, cons, warps, stages in log:
                            key = _key(fn, sig, cons)
                            assert key in aot, f"launch not in aot_variants: {sig} {cons}"
                            assert aot[key][1:] == (warps, stages), (aot[key], warps, stages)
                            seen.add(aot[key][0])
                        log.clear()
    missing = {v[0] for v in aot.values()} - seen
    assert not missing, sorted(missing)[:10]
