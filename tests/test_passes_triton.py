"""The six generic passes' Triton launchers (fusedattn.triton_kernels.passes) against their eager
statement (fusedattn.ops.pass_reference, fusedattn/spec/passes.md), pass by pass and for every
optional combination: channel groups G = 1 (no group) and G = 2, with and without the maps (s; s,
d_avg, d_max, argmax), with and without the pixel max (pool_pixels' with_max, grad_x's d_max_c /
argmax_c), both layouts, odd sizes, split reductions, NaN / +-0 / -inf ties, empty groups.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1); with one, on CUDA tensors, compared with the reference on the same data (on
the CPU). Nothing here needs the C++ extension."""
import inspect

import pytest
import torch

from fusedattn.ops import pass_reference
from helpers import GPU, INTERPRET

DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(
               not INTERPRET, reason="CPU tensors run Triton only in the interpreter (TRITON_INTERPRET=1)")),
           pytest.param("cuda", marks=pytest.mark.skipif(
               not GPU or INTERPRET, reason="needs a CUDA device (none visible to torch here)"))]

PASSES = ("pool_pixels", "pool_channels", "gate", "gate_grad_s", "grad_a", "grad_x")
LOW_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# Every optional combination of every pass, as (pass, options): with_max (pool_pixels), maps
# (gate: s; grad_a, grad_x: s, d_avg, d_max, argmax), pixel_max (grad_x: d_max_c, argmax_c).
# The groups (G = 1 or 2) come with the inputs.
CALLS = (("pool_pixels", dict(with_max=True)), ("pool_pixels", dict(with_max=False)),
         ("pool_channels", {}),
         ("gate", dict(maps=True)), ("gate", dict(maps=False)),
         ("gate_grad_s", {}),
         ("grad_a", dict(maps=True)), ("grad_a", dict(maps=False)),
         *(("grad_x", dict(maps=m, pixel_max=pm)) for m in (True, False) for pm in (True, False)))


@pytest.fixture(scope="module")
def k():
    from fusedattn.triton_kernels import passes
    return passes


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _group(N, C, k1, gen):
    """bool (N, C) with exactly k1 channels True (group 1) in every row."""
    g = torch.zeros(N, C, dtype=torch.bool)
    for n in range(N):
        g[n, torch.randperm(C, generator=gen)[:k1]] = True
    return g


def make_inputs(shape, dtype, channels_last=False, k1=None, x=None, seed=0):
    """Valid inputs of all six passes: x, dy in a layout; k1 None: no group (G = 1, size0 = C,
    size1 = 0), else a group with k1 channels in group 1 (G = 2); a, s, d_avg, d_max, d_mean_c,
    d_max_c in the accumulation dtype; the argmax maps from the reference's pooling."""
    gen = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    P = H * W
    acc = _acc(dtype)
    if x is None:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(dtype).contiguous(memory_format=fmt)
    G = 1 if k1 is None else 2
    inp = dict(x=x, dy=torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
               .contiguous(memory_format=fmt),
               a=torch.rand(N, C, generator=gen, dtype=acc) + 0.1,
               group=None if k1 is None else _group(N, C, k1, gen),
               size0=C if k1 is None else C - k1, size1=0 if k1 is None else k1,
               s=torch.rand(N, G, P, generator=gen, dtype=acc) * 0.5 + 0.5,
               d_avg=torch.randn(N, G, P, generator=gen, dtype=acc),
               d_max=torch.randn(N, G, P, generator=gen, dtype=acc),
               d_mean_c=torch.randn(N, C, generator=gen, dtype=acc),
               d_max_c=torch.randn(N, C, generator=gen, dtype=acc))
    inp["dy"] = inp["dy"].as_strided(x.shape, x.stride())  # exactly x's strides (1x1, W=1 maps)
    set_argmax(inp)
    return inp


def set_argmax(inp):
    inp["argmax"] = pass_reference.pool_channels(inp["x"], inp["a"], inp["group"], inp["size0"],
                                                 inp["size1"])[2]
    inp["argmax_c"] = pass_reference.pool_pixels(inp["x"], True)[2]


