"""Bitwise reproducibility of the C++ CPU kernels across thread counts (issue 10): every output
of every CPU op -- SimAM forward and backward, the six passes in every option combination the
modules use, same_conv2d and its weight gradient -- and the forward and backward of the modules
SimAM, HAM, SE, ECA and CBAM (output, input gradient, every parameter gradient, BatchNorm running
statistics; train and eval) must be the same bits under torch.set_num_threads(1), (2) and (3).
Shapes split unevenly over threads (odd plane and channel counts, planes shorter and longer than
one vector), both layouts.

The modules' small parts run in torch (F.linear, the channel conv's shifted multiply-adds,
batch_norm on (N, C) and (N, 1, H, W) tensors, kthvalue, sums): this test holds them to the same
rule, so that a torch op that is not reproducible across thread counts shows up here by name."""
import copy
import itertools

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import fusedattn
from fusedattn import dispatch
from fusedattn.ops.passes import passes
from test_passes import calls

THREADS = (1, 2, 3)
# Uneven splits: 600 planes of 221 pixels; 37 channels (a partial vector, narrowed channels-last
# blocks) of 655 pixels; 9-pixel rows (short rows in groups of 16) over 1000 channels; one pixel;
# planes larger than one statistics chunk.
SHAPES = [(2, 300, 17, 13), (3, 37, 5, 131), (5, 1000, 3, 3), (1, 7, 1, 1), (2, 64, 56, 56)]
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _id(shape):
    return "x".join(map(str, shape))


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns as integers (NaNs compare by payload, -0 differs from +0)."""
    if not t.is_floating_point():
        return t
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if t is not None]


def assert_thread_invariant(fn, what: str):
    """fn() (a tensor or a sequence of tensors) gives the same bits for every count in THREADS."""
    runs = []
    for nt in THREADS:
        torch.set_num_threads(nt)
        runs.append([t.detach().clone() for t in _tensors(fn())])
    base = runs[0]
    for nt, run in zip(THREADS[1:], runs[1:]):
        assert len(run) == len(base), what
        for i, (a, b) in enumerate(zip(base, run)):
            assert (a.dtype, a.shape, a.stride()) == (b.dtype, b.shape, b.stride()), (what, i)
            if not torch.equal(_bits(a), _bits(b)):
                bad = (_bits(a) != _bits(b)).sum().item()
                diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else 0
                raise AssertionError(
                    f"{what}: output {i} {tuple(a.shape)} differs between {THREADS[0]} and {nt} "
                    f"threads in {bad} of {a.numel()} elements (max |diff| {diff:.3g})")


def _randn(shape, gen, dtype, fmt=torch.contiguous_format):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).contiguous(
        memory_format=fmt)


# ----------------------------------------------------------------------------------- the ops

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_simam_ops(shape, layout):
    gen = torch.Generator().manual_seed(1)
    ops = torch.ops.fusedattn
    dtypes = [torch.float32] + ([torch.float64, torch.bfloat16] if shape[1] == 300 else [])
    for dtype in dtypes:
        x = _randn(shape, gen, dtype, LAYOUTS[layout])
        g = _randn(shape, gen, dtype, LAYOUTS[layout])
        assert_thread_invariant(lambda: ops.simam_forward(x, 1e-4), f"simam_forward {dtype}")
        _, mu, inv = ops.simam_forward(x, 1e-4)
        assert_thread_invariant(lambda: ops.simam_backward(g, x, mu, inv),
                                f"simam_backward {dtype}")


def pass_args(shape, dtype, layout, G, seed=2):
    """The arguments of tests/test_passes.py's ``calls`` with inexact values everywhere (that
    file's x is quarter-integers, whose sums are exact in any order)."""
    gen = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    P = H * W
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x, dy = _randn(shape, gen, dtype, LAYOUTS[layout]), _randn(shape, gen, dtype, LAYOUTS[layout])
    if G == 2:
        k1 = C // 2
        group = torch.stack([torch.randperm(C, generator=gen) < k1 for _ in range(N)])
        sizes = (C - k1, k1)
    else:
        group, sizes = None, (C, 0)
    return dict(
        x=x, dy=dy, a=torch.rand(N, C, generator=gen, dtype=acc) + 0.1, group=group, sizes=sizes,
        s=torch.rand(N, G, P, generator=gen, dtype=acc),
        d_avg=torch.randn(N, G, P, generator=gen, dtype=acc),
        d_max=torch.randn(N, G, P, generator=gen, dtype=acc),
        argmax=torch.randint(0, C, (N, G, P), generator=gen, dtype=torch.int32),
        d_mean_c=torch.randn(N, C, generator=gen, dtype=acc),
        d_max_c=torch.randn(N, C, generator=gen, dtype=acc),
        argmax_c=torch.randint(0, P, (N, C), generator=gen, dtype=torch.int32))


