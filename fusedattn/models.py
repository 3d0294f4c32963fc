"""The real models of the model-level benchmark and tests, each with its attention modules in their
eager form (as users hold them), so that ``fusedattn.convert`` has something to swap.

- timm: ``resnet50`` (plain), ``seresnet50`` (SEModule), ``resnet50_cbam`` (``resnet50`` with
  ``block_args={"attn_layer": "cbam"}``: CbamModule), ``resnet50d`` (plain), ``ecaresnet50d``
  (EcaModule).
- torchvision: ``tv_resnet50`` (plain), ``tv_resnet50_simam`` (the authors' SimAM after each
  ``conv2``), ``tv_resnet50_ham`` (HAM before each residual add), ``tv_resnet50_simam_ham`` (both),
  and the ``tv_resnet18*`` counterparts with basic blocks.

``build(name)`` needs timm or torchvision (test dependencies, not runtime ones).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from . import reference

__all__ = ["AuthorsSimAM", "AttnBottleneck", "AttnBasicBlock", "tv_resnet", "build", "NAMES",
           "PLAIN"]


class AuthorsSimAM(nn.Module):
    """SimAM as its authors wrote it (``simam_module`` in their repository): what users paste
    into their code, under whatever name. ``fusedattn.convert`` recognises it by behaviour."""

    def __init__(self, channels=None, e_lambda=1e-4):
        super().__init__()
        self.activaton = nn.Sigmoid()
        self.e_lambda = e_lambda

    def forward(self, x):
        b, c, h, w = x.size()
        n = w * h - 1
        x_minus_mu_square = (x - x.mean(dim=[2, 3], keepdim=True)).pow(2)
        y = x_minus_mu_square / (4 * (x_minus_mu_square.sum(dim=[2, 3], keepdim=True) / n
                                      + self.e_lambda)) + 0.5
        return x * self.activaton(y)


@functools.cache
def _blocks():
    from torchvision.models.resnet import BasicBlock, Bottleneck

    class AttnBottleneck(Bottleneck):
        """torchvision's Bottleneck with SimAM after conv2 and HAM before the residual add (either
        may be None)."""

        def __init__(self, *args, simam: bool = False, ham: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            width = self.conv2.out_channels
            self.simam = AuthorsSimAM(width) if simam else None
            self.ham = reference.HAM(self.conv3.out_channels) if ham else None

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.conv2(out)
            if self.simam is not None:
                out = self.simam(out)
            out = self.relu(self.bn2(out))
            out = self.bn3(self.conv3(out))
            if self.ham is not None:
                out = self.ham(out)
            return self.relu(out + identity)

    class AttnBasicBlock(BasicBlock):
        """torchvision's BasicBlock with SimAM after conv2 and HAM before the residual add."""

        def __init__(self, *args, simam: bool = False, ham: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            planes = self.conv2.out_channels
            self.simam = AuthorsSimAM(planes) if simam else None
            self.ham = reference.HAM(planes) if ham else None

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.conv2(out)
            if self.simam is not None:
                out = self.simam(out)
            out = self.bn2(out)
            if self.ham is not None:
                out = self.ham(out)
            return self.relu(out + identity)

    return AttnBottleneck, AttnBasicBlock


def __getattr__(name):
    if name in ("AttnBottleneck", "AttnBasicBlock"):
        return dict(zip(("AttnBottleneck", "AttnBasicBlock"), _blocks()))[name]
    raise AttributeError(name)


def tv_resnet(depth: int = 50, simam: bool = False, ham: bool = False, num_classes: int = 1000):
    """A torchvision ResNet (18, 34, 50, 101, 152) whose blocks carry the authors' SimAM after
    ``conv2`` and/or ``fusedattn.reference.HAM`` before the residual add."""
    from torchvision.models.resnet import ResNet
    bottleneck, basic = _blocks()
    layers = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3],
              152: [3, 8, 36, 3]}[depth]
    block = basic if depth < 50 else bottleneck
    # ResNet reads block.expansion and calls block(inplanes, planes, stride, downsample, ...)
    make = functools.partial(block, simam=simam, ham=ham)
    make.expansion = block.expansion
    return ResNet(make, layers, num_classes=num_classes)


def _timm(name: str, **kwargs):
    import timm
    return timm.create_model(name, pretrained=False, **kwargs)


_BUILDERS = {
    "resnet50": lambda: _timm("resnet50"),
    "seresnet50": lambda: _timm("seresnet50"),
    "resnet50_cbam": lambda: _timm("resnet50", block_args={"attn_layer": "cbam"}),
    "resnet50d": lambda: _timm("resnet50d"),
    "ecaresnet50d": lambda: _timm("ecaresnet50d"),
    "tv_resnet50": lambda: tv_resnet(50),
    "tv_resnet50_simam": lambda: tv_resnet(50, simam=True),
    "tv_resnet50_ham": lambda: tv_resnet(50, ham=True),
    "tv_resnet50_simam_ham": lambda: tv_resnet(50, simam=True, ham=True),
    "tv_resnet18": lambda: tv_resnet(18),
    "tv_resnet18_simam_ham": lambda: tv_resnet(18, simam=True, ham=True),
}
NAMES = tuple(_BUILDERS)

# Each model with attention and the plain model it is built on (its attention share of a step is
# the difference).
PLAIN = {"seresnet50": "resnet50", "resnet50_cbam": "resnet50", "ecaresnet50d": "resnet50d",
         "tv_resnet50_simam": "tv_resnet50", "tv_resnet50_ham": "tv_resnet50",
         "tv_resnet50_simam_ham": "tv_resnet50", "tv_resnet18_simam_ham": "tv_resnet18"}


def build(name: str) -> nn.Module:
    """Model ``name`` (one of ``NAMES``) with random weights and eager attention modules."""
    try:
        make = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"fusedattn.models: unknown model {name!r}; expected one of {NAMES}") from None
    torch.manual_seed(0)
    return make()
