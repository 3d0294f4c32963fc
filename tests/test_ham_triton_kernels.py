"""HAM's Triton launchers (fusedattn.triton_kernels.ham) against the C++ CPU ops
(torch.ops.fusedattn.ham_*, csrc/cpu/ham.cpp), pass by pass.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1); with one, on CUDA tensors, compared with the CPU op on the same data."""
import pytest
import torch

import fusedattn  # noqa: F401  (loads the C++ ops)
from helpers import GPU, INTERPRET

ops = torch.ops.fusedattn

DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(
               not INTERPRET, reason="CPU tensors run Triton only in the interpreter (TRITON_INTERPRET=1)")),
           pytest.param("cuda", marks=pytest.mark.skipif(
               not GPU or INTERPRET, reason="needs a CUDA device (none visible to torch here)"))]

PASSES = ("pool_pixels", "pool_channels", "gate", "gate_grad_s", "grad_a", "grad_x")
LOW_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(scope="module")
def k():
    from fusedattn.triton_kernels import ham
    return ham


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _group(N, C, k1, gen):
    """bool (N, C) with exactly k1 channels True (group 1) in every row."""
    g = torch.zeros(N, C, dtype=torch.bool)
    for n in range(N):
        g[n, torch.randperm(C, generator=gen)[:k1]] = True
    return g


def make_inputs(shape, dtype, channels_last=False, k1=None, x=None, seed=0):
    """Valid inputs of all six passes: x, dy in a layout; a, s, d_avg, d_max, d_mean_c, d_max_c in
    the accumulation dtype; argmax maps from the CPU pooling ops."""
    gen = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    P = H * W
    acc = _acc(dtype)
    if x is None:
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(dtype).contiguous(memory_format=fmt)
    k1 = C // 2 if k1 is None else k1
    inp = dict(x=x, dy=torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
               .contiguous(memory_format=fmt),
               a=torch.rand(N, C, generator=gen, dtype=acc) + 0.1, group=_group(N, C, k1, gen),
               size0=C - k1, size1=k1,
               s=torch.rand(N, 2, P, generator=gen, dtype=acc) * 0.5 + 0.5,
               d_avg=torch.randn(N, 2, P, generator=gen, dtype=acc),
               d_max=torch.randn(N, 2, P, generator=gen, dtype=acc),
               d_mean_c=torch.randn(N, C, generator=gen, dtype=acc),
               d_max_c=torch.randn(N, C, generator=gen, dtype=acc))
    inp["dy"] = inp["dy"].as_strided(x.shape, x.stride())  # exactly x's strides (1x1, W=1 maps)
    inp["argmax"] = ops.ham_pool_channels(x, inp["a"], inp["group"], inp["size0"], inp["size1"])[2]
    inp["argmax_c"] = ops.ham_pool_pixels(x)[2]
    return inp


def _args(name, i):
    sizes = (i["size0"], i["size1"])
    pool = (i["d_avg"], i["d_max"], i["argmax"], *sizes)
    return {"pool_pixels": (i["x"],),
            "pool_channels": (i["x"], i["a"], i["group"], *sizes),
            "gate": (i["x"], i["a"], i["s"], i["group"]),
            "gate_grad_s": (i["dy"], i["x"], i["a"], i["group"]),
            "grad_a": (i["x"], i["dy"], i["s"], i["group"], *pool),
            "grad_x": (i["dy"], i["a"], i["s"], i["group"], *pool, i["d_mean_c"], i["d_max_c"],
                       i["argmax_c"])}[name]


def _to(args, device=None, dtype=None):
    """Move tensors to device; with dtype, floating tensors to fp64 (the exact reference)."""
    out = []
    for t in args:
        if isinstance(t, torch.Tensor):
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            if device is not None:
                t = t.to(device)
        out.append(t)
    return out


def _tuple(r):
    return tuple(r) if isinstance(r, (tuple, list)) else (r,)


def run_triton(k, name, inp, device):
    res = getattr(k, name)(*_to(_args(name, inp), device))
    return tuple(t.cpu() for t in _tuple(res)), _tuple(res)


