"""Benchmark providers of attention-augmented convolution (issue 11, item 5) for
``python -m fusedattn.bench --ops aaconv``: the whole module y = f(x) on the paper's settings
(``registry.get("aaconv").build``: out_channels = C, 3x3, Nh = 8, dkh >= 20), with the same
weights in every provider, differing only in how the 2-D relative self-attention is computed:

- ``eager``       ``fusedattn.reference.AugmentedConv2d``: (HW)^2 logits, the relative terms as
                  per-query tables gathered and broadcast (the reference's formulation);
- ``compile``     ``torch.compile`` of that module (the reference's formulation compiled);
- ``sdpa_bias``   ``F.scaled_dot_product_attention`` with the relative logits materialised as a
                  float ``attn_mask`` (N, Nh, HW, HW);
- ``sdpa_folded`` SDPA with the relative terms folded into q and k, no bias: q' = [q, Tw, Th],
                  k' = [k, onehot(jx), onehot(jy)] (Tw, Th the absolute tables, W and H per
                  query), so that q'_i . k'_j = q_i . k_j + Tw[i, jx] + Th[i, jy];
- ``flex``        ``flex_attention`` (compiled) with a ``score_mod`` adding
                  Tw[b, h, i, j mod W] + Th[b, h, i, j div W]. torch 2.14.1 has no flex backward
                  on CPU, and refuses even the training forward there (inputs that require
                  grad: ``NotImplementedError: FlexAttention does not support backward on CPU.
                  Please set the input requires_grad to False or use another device.``); on CPU
                  it runs inference only. ``unsupported()`` names those cells;
- ``fused``       ``fusedattn.AugmentedConv2d`` (the fused op on the active backend);
- ``clone``       ``x.clone()``, the floor of any forward.

Two parts are benchmarked (the ``part`` column of the results):

- ``module``     y = f(x), the whole AugmentedConv2d as above (``providers``);
- ``attention``  only the attention core: the input is the qkv convolution's output ``qkv``
                 (N, 2 dk + dv, H, W) requiring grad (computed once from x by the reference's
                 qkv_conv), and each provider computes ``core(*ref.heads(qkv), ref.rel_h,
                 ref.rel_w, H, W, ref.dkh ** -0.5)`` with its core: ``reference.rel_attention``
                 (eager), its torch.compile (compile), ``sdpa_bias``, ``sdpa_folded``, ``flex``,
                 ``fusedattn.ops.aaconv.rel_attention`` (fused); clone is ``qkv.clone()``
                 (``attention_providers``). The backward's incoming gradient has the layout the
                 module gives it (the head-major channels of attn_out's input: memory ordered
                 (N, Nh, dvh, H W)).

Gradients (bwd, fwd+bwd) are taken with respect to the input (x, or qkv), as for every op.

``fusedattn/bench.py`` reads this module through ``registry.get("aaconv").bench_providers`` (see
``bench.op_bench``): ``PROVIDERS``, ``PARTS``, ``case(part, x, e_lambda, training)``,
``unsupported(provider, mode, device)`` (those cells are skipped and shown as n/a), ``SHAPES`` /
``QUICK_SHAPES`` / ``LAYOUTS`` / ``ROUND_PERIODS`` (the defaults of --shapes, --quick, --layouts,
--reps), ``COMPARE`` (the providers the table's "fused / fastest other" ranges over) and
``saved_bound(shape, dtype)`` (the bytes of q + k + v + out + one fp32 per (query, head), the
issue's target for what the fused op saves for backward).
Shapes: ``SHAPES`` below (the spec's ResNet-50 and CIFAR grids).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

PROVIDERS = ("eager", "compile", "sdpa_bias", "sdpa_folded", "flex", "fused", "clone")
PARTS = ("module", "attention")
COMPARE = ("eager", "compile", "sdpa_bias", "sdpa_folded", "flex")  # fused / fastest of these
LAYOUTS = "contiguous"  # default --layouts (channels_last only when asked for)
ROUND_PERIODS = 1  # default --reps: one period of the provider orders (7 providers: 14 rounds)

# (N, C, H, W): fusedattn/spec/aaconv.md's benchmark shapes. ResNet-50 at 224, batch 8: the 3x3
# convolutions of the bottlenecks of stages 2-4 (width 128 at 28x28, 256 at 14x14, 512 at 7x7).
# CIFAR-100 Wide-ResNet-28-10 (F_out 160, 320, 640 at 32x32, 16x16, 8x8): batch 128 in the spec,
# 8 here by default (``SHAPES_CIFAR_FULL`` has the spec's batch).
SHAPES_RESNET = [(8, 128, 28, 28), (8, 256, 14, 14), (8, 512, 7, 7)]
SHAPES_CIFAR = [(8, 160, 32, 32), (8, 320, 16, 16), (8, 640, 8, 8)]
SHAPES_CIFAR_FULL = [(128, 160, 32, 32), (128, 320, 16, 16), (128, 640, 8, 8)]
SHAPES = SHAPES_RESNET + SHAPES_CIFAR
QUICK_SHAPES = [SHAPES_RESNET[0], SHAPES_RESNET[-1]]  # --quick: the first and last ResNet grids

FLEX_CPU_BACKWARD = ("flex_attention has no backward on CPU in torch 2.14.1 (and refuses a "
                     "forward whose inputs require grad): inference only")


def unsupported(provider: str, mode: str, device) -> str | None:
    """Why provider cannot run mode ("fwd", "bwd", "fwd+bwd" in training, "infer") on device
    (None: it can)."""
    if provider == "flex" and torch.device(device).type == "cpu" and mode != "infer":
        return FLEX_CPU_BACKWARD
    return None


# ----------------------------------------------------------------------------- attention cores
# Each core has the signature of fusedattn.reference.rel_attention: (q, k, v, rel_h, rel_w, H,
# W, scale) -> (N, Nh, H W, dvh), q, k, v (N, Nh, H W, d) views of the qkv convolution.


def abs_tables(q, rel_h, rel_w, H, W):
    """(Tw, Th): Tw[n, h, i, x] = q_i . rel_w[x - ix + W - 1] (N, Nh, L, W) and
    Th[n, h, i, y] = q_i . rel_h[y - iy + H - 1] (N, Nh, L, H): the relative logits over key
    columns and key rows (the per-query tables q rel^T read at the offsets)."""
    N, Nh, L, _ = q.shape
    dev = q.device
    iy = torch.arange(H, device=dev).repeat_interleave(W)
    ix = torch.arange(W, device=dev).repeat(H)
    off_w = torch.arange(W, device=dev)[None, :] - ix[:, None] + W - 1
    off_h = torch.arange(H, device=dev)[None, :] - iy[:, None] + H - 1
    tw = (q @ rel_w.t()).gather(-1, off_w.expand(N, Nh, L, W))
    th = (q @ rel_h.t()).gather(-1, off_h.expand(N, Nh, L, H))
    return tw, th


def sdpa_bias(q, k, v, rel_h, rel_w, H, W, scale):
    """SDPA with the relative logits as a materialised float attn_mask (N, Nh, L, L)."""
    mask = None
    if rel_h is not None:
        N, Nh, L, _ = q.shape
        tw, th = abs_tables(q, rel_h, rel_w, H, W)
        mask = ((th[..., :, None] + tw[..., None, :]) * scale).reshape(N, Nh, L, L)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def sdpa_folded(q, k, v, rel_h, rel_w, H, W, scale):
    """SDPA on q' = [q, Tw, Th] and k' = [k, onehot(jx), onehot(jy)]: the relative logits as
    W + H more channels of the dot product, no bias and no (HW)^2 input."""
    if rel_h is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    N, Nh, L, _ = q.shape
    tw, th = abs_tables(q, rel_h, rel_w, H, W)
    pix = torch.arange(L, device=q.device)
    onehot = torch.cat([F.one_hot(pix % W, W), F.one_hot(pix // W, H)], dim=1).to(q.dtype)
    qf = torch.cat([q, tw, th], dim=-1)
    kf = torch.cat([k, onehot.expand(N, Nh, L, W + H)], dim=-1)
    return F.scaled_dot_product_attention(qf, kf, v, scale=scale)


_flex = {}  # compile backend -> compiled flex_attention


def flex(q, k, v, rel_h, rel_w, H, W, scale):
    """flex_attention (torch.compile'd, as it must be to run fast; fusedattn.bench.compiled's
    backend) with a score_mod adding the relative logits from the absolute tables Tw, Th
    (captured tensors)."""
    import os

    from torch.nn.attention.flex_attention import flex_attention

    from fusedattn import bench
    backend = os.environ.get(bench.COMPILE_BACKEND_ENV, "inductor")
    if backend not in _flex:
        _flex[backend] = bench.compiled(flex_attention)
    fa = _flex[backend]
    if rel_h is None:
        return fa(q, k, v, scale=scale)
    tw, th = abs_tables(q, rel_h, rel_w, H, W)
    tw, th = tw * scale, th * scale

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + tw[b, h, q_idx, kv_idx % W] + th[b, h, q_idx, kv_idx // W]

    return fa(q, k, v, score_mod=score_mod, scale=scale)


def with_core(ref: nn.Module, core) -> nn.Module:
    """The reference module ``ref`` with its attention computed by ``core``: a shallow copy
    (the same parameters and submodules) whose ``attention`` hook
    (``fusedattn.reference.AugmentedConv2d.attention``) is ``core``."""
    m = copy.copy(ref)
    m.attention = core
    return m


class AttentionCore(nn.Module):
    """The attention part: qkv (the qkv convolution's output) -> ``core(*ref.heads(qkv),
    ref.rel_h, ref.rel_w, H, W, ref.dkh ** -0.5)``, (N, Nh, H W, dvh); ``ref`` shared."""

    def __init__(self, ref: nn.Module, core):
        super().__init__()
        self.ref, self.core = ref, core

    def forward(self, qkv):
        m = self.ref
        H, W = qkv.shape[2:]
        return self.core(*m.heads(qkv), m.rel_h, m.rel_w, H, W, m.dkh ** -0.5)


def _reference(x: torch.Tensor, training: bool, relative: bool):
    """The reference module for inputs like x, perturbed weights, x's device and dtype."""
    from fusedattn import bench, registry
    entry = registry.get("aaconv")
    ref = entry.build(entry.reference_cls(), tuple(x.shape))
    if not relative:
        ref = _without_tables(entry, ref, x)
    return bench.perturb_weights(ref).to(x.device, x.dtype).train(training)


