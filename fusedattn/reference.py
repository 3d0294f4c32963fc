"""Eager PyTorch modules: the ground truth that every fused kernel is tested against.

Each follows its spec in ``shared/spec`` line by line, with plain autograd for the gradients.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SimAM", "simam", "HAM", "SE", "ECA", "CBAM", "make_divisible", "AugmentedConv2d",
           "rel_attention"]


def simam(x: torch.Tensor, e_lambda: float = 1e-4) -> torch.Tensor:
    """SimAM (Yang et al., ICML 2021), the authors' formula over any rank >= 3.

    Per plane (n, c) of M = prod(spatial) elements, with n = max(M - 1, 1) (the spec's guard: the
    authors divide by M - 1 = 0 for 1x1 planes)::

        d = (x - mean(x))^2;  e = d / (4 (sum(d) / n + e_lambda)) + 1/2;  y = x sigmoid(e)
    """
    dims = tuple(range(2, x.dim()))
    n = max(x[0, 0].numel() - 1, 1) if x.numel() else 1
    d = (x - x.mean(dim=dims, keepdim=True)).pow(2)
    e = d / (4 * (d.sum(dim=dims, keepdim=True) / n + e_lambda)) + 0.5
    return x * torch.sigmoid(e)


class SimAM(nn.Module):
    """Eager SimAM; ``channels`` is accepted and ignored (YOLO-style parsers pass it)."""

    def __init__(self, channels: int | None = None, e_lambda: float = 1e-4):
        super().__init__()
        self.e_lambda = e_lambda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return simam(x, self.e_lambda)

    def extra_repr(self) -> str:
        return f"e_lambda={self.e_lambda}"


def ham_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """k of HAM's channel conv (Eq. 6): t = int(|log2(C)/gamma + b/gamma|), odd-up."""
    t = int(abs(math.log2(channels) / gamma + b / gamma))
    return t if t % 2 else t + 1


def ham_important_channels(channels: int, separation_rate: float) -> int:
    """C_im (Eq. 8): separation_rate * C rounded to an even number (int, +1 if odd), at most C."""
    h = int(separation_rate * channels)
    return min(h if h % 2 == 0 else h + 1, channels)


def ham_important_mask(a: torch.Tensor, important: int) -> torch.Tensor:
    """(N, C) bool: the ``important`` channels of largest a per sample, ties to the lower index
    (a stable descending sort), so that every backend selects the same channels."""
    if torch.onnx.is_in_onnx_export():  # ONNX has no stable sort; its TopK breaks ties the same way
        order = torch.topk(a.detach(), important, dim=1).indices
    else:
        order = torch.sort(a.detach(), dim=1, descending=True, stable=True).indices[:, :important]
    mask = torch.zeros_like(a, dtype=torch.bool)
    return mask.scatter(1, order, torch.ones_like(order, dtype=torch.bool))


def check_ham_args(channels, separation_rate, spatial_kernel_size) -> None:
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"HAM: channels must be a positive int, got {channels!r}")
    if not (0.0 <= separation_rate <= 1.0):
        raise ValueError(f"HAM: separation_rate must lie in [0, 1], got {separation_rate!r}")
    if spatial_kernel_size < 1 or spatial_kernel_size % 2 == 0:
        raise ValueError(f"HAM: spatial_kernel_size must be odd and positive, got {spatial_kernel_size!r}")


def check_ham_input(x, channels: int) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"HAM: expected a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"HAM: expected a tensor of shape (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"HAM: expected {channels} channels, got shape {tuple(x.shape)}")