def _args(name, i, with_max=True, maps=True, pixel_max=True):
    sizes = (i["size0"], i["size1"])
    pool = (i["d_avg"], i["d_max"], i["argmax"]) if maps else (None, None, None)
    s = i["s"] if maps else None
    pmax = (i["d_max_c"], i["argmax_c"]) if pixel_max else (None, None)
    return {"pool_pixels": (i["x"], with_max),
            "pool_channels": (i["x"], i["a"], i["group"], *sizes),
            "gate": (i["x"], i["a"], s, i["group"]),
            "gate_grad_s": (i["dy"], i["x"], i["a"], i["group"]),
            "grad_a": (i["x"], i["dy"], s, i["group"], *pool, *sizes),
            "grad_x": (i["dy"], i["a"], s, i["group"], *pool, *sizes, i["d_mean_c"], *pmax)}[name]


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


def run_triton(k, name, inp, device, **opts):
    res = getattr(k, name)(*_to(_args(name, inp, **opts), device))
    return tuple(t.cpu() for t in _tuple(res)), _tuple(res)


def run_ref(name, inp, exact=False, **opts):
    args = _args(name, inp, **opts)
    if exact:
        args = _to(args, dtype=torch.float64)
    return _tuple(getattr(pass_reference, name)(*args))


def assert_same_meta(got, ref, what):
    assert len(got) == len(ref), what
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype, f"{what}: {g.dtype} {tuple(g.shape)} vs {r.dtype} {tuple(r.shape)}"
        if g.numel() > 1:  # the stride of a dimension of size 1 is arbitrary (the reference's)
            gs, rs = ([st for st, n in zip(t.stride(), t.shape) if n > 1] for t in (g, r))
            assert gs == rs, f"{what}: strides {g.stride()} vs {r.stride()}"


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


def check_pass(k, name, inp, device, dtype, **opts):
    """Triton vs the reference: same shapes, dtypes and strides; argmax and max exact (the same
    products); values to fp64 round-off (fp64) or within 2x the reference's own error at the same
    precision + a dtype bound of the fp64 result (fp32/fp16/bf16)."""
    what0 = f"{name}{opts or ''} G={1 if inp['group'] is None else 2} {dtype}"
    got, on_dev = run_triton(k, name, inp, device, **opts)
    ref = run_ref(name, inp, **opts)
    assert_same_meta(got, ref, what0)
    for t in on_dev:
        assert t.device.type == device
    is_arg = [r.dtype == torch.int32 for r in ref]
    for j, (g, r) in enumerate(zip(got, ref)):
        what = f"{what0} [{j}]"
        if is_arg[j]:
            assert torch.equal(g, r), f"{what}: argmax differs at {(g != r).nonzero()[:5].tolist()}"
        elif name.startswith("pool") and j == 1:  # max values: copies of x (or a x) products
            torch.testing.assert_close(g, r, rtol=0, atol=0, equal_nan=True, msg=what)
        elif dtype == torch.float64:
            assert_close64(g, r, what)
    if dtype != torch.float64:
        exact = run_ref(name, inp, exact=True, **opts)
        for j, (g, r, e) in enumerate(zip(got, ref, exact)):
            if is_arg[j] or not g.numel():
                continue
            ef, scale = _finite_err(g, e, f"{what0} [{j}] vs fp64")
            ec, _ = _finite_err(r, e, f"reference {what0} [{j}] vs fp64")
            bound = 2 * ec + LOW_TOL[dtype] * scale
            assert ef <= bound, f"{what0} [{j}]: error {ef:.3g} > 2 x reference's {ec:.3g} + tol"
    return got


def check_all(k, inp, device, dtype, names=PASSES):
    for name, opts in CALLS:
        if name in names:
            check_pass(k, name, inp, device, dtype, **opts)


def _ids(cases):
    return ["x".join(map(str, s)) + ("-nogroup" if k1 is None else f"-k{k1}") for s, k1 in cases]


