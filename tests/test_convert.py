"""fusedattn.convert on the real models users hold (timm's SE/ECA/CBAM ResNets, a torchvision
ResNet with the authors' SimAM and HAM) and on single modules: what is swapped and what is left,
that outputs, gradients, BatchNorm statistics and training steps are unchanged, and that
parameters, optimizers, hooks and state survive."""
import copy
import logging

import pytest
import torch
from torch import nn

import fusedattn
from fusedattn import models, reference
from fusedattn.models import AuthorsSimAM
from helpers import assert_close64

timm = pytest.importorskip("timm")
pytest.importorskip("torchvision")

from timm.layers.cbam import CbamModule  # noqa: E402
from timm.layers.eca import EcaModule  # noqa: E402
from timm.layers.squeeze_excite import SEModule  # noqa: E402

# model -> (eager classes that must all be swapped, fused class they become)
REAL = {
    "seresnet50": ((SEModule,), (fusedattn.SE,)),
    "ecaresnet50d": ((EcaModule,), (fusedattn.ECA,)),
    "resnet50_cbam": ((CbamModule,), (fusedattn.CBAM,)),
    "tv_resnet18_simam_ham": ((AuthorsSimAM, reference.HAM), (fusedattn.SimAM, fusedattn.HAM)),
}


def _build(name):
    """The model in fp64 with random BatchNorm affines: timm zero-initialises each block's last
    BN, which would hand every attention module an all-zero input in the first step."""
    model = models.build(name).double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.weight is not None:
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model


def _count(model, classes):
    return sum(type(m) in classes for m in model.modules())


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def _step(model, x, y):
    out = model(x)
    nn.functional.cross_entropy(out, y).backward()
    return out


@pytest.mark.parametrize("name", REAL)
def test_real_model_fp64_train(name):
    """Every attention module swapped; logits, every parameter gradient and every BatchNorm
    statistic equal to the eager model's in fp64, in training mode."""
    eager_cls, fused_cls = REAL[name]
    eager = _build(name).train()
    n = _count(eager, eager_cls)
    assert n >= 8
    fused = copy.deepcopy(eager)
    fused, report = fusedattn.convert(fused, return_report=True)
    assert len(report.swapped) == n and not report.left, str(report)
    assert _count(fused, eager_cls) == 0 and _count(fused, fused_cls) == n
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    y = torch.tensor([3, 7])
    out_e, out_f = _step(eager, x, y), _step(fused, x, y)
    assert_close64(out_f, out_e, f"{name} logits")
    ge, gf = _grads(eager), _grads(fused)
    assert ge.keys() == gf.keys()
    for k in ge:
        assert_close64(gf[k], ge[k], f"{name} grad {k}")
    be, bf = dict(eager.named_buffers()), dict(fused.named_buffers())
    for k in be:
        assert_close64(bf[k].double(), be[k].double(), f"{name} buffer {k}")
    assert any(fusedattn.last_backend(op) == "cpu" for op in ("se", "eca", "cbam", "ham"))


@pytest.mark.parametrize("name", REAL)
def test_real_model_state_dict_and_optimizer(name):
    """state_dict loads both ways (strict); an optimizer built before conversion keeps training
    the converted model: two SGD steps (one before, one after conversion) equal two eager steps."""
    torch.manual_seed(0)
    a = _build(name).train()
    b = copy.deepcopy(a)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.01, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    y = torch.tensor([1, 2])
    for step in range(2):
        if step == 1:
            params = [id(p) for p in b.parameters()]
            fusedattn.convert(b)
            assert [id(p) for p in b.parameters()] == params
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            _step(m, x, y)
            opt.step()
    for (k, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert_close64(pb, pa, f"{name} {k} after two steps")
    sd = b.state_dict()
    assert sd.keys() == a.state_dict().keys()
    fresh = models.build(name).double()
    fresh.load_state_dict(sd, strict=True)
    fusedattn.convert(fresh).load_state_dict(a.state_dict(), strict=True)


def test_real_model_back_to_eager():
    """to='eager' gives back timm's and the user's own classes (objects for probed SimAMs)."""
    m = models.build("tv_resnet18_simam_ham")
    simams = [mod for mod in m.modules() if isinstance(mod, AuthorsSimAM)]
    fusedattn.convert(m)
    m, report = fusedattn.convert(m, to="eager", return_report=True)
    assert len(report.swapped) == 16
    assert [mod for mod in m.modules() if isinstance(mod, AuthorsSimAM)] == simams
    assert _count(m, (reference.HAM,)) == 8 and _count(m, (fusedattn.HAM,)) == 0
    se = models.build("seresnet50")
    fusedattn.convert(fusedattn.convert(se), to="eager")
    assert _count(se, (SEModule,)) == 16
    assert not any(hasattr(mod, "channels") for mod in se.modules() if type(mod) is SEModule)


# ----------------------------------------------------------------------------- single modules

def _wrap(m):
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), m, nn.ReLU())