def providers(x: torch.Tensor, training: bool = True, relative: bool = True):
    """Callables y = f(x) per provider (PROVIDERS) for inputs like x (N, C, H, W): the
    reference module with perturbed weights (fusedattn.bench.perturb_weights) in train() or
    eval(), the other providers sharing its parameters (the fused module: a copy of its
    state_dict, strict), fresh torch.compile instances."""
    from fusedattn import bench, registry
    entry = registry.get("aaconv")
    ref = _reference(x, training, relative)
    fused = entry.build(entry.fused_cls(), tuple(x.shape))
    if not relative:
        fused = _without_tables(entry, fused, x)
    fused = fused.to(x.device, x.dtype)
    fused.load_state_dict(ref.state_dict(), strict=True)
    fused.train(training)
    return {"eager": ref, "compile": bench.compiled(ref),
            "sdpa_bias": with_core(ref, sdpa_bias), "sdpa_folded": with_core(ref, sdpa_folded),
            "flex": with_core(ref, flex), "fused": fused, "clone": (lambda t: t.clone())}


def attention_providers(x: torch.Tensor, training: bool = True, relative: bool = True):
    """(qkv, callables out = f(qkv) per provider) of the attention part for module inputs like
    x: qkv = the reference's (perturbed) qkv_conv(x), detached, requiring grad; the providers
    run the cores on ``ref.heads(qkv)`` with the reference's rel_h, rel_w (AttentionCore)."""
    from fusedattn import bench, reference
    from fusedattn.ops import aaconv as fused_ops
    ref = _reference(x, training, relative)
    with torch.no_grad():
        qkv = ref.qkv_conv(x.detach())
    qkv.requires_grad_()
    eager = AttentionCore(ref, reference.rel_attention)
    return qkv, {"eager": eager, "compile": bench.compiled(eager),
                 "sdpa_bias": AttentionCore(ref, sdpa_bias),
                 "sdpa_folded": AttentionCore(ref, sdpa_folded),
                 "flex": AttentionCore(ref, flex),
                 "fused": AttentionCore(ref, fused_ops.rel_attention),
                 "clone": (lambda t: t.clone())}