class HAM(nn.Module):
    """Hybrid attention module (Li et al., Pattern Recognition 129, 2022), fusedattn/spec/ham.md
    line by line. Channel attention (Eqs. 5-7)::

        add_c = (avg_c + max_c) / 2 + alpha avg_c + beta max_c;  a = sigmoid(conv1d_k(add_c))

    channel separation (Eq. 8): per sample, the C_im channels with the largest a (ties to the
    lower index: a stable descending sort) form the important group, the rest the sub-important
    one (hard masks, no gradient); spatial attention per group g (Eqs. 9-10) on f = a x::

        avg_g = sum_{c in g} f_c / |g|;  max_g = max over all C channels of f * mask_g
        s_g = sigmoid(relu(bn(conv7x7([avg_g, max_g]))))   (one conv and one BN for both groups)

    and y = s_{g(c)} f_c. Maxima take the first index that attains them (``torch.max``), so their
    gradient goes there; an empty group contributes nothing."""

    def __init__(self, channels: int, gamma: int = 2, b: int = 1, separation_rate: float = 0.6,
                 spatial_kernel_size: int = 7):
        super().__init__()
        check_ham_args(channels, separation_rate, spatial_kernel_size)
        self.channels = channels
        self.separation_rate = separation_rate
        self.important = ham_important_channels(channels, separation_rate)
        k = ham_kernel_size(channels, gamma, b)
        self.alpha = nn.Parameter(torch.tensor(0.5))
        self.beta = nn.Parameter(torch.tensor(0.5))
        self.conv1d = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)
        self.spatial_conv = nn.Conv2d(2, 1, spatial_kernel_size, padding=spatial_kernel_size // 2,
                                      bias=False)
        self.bn = nn.BatchNorm2d(1)

    def channel_attention(self, x: torch.Tensor) -> torch.Tensor:
        """a, shape (N, C)."""
        avg = x.mean(dim=(2, 3))
        mx = x.flatten(2).max(dim=2).values
        add = 0.5 * (avg + mx) + self.alpha * avg + self.beta * mx
        return torch.sigmoid(self.conv1d(add.unsqueeze(1))).squeeze(1)

    def important_mask(self, a: torch.Tensor) -> torch.Tensor:
        return ham_important_mask(a, self.important)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_ham_input(x, self.channels)
        a = self.channel_attention(x)
        f = a[:, :, None, None] * x
        imp = self.important_mask(a)
        y = torch.zeros_like(x)
        for mask, size in ((imp, self.important), (~imp, self.channels - self.important)):
            if size == 0:
                continue
            fg = f * mask[:, :, None, None].to(x.dtype)
            avg = fg.sum(dim=1, keepdim=True) / size
            mx = fg.max(dim=1, keepdim=True).values
            s = torch.sigmoid(torch.relu(self.bn(self.spatial_conv(torch.cat([avg, mx], dim=1)))))
            y = y + s * fg
        return y

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, important={self.important}, "
                f"separation_rate={self.separation_rate}, k={self.conv1d.kernel_size[0]}")


# ----------------------------------------------------------------------------- SE, ECA, CBAM
# timm's modules (fusedattn/spec/zoo.md): the same constructors, forward and state_dict keys,
# written here so that the reference needs no timm.