def run_cpu(name, inp, exact=False):
    args = _args(name, inp)
    if exact:
        args = _to(args, dtype=torch.float64)
    return _tuple(getattr(ops, f"ham_{name}")(*args))


def assert_same_meta(got, ref, what):
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype, f"{what}: {g.dtype} {tuple(g.shape)} vs {r.dtype} {tuple(r.shape)}"
        if g.numel() > 1:
            assert g.stride() == r.stride(), f"{what}: strides {g.stride()} vs {r.stride()}"


def _finite_err(got, ref, what):
    """Max |got - ref| over the entries where ref is finite; NaN and inf entries must match."""
    got, ref = got.double(), ref.double()
    fin = ref.isfinite()
    torch.testing.assert_close(got[~fin], ref[~fin], rtol=0, atol=0, equal_nan=True, msg=what)
    if not fin.any():
        return 0.0, 1.0
    return (got[fin] - ref[fin]).abs().max().item(), max(1.0, ref[fin].abs().max().item())


def assert_close64(got, ref, what):
    err, scale = _finite_err(got, ref, what)
    assert err <= 1e-12 * scale, f"{what}: fp64 error {err:.3g} (scale {scale:.3g})"


def check_pass(k, name, inp, device, dtype):
    """Triton vs the CPU op: same shapes, dtypes and strides; argmax and max exact (same dtype);
    values to fp64 round-off (fp64) or within 2x the CPU op's own error + a dtype bound of the
    fp64 result (fp32/fp16/bf16)."""
    got, on_dev = run_triton(k, name, inp, device)
    ref = run_cpu(name, inp)
    assert_same_meta(got, ref, name)
    for t in on_dev:
        assert t.device.type == device
    is_arg = [r.dtype == torch.int32 for r in ref]
    for j, (g, r) in enumerate(zip(got, ref)):
        what = f"{name}[{j}] {dtype}"
        if is_arg[j]:
            assert torch.equal(g, r), f"{what}: argmax differs at {(g != r).nonzero()[:5].tolist()}"
        elif name.startswith("pool") and j == 1:  # max values: copies of x (or a x) products
            torch.testing.assert_close(g, r, rtol=0, atol=0, equal_nan=True, msg=what)
        elif dtype == torch.float64:
            assert_close64(g, r, what)
    if dtype != torch.float64:
        exact = run_cpu(name, inp, exact=True)
        for j, (g, r, e) in enumerate(zip(got, ref, exact)):
            if is_arg[j] or not g.numel():
                continue
            ef, scale = _finite_err(g, e, f"{name}[{j}] {dtype} vs fp64")
            ec, _ = _finite_err(r, e, f"CPU op {name}[{j}] {dtype} vs fp64")
            bound = 2 * ec + LOW_TOL[dtype] * scale
            assert ef <= bound, f"{name}[{j}] {dtype}: error {ef:.3g} > 2 x CPU op's {ec:.3g} + tol"
    return got


