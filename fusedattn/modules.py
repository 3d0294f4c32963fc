"""nn.Modules over the fused ops (same constructors and state_dicts as ``fusedattn.reference``)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import dispatch, reference
from .ops import simam
from .ops.aaconv import rel_attention
from .ops import zoo as zoo_ops
from .ops.ham import channel_conv
from .ops.ham import ham as ham_op
from .ops.norm import Norm
from .ops.simam import check_lambda
from .ops.stn import affine_sample
from .ops.zoo import zoo as zoo_op


class SimAM(reference.SimAM):
    """Fused SimAM (fusedattn/spec/simam.md). No parameters; ``channels`` is accepted and ignored
    (YOLO-style parsers pass it), so its state_dict is empty like ``nn.Identity``'s. It
    subclasses ``fusedattn.reference.SimAM`` (``fusedattn.convert`` swaps the two)."""

    def __init__(self, channels: int | None = None, e_lambda: float = 1e-4):
        check_lambda(e_lambda)
        super().__init__(channels, e_lambda)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return simam(x, self.e_lambda)


_warned: set = set()


def _params(*tensors):
    return [t for t in tensors if t is not None]


def _syncs(bn: nn.Module) -> bool:
    """Whether ``bn`` is a SyncBatchNorm that would synchronise statistics across processes now
    (training, with a process group of more than one)."""
    if not isinstance(bn, nn.SyncBatchNorm) or not bn.training:
        return False
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(bn.process_group or dist.group.WORLD) > 1


class _Fused:
    """What the fused modules with parameters share: the fused forward where the module's options
    allow it, else the eager forward (with a one-time warning, and ``last_backend`` saying
    ``eager``)."""

    op_name = ""

    def _acts(self):
        return []

    def _unfusable(self) -> str:
        """Why this instance's options cannot run fused ('' if they can)."""
        for m in self._acts():
            if m is not None and any(True for _ in m.parameters()):
                return f"activation {type(m).__name__} has parameters"
        for m in self.modules():
            if _syncs(m):
                return "a SyncBatchNorm synchronises its statistics across processes"
            # hooks on the module itself run as usual; on its parts they would not
            if m is not self and (m._forward_hooks or m._forward_pre_hooks):
                return f"{type(m).__name__} has forward hooks"
        return ""

    def _check(self, x):
        reference.check_zoo_input(type(self).__name__, x, self.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        backend = dispatch.select(self.op_name, x)
        why = "" if backend == "eager" else self._unfusable()
        if why:
            key = (type(self).__name__, why)
            if key not in _warned:
                _warned.add(key)
                warnings.warn(f"fusedattn.{type(self).__name__}: running the eager module: {why}",
                              stacklevel=2)
            dispatch.record(self.op_name, "eager")
            backend = "eager"
        if backend == "eager" or x.numel() == 0:
            return super().forward(x)
        return self._fused(x, backend)


class HAM(_Fused, reference.HAM):
    """Fused HAM (fusedattn/spec/ham.md): the eager reference's constructor, parameters and
    state_dict (it subclasses ``fusedattn.reference.HAM``, so ``load_state_dict`` moves weights both
    ways), with the passes over full-size tensors fused (``fusedattn.ops.ham``). Backend ``eager``
    runs the reference forward, as do a ``bn`` that is not an affine BatchNorm, a SyncBatchNorm
    that synchronises across processes, and forward hooks on a part (warned once)."""

    op_name = "ham"

    def _check(self, x):
        reference.check_ham_input(x, self.channels)

    def _unfusable(self) -> str:
        bn = self.bn
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.weight is None:
            return f"its bn ({type(bn).__name__}) is not an affine BatchNorm"
        return super()._unfusable()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.numel() == 0:
            reference.check_ham_input(x, self.channels)
            return x.clone()
        return super().forward(x)

    def _fused(self, x, backend):
        return ham_op(self, x, backend)


# ----------------------------------------------------------------------------- SE, ECA, CBAM

class _Zoo(_Fused):
    """What SE, ECA and CBAM share: the fused forward over ``fusedattn.ops.zoo``, the small parts
    written as functions of the parameters and the BatchNorms (``norms()``)."""

    with_max = False
    spatial_attention = False

    def _fused(self, x, backend):
        return zoo_op(self, x, backend)

    def norms(self) -> dict:
        """The BatchNorms of the small parts, as ``Norm`` snapshots by name."""
        return {}

    @staticmethod
    def adopt(module: nn.Module) -> str:
        """Prepare another library's instance (``registry.Op.adopts``) to become this class:
        set the attributes the fused forward reads; return why it cannot ('' if it can)."""
        return ""

    @property
    def channel_param_count(self) -> int:
        return len(self.channel_params())

    def fused_params(self):
        return [*self.channel_params(), *self.spatial_params()]

    def spatial_params(self):
        return []


class SE(_Zoo, reference.SE):
    """Fused squeeze-and-excitation: timm's ``SEModule`` constructor, forward and state_dict keys
    (``fc1.*``, ``bn.*``, ``fc2.*``; it subclasses ``fusedattn.reference.SE``). Fused: the pixel
    pooling, the gate and their backward; the MLP, ``norm_layer`` (identity or a BatchNorm) and
    the activations run in torch on (N, C) tensors. A norm layer other than BatchNorm, an
    activation with parameters, or forward hooks on a part run the eager module (warned once)."""

    op_name = "se"

    @staticmethod
    def adopt(module: nn.Module) -> str:
        module.channels = module.fc1.in_channels
        return ""

    @property
    def with_max(self):
        return self.add_maxpool

    def _acts(self):
        return [self.act, self.gate]

    def _unfusable(self) -> str:
        if not isinstance(self.bn, (nn.Identity, nn.modules.batchnorm._BatchNorm)):
            return f"norm_layer {type(self.bn).__name__} is not a BatchNorm"
        return super()._unfusable()

    def _has_bn(self):
        return isinstance(self.bn, nn.modules.batchnorm._BatchNorm)

    def norms(self) -> dict:
        return {"bn": Norm.of(self.bn)} if self._has_bn() else {}

    def channel_params(self):
        bn = (self.bn.weight, self.bn.bias) if self._has_bn() else ()
        return _params(self.fc1.weight, self.fc1.bias, *bn, self.fc2.weight, self.fc2.bias)

    def channel_fn(self, mean, mx, params, norms, update: bool):
        dt = mean.dtype
        has_bn = self._has_bn()
        w1, b1, bn_w, bn_b, w2, b2 = zoo_ops.unpack(params, (
            True, self.fc1.bias is not None, has_bn and self.bn.weight is not None,
            has_bn and self.bn.bias is not None, True, self.fc2.bias is not None), dt)
        v = 0.5 * mean + 0.5 * mx if self.add_maxpool else mean
        z = zoo_ops.fc(v, w1, b1)
        if has_bn:
            z = norms["bn"].forward(z, bn_w, bn_b, update)
        return self.gate(zoo_ops.fc(self.act(z), w2, b2))

    def channel_backward(self, da, mean, mx, params, norms):
        """By hand without a norm layer (torch.func.vjp with one)."""
        if self._has_bn():
            return zoo_ops.channel_vjp(self, da, mean, mx, params, norms)
        dt = mean.dtype
        with_b1, with_b2 = self.fc1.bias is not None, self.fc2.bias is not None
        w1, b1, w2, b2 = zoo_ops.unpack(params, (True, with_b1, True, with_b2), dt)
        v = 0.5 * mean + 0.5 * mx if self.add_maxpool else mean
        z2, saved = zoo_ops.mlp_forward(v, w1, b1, self.act, w2, b2)
        a = zoo_ops.apply_act(self.gate, z2)
        d_z2 = zoo_ops.act_backward(self.gate, z2, a, da)
        d_v, grads = zoo_ops.mlp_backward(d_z2, saved, self.act, w1, w2, with_b1, with_b2)
        if self.add_maxpool:
            return 0.5 * d_v, 0.5 * d_v, zoo_ops.cast_like(grads, params)
        return d_v, mx, zoo_ops.cast_like(grads, params)


class ECA(_Zoo, reference.ECA):
    """Fused efficient channel attention: timm's ``EcaModule`` constructor, forward and state_dict
    keys (``conv.weight``; with ``use_mlp`` also ``conv.bias``, ``conv2.*``). Fused: the pixel
    pooling, the gate and their backward; the 1-D conv over the channels (shifted
    multiply-adds) and the gate run in torch on (N, C) tensors."""

    op_name = "eca"

    @staticmethod
    def adopt(module: nn.Module) -> str:
        module.channels = None  # timm's EcaModule does not keep it; the conv needs no check
        return ""

    def _acts(self):
        return [self.act, self.gate]

    def channel_params(self):
        if self.conv2 is None:
            return [self.conv.weight]
        return [self.conv.weight, self.conv.bias, self.conv2.weight, self.conv2.bias]

    def channel_fn(self, mean, mx, params, norms, update: bool):
        dt = mean.dtype
        if self.conv2 is None:
            return self.gate(channel_conv(mean, params[0].to(dt)))
        w1, b1, w2, b2 = (t.to(dt) for t in params)
        z = self.act(F.conv1d(mean[:, None], w1, b1))
        z = F.conv1d(z, w2, b2, padding=self.conv2.padding[0])
        return self.gate(z[:, 0])

    def channel_backward(self, da, mean, mx, params, norms):
        """By hand for the paper's form (torch.func.vjp with ``use_mlp``)."""
        if self.conv2 is not None:
            return zoo_ops.channel_vjp(self, da, mean, mx, params, norms)
        d_mean, grads = zoo_ops.eca_channel_backward(self.gate, da, mean, params[0])
        return d_mean, mx, grads


class CBAM(_Zoo, reference.CBAM):
    """Fused CBAM: timm's ``CbamModule`` constructor, forward and state_dict keys
    (``channel.fc1.weight``, ``channel.fc2.weight``, ``spatial.conv.conv.weight``,
    ``spatial.conv.bn.*``). Fused: the pixel pooling (mean and max), the channel pooling of
    ``a x`` (never stored), the gate ``x a s`` and their backward; the MLP, the k x k conv, the
    BatchNorm and the gates run in torch on (N, C) and (N, pixel) maps."""

    op_name = "cbam"
    with_max = True
    spatial_attention = True

    @staticmethod
    def adopt(module: nn.Module) -> str:
        """timm's CbamModule: its spatial ConvNormAct must be conv + BatchNorm only."""
        cb = module.spatial.conv
        conv = cb.conv
        k = conv.kernel_size[0]
        if (conv.kernel_size != (k, k) or conv.stride != (1, 1) or conv.dilation != (1, 1)
                or conv.padding != (k // 2, k // 2) or conv.bias is not None or conv.groups != 1):
            return "its spatial conv is not a same-padded k x k conv without bias"
        extra = [getattr(cb, "aa", None), getattr(cb.bn, "act", None), getattr(cb.bn, "drop", None)]
        if any(m is not None and not isinstance(m, nn.Identity) for m in extra):
            return "its spatial ConvNormAct applies more than conv + BatchNorm"
        module.channels = module.channel.fc1.in_channels
        return ""

    def _acts(self):
        return [self.channel.act, self.channel.gate, self.spatial.gate]

    def channel_params(self):
        c = self.channel
        return _params(c.fc1.weight, c.fc1.bias, c.fc2.weight, c.fc2.bias)

    def spatial_params(self):
        cb = self.spatial.conv
        return [cb.conv.weight, cb.bn.weight, cb.bn.bias]

    def _unfusable(self) -> str:
        bn = self.spatial.conv.bn
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.weight is None:
            return "the spatial norm is not an affine BatchNorm"
        return super()._unfusable()

    def norms(self) -> dict:
        return {"spatial": Norm.of(self.spatial.conv.bn)}

    def channel_fn(self, mean, mx, params, norms, update: bool):
        c = self.channel
        dt = mean.dtype
        w1, b1, w2, b2 = zoo_ops.unpack(
            params, (True, c.fc1.bias is not None, True, c.fc2.bias is not None), dt)

        def mlp(v):
            return zoo_ops.fc(c.act(zoo_ops.fc(v, w1, b1)), w2, b2)

        return c.gate(mlp(mean) + mlp(mx))

    def channel_backward(self, da, mean, mx, params, norms):
        """By hand: both pooled vectors through the MLP as one (2N, C) batch."""
        c = self.channel
        dt = mean.dtype
        N = mean.shape[0]
        with_b1, with_b2 = c.fc1.bias is not None, c.fc2.bias is not None
        w1, b1, w2, b2 = zoo_ops.unpack(params, (True, with_b1, True, with_b2), dt)
        z2, saved = zoo_ops.mlp_forward(torch.cat([mean, mx]), w1, b1, c.act, w2, b2)
        pre = z2[:N] + z2[N:]
        a = zoo_ops.apply_act(c.gate, pre)
        d_pre = zoo_ops.act_backward(c.gate, pre, a, da)
        d_v, grads = zoo_ops.mlp_backward(torch.cat([d_pre, d_pre]), saved, c.act, w1, w2,
                                          with_b1, with_b2)
        return d_v[:N], d_v[N:], zoo_ops.cast_like(grads, params)

    def spatial_fn(self, inp, params, norms):
        return zoo_ops.spatial_fn(self.spatial.gate, inp, params, norms["spatial"])

    def spatial_backward(self, ds, inp, params, norms):
        return zoo_ops.spatial_backward(self.spatial.gate, ds, inp, params, norms["spatial"])


# ----------------------------------------------------------------------------- AA-Conv

class AugmentedConv2d(reference.AugmentedConv2d):
    """Fused attention-augmented convolution (fusedattn/spec/aaconv.md): the reference's
    constructor, parameters and state_dict (it subclasses ``fusedattn.reference.AugmentedConv2d``,
    so ``load_state_dict`` and ``fusedattn.convert`` move between the two). The three
    convolutions stay torch's (oneDNN / cuDNN); q, k, v are strided views of the qkv
    convolution's output (no copies), and the attention is the fused op
    ``fusedattn.ops.aaconv.rel_attention`` (no (HW)^2 tensor; autograd keeps q, k, v, the
    attention output and one fp32 log-sum-exp per pixel and head), whose output is viewed as the
    (N, dv, H, W) map without a copy. Backend ``eager`` runs the reference math. The attention
    grid H W is limited to 4096 pixels (64 x 64); a larger feat_size raises ValueError at
    forward."""

    op_name = "aaconv"
    attention = staticmethod(rel_attention)  # the reference's forward, this attention


class SpatialTransformer(reference.SpatialTransformer):
    """Fused spatial transformer: the reference's constructor, parameters and state_dict (it
    subclasses ``fusedattn.reference.SpatialTransformer``); the localisation network stays the
    user's, the sampler is the fused op ``fusedattn.affine_sample`` (no grid tensor; autograd
    keeps x and theta only; gradients gathered, deterministic). Backend ``eager`` runs
    ``affine_grid`` + ``grid_sample``."""

    op_name = "stn"
    sample = staticmethod(affine_sample)