@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_passes(shape, layout, G):
    op = passes("cpu")
    dtypes = [torch.float32] + ([torch.float64, torch.bfloat16] if shape[1] == 300 else [])
    for dtype in dtypes:
        for name, args in calls(pass_args(shape, dtype, layout, G), G):
            opts = [i for i, a in enumerate(args) if a is None or isinstance(a, bool) and not a]
            assert_thread_invariant(lambda: op[name](*args),
                                    f"{name} G={G} {dtype} (arguments None/False: {opts})")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_same_conv(shape, layout):
    """HAM's and CBAM's 7x7 conv (2 -> 1), its input gradient's conv (1 -> 2), the weight
    gradient; also a 3x3 kernel. Maps of the shapes' samples and pixels."""
    gen = torch.Generator().manual_seed(3)
    ops = torch.ops.fusedattn
    N, _, H, W = shape
    fmt = LAYOUTS[layout]
    for dtype, (i, o, k) in itertools.product((torch.float32, torch.float64),
                                              ((2, 1, 7), (1, 2, 7), (2, 1, 3))):
        x = _randn((N, i, H, W), gen, dtype, fmt)
        w = _randn((o, i, k, k), gen, dtype)
        dy = _randn((N, o, H, W), gen, dtype, fmt)
        assert_thread_invariant(lambda: ops.same_conv2d(x, w), f"same_conv2d {dtype} {i}->{o} k={k}")
        assert_thread_invariant(lambda: ops.same_conv2d_weight_grad(dy, x, k),
                                f"same_conv2d_weight_grad {dtype} {i}->{o} k={k}")


# ------------------------------------------------------------------------------- the modules

def _modules(C):
    return {
        "simam": lambda: fusedattn.SimAM(),
        "ham": lambda: fusedattn.HAM(C),
        "se": lambda: fusedattn.SE(C),
        "se_max": lambda: fusedattn.SE(C, add_maxpool=True),
        "se_bn": lambda: fusedattn.SE(C, norm_layer=nn.BatchNorm2d),
        "eca": lambda: fusedattn.ECA(C),
        "cbam": lambda: fusedattn.CBAM(C),
    }


OP_OF = {"simam": "simam", "ham": "ham", "se": "se", "se_max": "se", "se_bn": "se", "eca": "eca",
         "cbam": "cbam"}