def case(part: str, x: torch.Tensor, e_lambda: float = 0.0, training: bool = True):
    """(input, {provider: f}, dy) of ``part`` for module inputs like x, as fusedattn.bench
    wants them: the tensor the providers take (and gradients are taken for), the callables
    y = f(input), and the incoming gradient of the backward (None: torch.randn_like(x), y
    having x's shape). e_lambda is SimAM's and unused."""
    if part == "module":
        return x, providers(x, training), None
    if part == "attention":
        qkv, fns = attention_providers(x, training)
        N, _, H, W = qkv.shape
        ref = fns["eager"].ref
        dy = torch.randn(N, ref.num_heads, ref.dvh, H * W, dtype=qkv.dtype,
                         device=qkv.device).transpose(2, 3)  # combine()'s layout of the gradient
        return qkv, fns, dy
    raise ValueError(f"bench_aaconv: unknown part {part!r}; expected one of {PARTS}")


def saved_bound(shape, dtype) -> int:
    """Bytes of q + k + v + out + one fp32 (fp64 for fp64 inputs, lse's dtype) per (query,
    head) of the module built for inputs of ``shape`` (N, C, H, W) in ``dtype``:
    N Nh L (2 dkh + 2 dvh) elem + N Nh L 4, L = H W: what the fused op may save for backward
    (issue 11's target: at most this; the relative tables, parameters, come on top)."""
    from fusedattn import registry
    entry = registry.get("aaconv")
    with torch.device("meta"):
        m = entry.build(entry.reference_cls(), tuple(shape))
    N, _, H, W = shape
    H, W = (H - 1) // m.stride + 1, (W - 1) // m.stride + 1
    elem = torch.empty((), dtype=dtype).element_size()
    rows = N * m.num_heads * H * W
    return rows * (2 * m.dkh + 2 * m.dvh) * elem + rows * (8 if dtype == torch.float64 else 4)


def _without_tables(entry, module, x):
    cls = type(module)
    return cls(module.in_channels, module.out_channels, module.kernel_size, module.dk, module.dv,
               module.num_heads, module.feat_size, relative=False, stride=module.stride)
