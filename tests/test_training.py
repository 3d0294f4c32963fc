"""The fused modules in real training: autocast, double backward, frozen inputs and parameters,
state changes between forward and backward, SyncBatchNorm."""
import copy
import warnings

import pytest
import torch
from torch import nn

import fusedattn
from fusedattn import reference
from helpers import ATOL, Block, max_err

FUSED = {
    "simam": (fusedattn.SimAM, reference.SimAM),
    "ham": (fusedattn.HAM, reference.HAM),
    "se": (lambda c: fusedattn.SE(c, rd_ratio=0.25, norm_layer=nn.BatchNorm2d),
           lambda c: reference.SE(c, rd_ratio=0.25, norm_layer=nn.BatchNorm2d)),
    "eca": (fusedattn.ECA, reference.ECA),
    "cbam": (lambda c: fusedattn.CBAM(c, rd_ratio=0.25), lambda c: reference.CBAM(c, rd_ratio=0.25)),
}


def _nets(name):
    """(fused, eager) conv nets with the same weights: a stem conv in front, so that under
    autocast the module sees the conv's low-precision output, as in a real network."""
    fused_cls, ref_cls = FUSED[name]
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), Block(ref_cls))
    fused = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), Block(fused_cls))
    fused.load_state_dict(eager.state_dict())
    for m in eager.modules():  # BatchNorm statistics that are not trivial
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    fused.load_state_dict(eager.state_dict())
    return fused, eager


def _run(net, x, dtype=None):
    """Output and parameter gradients of a training step, under autocast to dtype if given."""
    net.zero_grad()
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        y = net(x)
    (y.float().square().mean()).backward()
    return y, [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", FUSED)
def test_autocast(name, train, dtype, device):
    """Under autocast: the eager module's output dtype, and outputs and every parameter gradient
    within the tolerance rule (against fp64, at most twice the eager module's error under the
    same autocast, plus a small slack)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (none visible to torch here)")
    fused, eager = _nets(name)
    fused, eager = fused.to(device), eager.to(device)
    exact = copy.deepcopy(eager).double()
    for n in (fused, eager, exact):
        n.train(train)
    x = torch.randn(2, 3, 12, 10, device=device)
    y_f, g_f = _run(fused, x, dtype)
    y_e, g_e = _run(eager, x, dtype)
    y_x, g_x = _run(exact, x.double())
    assert y_f.dtype == y_e.dtype
    assert fusedattn.last_backend(name) != "eager"
    slack = ATOL[dtype]
    assert max_err(y_f, y_x) <= 2 * max_err(y_e, y_x) + slack
    # Gradients: the rule over the whole net, on errors relative to each tensor's size. Per
    # tensor it would be noise: both nets run the convs in low precision, and a sum with
    # cancellation (a BatchNorm weight's gradient) can come out nearly exact in either by chance.
    # (A bias right before a BatchNorm has an exact gradient of 0: sizes are floored at 1e-3 of
    # the largest gradient of the net.)
    floor = 1e-3 * max(c.abs().max().item() for c in g_x)

    def rel(a, c):
        return max_err(a, c) / max(c.abs().max().item(), floor)

    worst_f = max(rel(a, c) for a, c in zip(g_f, g_x))
    worst_e = max(rel(b, c) for b, c in zip(g_e, g_x))
    assert worst_f <= 2 * worst_e + slack, (worst_f, worst_e)


@pytest.mark.parametrize("name", FUSED)
def test_double_backward_refused(name):
    fused, _ = _nets(name)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    (g,) = torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)
    (g_plain,) = torch.autograd.grad(fused(x).square().sum(), x)
    torch.testing.assert_close(g, g_plain)  # create_graph alone changes nothing
    with pytest.raises(RuntimeError, match=rf"double backward through {type(fused[1].attn).__name__}"):
        g.square().sum().backward()


def _count_grad_x(monkeypatch):
    """Counts the launches of the grad_x pass (the dx pass of HAM, SE, ECA, CBAM)."""
    import fusedattn.ops.ham as ham_ops
    import fusedattn.ops.zoo as zoo_ops
    calls = []
    real = ham_ops.passes

    def passes(backend):
        ops = dict(real(backend))
        inner = ops["grad_x"]
        ops["grad_x"] = lambda *a: calls.append(1) or inner(*a)
        return ops

    monkeypatch.setattr(ham_ops, "passes", passes)
    monkeypatch.setattr(zoo_ops, "passes", passes)
    return calls


@pytest.mark.parametrize("name", ["ham", "se", "eca", "cbam"])
def test_frozen_input_and_parameters(name, monkeypatch):
    """A frozen input skips the dx pass; frozen parameters get no gradient and the others the
    same as with nothing frozen."""
    calls = _count_grad_x(monkeypatch)
    m = FUSED[name][0](16).double()
    x = torch.randn(2, 16, 6, 5, dtype=torch.float64)
    params = list(m.parameters())
    m(x).square().sum().backward()
    assert calls == []
    full = [p.grad.clone() for p in params]
    m.zero_grad(set_to_none=True)
    params[0].requires_grad_(False)
    xg = x.clone().requires_grad_()
    m(xg).square().sum().backward()
    assert calls == [1] and params[0].grad is None and xg.grad is not None
    for p, g in zip(params[1:], full[1:]):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["ham", "se", "cbam"])
def test_backward_reads_what_forward_saved(name):
    """Switching the module to eval between forward and backward does not change the gradient
    (the backward uses the forward's BatchNorm mode); an in-place change of a parameter, or of
    a running statistic the backward needs, raises autograd's version error."""
    m = FUSED[name][0](16).double().train()
    x = torch.randn(2, 16, 6, 5, dtype=torch.float64, requires_grad=True)
    (want,) = torch.autograd.grad(m(x).square().sum(), x)
    y = m(x)
    m.eval()
    (got,) = torch.autograd.grad(y.square().sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)

    y = m(x)  # eval: the running statistics are read, and saved
    bn = next(b for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    with torch.no_grad():
        bn.running_mean.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()

    m.train()
    y = m(x)
    with torch.no_grad():
        next(m.parameters()).mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("name", ["ham", "se", "cbam"])
def test_sync_batchnorm_without_process_group_runs_fused(name):
    """After convert_sync_batchnorm, outside distributed training SyncBatchNorm is a BatchNorm:
    the fused path runs and matches the eager module."""
    fused, eager = _nets(name)
    fused = nn.SyncBatchNorm.convert_sync_batchnorm(fused).double()
    eager = eager.double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y_f, g_f = _run(fused, x)
    assert fusedattn.last_backend(name) == "cpu"
    y_e, g_e = _run(eager, x)
    torch.testing.assert_close(y_f, y_e, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_f, g_e):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_non_batchnorm_norm_runs_eager_with_warning():
    ham = fusedattn.HAM(16)
    ham.bn = nn.GroupNorm(1, 1)
    x = torch.randn(2, 16, 5, 5)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y = ham(x)
    assert fusedattn.last_backend("ham") == "eager"
    assert any("not an affine BatchNorm" in str(i.message) for i in w)
    torch.testing.assert_close(y, reference.HAM.forward(ham, x))