def _perturbed(module: nn.Module, seed=4) -> nn.Module:
    """Non-trivial weights and BatchNorm statistics (the init's zeros and ones make sums exact)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.rand(p.shape, generator=gen, dtype=p.dtype).sub_(0.5).mul_(0.5))
        for name, b in module.named_buffers():
            if "running_mean" in name:
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype) * 0.1)
            elif "running_var" in name:
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)
    return module


def _replica(t: torch.Tensor) -> torch.Tensor:
    """A copy of t's whole storage viewed with t's sizes, strides and offset (views, expanded and
    channels-last tensors keep their exact layout)."""
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage().clone(), t.storage_offset(), t.shape, t.stride())


# Not replayed: factory ops whose outputs hold uninitialised memory, and storage swaps (copies
# of modules and tensors) that compute nothing.
_NOT_REPLAYED = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "set_"}


class _Recorder(TorchDispatchMode):
    """Every op below autograd (aten and fusedattn alike) with replicas of its inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        keep = lambda v: _replica(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
        before = tree_map(keep, (args, kwargs))
        out = func(*args, **kwargs)
        self.calls.append((func, before, tree_map(keep, out)))
        return out


def _describe(func, inputs) -> str:
    args, kwargs = inputs
    shapes = [f"{tuple(v.shape)}{'' if v.is_contiguous() else ' strides ' + str(v.stride())}"
              f" {str(v.dtype).replace('torch.', '')}"
              for v in tree_flatten((args, kwargs))[0] if isinstance(v, torch.Tensor)]
    return f"{func} on [{', '.join(shapes)}]"


def ops_not_thread_invariant(step) -> list:
    """The ops (with their input shapes) that step() runs and that, replayed alone on the same
    inputs, give other bits under 2 or 3 threads than under 1."""
    torch.set_num_threads(THREADS[0])
    rec = _Recorder()
    with rec:
        step()
    found = []
    for func, inputs, want in rec.calls:
        if func.__name__.split(".")[0] in _NOT_REPLAYED:
            continue
        for nt in THREADS[1:]:
            torch.set_num_threads(nt)
            args, kwargs = tree_map(lambda v: _replica(v) if isinstance(v, torch.Tensor) else v,
                                    inputs)
            got = func(*args, **kwargs)
            pairs = zip(tree_flatten(want)[0], tree_flatten(got)[0])
            if any(isinstance(w, torch.Tensor) and not torch.equal(_bits(w), _bits(g))
                   for w, g in pairs):
                found.append(f"{_describe(func, inputs)} ({nt} threads)")
                break
    torch.set_num_threads(THREADS[0])
    return list(dict.fromkeys(found))


# torch's own ops that the modules' small parts run and that are not bitwise reproducible across
# thread counts for some shapes (the eager modules run the same ones): the MLP's matrix products
# (SE, CBAM) and batch_norm on the (N, C) pooled vectors (SE with a BatchNorm).
TORCH_OPS_THAT_VARY = ("aten.mm.", "aten.addmm.", "aten.native_batch_norm.",
                       "aten.native_batch_norm_backward.")
# Modules whose every op is reproducible: fusedattn's kernels plus torch ops that are.
STRICT = ("simam", "ham", "eca")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("name", list(OP_OF))
def test_modules(name, shape, layout, train):
    """Forward and backward of a fused module, bitwise the same for 1, 2 and 3 threads. SimAM,
    HAM and ECA always. SE and CBAM may differ only through the torch ops above: every op the
    module ran is then replayed alone across thread counts, and any fusedattn op among those
    that differ -- or any torch op outside that list, or none found -- fails the test."""
    N, C, H, W = shape
    template = _perturbed(_modules(C)[name]()).train(train)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in template.modules())
    if train and has_bn and N * H * W == 1:
        pytest.skip("BatchNorm in training needs more than one value per channel")
    gen = torch.Generator().manual_seed(5)
    x0 = _randn(shape, gen, torch.float32, LAYOUTS[layout])
    g = _randn(shape, gen, torch.float32, LAYOUTS[layout])

    def step():
        m = copy.deepcopy(template)  # the same parameters and running statistics every time
        x = x0.detach().clone().requires_grad_()
        with fusedattn.use_backend("cpu"):
            y = m(x)
        assert dispatch.last_backend(OP_OF[name]) == "cpu"
        y.backward(g)
        return [y, x.grad, *(p.grad for p in m.parameters()), *m.buffers()]

    try:
        assert_thread_invariant(step, f"{name} {'train' if train else 'eval'}")
    except AssertionError as exc:
        if name in STRICT:
            raise
        culprits = ops_not_thread_invariant(step)
        unexpected = [c for c in culprits if not c.startswith(TORCH_OPS_THAT_VARY)]
        if unexpected or not culprits:
            raise AssertionError(f"{exc}; ops that differ alone: {culprits or 'none'}") from None