SHAPES = [((2, 5, 3, 7), None),       # odd sizes
          ((1, 70, 9, 9), None),      # C not a multiple of any block, P = 81
          ((2, 3, 1, 1), 1),          # 1x1 maps (read as channels-last)
          ((2, 2, 5, 6), 0),          # C = 2, group 1 empty (size0 = 2, size1 = 0)
          ((2, 2, 5, 6), 2),          # group 0 empty (size0 = 0, size1 = 2)
          ((1, 6, 17, 31), 3),        # P = 527: loop over P (several tiles), split in two
          ((1, 520, 2, 3), 200)]      # C = 520: loop over C, split in two


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["planar", "cl"])
@pytest.mark.parametrize("shape,k1", SHAPES, ids=["x".join(map(str, s)) + f"-k{k1}" for s, k1 in SHAPES])
def test_fp64_matches_cpu_op(k, device, channels_last, shape, k1):
    inp = make_inputs(shape, torch.float64, channels_last, k1)
    for name in PASSES:
        check_pass(k, name, inp, device, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["planar", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision(k, device, channels_last, dtype):
    # C = 19 and P = 99: neither a multiple of a block nor of 16 bytes (the unaligned variants);
    # C = 16, P = 64: aligned rows in both layouts (the vectorised variants)
    for shape in ((2, 19, 9, 11), (2, 16, 8, 8)):
        inp = make_inputs(shape, dtype, channels_last)
        for name in PASSES:
            check_pass(k, name, inp, device, dtype)


def _tie_data(shape, dtype):
    """Values from {-1, -0.0, 0, 1} and many equal ones: ties everywhere, -0.0 == 0."""
    gen = torch.Generator().manual_seed(1)
    v = torch.tensor([-1.0, -0.0, 0.0, 1.0, 0.0, -1.0], dtype=torch.float64)
    return v[torch.randint(0, len(v), shape, generator=gen)].to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["planar", "cl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_ties_exact_argmax(k, device, channels_last, dtype):
    shape = (2, 13, 5, 7)
    cases = {"mixed": _tie_data(shape, dtype),
             "zeros": torch.zeros(shape, dtype=dtype),           # masked-out 0 vs real zeros
             "negative": -_tie_data(shape, dtype).abs() - 1,     # a masked-out 0 wins
             "minus_inf": torch.full(shape, float("-inf"), dtype=dtype)}
    for what, x in cases.items():
        inp = make_inputs(shape, dtype, channels_last, k1=5, x=x)
        inp["a"] = torch.ones_like(inp["a"])                     # f = x exactly: ties stay ties
        inp["argmax"] = ops.ham_pool_channels(inp["x"], inp["a"], inp["group"], 8, 5)[2]
        names = PASSES if what != "minus_inf" else ("pool_pixels", "pool_channels")
        for name in names:
            check_pass(k, name, inp, device, dtype)
        if what == "negative":  # every group's max is a masked-out 0: its first foreign channel
            _, mx, arg = run_triton(k, "pool_channels", inp, device)[0]
            first_out = torch.stack([(inp["group"] == (g == 0)).int().argmax(1) for g in (0, 1)], 1)
            assert not mx.any()
            assert torch.equal(arg, first_out[:, :, None].expand_as(arg).int())
        if what == "zeros":     # all zero: channel 0 and pixel 0 everywhere
            _, mx, arg = run_triton(k, "pool_channels", inp, device)[0]
            assert not mx.any() and not arg.any()
            assert not run_triton(k, "pool_pixels", inp, device)[0][2].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["planar", "cl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_nan_counts_as_largest(k, device, channels_last, dtype):
    shape = (2, 9, 6, 7)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[0, 1, 2, 3] = x[0, 1, 4, 0] = float("nan")    # two NaNs in one plane: the first wins
    x[0, 4, 0, 0] = float("nan")                      # at pixel 0
    x[1, 3, 5, 6] = float("nan")                      # at the last pixel
    x[1, 0, 1, 1] = x[1, 7, 1, 1] = float("nan")      # two channels of one pixel
    x[1, 8, 2, :] = float("inf")
    inp = make_inputs(shape, dtype, channels_last, k1=4, x=x)
    for name in ("pool_pixels", "pool_channels"):
        got = check_pass(k, name, inp, device, dtype)
        assert got[1].isnan().any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", [False, True], ids=["one-range", "split"])
def test_loops_and_splits(k, device, split, monkeypatch):
    """Reduced axes of many tiles in one program (no split) or in many ranges merged by the
    combine kernel (split forced): same numbers, argmax across range boundaries included."""
    if split:
        monkeypatch.setattr(k, "MIN_SPLIT", 1)
        monkeypatch.setattr(k, "DEFAULT_SMS", 10**6)
        monkeypatch.setattr(k, "_sm_counts", {i: 10**6 for i in range(16)})
    else:
        monkeypatch.setattr(k, "DEFAULT_SMS", 0)
        monkeypatch.setattr(k, "_sm_counts", {i: 0 for i in range(16)})
    # C = 150: several channel tiles in either layout; P = 399: several pixel tiles
    # (k1 = C: group 0 empty, zeros from the combine too)
    for shape, cl, dtype, k1 in (((2, 150, 3, 5), False, torch.float64, 50),
                                 ((2, 150, 3, 5), True, torch.float16, 50),
                                 ((1, 5, 19, 21), False, torch.float16, 2),
                                 ((1, 5, 19, 21), True, torch.float64, 1),
                                 ((1, 150, 2, 2), True, torch.float64, 150)):
        x = _tie_data(shape, torch.float64)
        x[0, 1, 1, 0] = x[0, 1, -1, -1] = float("nan")     # two NaNs, in different pixel tiles
        x[0, 120 % shape[1], 0, 1] = float("nan")          # in a late channel tile
        inp = make_inputs(shape, dtype, cl, k1=k1, x=x)
        for name in PASSES:
            check_pass(k, name, inp, device, dtype)
    # the split really happened (or not)
    S, _ = k.splits(1, 10_000, 64, torch.device("cpu"))
    assert (S > 1) == split


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 0, 3, 3), (2, 4, 0, 5)], ids=str)
def test_empty(k, device, shape):
    inp = make_inputs(shape, torch.float32, k1=shape[1] // 2)
    for name in PASSES:
        got, _ = run_triton(k, name, inp, device)
        ref = run_cpu(name, inp)
        assert_same_meta(got, ref, name)
        if name not in ("gate", "grad_x"):  # small outputs are zero-filled
            for g in got:
                assert not g.any()


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_output_strides(k, device):
    """Channels-last shapes where contiguity is ambiguous or strides are easy to get wrong:
    N = 1, W = 1, H = W = 1 (both layouts at once); y and dx keep exactly x's strides."""
    for shape in ((1, 8, 3, 3), (2, 8, 4, 1), (2, 5, 1, 1), (3, 4, 1, 6)):
        for cl in (False, True):
            inp = make_inputs(shape, torch.float64, cl, k1=2)
            for name in ("gate", "grad_x"):
                (y,) = check_pass(k, name, inp, device, torch.float64)
                src = inp["x"] if name == "gate" else inp["dy"]
                assert y.stride() == src.stride(), (name, shape, cl, y.stride(), src.stride())


def test_bad_input(k):
    x = torch.randn(2, 4, 3, 3)
    a = torch.rand(2, 4)
    g = torch.zeros(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="contiguous or dense channels_last"):
        k.pool_pixels(x.transpose(2, 3))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        k.pool_pixels(x[0])
    with pytest.raises(TypeError, match="fp16, bf16, fp32 or fp64"):
        k.pool_pixels(x.int())
    with pytest.raises(ValueError, match="ham_pool_channels: a"):
        k.pool_channels(x, a.double(), g, 2, 2)
    with pytest.raises(ValueError, match="dy must have x's"):
        k.gate_grad_s(x.contiguous(memory_format=torch.channels_last), x, a, g)


def test_configs_and_aot_variants(k):
    """Every specialisation's tile is whole warps of per_thread() elements with power-of-2 sides;
    the AOT list names each compiled form once and stays small."""
    for name, cl, eb, aligned, cfg in k.specializations():
        tile = cfg.block_c * cfg.block_p
        assert tile == cfg.num_warps * 32 * k.per_thread(name, eb, aligned)
        assert cfg.block_c & (cfg.block_c - 1) == 0 and cfg.block_p & (cfg.block_p - 1) == 0
        assert (cfg.block_c if cl else cfg.block_p) == k.CONTIG_BLOCK
    variants = list(k.aot_variants())
    names = [v[0] for v in variants]
    assert len(names) == len(set(names)) and len(names) < 150
    assert all(n.startswith("ham_") for n in names)


def test_splits_rule(k):
    cpu = torch.device("cpu")
    assert k.splits(10**6, 10**6, 64, cpu) == (1, triton_cdiv(10**6, 64) * 64)  # enough programs
    assert k.splits(4, 100, 64, cpu)[0] == 1                                      # short axis
    S, split = k.splits(4, 100_000, 64, cpu)
    assert S > 1 and split % 64 == 0 and (S - 1) * split < 100_000 <= S * split
    assert split >= k.MIN_SPLIT


def triton_cdiv(a, b):
    return -(-a // b)