_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "hard_sigmoid": nn.Hardsigmoid, "tanh": nn.Tanh,
                "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "swish": nn.SiLU,
                "gelu": nn.GELU, "hard_swish": nn.Hardswish, "identity": nn.Identity}


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None,
                   round_limit: float = 0.9) -> int:
    """timm's rounding of channel counts: the multiple of divisor nearest to v (at least
    min_value or divisor), one more divisor if that falls below round_limit * v."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def create_act(layer, inplace: bool = False):
    """An activation module from a name ('sigmoid', 'hard_sigmoid', 'relu', ...; other names
    through timm when it is installed), a class (built with ``inplace`` when it takes it), or a
    module; None stays None."""
    if layer is None:
        return None
    if isinstance(layer, nn.Module):
        return layer
    if isinstance(layer, str):
        if layer in _ACTIVATIONS:
            layer = _ACTIVATIONS[layer]
        else:
            try:
                from timm.layers import get_act_layer
            except ImportError:
                raise ValueError(f"unknown activation {layer!r}: expected one of "
                                 f"{tuple(_ACTIVATIONS)} (other names need timm)") from None
            layer = get_act_layer(layer)
    try:
        return layer(inplace=inplace)
    except TypeError:
        return layer()


def _check_channels(name: str, channels) -> None:
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"{name}: channels must be a positive int, got {channels!r}")


def check_zoo_input(name: str, x, channels: int | None) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a tensor of shape (N, C, H, W), got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channels, got shape {tuple(x.shape)}")


class SE(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018), timm's ``SEModule``::

        s = mean_p x  (add_maxpool: 0.5 s + 0.5 max_p x)
        y = x * gate(fc2(act(bn(fc1(s)))))        fc: 1x1 convs, bn: norm_layer or identity
    """

    def __init__(self, channels: int, rd_ratio: float = 1. / 16, rd_channels: int | None = None,
                 rd_divisor: int = 8, add_maxpool: bool = False, bias: bool = True,
                 act_layer=nn.ReLU, norm_layer=None, gate_layer="sigmoid", device=None,
                 dtype=None):
        super().__init__()
        _check_channels("SE", channels)
        dd = {"device": device, "dtype": dtype}
        self.channels = channels
        self.add_maxpool = add_maxpool
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.)
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias, **dd)
        self.bn = norm_layer(rd_channels, **dd) if norm_layer else nn.Identity()
        self.act = create_act(act_layer, inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias, **dd)
        self.gate = create_act(gate_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_zoo_input("SE", x, self.channels)
        x_se = x.mean((2, 3), keepdim=True)
        if self.add_maxpool:
            x_se = 0.5 * x_se + 0.5 * x.amax((2, 3), keepdim=True)
        x_se = self.fc2(self.act(self.bn(self.fc1(x_se))))
        return x * self.gate(x_se)


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """ECA's k: t = int(|log2(C) + beta| / gamma), odd-up, at least 3."""
    t = int(abs(math.log(channels, 2) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


class ECA(nn.Module):
    """Efficient channel attention (Wang et al. 2020), timm's ``EcaModule``::

        y = x * gate(conv1d_k(mean_p x))     (zero-padded over the channels, no bias)

    ``use_mlp`` (a timm experiment): conv1d(1 -> rd, 1) + act + conv1d(rd -> 1, k), with bias."""

    def __init__(self, channels: int | None = None, kernel_size: int = 3, gamma: float = 2,
                 beta: float = 1, act_layer=None, gate_layer="sigmoid", rd_ratio: float = 1 / 8,
                 rd_channels: int | None = None, rd_divisor: int = 8, use_mlp: bool = False,
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if channels is not None:
            _check_channels("ECA", channels)
            kernel_size = eca_kernel_size(channels, gamma, beta)
        if kernel_size % 2 != 1 or kernel_size < 1:
            raise ValueError(f"ECA: kernel_size must be odd and positive, got {kernel_size!r}")
        self.channels = channels
        padding = (kernel_size - 1) // 2
        if use_mlp:
            if channels is None:
                raise ValueError("ECA: use_mlp needs channels")
            if rd_channels is None:
                rd_channels = make_divisible(channels * rd_ratio, divisor=rd_divisor)
            act_layer = act_layer or nn.ReLU
            self.conv = nn.Conv1d(1, rd_channels, kernel_size=1, padding=0, bias=True, **dd)
            self.act = create_act(act_layer)
            self.conv2 = nn.Conv1d(rd_channels, 1, kernel_size=kernel_size, padding=padding,
                                   bias=True, **dd)
        else:
            self.conv = nn.Conv1d(1, 1, kernel_size=kernel_size, padding=padding, bias=False, **dd)
            self.act = None
            self.conv2 = None
        self.gate = create_act(gate_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_zoo_input("ECA", x, self.channels)
        y = x.mean((2, 3)).view(x.shape[0], 1, -1)
        y = self.conv(y)
        if self.conv2 is not None:
            y = self.conv2(self.act(y))
        y = self.gate(y).view(x.shape[0], -1, 1, 1)
        return x * y.expand_as(x)


class CbamChannel(nn.Module):
    """CBAM's channel attention (timm's ``ChannelAttn``): x * gate(mlp(mean_p x) + mlp(max_p x)),
    mlp = fc2(act(fc1)) with 1x1 convs."""

    def __init__(self, channels: int, rd_ratio: float = 1. / 16, rd_channels: int | None = None,
                 rd_divisor: int = 1, act_layer=nn.ReLU, gate_layer="sigmoid",
                 mlp_bias: bool = False, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=mlp_bias, **dd)
        self.act = create_act(act_layer, inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=mlp_bias, **dd)
        self.gate = create_act(gate_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        x_max = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        return x * self.gate(x_avg + x_max)


class ConvBn(nn.Module):
    """conv k x k (same padding, no bias) + BatchNorm: timm's ``ConvNormAct(apply_act=False)``
    (keys ``conv.weight``, ``bn.*``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, device=None,
                 dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                              bias=False, **dd)
        self.bn = nn.BatchNorm2d(out_channels, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class CbamSpatial(nn.Module):
    """CBAM's spatial attention (timm's ``SpatialAttn``): x * gate(bn(conv([mean_c x, max_c x])))."""

    def __init__(self, kernel_size: int = 7, gate_layer="sigmoid", device=None, dtype=None):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"CBAM: spatial_kernel_size must be odd and positive, got {kernel_size!r}")
        self.conv = ConvBn(2, 1, kernel_size, device=device, dtype=dtype)
        self.gate = create_act(gate_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_attn = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * self.gate(self.conv(x_attn))


class CBAM(nn.Module):
    """CBAM (Woo et al. 2018), timm's ``CbamModule``: channel attention, then spatial attention
    on its output::

        a = gate(mlp(mean_p x) + mlp(max_p x));  f = a x
        y = f * gate(bn(conv_k([mean_c f, max_c f])))
    """

    def __init__(self, channels: int, rd_ratio: float = 1. / 16, rd_channels: int | None = None,
                 rd_divisor: int = 1, spatial_kernel_size: int = 7, act_layer=nn.ReLU,
                 gate_layer="sigmoid", mlp_bias: bool = False, device=None, dtype=None):
        super().__init__()
        _check_channels("CBAM", channels)
        self.channels = channels
        dd = {"device": device, "dtype": dtype}
        self.channel = CbamChannel(channels, rd_ratio=rd_ratio, rd_channels=rd_channels,
                                   rd_divisor=rd_divisor, act_layer=act_layer,
                                   gate_layer=gate_layer, mlp_bias=mlp_bias, **dd)
        self.spatial = CbamSpatial(spatial_kernel_size, gate_layer=gate_layer, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_zoo_input("CBAM", x, self.channels)
        return self.spatial(self.channel(x))


# ----------------------------------------------------------------------------- AA-Conv
# Attention-augmented convolution (Bello et al., ICCV 2019), fusedattn/spec/aaconv.md.

def rel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor | None,
                  rel_w: torch.Tensor | None, H: int, W: int, scale: float) -> torch.Tensor:
    """2-D relative self-attention per (n, head), the math of the fused op
    (``fusedattn.ops.aaconv``) written with (HW)^2 logits. q, k: (N, Nh, L = H W, dkh); v:
    (N, Nh, L, dvh); rel_h: (2H - 1, dkh), rel_w: (2W - 1, dkh), shared by the heads (or both
    None). With pixel i = iy W + ix (query) and j = jy W + jx (key)::

        logit[i, j] = q'_i . k_j + q'_i . rel_w[jx - ix + W - 1] + q'_i . rel_h[jy - iy + H - 1]

    with q' = scale q; returns softmax_j(logit) @ v, (N, Nh, L, dvh). The relative logits are
    the per-query tables q' rel^T ((2W - 1) and (2H - 1) numbers) read at the offsets (a
    gather), broadcast over key rows and key columns."""
    N, Nh, L, _ = q.shape
    q = q * scale
    logits = q @ k.transpose(-1, -2)
    if rel_h is not None:
        dev = q.device
        iy = torch.arange(H, device=dev).repeat_interleave(W)
        ix = torch.arange(W, device=dev).repeat(H)
        off_w = torch.arange(W, device=dev)[None, :] - ix[:, None] + W - 1  # (L, W): [i, jx]
        off_h = torch.arange(H, device=dev)[None, :] - iy[:, None] + H - 1  # (L, H): [i, jy]
        rw = (q @ rel_w.t()).gather(-1, off_w.expand(N, Nh, L, W))
        rh = (q @ rel_h.t()).gather(-1, off_h.expand(N, Nh, L, H))
        logits = logits.view(N, Nh, L, H, W) + rh[..., :, None] + rw[..., None, :]
        logits = logits.view(N, Nh, L, L)
    return torch.softmax(logits, dim=-1) @ v


def _pair(v, what, owner="AugmentedConv2d"):
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in v)):
        raise ValueError(f"{owner}: {what} must be a positive int or a pair of them, "
                         f"got {v!r}")
    return tuple(v)


def check_aaconv_args(in_channels, out_channels, kernel_size, dk, dv, num_heads, stride) -> None:
    for name, val in (("in_channels", in_channels), ("out_channels", out_channels),
                      ("kernel_size", kernel_size), ("dk", dk), ("dv", dv),
                      ("num_heads", num_heads), ("stride", stride)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"AugmentedConv2d: {name} must be a positive int, got {val!r}")
    if dk % num_heads or dv % num_heads:
        raise ValueError(f"AugmentedConv2d: num_heads ({num_heads}) must divide dk ({dk}) and "
                         f"dv ({dv})")
    if dv >= out_channels:
        raise ValueError(f"AugmentedConv2d: dv ({dv}) must be smaller than out_channels "
                         f"({out_channels}): the convolution keeps out_channels - dv channels")
    if kernel_size % 2 == 0:
        raise ValueError(f"AugmentedConv2d: kernel_size must be odd (padding kernel_size // 2 "
                         f"keeps the grid of the attention), got {kernel_size}")


class AugmentedConv2d(nn.Module):
    """Attention-augmented convolution (Bello et al., ICCV 2019), fusedattn/spec/aaconv.md line
    by line (the TensorFlow code of the paper's appendix)::

        conv_out = Conv2d(in, out - dv, k, padding=k // 2, stride)(x)
        k, q, v  = split(Conv2d(in, 2 dk + dv, 1, stride)(x), [dk, dk, dv])    # in that order
        q = q dkh^-0.5; heads head-major (channel c of q/k in head c // dkh), pixels i = iy W + ix
        logit[i, j] = q_i . k_j + q_i . rel_w[jx - ix + W - 1] + q_i . rel_h[jy - iy + H - 1]
        attn = attn_out(heads of softmax_j(logit) @ v, combined head-major to dv channels)
        y = cat([conv_out, attn], dim=1)                                         # out channels

    ``rel_w`` (2W - 1, dkh) and ``rel_h`` (2H - 1, dkh) are shared by all heads; they depend on
    the attention grid ``feat_size`` = (H, W) (after the stride; an int for square maps), and
    another input size raises ValueError. ``relative=False`` drops both terms (and the
    parameters). Initialisation: PyTorch's default for the convolutions; ``rel_h``, ``rel_w``
    normal with mean 0 and std dkh^-0.5 (the appendix passes dkh^-0.5 positionally to TF1's
    ``random_normal_initializer``, which makes it the mean with std 1, a slip; timm's
    ``PosEmbedRel`` uses std dim_head^-0.5, as here). kernel_size must be odd, num_heads must
    divide dk and dv, and dv < out_channels."""

    # the attention on (q, k, v, rel_h, rel_w, H, W, scale); fusedattn.AugmentedConv2d: fused
    attention = staticmethod(rel_attention)

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dk: int, dv: int,
                 num_heads: int, feat_size, relative: bool = True, stride: int = 1, *,
                 device=None, dtype=None):
        super().__init__()
        check_aaconv_args(in_channels, out_channels, kernel_size, dk, dv, num_heads, stride)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = kernel_size
        self.dk, self.dv, self.num_heads = dk, dv, num_heads
        self.dkh, self.dvh = dk // num_heads, dv // num_heads
        self.feat_size = _pair(feat_size, "feat_size")
        self.relative, self.stride = bool(relative), stride
        dd = {"device": device, "dtype": dtype}
        self.conv_out = nn.Conv2d(in_channels, out_channels - dv, kernel_size, stride=stride,
                                  padding=kernel_size // 2, **dd)
        self.qkv_conv = nn.Conv2d(in_channels, 2 * dk + dv, 1, stride=stride, **dd)
        self.attn_out = nn.Conv2d(dv, dv, 1, **dd)
        if self.relative:
            H, W = self.feat_size
            self.rel_h = nn.Parameter(torch.empty(2 * H - 1, self.dkh, **dd))
            self.rel_w = nn.Parameter(torch.empty(2 * W - 1, self.dkh, **dd))
            nn.init.normal_(self.rel_h, std=self.dkh ** -0.5)
            nn.init.normal_(self.rel_w, std=self.dkh ** -0.5)
        else:
            self.register_parameter("rel_h", None)
            self.register_parameter("rel_w", None)

    def check_input(self, x) -> None:
        """ValueError / TypeError unless x is (N, in_channels, H, W) with the attention grid
        (after the stride) equal to feat_size."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"AugmentedConv2d: expected a floating-point tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"AugmentedConv2d: expected an input of shape (N, {self.in_channels}, "
                             f"H, W), got {tuple(x.shape)}")
        grid = tuple((s - 1) // self.stride + 1 for s in x.shape[2:])
        if grid != self.feat_size:
            raise ValueError(f"AugmentedConv2d: built for the attention grid feat_size = "
                             f"{self.feat_size}, but an input of {tuple(x.shape[2:])} pixels with "
                             f"stride {self.stride} gives {grid} (the relative embeddings depend "
                             f"on the grid)")

    def heads(self, qkv: torch.Tensor):
        """q, k, v of the qkv convolution's output (N, 2 dk + dv, H, W), split k, q, v, as
        (N, Nh, H W, d) views (head-major channels; pixel axis before the head's channels)."""
        N, _, H, W = qkv.shape
        k, q, v = torch.split(qkv, [self.dk, self.dk, self.dv], dim=1)
        Nh = self.num_heads
        return tuple(t.reshape(N, Nh, t.shape[1] // Nh, H * W).transpose(2, 3) for t in (q, k, v))

    def combine(self, out: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """(N, Nh, H W, dvh) -> (N, dv, H, W): the pixel axis behind the channels, heads
        head-major."""
        N = out.shape[0]
        return out.transpose(2, 3).reshape(N, self.dv, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        conv_out = self.conv_out(x)
        qkv = self.qkv_conv(x)
        H, W = qkv.shape[2:]
        q, k, v = self.heads(qkv)
        attn = self.attention(q, k, v, self.rel_h, self.rel_w, H, W, self.dkh ** -0.5)
        return torch.cat([conv_out, self.attn_out(self.combine(attn, H, W))], dim=1)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"kernel_size={self.kernel_size}, dk={self.dk}, dv={self.dv}, "
                f"num_heads={self.num_heads}, feat_size={self.feat_size}, "
                f"relative={self.relative}, stride={self.stride}")


# ----------------------------------------------------------------------------- spatial transformer

def affine_sample(x: torch.Tensor, theta: torch.Tensor, size=None,
                  align_corners: bool = False) -> torch.Tensor:
    """The spatial transformer's sampler as PyTorch users write it: ``F.grid_sample(x,
    F.affine_grid(theta, (N, C, Ho, Wo), align_corners), mode="bilinear", padding_mode="zeros",
    align_corners=align_corners)``. ``size``: None (x's H, W), (Ho, Wo) or (N, C, Ho, Wo).
    theta is cast to x's dtype (grid_sample needs the grid in x's dtype)."""
    import torch.nn.functional as F
    if size is None:
        size = x.shape[2:]
    size = (x.shape[0], x.shape[1], *tuple(size)[-2:])
    grid = F.affine_grid(theta.to(x.dtype), size, align_corners=align_corners)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=align_corners)


IDENTITY_THETA = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def default_localization(in_channels: int) -> nn.Module:
    """The localisation network of PyTorch's spatial transformer tutorial, made size-agnostic
    (same-padded convolutions, ceil-mode pools, a 3 x 3 adaptive average pool before the MLP):
    conv 7x7 -> 8, max-pool 2, ReLU, conv 5x5 -> 10, max-pool 2, ReLU, pool to 3 x 3,
    Linear(90, 32), ReLU, Linear(32, 6). Any input of at least 1 x 1 pixels."""
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ValueError(f"SpatialTransformer: in_channels must be a positive int, got "
                         f"{in_channels!r}")
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 7, padding=3), nn.MaxPool2d(2, ceil_mode=True), nn.ReLU(True),
        nn.Conv2d(8, 10, 5, padding=2), nn.MaxPool2d(2, ceil_mode=True), nn.ReLU(True),
        nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(90, 32), nn.ReLU(True), nn.Linear(32, 6))


def _last_linear(module: nn.Module):
    last = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


class SpatialTransformer(nn.Module):
    """Spatial transformer (Jaderberg et al., NeurIPS 2015), affine, bilinear::

        theta = localization(x).view(N, 2, 3)
        y = grid_sample(x, affine_grid(theta, (N, C, Ho, Wo), align_corners), bilinear, zeros)

    ``localization``: any module mapping x (N, C, H, W) to 6 numbers per sample ((N, 6) or
    (N, 2, 3)); None builds :func:`default_localization` for ``in_channels``. As in the paper,
    the transform starts as the identity: the localisation's last ``nn.Linear`` (it must have 6
    outputs) gets zero weights and the bias (1, 0, 0, 0, 1, 0); ``init_identity=False`` leaves
    a user's module as it is. ``out_size``: None (the input's H, W), an int or (Ho, Wo).
    ``forward(x, return_theta=False)`` returns y, or (y, theta) with theta (N, 2, 3)."""

    # the sampler on (x, theta, (Ho, Wo), align_corners); fusedattn.SpatialTransformer: fused
    sample = staticmethod(affine_sample)

    def __init__(self, localization: nn.Module | None = None, out_size=None,
                 align_corners: bool = False, *, in_channels: int | None = None,
                 init_identity: bool = True):
        super().__init__()
        if localization is None:
            if in_channels is None:
                raise ValueError("SpatialTransformer: give a localization network, or "
                                 "in_channels for the default one")
            localization = default_localization(in_channels)
        elif not isinstance(localization, nn.Module):
            raise TypeError(f"SpatialTransformer: localization must be an nn.Module, got "
                            f"{type(localization).__name__}")
        if not isinstance(align_corners, bool):
            raise TypeError(f"SpatialTransformer: align_corners must be a bool, got "
                            f"{align_corners!r}")
        self.localization = localization
        self.out_size = None if out_size is None else _pair(out_size, "out_size", "SpatialTransformer")
        self.align_corners = align_corners
        if init_identity:
            last = _last_linear(localization)
            if last is None or last.out_features != 6 or last.bias is None:
                raise ValueError("SpatialTransformer: the identity start needs the "
                                 "localization's last nn.Linear to have 6 outputs and a bias; "
                                 "pass init_identity=False to keep the module as it is")
            with torch.no_grad():
                last.weight.zero_()
                last.bias.copy_(torch.tensor(IDENTITY_THETA, dtype=last.bias.dtype))

    def theta(self, x: torch.Tensor) -> torch.Tensor:
        """The localisation's transform for x, (N, 2, 3)."""
        t = self.localization(x)
        if t.dim() < 2 or t.shape[0] != x.shape[0] or t[0].numel() != 6:
            raise ValueError(f"SpatialTransformer: the localization must give 6 numbers per "
                             f"sample, got shape {tuple(t.shape)} for {x.shape[0]} samples")
        return t.reshape(x.shape[0], 2, 3)

    def forward(self, x: torch.Tensor, return_theta: bool = False):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"SpatialTransformer: expected an input of shape (N, C, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        theta = self.theta(x)
        y = self.sample(x, theta, self.out_size, self.align_corners)
        return (y, theta) if return_theta else y

    def extra_repr(self) -> str:
        return f"out_size={self.out_size}, align_corners={self.align_corners}"