@pytest.mark.parametrize("make", [
    lambda: reference.SE(8), lambda: reference.ECA(8), lambda: reference.CBAM(8, rd_ratio=0.5),
    lambda: reference.HAM(8), lambda: reference.SimAM(e_lambda=0.01),
    lambda: SEModule(8, add_maxpool=True, norm_layer=nn.BatchNorm2d),
    lambda: EcaModule(8, use_mlp=True), lambda: CbamModule(8, rd_ratio=0.5, spatial_kernel_size=3),
], ids=["ref-se", "ref-eca", "ref-cbam", "ref-ham", "ref-simam", "timm-se-bn-max", "timm-eca-mlp",
        "timm-cbam-k3"])
def test_module_swapped_in_place(make):
    torch.manual_seed(0)
    model = _wrap(make()).train()
    twin = copy.deepcopy(model)
    att = model[1]
    params = {n: p for n, p in att.named_parameters()}
    for p in params.values():
        p.requires_grad_(True)
    handle_calls = []
    att.register_forward_hook(lambda *a: handle_calls.append(1))
    fusedattn.convert(model)
    assert model[1] is att and type(att).__module__ == "fusedattn.modules"
    assert {n: p for n, p in att.named_parameters()} == params  # same objects
    x = torch.randn(2, 8, 6, 5, dtype=torch.float32)
    y, y_ref = model(x), twin(x)
    torch.testing.assert_close(y, y_ref, rtol=2e-5, atol=2e-6)
    assert handle_calls == [1]
    model.eval(), twin.eval()
    torch.testing.assert_close(model(x), twin(x), rtol=2e-5, atol=2e-6)


def test_keeps_device_dtype_mode_and_frozen_parameters():
    m = _wrap(reference.CBAM(8, rd_ratio=0.5)).double().eval()
    m[1].channel.fc1.weight.requires_grad_(False)
    fusedattn.convert(m)
    assert not m[1].training and m[1].channel.fc1.weight.dtype == torch.float64
    assert not m[1].channel.fc1.weight.requires_grad
    assert m[1].spatial.conv.bn.running_mean.device.type == "cpu"


@pytest.mark.parametrize("lam", [0.0, 1e-4, 0.1, 3.0])
def test_simam_found_by_behaviour(lam):
    class Whatever(nn.Module):  # the authors' formula under another name, rank-4 only
        def __init__(self):
            super().__init__()
            self.act = nn.Sigmoid()

        def forward(self, x):
            n = x.shape[2] * x.shape[3] - 1
            d = (x - x.mean(dim=[2, 3], keepdim=True)).pow(2)
            return x * self.act(d / (4 * (d.sum(dim=[2, 3], keepdim=True) / n + lam)) + 0.5)

    model = _wrap(Whatever())
    fusedattn.convert(model)
    assert type(model[1]) is fusedattn.SimAM and model[1].e_lambda == pytest.approx(lam, abs=1e-12)


def test_left_with_reasons(caplog):
    class NotSimAM(nn.Module):  # named like SimAM, forward is not SimAM's
        def forward(self, x):
            return x * torch.sigmoid(x)

    class MySE(reference.SE):  # a subclass: its forward may differ
        pass

    hooked = reference.SE(8)
    hooked.fc1.register_forward_hook(lambda *a: None)
    group_norm = SEModule(8, norm_layer=lambda c, **kw: nn.GroupNorm(1, c))
    model = nn.Sequential(NotSimAM(), MySE(8), group_norm, hooked, nn.ReLU())
    with caplog.at_level(logging.INFO, logger="fusedattn.convert"):
        model, report = fusedattn.convert(model, return_report=True)
    assert not report.swapped
    reasons = {p: why for p, _, why in report.left}
    assert "does not match SimAM" in reasons["0"]
    assert "subclass" in reasons["1"]
    assert "GroupNorm" in reasons["2"] and "hooks" in reasons["3"]
    assert type(model[2]) is SEModule and type(model[3]) is reference.SE
    assert "left 2" in caplog.text
    assert "left" in str(report)


def test_shared_instance_and_root():
    s = AuthorsSimAM()
    model = nn.Sequential(s, nn.ReLU(), s)
    fusedattn.convert(model)
    assert model[0] is model[2] and type(model[0]) is fusedattn.SimAM
    root = fusedattn.convert(AuthorsSimAM())
    assert type(root) is fusedattn.SimAM
    assert fusedattn.convert(root, to="eager").__class__ is AuthorsSimAM


def test_already_fused_and_plain_untouched():
    model = nn.Sequential(fusedattn.SE(8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
    _, report = fusedattn.convert(model, return_report=True)
    assert not report.swapped and not report.left
    m, report = fusedattn.convert(model, to="eager", return_report=True)
    assert type(m[0]) is reference.SE and len(report.swapped) == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="'fused' or 'eager'"):
        fusedattn.convert(nn.ReLU(), to="triton")
    with pytest.raises(TypeError, match="nn.Module"):
        fusedattn.convert(torch.zeros(1))