SHAPES = [((2, 3, 3, 5), None),      # odd sizes, C = 3, 3x5 maps
          ((2, 3, 3, 5), 1),
          ((1, 70, 9, 9), None),     # C not a multiple of any block, P = 81
          ((1, 70, 9, 9), 30),
          ((2, 3, 1, 1), None),      # 1x1 maps (read as channels-last)
          ((2, 3, 1, 1), 1),
          ((2, 2, 5, 6), 0),         # C = 2, group 1 empty (size0 = 2, size1 = 0)
          ((2, 2, 5, 6), 2)]         # group 0 empty (size0 = 0, size1 = 2)
# (loops over many tiles and split reductions: test_loops_and_splits)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["planar", "cl"])
@pytest.mark.parametrize("shape,k1", SHAPES, ids=_ids(SHAPES))
def test_fp64_matches_reference(k, device, channels_last, shape, k1):
    inp = make_inputs(shape, torch.float64, channels_last, k1)
    check_all(k, inp, device, torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["planar", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("grouped", [False, True], ids=["nogroup", "group"])
def test_low_precision(k, device, channels_last, dtype, grouped):
    # C = 19 and P = 35: neither a multiple of a block nor of 16 bytes (the unaligned variants);
    # C = 16, P = 64: aligned rows in both layouts (the vectorised variants)
    for shape in ((2, 19, 5, 7), (2, 16, 8, 8)):
        inp = make_inputs(shape, dtype, channels_last, shape[1] // 3 if grouped else None)
        check_all(k, inp, device, dtype)


def _tie_data(shape, dtype):
    """Values from {-1, -0.0, 0, 1} and many equal ones: ties everywhere, -0.0 == 0."""
    gen = torch.Generator().manual_seed(1)
    v = torch.tensor([-1.0, -0.0, 0.0, 1.0, 0.0, -1.0], dtype=torch.float64)
    return v[torch.randint(0, len(v), shape, generator=gen)].to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["planar", "cl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("grouped", [False, True], ids=["nogroup", "group"])
def test_ties_exact_argmax(k, device, channels_last, dtype, grouped):
    shape = (1, 13, 5, 7)
    cases = {"mixed": _tie_data(shape, dtype),
             "zeros": torch.zeros(shape, dtype=dtype),           # masked-out 0 vs real zeros
             "negative": -_tie_data(shape, dtype).abs() - 1,     # a masked-out 0 wins (G = 2)
             "minus_inf": torch.full(shape, float("-inf"), dtype=dtype)}
    for what, x in cases.items():
        inp = make_inputs(shape, dtype, channels_last, k1=5 if grouped else None, x=x)
        inp["a"] = torch.ones_like(inp["a"])                     # f = x exactly: ties stay ties
        set_argmax(inp)
        # all passes on mixed ties (the argmax maps the gradients read have ties too)
        check_all(k, inp, device, dtype, PASSES if what == "mixed" else PASSES[:2])
        _, mx, arg = run_triton(k, "pool_channels", inp, device)[0]
        if what == "negative" and grouped:  # every group's max is a masked-out 0: its first foreign channel
            first_out = torch.stack([(inp["group"] == (g == 0)).int().argmax(1) for g in (0, 1)], 1)
            assert not mx.any()
            assert torch.equal(arg, first_out[:, :, None].expand_as(arg).int())
        if what == "zeros" or (what == "minus_inf" and not grouped):  # channel 0 everywhere
            assert not arg.any()
        if what in ("zeros", "minus_inf"):  # pixel 0 everywhere
            assert not run_triton(k, "pool_pixels", inp, device, with_max=True)[0][2].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["planar", "cl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("grouped", [False, True], ids=["nogroup", "group"])
def test_nan_counts_as_largest(k, device, channels_last, dtype, grouped):
    shape = (2, 9, 6, 7)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[0, 1, 2, 3] = x[0, 1, 4, 0] = float("nan")    # two NaNs in one plane: the first wins
    x[0, 4, 0, 0] = float("nan")                      # at pixel 0
    x[1, 3, 5, 6] = float("nan")                      # at the last pixel
    x[1, 0, 1, 1] = x[1, 7, 1, 1] = float("nan")      # two channels of one pixel
    x[1, 8, 2, :] = float("inf")
    inp = make_inputs(shape, dtype, channels_last, k1=4 if grouped else None, x=x)
    for name, opts in CALLS[:3]:
        got = check_pass(k, name, inp, device, dtype, **opts)
        assert got[0].isnan().any()
        if opts.get("with_max", True):
            assert got[1].isnan().any()


def _force_splits(k, monkeypatch, split):
    if split:
        monkeypatch.setattr(k, "MIN_SPLIT", 1)
        monkeypatch.setattr(k, "TARGET_PROGRAMS", 10**9)
    else:
        monkeypatch.setattr(k, "TARGET_PROGRAMS", 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", [False, True], ids=["one-range", "split"])
def test_loops_and_splits(k, device, split, monkeypatch):
    """Reduced axes of many tiles in one program (no split) or in many ranges merged by the
    combine kernel (split forced): same numbers, argmax across range boundaries included."""
    _force_splits(k, monkeypatch, split)
    # several tiles along C (planar tiles are few channels high, channels-last ones 64 wide)
    # and along P (planar tiles 64 wide, channels-last ones a few pixels high); k1 = C: group 0
    # empty, zeros from the combine too
    for shape, cl, dtype, k1 in (((1, 40, 3, 5), False, torch.float64, 15),
                                 ((1, 40, 3, 5), False, torch.float16, None),
                                 ((2, 150, 2, 3), True, torch.float16, None),
                                 ((1, 150, 2, 2), True, torch.float64, 150),
                                 ((1, 5, 19, 21), False, torch.float16, 2),
                                 ((1, 5, 19, 21), False, torch.float64, None),
                                 ((2, 5, 9, 11), True, torch.float64, 2),
                                 ((1, 5, 9, 11), True, torch.float32, None)):
        x = _tie_data(shape, torch.float64)
        x[0, 1, 1, 0] = x[0, 1, -1, -1] = float("nan")     # two NaNs, in different pixel tiles
        x[0, shape[1] - 3, 0, 1] = float("nan")            # in a late channel tile
        inp = make_inputs(shape, dtype, cl, k1=k1, x=x)
        check_all(k, inp, device, dtype)
    # the split really happened (or not)
    S, _ = k.splits(1, 10_000, 64)
    assert (S > 1) == split


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 0, 3, 3), (2, 4, 0, 5)], ids=str)
@pytest.mark.parametrize("grouped", [False, True], ids=["nogroup", "group"])
def test_empty(k, device, shape, grouped):
    inp = make_inputs(shape, torch.float32, k1=shape[1] // 2 if grouped else None)
    for name, opts in CALLS:
        got, _ = run_triton(k, name, inp, device, **opts)
        ref = run_ref(name, inp, **opts)
        assert_same_meta(got, ref, f"{name}{opts}")
        if name not in ("gate", "grad_x"):  # small outputs are zero-filled
            for g in got:
                assert not g.any()


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_output_strides(k, device):
    """Channels-last shapes where contiguity is ambiguous or strides are easy to get wrong:
    N = 1, W = 1, H = W = 1 (both layouts at once); y and dx keep exactly x's strides."""
    for shape in ((1, 8, 3, 3), (2, 8, 4, 1), (2, 5, 1, 1), (3, 4, 1, 6)):
        for cl in (False, True):
            for k1 in (None, 2):
                inp = make_inputs(shape, torch.float64, cl, k1=k1)
                for name, opts in CALLS:
                    if name not in ("gate", "grad_x"):
                        continue
                    (y,) = check_pass(k, name, inp, device, torch.float64, **opts)
                    src = inp["x"] if name == "gate" else inp["dy"]
                    assert y.stride() == src.stride(), (name, shape, cl, y.stride(), src.stride())


def test_bad_input(k):
    x = torch.randn(2, 4, 3, 3)
    a = torch.rand(2, 4)
    g = torch.zeros(2, 4, dtype=torch.bool)
    m1, m2 = torch.rand(2, 1, 9), torch.rand(2, 2, 9)
    am1 = torch.zeros(2, 1, 9, dtype=torch.int32)
    dmc = torch.rand(2, 4)
    amc = torch.zeros(2, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="contiguous or dense channels_last"):
        k.pool_pixels(x.transpose(2, 3), True)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        k.pool_pixels(x[0], False)
    with pytest.raises(TypeError, match="fp16, bf16, fp32 or fp64"):
        k.pool_pixels(x.int(), True)
    with pytest.raises(ValueError, match="pool_channels: a"):
        k.pool_channels(x, a.double(), g, 2, 2)
    with pytest.raises(ValueError, match="pool_channels: group"):
        k.pool_channels(x, a, g[:, :3], 2, 2)
    with pytest.raises(ValueError, match="without group, expected size0 = C = 4"):
        k.pool_channels(x, a, None, 2, 2)
    with pytest.raises(ValueError, match="size0 \\+ size1 = C = 4"):
        k.pool_channels(x, a, g, 3, 2)
    with pytest.raises(ValueError, match="dy must have x's"):
        k.gate_grad_s(x.contiguous(memory_format=torch.channels_last), x, a, g)
    with pytest.raises(ValueError, match=r"gate: s: .*shape \(2, 1, 9\)"):
        k.gate(x, a, m2, None)                          # G = 1 needs (N, 1, P) maps
    with pytest.raises(ValueError, match=r"gate: s: .*shape \(2, 2, 9\)"):
        k.gate(x, a, m1, g)                             # G = 2 needs (N, 2, P) maps
    with pytest.raises(ValueError, match="given together or not at all"):
        k.grad_a(x, x, m1, None, m1, None, am1, 4, 0)   # maps: all or none
    with pytest.raises(ValueError, match="grad_a: argmax"):
        k.grad_a(x, x, m1, None, m1, m1, am1.float(), 4, 0)
    with pytest.raises(ValueError, match="without group"):
        k.grad_a(x, x, None, None, None, None, None, 4, 1)
    with pytest.raises(ValueError, match="given together or not at all"):
        k.grad_x(x, a, None, None, None, None, None, 4, 0, dmc, dmc, None)
    with pytest.raises(ValueError, match="grad_x: argmax_c"):
        k.grad_x(x, a, None, None, None, None, None, 4, 0, dmc, dmc, amc.long())
    with pytest.raises(ValueError, match="grad_x: d_mean_c"):
        k.grad_x(x, a, None, None, None, None, None, 4, 0, dmc[:1], None, None)


def test_configs_and_aot_variants(k):
    """Every specialisation's tile is whole warps of per_thread() elements with power-of-2 sides;
    the AOT list names each compiled form once, after its pass and flavour, "_aligned" for
    16-byte-aligned rows: every flavour x layout x dtype x alignment, and the combines."""
    specs = k.specializations()
    for name, flags, cl, eb, aligned, cfg in specs:
        tile = cfg.block_c * cfg.block_p
        assert tile == cfg.num_warps * 32 * k.per_thread(name, flags, eb, aligned)
        assert cfg.block_c & (cfg.block_c - 1) == 0 and cfg.block_p & (cfg.block_p - 1) == 0
        assert (cfg.block_c if cl else cfg.block_p) == k.CONTIG_BLOCK
    flavours = sum(len(k.FLAVOURS[p]) for p in PASSES)
    assert flavours == 2 + 2 + 3 + 2 + 3 + 6
    assert len(specs) == flavours * 2 * 3 * 2
    variants = list(k.aot_variants())
    names = [v[0] for v in variants]
    assert len(names) == len(set(names))
    assert len(names) == flavours * 2 * 4 * 2 + 2 * len(k.COMBINES)
    for n in names:
        assert n.startswith(PASSES) or n.startswith("combine_"), n
        assert n.startswith("combine_") or n.endswith(("_aligned", "_any")), n
    assert sum(n.endswith("_aligned") for n in names) == flavours * 2 * 4
    for n in ("pool_pixels_max_fp16_planar", "pool_pixels_mean_fp32_cl", "pool_channels_g1_bf16",
              "pool_channels_g2_fp64", "gate_g1_", "gate_g2_", "gate_nomaps_", "gate_grad_s_g1_",
              "grad_a_nomaps_", "grad_x_g2_pmax_", "grad_x_nomaps_nopmax_", "combine_mean_fp32",
              "combine_channels_g1_fp64"):
        assert any(v.startswith(n) for v in names), n


class _Recorder:
    """Stands in for a kernel: records each launch's signature as the JIT would key it (pointer
    dtypes, None and constexprs; integers must be unspecialised) instead of running it."""

    _TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
              torch.float64: "*fp64", torch.int32: "*i32", torch.uint8: "*u8"}

    def __init__(self, kernel, log, ints):
        self.kernel, self.log = kernel, log
        self.params = list(inspect.signature(kernel.fn).parameters)
        # the JIT's do_not_specialize (the interpreter keeps none: the module's list then)
        self.unspecialised = getattr(kernel, "do_not_specialize", None) or ints

    def __getitem__(self, grid):
        def launch(*args, num_warps, **consts):
            sig, cons = {}, dict(consts)
            for name, v in zip(self.params, args):
                if v is None:
                    sig[name], cons[name] = "constexpr", None
                elif isinstance(v, torch.Tensor):
                    assert v.data_ptr() % 16 == 0, (name, "pointers are 16-byte aligned")
                    sig[name] = self._TYPES[v.dtype]
                else:
                    assert isinstance(v, int) and not isinstance(v, bool), (name, v)
                    assert name in self.unspecialised, f"{name} would be specialised"
                    sig[name] = "i32"
            for name in consts:
                sig[name] = "constexpr"
            assert set(sig) == set(self.params), (self.params, sig)
            self.log.append((self.kernel, sig, cons, num_warps))
        return launch


def test_launches_are_aot_variants(k, monkeypatch):
    """Every kernel form the launchers launch (every pass and option, G = 1 and 2, every dtype,
    layout and alignment, split or not) is one that aot_variants() lists, with its warps: the
    AOT check (python -m fusedattn.aot) compiles all that can run. Launches are recorded, not
    run."""
    aot = {}
    for name, fn, sig, consts, attrs, warps in k.aot_variants():
        key = (fn, tuple(sorted(sig.items())), tuple(sorted(consts.items(), key=lambda kv: kv[0])))
        assert key not in aot, name
        aot[key] = (name, warps)
    log = []
    for attr in ("_pool_pixels_kernel", "_pool_channels_kernel", "_gate_kernel",
                 "_gate_grad_s_kernel", "_grad_a_kernel", "_grad_x_kernel", "_combine_kernel"):
        monkeypatch.setattr(k, attr, _Recorder(getattr(k, attr), log, k._INTS))
    seen = set()
    for split in (False, True):
        _force_splits(k, monkeypatch, split)
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            # 16-byte-aligned rows in both layouts; none; several tiles along both axes (splits)
            for shape in ((2, 8, 4, 4), (2, 3, 3, 5), (1, 72, 9, 9)):
                for cl in (False, True):
                    for k1 in (None, 1):
                        inp = make_inputs(shape, dtype, cl, k1=k1)
                        for name, opts in CALLS:
                            getattr(k, name)(*_args(name, inp, **opts))
                            for fn, sig, cons, warps in log:
                                key = (fn, tuple(sorted(sig.items())),
                                       tuple(sorted(cons.items(), key=lambda kv: kv[0])))
                                assert key in aot, f"{name}{opts}: launch not in aot_variants: {sig} {cons}"
                                assert aot[key][1] == warps, aot[key]
                                seen.add(aot[key][0])
                            log.clear()
    # and every listed variant is reachable
    missing = {v for v, _ in aot.values()} - seen
    assert not missing, sorted(missing)[:10]


def test_splits_rule(k):
    assert k.splits(10**6, 10**6, 64) == (1, triton_cdiv(10**6, 64) * 64)  # enough programs
    assert k.splits(4, 100, 64)[0] == 1                                      # short axis
    S, split = k.splits(4, 100_000, 64)
    assert S > 1 and split % 64 == 0 and (S - 1) * split < 100_000 <= S * split
    assert split >= k.MIN_SPLIT
    # a function of the shape alone (no device, no SM count): every GPU splits, and adds, alike
    assert list(inspect.signature(k.splits).parameters) == ["programs", "extent", "block"]
    assert k.TARGET_PROGRAMS == 1024 and (S, split) == (224, 448)


def triton_cdiv(a, b):
    return -(-a // b)
