"""The six generic attention passes (fusedattn/spec/passes.md) in Triton: the kernels and host
launchers behind ``fusedattn::<pass>_triton``. ``fusedattn/ops/pass_reference.py`` states the
contract (same arguments, outputs, shapes, dtypes and strides); csrc/cpu/passes.cpp is the CPU op of
the same.

Element ``(n, c, p)`` of ``x`` (and of ``dy``, ``y``, ``dx``, which share x's strides) lies at
``n C P + c sC + p sP``: planar ``sC = P, sP = 1``, channels-last ``sC = 1, sP = C``. Every kernel
works on ``[BLOCK_C, BLOCK_P]`` tiles of one sample whose unit-stride axis is a compile-time 1
(``CL``), so both layouts are read in place with coalesced, vectorised rows; ``ALIGNED`` says the
row stride (P planar, C channels-last) is a multiple of 16 bytes, which the kernels tell the
compiler so that rows load as 128-bit vectors. Integer arguments are never specialised by the JIT
(``do_not_specialize``): the compiled forms are exactly those ``aot_variants()`` lists. Offsets
are 64-bit. Small tensors (``(N, C)``, ``(N, G, P)``) are contiguous in the accumulation dtype
ACC (fp32; fp64 for fp64 x); argmax indices int32; ``group`` is read as uint8 (0: group 0,
1: group 1). A 1x1 map is read as channels-last (the same bytes), so its rows are the channels.

Channel groups: without ``group`` every channel is in group 0 and the ``(n, g, p)`` maps have
``G = 1`` row per sample (``size0 = C``, ``size1 = 0``); with it ``G = 2``. Passes (g = g(c) the
row's group, s_g/d_avg_g/d_max_g/argmax_g the (n, g, p) maps, inv_g = 1 / |g|):

- ``pool_pixels(x, with_max)``: mean over p of x[n, c]; with_max also max and first argmax
                                                                         (reduce P; N C outputs)
- ``pool_channels``: sum_{c in g} a x inv_g, max over all c of [g(c)=g] a x, first argmax
                                                                         (reduce C; N G P outputs)
- ``gate``: y = s_g a x; without s, y = a x                              (elementwise)
- ``gate_grad_s``: sum_{c in g} dy a x                                     (reduce C)
- ``grad_a``: sum_p x (dy s_g + d_avg_g inv_g + [argmax_g = c] d_max_g); without the maps,
  sum_p x dy                                                               (reduce P)
- ``grad_x``: dy s_g a + a (d_avg_g inv_g + [argmax_g = c] d_max_g) + d_mean_c / P
  + [p = argmax_c] d_max_c; without the maps the first two terms are dy a, without
  d_max_c/argmax_c the last is 0                                           (elementwise)

Each optional part is a compile-time flag of the kernel (``G``, ``HAS_MAX``, ``HAS_S``,
``HAS_MAPS``, ``HAS_PIXEL_MAX``; ``FLAVOURS`` lists the combinations the launchers pick), and an
absent tensor is passed as ``None`` (a constexpr): a lighter case neither loads nor carries what
it does not use, and HAM's case (G = 2, the maps, the maxima) keeps its statements in their order,
so it compiles to the PTX it always did (triton_kernels/ham.py before; the split sums' combine
has fewer parameters).

Reductions keep a running state per tile element (lane) over a loop along the reduced axis in a
fixed order, and reduce the tile once at the end: sums in ACC; maxima as (value, index) merged
with a strict ``>`` (the earlier index wins ties) where NaN counts as the largest value (the first
NaN wins), as torch.max and the CPU op do; the final reduction of the lanes takes the lanes equal
to the max (or NaN when there is one) and the smallest index among them, which is exact.
When the tiles give fewer than ``TARGET_PROGRAMS`` programs (a small batch, or few rows to
reduce over a long axis), the reduced axis is split into ``S`` contiguous ranges of whole tiles:
program ``s`` writes its partial state to a workspace ``(S, R)`` and ``_combine_kernel`` merges
the ranges in order (sums in order, maxima with the same rule), so results stay deterministic;
with ``S = 1`` the kernel writes the final outputs directly. No atomics. The split, like the
tile, depends on the shape and dtype only, never on the GPU (its SM count): every GPU runs the
same programs and adds in the same order.

Launches go to x's device and its current stream (``on_device``).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

NUM_WARPS = 4
CONTIG_BLOCK = 64           # tile extent along the unit-stride axis, in elements
TARGET_PROGRAMS = 1024      # programs a reduction offers before it is not split (~8 per SM of an
                            # H100/H200's 132, ~9.5 of an A100's 108); a constant, not the SM
                            # count, so that the split, and with it the order of the additions,
                            # is the same on every GPU
MIN_SPLIT = 256             # elements of the reduced axis each split range covers at least
COMBINE_BLOCK = 512         # outputs per program of the split combine


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _hint(C, P, CL: tl.constexpr, ALIGNED: tl.constexpr, ptr):
    """C and P, with the row stride (C channels-last, P planar) known to be a multiple of 16 bytes
    of ptr's elements when ALIGNED (the launcher guarantees it; the rounding is then the
    identity, and tells the compiler's alignment analysis what tl.multiple_of on an argument
    does not)."""
    VEC: tl.constexpr = 128 // ptr.dtype.element_ty.primitive_bitwidth
    if ALIGNED:
        if CL:
            C = (C // VEC) * VEC
        else:
            P = (P // VEC) * VEC
    return C, P


@triton.jit
def _offsets(n, c, p, C, P, CL: tl.constexpr):
    """int64 offsets [BLOCK_C, BLOCK_P] of elements (n, c, p) of a full-size tensor."""
    base = n.to(tl.int64) * C * P
    if CL:
        return base + c[:, None] + p[None, :].to(tl.int64) * C
    else:
        return base + c[:, None].to(tl.int64) * P + p[None, :]


@triton.jit
def _take(v, i, best, idx):
    """Elementwise running max: v replaces best when larger or the first NaN (strict, so the
    earlier index keeps ties)."""
    t = (v > best) | ((v != v) & (best == best))
    return tl.where(t, v, best), tl.where(t, i, idx)


@triton.jit
def _argmax_reduce(best, idx, AXIS: tl.constexpr):
    """(max, first index) along AXIS of lanes that each hold (max, first index) of their part:
    NaN is the largest value; among the lanes equal to the max (NaN lanes when there is one), the
    smallest index. Built-in reductions only (a custom combine runs element by element in the
    interpreter)."""
    isnan = best != best
    has_nan = tl.max(isnan.to(tl.int32), AXIS) > 0
    m = tl.max(tl.where(isnan, float("-inf"), best), AXIS)
    hit = tl.where(tl.expand_dims(has_nan, AXIS), isnan, best == tl.expand_dims(m, AXIS))
    return tl.where(has_nan, float("nan"), m), tl.min(tl.where(hit, idx, 2147483647), AXIS)


@triton.jit
def _group_row(ptr, n, p, P, pmask):
    """The (n, 0, p) entries of a contiguous (N, 1, P) map (G = 1), as a [BLOCK_P] vector."""
    return tl.load(ptr + n.to(tl.int64) * P + p, mask=pmask, other=0)


@triton.jit
def _map_rows(n, P, s_ptr, d_avg_ptr, d_max_ptr, am_ptr):
    """The maps' (n, 0, :) rows (G = 1): the pointers offset once, outside the loops."""
    row = n.to(tl.int64) * P
    return s_ptr + row, d_avg_ptr + row, d_max_ptr + row, am_ptr + row


@triton.jit
def _group_pair(ptr, n, p, P, pmask):
    """The (n, 0, p) and (n, 1, p) entries of a contiguous (N, 2, P) map, as [BLOCK_P] vectors."""
    o = n.to(tl.int64) * 2 * P + p
    return tl.load(ptr + o, mask=pmask, other=0), tl.load(ptr + o + P, mask=pmask, other=0)


@triton.jit
def _gate_terms(in1, c, p, n, P, mask, pmask, s_ptr, d_avg_ptr, d_max_ptr, am_ptr, inv0, inv1,
                CL: tl.constexpr, G: tl.constexpr):
    """Per tile element, the row's group's s_g and the channel pooling's gradient w.r.t. f = a x,
    d_avg_g / max(|g|, 1) + [argmax_g == c] d_max_g (in1: the row is in group 1; None with
    G = 1, where the map pointers already point at the sample's (n, 0, :) rows, _map_rows).
    Planar tiles gather the row's group directly (a thread's pixels are contiguous: vector
    loads, and only one group's values held); channels-last tiles load the groups' [BLOCK_P]
    vectors and (G = 2) select (a thread's elements are channels of few pixels)."""
    if G == 1 and CL:
        sv = tl.load(s_ptr + p, mask=pmask, other=0.0)[None, :]
        pa = (tl.load(d_avg_ptr + p, mask=pmask, other=0.0) * inv0)[None, :]
        dm = tl.load(d_max_ptr + p, mask=pmask, other=0.0)[None, :]
        am = tl.load(am_ptr + p, mask=pmask, other=0)[None, :]
    elif G == 1:
        o = p[None, :]
        sv = tl.load(s_ptr + o, mask=mask, other=0.0)
        pa = tl.load(d_avg_ptr + o, mask=mask, other=0.0) * inv0
        dm = tl.load(d_max_ptr + o, mask=mask, other=0.0)
        am = tl.load(am_ptr + o, mask=mask, other=0)
    elif CL:
        s0, s1 = _group_pair(s_ptr, n, p, P, pmask)
        da0, da1 = _group_pair(d_avg_ptr, n, p, P, pmask)
        dm0, dm1 = _group_pair(d_max_ptr, n, p, P, pmask)
        am0, am1 = _group_pair(am_ptr, n, p, P, pmask)
        sv = tl.where(in1, s1[None, :], s0[None, :])
        pa = tl.where(in1, (da1 * inv1)[None, :], (da0 * inv0)[None, :])
        dm = tl.where(in1, dm1[None, :], dm0[None, :])
        am = tl.where(in1, am1[None, :], am0[None, :])
    else:
        o = (n.to(tl.int64) * 2 + in1.to(tl.int64)) * P + p[None, :]
        sv = tl.load(s_ptr + o, mask=mask, other=0.0)
        pa = tl.load(d_avg_ptr + o, mask=mask, other=0.0) * tl.where(in1, inv1, inv0)
        dm = tl.load(d_max_ptr + o, mask=mask, other=0.0)
        am = tl.load(am_ptr + o, mask=mask, other=0)
    return sv, pa + tl.where(am == c[:, None], dm, 0.0)


@triton.jit
def _in_group1(g_ptr, o, cmask):
    """[BLOCK_C, 1]: the channels at offsets o of the (N, C) group flags are in group 1."""
    return (tl.load(g_ptr + o, mask=cmask, other=0) != 0)[:, None]


@triton.jit
def _elementwise_tile(C, P, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, CL: tl.constexpr):
    """(n, channels, pixels, channel mask, pixel mask, tile mask, offsets) of this program's tile;
    neighbouring programs are neighbours along the unit-stride axis."""
    pid = tl.program_id(0)
    cb_n = tl.cdiv(C, BLOCK_C)
    pb_n = tl.cdiv(P, BLOCK_P)
    if CL:
        cb = pid % cb_n
        t = pid // cb_n
        pb = t % pb_n
        n = t // pb_n
    else:
        pb = pid % pb_n
        t = pid // pb_n
        cb = t % cb_n
        n = t // cb_n
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = c < C
    pmask = p < P
    return n, c, p, cmask, pmask, cmask[:, None] & pmask[None, :], _offsets(n, c, p, C, P, CL)


@triton.jit
def _split_tile(KEEP, RED, S, SPLIT, BLOCK_KEEP: tl.constexpr, BLOCK_RED: tl.constexpr):
    """Program (n, block of the kept axis, split s) of a reduction over the other axis (extent
    RED): n, s, the block's kept indices and their mask, and the split's range [lo, hi) of the
    reduced axis (SPLIT elements from s SPLIT)."""
    pid = tl.program_id(0)
    s = pid % S
    t = pid // S
    kb_n = tl.cdiv(KEEP, BLOCK_KEEP)
    n = t // kb_n
    k = (t % kb_n) * BLOCK_KEEP + tl.arange(0, BLOCK_KEEP)
    SPLIT = (SPLIT // BLOCK_RED) * BLOCK_RED  # a multiple of BLOCK_RED (identity): aligned tiles
    lo = s * SPLIT
    hi = lo + tl.minimum(SPLIT, RED - lo)  # no int32 overflow near 2^31
    return n, s, k, k < KEEP, lo, hi


@triton.jit
def _channel_step(x_ptr, dy_ptr, a_ptr, n, nc, c, p, pmask, C, P, CL: tl.constexpr,
                  ACC: tl.constexpr, GRAD: tl.constexpr):
    """One [BLOCK_C, BLOCK_P] step of a channel reduction over channels c (nc = n C): the channel
    mask, x's values and (GRAD; else x's again) dy's, in ACC, and a[n, c]."""
    cmask = c < C
    mask = cmask[:, None] & pmask[None, :]
    off = _offsets(n, c, p, C, P, CL)
    xv = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
    if GRAD:
        dv = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC)
    else:
        dv = xv
    av = tl.load(a_ptr + nc + c, mask=cmask, other=0.0)
    return cmask, xv, dv, av


@triton.jit
def _store_group(sum_ptr, max_ptr, idx_ptr, o, g_off, pmask, total, best, idx, size, final,
                 ACC: tl.constexpr):
    """A group's channel pooling at o + g_off (g_off: 0 for group 0, P for group 1): the lanes'
    sum, max and first argmax ([BLOCK_C, BLOCK_P], reduced over the channels); final (S = 1): the
    avg (sum / |g|) and zeros for an empty group, else the raw partial state."""
    m, i = _argmax_reduce(best, idx, 0)
    inv = tl.where(size > 0, 1.0 / tl.maximum(size, 1).to(ACC), 0.0)
    empty = final & (size == 0)
    sums = tl.sum(total, axis=0)
    tl.store(sum_ptr + o + g_off, tl.where(final, sums * inv, sums), mask=pmask)
    tl.store(max_ptr + o + g_off, tl.where(empty, 0.0, m), mask=pmask)
    tl.store(idx_ptr + o + g_off, tl.where(empty, 0, i), mask=pmask)


# ----------------------------------------------------------------------------- kernels

_INTS = ["C", "P", "S", "SPLIT", "R", "DIV", "size0", "size1"]


@triton.jit(do_not_specialize=_INTS)
def _pool_pixels_kernel(x_ptr, sum_ptr, max_ptr, idx_ptr, C, P, S, SPLIT, R, DIV,
                        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, CL: tl.constexpr,
                        ALIGNED: tl.constexpr, ACC: tl.constexpr, HAS_MAX: tl.constexpr):
    """Program (n, channel block, split s): sum and (HAS_MAX) max and first argmax over pixels
    [s SPLIT, min(P, (s+1) SPLIT)); writes sum / DIV (DIV = P when S = 1: the mean)."""
    C, P = _hint(C, P, CL, ALIGNED, x_ptr)
    n, s, c, cmask, p_lo, p_hi = _split_tile(C, P, S, SPLIT, BLOCK_C, BLOCK_P)
    rp = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_C, BLOCK_P], ACC)
    if HAS_MAX:
        best = tl.full([BLOCK_C, BLOCK_P], float("-inf"), ACC)
        idx = tl.zeros([BLOCK_C, BLOCK_P], tl.int32) + (p_lo + rp)[None, :]
    for p0 in range(p_lo, p_hi, BLOCK_P):  # SPLIT is a multiple of BLOCK_P
        p = p0 + rp
        mask = cmask[:, None] & (p < P)[None, :]
        v = tl.load(x_ptr + _offsets(n, c, p, C, P, CL), mask=mask, other=0.0).to(ACC)
        acc += v
        if HAS_MAX:
            best, idx = _take(tl.where(mask, v, float("-inf")), p[None, :], best, idx)
    if HAS_MAX:
        mx, am = _argmax_reduce(best, idx, 1)
    o = s.to(tl.int64) * R + n.to(tl.int64) * C + c
    tl.store(sum_ptr + o, tl.sum(acc, axis=1) / DIV.to(ACC), mask=cmask)
    if HAS_MAX:
        tl.store(max_ptr + o, mx, mask=cmask)
        tl.store(idx_ptr + o, am, mask=cmask)


@triton.jit(do_not_specialize=_INTS)
def _pool_channels_kernel(x_ptr, a_ptr, g_ptr, sum_ptr, max_ptr, idx_ptr, C, P, S, SPLIT, R,
                          size0, size1, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                          CL: tl.constexpr, ALIGNED: tl.constexpr, ACC: tl.constexpr,
                          G: tl.constexpr):
    """Program (n, pixel block, split s) over channels [s SPLIT, min(C, (s+1) SPLIT)): per group
    the sum of f = a x over its channels, and max / first argmax over all channels of f masked to
    the group (a masked-out channel counts as 0; G = 1: every channel, no group flags read). With
    S = 1 writes the final avg (sum / |g|) and zeros for an empty group; otherwise the raw partial
    state."""
    C, P = _hint(C, P, CL, ALIGNED, x_ptr)
    n, s, p, pmask, c_lo, c_hi = _split_tile(P, C, S, SPLIT, BLOCK_P, BLOCK_C)
    rc = tl.arange(0, BLOCK_C)
    sum0 = tl.zeros([BLOCK_C, BLOCK_P], ACC)
    if G == 2:
        sum1 = tl.zeros([BLOCK_C, BLOCK_P], ACC)
    best0 = tl.full([BLOCK_C, BLOCK_P], float("-inf"), ACC)
    if G == 2:
        best1 = tl.full([BLOCK_C, BLOCK_P], float("-inf"), ACC)
    idx0 = tl.zeros([BLOCK_C, BLOCK_P], tl.int32) + (c_lo + rc)[:, None]
    if G == 2:
        idx1 = idx0
    nc = n.to(tl.int64) * C
    for c0 in range(c_lo, c_hi, BLOCK_C):  # SPLIT is a multiple of BLOCK_C
        c = c0 + rc
        cmask, xv, _, av = _channel_step(x_ptr, None, a_ptr, n, nc, c, p, pmask, C, P, CL, ACC,
                                         False)
        if G == 2:
            in1 = _in_group1(g_ptr + nc, c, cmask)
        f = av[:, None] * xv
        if G == 2:
            v0 = tl.where(in1, 0.0, f)
            v1 = tl.where(in1, f, 0.0)
            sum0 += v0
            sum1 += v1
            cc = c[:, None]
            best0, idx0 = _take(tl.where(cmask[:, None], v0, float("-inf")), cc, best0, idx0)
            best1, idx1 = _take(tl.where(cmask[:, None], v1, float("-inf")), cc, best1, idx1)
        else:
            sum0 += f
            best0, idx0 = _take(tl.where(cmask[:, None], f, float("-inf")), c[:, None], best0,
                                idx0)
    final = S == 1
    o = s.to(tl.int64) * R + n.to(tl.int64) * G * P + p
    _store_group(sum_ptr, max_ptr, idx_ptr, o, 0, pmask, sum0, best0, idx0, size0, final, ACC)
    if G == 2:
        _store_group(sum_ptr, max_ptr, idx_ptr, o, P, pmask, sum1, best1, idx1, size1, final, ACC)


@triton.jit(do_not_specialize=_INTS)
def _gate_kernel(x_ptr, a_ptr, s_ptr, g_ptr, y_ptr, C, P, BLOCK_C: tl.constexpr,
                 BLOCK_P: tl.constexpr, CL: tl.constexpr, ALIGNED: tl.constexpr, ACC: tl.constexpr,
                 G: tl.constexpr, HAS_S: tl.constexpr):
    """y = s_g a x (HAS_S; else y = a x) on one tile."""
    C, P = _hint(C, P, CL, ALIGNED, x_ptr)
    n, c, p, cmask, pmask, mask, off = _elementwise_tile(C, P, BLOCK_C, BLOCK_P, CL)
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
    nc = n.to(tl.int64) * C + c
    a = tl.load(a_ptr + nc, mask=cmask, other=0.0)
    if HAS_S:
        if G == 2:
            in1 = _in_group1(g_ptr, nc, cmask)
            s0, s1 = _group_pair(s_ptr, n, p, P, pmask)
            sv = tl.where(in1, s1[None, :], s0[None, :])
        else:
            sv = _group_row(s_ptr, n, p, P, pmask)[None, :]
        tl.store(y_ptr + off, (sv * a[:, None] * x).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(y_ptr + off, (a[:, None] * x).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_INTS)
def _gate_grad_s_kernel(dy_ptr, x_ptr, a_ptr, g_ptr, sum_ptr, C, P, S, SPLIT, R,
                        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, CL: tl.constexpr,
                        ALIGNED: tl.constexpr, ACC: tl.constexpr, G: tl.constexpr):
    """Program (n, pixel block, split s): per group the sum of dy a x over its channels in
    [s SPLIT, min(C, (s+1) SPLIT)) (G = 1: over all of them)."""
    C, P = _hint(C, P, CL, ALIGNED, x_ptr)
    n, s, p, pmask, c_lo, c_hi = _split_tile(P, C, S, SPLIT, BLOCK_P, BLOCK_C)
    rc = tl.arange(0, BLOCK_C)
    sum0 = tl.zeros([BLOCK_C, BLOCK_P], ACC)
    if G == 2:
        sum1 = tl.zeros([BLOCK_C, BLOCK_P], ACC)
    nc = n.to(tl.int64) * C
    for c0 in range(c_lo, c_hi, BLOCK_C):  # SPLIT is a multiple of BLOCK_C
        c = c0 + rc
        cmask, xv, dv, av = _channel_step(x_ptr, dy_ptr, a_ptr, n, nc, c, p, pmask, C, P, CL,
                                          ACC, True)
        if G == 2:
            in1 = _in_group1(g_ptr + nc, c, cmask)
        v = dv * av[:, None] * xv
        if G == 2:
            sum0 += tl.where(in1, 0.0, v)
            sum1 += tl.where(in1, v, 0.0)
        else:
            sum0 += v
    o = s.to(tl.int64) * R + n.to(tl.int64) * G * P + p
    tl.store(sum_ptr + o, tl.sum(sum0, axis=0), mask=pmask)
    if G == 2:
        tl.store(sum_ptr + o + P, tl.sum(sum1, axis=0), mask=pmask)


@triton.jit(do_not_specialize=_INTS)
def _grad_a_kernel(x_ptr, dy_ptr, s_ptr, g_ptr, d_avg_ptr, d_max_ptr, am_ptr, sum_ptr,
                   C, P, S, SPLIT, R, size0, size1, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                   CL: tl.constexpr, ALIGNED: tl.constexpr, ACC: tl.constexpr, G: tl.constexpr,
                   HAS_MAPS: tl.constexpr):
    """Program (n, channel block, split s): sum over pixels [s SPLIT, min(P, (s+1) SPLIT)) of
    x (dy s_g + pool gradient) (HAS_MAPS; else of x dy)."""
    C, P = _hint(C, P, CL, ALIGNED, x_ptr)
    n, s, c, cmask, p_lo, p_hi = _split_tile(C, P, S, SPLIT, BLOCK_C, BLOCK_P)
    nc = n.to(tl.int64) * C + c
    if HAS_MAPS:
        if G == 2:
            in1 = _in_group1(g_ptr, nc, cmask)
        else:
            in1 = None
            s_ptr, d_avg_ptr, d_max_ptr, am_ptr = _map_rows(n, P, s_ptr, d_avg_ptr, d_max_ptr,
                                                            am_ptr)
        inv0 = 1.0 / tl.maximum(size0, 1).to(ACC)
        inv1 = 1.0 / tl.maximum(size1, 1).to(ACC)
    rp = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_C, BLOCK_P], ACC)
    for p0 in range(p_lo, p_hi, BLOCK_P):  # SPLIT is a multiple of BLOCK_P
        p = p0 + rp
        pmask = p < P
        mask = cmask[:, None] & pmask[None, :]
        off = _offsets(n, c, p, C, P, CL)
        xv = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        dv = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC)
        if HAS_MAPS:
            sv, pool = _gate_terms(in1, c, p, n, P, mask, pmask, s_ptr, d_avg_ptr, d_max_ptr,
                                   am_ptr, inv0, inv1, CL, G)
            acc += xv * (dv * sv + pool)
        else:
            acc += xv * dv
    o = s.to(tl.int64) * R + nc
    tl.store(sum_ptr + o, tl.sum(acc, axis=1), mask=cmask)


@triton.jit(do_not_specialize=_INTS)
def _grad_x_kernel(dy_ptr, a_ptr, s_ptr, g_ptr, d_avg_ptr, d_max_ptr, am_ptr, dmc_ptr, dxc_ptr,
                   amc_ptr, dx_ptr, C, P, size0, size1, BLOCK_C: tl.constexpr,
                   BLOCK_P: tl.constexpr, CL: tl.constexpr, ALIGNED: tl.constexpr,
                   ACC: tl.constexpr, G: tl.constexpr, HAS_MAPS: tl.constexpr,
                   HAS_PIXEL_MAX: tl.constexpr):
    """dx = dy s_g a + a (pool gradient) (HAS_MAPS; else dy a) + d_mean_c / P
    + [p == argmax_c] d_max_c (HAS_PIXEL_MAX) on one tile."""
    C, P = _hint(C, P, CL, ALIGNED, dy_ptr)
    n, c, p, cmask, pmask, mask, off = _elementwise_tile(C, P, BLOCK_C, BLOCK_P, CL)
    dv = tl.load(dy_ptr + off, mask=mask, other=0.0).to(ACC)
    nc = n.to(tl.int64) * C + c
    a = tl.load(a_ptr + nc, mask=cmask, other=0.0)[:, None]
    if HAS_MAPS:
        if G == 2:
            in1 = _in_group1(g_ptr, nc, cmask)
        else:
            in1 = None
            s_ptr, d_avg_ptr, d_max_ptr, am_ptr = _map_rows(n, P, s_ptr, d_avg_ptr, d_max_ptr,
                                                            am_ptr)
    if HAS_PIXEL_MAX:
        dmc = tl.load(dmc_ptr + nc, mask=cmask, other=0.0)
        dxc = tl.load(dxc_ptr + nc, mask=cmask, other=0.0)
        amc = tl.load(amc_ptr + nc, mask=cmask, other=0)
    if HAS_MAPS:
        inv0 = 1.0 / tl.maximum(size0, 1).to(ACC)
        inv1 = 1.0 / tl.maximum(size1, 1).to(ACC)
    invp = 1.0 / P.to(ACC)
    if HAS_MAPS:
        sv, pool = _gate_terms(in1, c, p, n, P, mask, pmask, s_ptr, d_avg_ptr, d_max_ptr, am_ptr,
                               inv0, inv1, CL, G)
    if not HAS_PIXEL_MAX:  # loaded where used (loaded first, ptxas spilled in one variant)
        dmc = tl.load(dmc_ptr + nc, mask=cmask, other=0.0)
    if HAS_MAPS:
        v = dv * sv * a + a * pool + (dmc * invp)[:, None]
    else:
        v = dv * a + (dmc * invp)[:, None]
    if HAS_PIXEL_MAX:
        v = tl.where(p[None, :] == amc[:, None], v + dxc[:, None], v)
    tl.store(dx_ptr + off, v.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_INTS)
def _combine_kernel(sum_ws, max_ws, idx_ws, sum_ptr, max_ptr, idx_ptr, R, S, P, size0, size1,
                    MODE: tl.constexpr, HAS_MAX: tl.constexpr, G: tl.constexpr,
                    BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Merge S partial states (S, R) in order into the outputs (R): MODE 0 sums; MODE 1 pixel
    pooling (mean = sum / P and, HAS_MAX, max and argmax); MODE 2 channel pooling (rows (n, g, p)
    of G groups: avg = sum / |g|, max and argmax of the group, zeros for an empty group)."""
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    rmask = r < R
    total = tl.load(sum_ws + r, mask=rmask, other=0.0)
    if HAS_MAX:
        best = tl.load(max_ws + r, mask=rmask, other=0.0)
        idx = tl.load(idx_ws + r, mask=rmask, other=0)
    for s in range(1, S):
        o = R.to(tl.int64) * s + r
        total += tl.load(sum_ws + o, mask=rmask, other=0.0)
        if HAS_MAX:
            best, idx = _take(tl.load(max_ws + o, mask=rmask, other=0.0),
                              tl.load(idx_ws + o, mask=rmask, other=0), best, idx)
    if MODE == 0:
        tl.store(sum_ptr + r, total, mask=rmask)
    elif MODE == 1:
        tl.store(sum_ptr + r, total / P.to(ACC), mask=rmask)
        if HAS_MAX:
            tl.store(max_ptr + r, best, mask=rmask)
            tl.store(idx_ptr + r, idx, mask=rmask)
    else:
        if G == 2:
            in1 = (r // P) % 2 == 1
            size = tl.where(in1, size1, size0)
        else:
            size = size0
        inv = tl.where(size > 0, 1.0 / tl.maximum(size, 1).to(ACC), 0.0)
        empty = size == 0
        tl.store(sum_ptr + r, total * inv, mask=rmask)
        tl.store(max_ptr + r, tl.where(empty, 0.0, best), mask=rmask)
        tl.store(idx_ptr + r, tl.where(empty, 0, idx), mask=rmask)


# ----------------------------------------------------------------------------- host side

PASSES = ("pool_pixels", "pool_channels", "gate", "gate_grad_s", "grad_a", "grad_x")
_KERNELS = {"pool_pixels": _pool_pixels_kernel, "pool_channels": _pool_channels_kernel,
            "gate": _gate_kernel, "gate_grad_s": _gate_grad_s_kernel, "grad_a": _grad_a_kernel,
            "grad_x": _grad_x_kernel}


def _flavours(**axes):
    """The product of flag values, as a tuple of dicts (in the order given)."""
    out = [{}]
    for k, vals in axes.items():
        out = [{**f, k: v} for f in out for v in vals]
    return tuple(out)


# Every combination of compile-time flags a launcher can pick, per pass. Without s (gate) or the
# maps (grad_a, grad_x) the groups play no part: those are compiled with G = 1 only.
FLAVOURS = {
    "pool_pixels": _flavours(HAS_MAX=(True, False)),
    "pool_channels": _flavours(G=(1, 2)),
    "gate": ({"G": 1, "HAS_S": True}, {"G": 2, "HAS_S": True}, {"G": 1, "HAS_S": False}),
    "gate_grad_s": _flavours(G=(1, 2)),
    "grad_a": ({"G": 1, "HAS_MAPS": True}, {"G": 2, "HAS_MAPS": True},
               {"G": 1, "HAS_MAPS": False}),
    "grad_x": tuple({**m, "HAS_PIXEL_MAX": pm}
                    for m in ({"G": 1, "HAS_MAPS": True}, {"G": 2, "HAS_MAPS": True},
                              {"G": 1, "HAS_MAPS": False})
                    for pm in (True, False)),
}


def flavour_name(flags: dict) -> str:
    """The flags' part of a kernel name: "max"/"mean" (pool_pixels), "g1"/"g2" (groups) or
    "nomaps" (no s / maps), "pmax"/"nopmax" (grad_x's pixel max), joined by "_"."""
    parts = []
    if "HAS_MAX" in flags:
        parts.append("max" if flags["HAS_MAX"] else "mean")
    if flags.get("HAS_S", True) and flags.get("HAS_MAPS", True):
        if "G" in flags:
            parts.append(f"g{flags['G']}")
    else:
        parts.append("nomaps")
    if "HAS_PIXEL_MAX" in flags:
        parts.append("pmax" if flags["HAS_PIXEL_MAX"] else "nopmax")
    return "_".join(parts)


def absent_pointers(pass_name: str, flags: dict) -> set:
    """The pointer parameters a flavour does not read: the launcher passes None (a constexpr)."""
    out = set()
    if flags.get("G", 2) == 1:
        out.add("g_ptr")
    if not flags.get("HAS_MAX", True):
        out |= {"max_ptr", "idx_ptr"}
    if not flags.get("HAS_S", True):
        out |= {"s_ptr", "g_ptr"}
    if not flags.get("HAS_MAPS", True):
        out |= {"s_ptr", "g_ptr", "d_avg_ptr", "d_max_ptr", "am_ptr"}
    if not flags.get("HAS_PIXEL_MAX", True):
        out |= {"dxc_ptr", "amc_ptr"}
    return out


@dataclass(frozen=True)
class Config:
    """One launch specialisation of a pass: tile [block_c, block_p] and warps."""
    block_c: int
    block_p: int
    num_warps: int


def per_thread(pass_name: str, flags: dict, elem_bytes: int, aligned: bool) -> int:
    """Tile elements per thread and iteration: two 16-byte vectors of each full-size tensor, or
    one for the flavours that carry many values per element (pool_channels with G = 2: six
    running values, two groups' sum, max and argmax; grad_a: the groups' s, d_avg, d_max and
    argmax at each of the thread's pixels, and without the maps the same tile, since ptxas's
    unrolling of the larger one spilled). Rows that are not 16-byte aligned load element by
    element, each with its own 64-bit address: at most 4 per thread then. So every variant stays
    within 128 registers with no spills (python -m fusedattn.aot)."""
    vec = 16 // elem_bytes
    heavy = ((pass_name == "pool_channels" and flags["G"] == 2)
             or pass_name == "grad_a")
    ept = vec if heavy else 2 * vec
    return ept if aligned else min(ept, 4)


def config(pass_name: str, flags: dict, channels_last: bool, elem_bytes: int,
           aligned: bool) -> Config:
    """The launcher's choice: NUM_WARPS warps of per_thread() elements each, CONTIG_BLOCK
    elements along the unit-stride axis (P planar, C channels-last: 128 bytes of fp16 to 512 of
    fp64 per row, whole sectors), the rest of the tile along the other axis. Shapes enter only
    through the ALIGNED flag and the split of the reduced axis (splits()), never the tile."""
    tile = 32 * NUM_WARPS * per_thread(pass_name, flags, elem_bytes, aligned)
    other = tile // CONTIG_BLOCK
    if channels_last:
        return Config(CONTIG_BLOCK, other, NUM_WARPS)
    return Config(other, CONTIG_BLOCK, NUM_WARPS)


def specializations() -> list[tuple[str, dict, bool, int, bool, Config]]:
    """Every (pass, flags, channels_last, element bytes, aligned, Config) the launchers can
    pick."""
    return [(name, flags, cl, eb, al, config(name, flags, cl, eb, al))
            for name in PASSES for flags in FLAVOURS[name]
            for cl in (False, True) for eb in (2, 4, 8) for al in (True, False)]


# split combine: (name, MODE, HAS_MAX, G)
COMBINES = (("sum", 0, False, 1), ("mean", 1, False, 1), ("mean_max", 1, True, 1),
            ("channels_g1", 2, True, 1), ("channels_g2", 2, True, 2))

_TL_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
             torch.float64: "fp64"}
_FULL_PTRS = {"x_ptr", "dy_ptr", "y_ptr", "dx_ptr"}
_INT_PTRS = {"idx_ptr", "am_ptr", "amc_ptr", "idx_ws"}


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _signature(kernel, t: str, st: str, consts: dict):
    """Signature of ``kernel`` as the launcher calls it: full-size pointers of type t, the group
    as *u8, argmax pointers *i32, other pointers of the accumulation type st, integers i32 (never
    specialised), and the constexprs (absent pointers among them, as None)."""
    sig = {}
    for k in inspect.signature(kernel.fn).parameters:  # JITFunction or InterpretedFunction
        if k in consts:
            sig[k] = "constexpr"
        elif k in _FULL_PTRS:
            sig[k] = f"*{t}"
        elif k == "g_ptr":
            sig[k] = "*u8"
        elif k in _INT_PTRS:
            sig[k] = "*i32"
        elif k.endswith("_ptr") or k.endswith("_ws"):
            sig[k] = f"*{st}"
        else:
            sig[k] = "i32"
    assert set(consts) <= set(sig), (kernel, consts)
    attrs = {(i,): [["tt.divisibility", 16]] for i, v in enumerate(sig.values()) if v.startswith("*")}
    return sig, attrs


def aot_variants():
    """(name, kernel, signature, constexprs, attrs, num_warps) of every compiled form the
    launchers can produce (``python -m fusedattn.aot``): each pass's flavour (FLAVOURS) x layout
    x each dtype of its element size x ALIGNED (the row stride a multiple of 16 bytes, or not),
    and the split combine per mode (COMBINES) and accumulation dtype. Names read
    ``<pass>_<flavour>_<dtype>_<planar|cl>_c<BLOCK_C>_p<BLOCK_P>_<aligned|any>`` and
    ``combine_<mode>_<acc dtype>``. Integer arguments are plain i32 (the kernels opt out of the
    JIT's specialisation of integers); pointers are 16-byte aligned, as torch allocates."""
    for name, flags, cl, eb, aligned, cfg in specializations():
        for dtype in (d for d in _TL_NAMES if torch.empty((), dtype=d).element_size() == eb):
            t = _TL_NAMES[dtype]
            st = "fp64" if dtype == torch.float64 else "fp32"
            consts = {"BLOCK_C": cfg.block_c, "BLOCK_P": cfg.block_p, "CL": cl,
                      "ALIGNED": aligned, "ACC": _acc(dtype), **flags,
                      **{k: None for k in absent_pointers(name, flags)}}
            kernel = _KERNELS[name]
            sig, attrs = _signature(kernel, t, st, consts)
            yield (f"{name}_{flavour_name(flags)}_{t}_{'cl' if cl else 'planar'}_c{cfg.block_c}_"
                   f"p{cfg.block_p}_{'aligned' if aligned else 'any'}", kernel, sig, consts, attrs,
                   cfg.num_warps)
    for st, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
        for mode_name, mode, has_max, groups in COMBINES:
            consts = {"MODE": mode, "HAS_MAX": has_max, "G": groups, "BLOCK": COMBINE_BLOCK,
                      "ACC": _acc(dtype)}
            if not has_max:
                consts.update(max_ws=None, idx_ws=None, max_ptr=None, idx_ptr=None)
            sig, attrs = _signature(_combine_kernel, st, st, consts)
            yield (f"combine_{mode_name}_{st}", _combine_kernel, sig, consts, attrs, NUM_WARPS)


# ----------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class _Geom:
    N: int
    C: int
    P: int
    cl: bool        # channels-last addressing (unit stride along C)
    aligned: bool   # the row stride (C if cl else P) is a multiple of 16 bytes


def _geometry(x: torch.Tensor, op: str) -> _Geom:
    """Geometry of a rank-4 tensor that is contiguous or dense channels-last, as csrc/layout.h
    reads it (a contiguous tensor first; a 1x1 map is channels-last, the same bytes)."""
    if x.dim() != 4:
        raise ValueError(f"{op}: expected (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in _TL_NAMES:
        raise TypeError(f"{op}: expected an fp16, bf16, fp32 or fp64 tensor, got {x.dtype}")
    N, C, H, W = x.shape
    P = H * W
    if x.is_contiguous():
        cl = P == 1
    elif _dense_channels_last(x):
        cl = True
    else:
        raise ValueError(f"{op}: expected a contiguous or dense channels_last tensor, got "
                         f"strides {x.stride()} for shape {tuple(x.shape)}")
    if C >= 2**31 - 1 or P >= 2**31 - 1:
        raise ValueError(f"{op}: C and H W must fit int32 argmax indices, got {tuple(x.shape)}")
    vec = 16 // x.element_size()
    return _Geom(N, C, P, cl, (C if cl else P) % vec == 0)


def _dense_channels_last(x: torch.Tensor) -> bool:
    expected = 1
    for dim in (1, 3, 2, 0):
        if x.shape[dim] != 1 and x.stride(dim) != expected:
            return False
        expected *= x.shape[dim]
    return True


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_small(t: torch.Tensor, x: torch.Tensor, shape, dtype, what: str):
    if (not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.dtype != dtype
            or not t.is_contiguous() or t.device != x.device):
        got = (f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor)
               else type(t).__name__)
        raise ValueError(f"{what}: expected a contiguous {dtype} tensor of shape {tuple(shape)} on "
                         f"{x.device}, got {got}")


def _check_like(dy: torch.Tensor, x: torch.Tensor, op: str):
    if dy.shape != x.shape or dy.stride() != x.stride() or dy.dtype != x.dtype or dy.device != x.device:
        raise ValueError(f"{op}: dy must have x's shape, strides, dtype and device")


def _groups(x: torch.Tensor, geo: _Geom, group, op: str, sizes=None) -> int:
    """The number of channel groups (1 without ``group``, 2 with it), after checking the flags
    and, where the pass takes them, the group sizes: without group size0 = C and size1 = 0; with
    it size0 + size1 = C (the counts of false / true flags per sample, which the caller
    guarantees)."""
    if group is not None:
        _check_small(group, x, (geo.N, geo.C), torch.bool, f"{op}: group")
    if sizes is not None:
        size0, size1 = sizes
        if group is None and (size0 != geo.C or size1 != 0):
            raise ValueError(f"{op}: without group, expected size0 = C = {geo.C} and size1 = 0, "
                             f"got {size0}, {size1}")
        if group is not None and (size0 < 0 or size1 < 0 or size0 + size1 != geo.C):
            raise ValueError(f"{op}: expected group sizes size0 + size1 = C = {geo.C}, got "
                             f"{size0}, {size1}")
    return 1 if group is None else 2


def _check_maps(x, geo: _Geom, ng: int, s, d_avg, d_max, argmax, op: str) -> bool:
    """The backward's (N, G, P) maps s, d_avg, d_max, argmax: all given or all None. Returns
    whether they are given."""
    given = [t is not None for t in (s, d_avg, d_max, argmax)]
    if any(given) != all(given):
        raise ValueError(f"{op}: s, d_avg, d_max and argmax must be given together or not at all")
    if not all(given):
        return False
    acc = _acc_dtype(x)
    shape = (geo.N, ng, geo.P)
    _check_small(s, x, shape, acc, f"{op}: s")
    _check_small(d_avg, x, shape, acc, f"{op}: d_avg")
    _check_small(d_max, x, shape, acc, f"{op}: d_max")
    _check_small(argmax, x, shape, torch.int32, f"{op}: argmax")
    return True


def on_device(x: torch.Tensor):
    """The context of a launch for ``x``: Triton 3 launches on torch's current CUDA device, on that
    device's current stream (``torch.cuda.current_device()``, ``torch.cuda.current_stream()``), so
    x's device is made current for the launch; the stream is then x's device's current stream,
    the one torch's own ops on x use. Nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def splits(programs: int, extent: int, block: int) -> tuple[int, int]:
    """(S, SPLIT): split a reduced axis of ``extent`` elements, tiled by ``block``, into S ranges
    of SPLIT elements (a multiple of block, none empty) when ``programs`` unsplit programs are fewer
    than TARGET_PROGRAMS; each range covers at least MIN_SPLIT elements. A function of the shape
    only: the same on every GPU."""
    tiles = triton.cdiv(extent, block)
    target = TARGET_PROGRAMS
    per_min = max(1, triton.cdiv(MIN_SPLIT, block))
    want = min(triton.cdiv(target, max(programs, 1)), tiles // per_min)
    if programs >= target or want <= 1:
        return 1, tiles * block
    per = triton.cdiv(tiles, want)
    return triton.cdiv(tiles, per), per * block


def _launch_args(geo: _Geom, x: torch.Tensor, name: str, flags: dict):
    cfg = config(name, flags, geo.cl, x.element_size(), geo.aligned)
    return cfg, dict(BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p, CL=geo.cl, ALIGNED=geo.aligned,
                     ACC=_acc(x.dtype), num_warps=cfg.num_warps, **flags)


def _reduction_launch(geo: _Geom, x: torch.Tensor, name: str, flags: dict, over_pixels: bool):
    """(grid, S, SPLIT, kwargs) of a reduction pass: over the pixels, a program per (n, channel
    block, split); over the channels, per (n, pixel block, split)."""
    cfg, kw = _launch_args(geo, x, name, flags)
    if over_pixels:
        programs = geo.N * triton.cdiv(geo.C, cfg.block_c)
        S, split = splits(programs, geo.P, cfg.block_p)
    else:
        programs = geo.N * triton.cdiv(geo.P, cfg.block_p)
        S, split = splits(programs, geo.C, cfg.block_c)
    return (programs * S,), S, split, kw


def _elementwise_launch(geo: _Geom, x: torch.Tensor, name: str, flags: dict):
    """(grid, kwargs) of an elementwise pass: a program per tile."""
    cfg, kw = _launch_args(geo, x, name, flags)
    return (geo.N * triton.cdiv(geo.C, cfg.block_c) * triton.cdiv(geo.P, cfg.block_p),), kw


def _partials(S: int, *outs: torch.Tensor):
    """Where a reduction's kernel writes: the outputs themselves when S == 1, else a workspace
    (S, *shape) of the same dtype per output, for _combine."""
    if S == 1:
        return outs
    return tuple(torch.empty((S, *o.shape), dtype=o.dtype, device=o.device) for o in outs)


def _new(x: torch.Tensor):
    """Allocator of the small outputs: zeros for an empty x (nothing launches), else uninitialised
    (the kernels write every element; no memset launch)."""
    fill = torch.zeros if x.numel() == 0 else torch.empty
    return lambda shape, dtype: fill(shape, dtype=dtype, device=x.device)


def _combine(mode: int, ws_sum, ws_max, ws_idx, out_sum, out_max, out_idx, S, P=1, size0=0,
             size1=0, has_max=True, groups=1):
    """Merge the S partial states: ws_max/ws_idx/out_max/out_idx are None without maxima."""
    R = out_sum.numel()
    _combine_kernel[(triton.cdiv(R, COMBINE_BLOCK),)](
        ws_sum, ws_max, ws_idx, out_sum, out_max, out_idx, R, S, P, size0, size1, MODE=mode,
        HAS_MAX=has_max, G=groups, BLOCK=COMBINE_BLOCK, ACC=_acc(out_sum.dtype),
        num_warps=NUM_WARPS)


def _u8(group):
    return None if group is None else group.view(torch.uint8)


def pool_pixels(x: torch.Tensor, with_max: bool):
    """(mean, max, argmax) over the H W pixels of every (n, c): (N, C) in the accumulation dtype,
    argmax int32 (first index; NaN is the largest value). Without with_max only the mean is
    computed; max and argmax are empty (0,) tensors."""
    geo = _geometry(x, "pool_pixels")
    acc = _acc_dtype(x)
    new = _new(x)
    shape = (geo.N, geo.C)
    with_max = bool(with_max)
    mean = new(shape, acc)
    if with_max:
        mx, arg = new(shape, acc), new(shape, torch.int32)
    else:
        mx = torch.empty(0, dtype=acc, device=x.device)
        arg = torch.empty(0, dtype=torch.int32, device=x.device)
    if x.numel() == 0:
        return mean, mx, arg
    flags = {"HAS_MAX": with_max}
    grid, S, split, kw = _reduction_launch(geo, x, "pool_pixels", flags, over_pixels=True)
    if with_max:
        outs = _partials(S, mean, mx, arg)
    else:
        outs = (*_partials(S, mean), None, None)
    with on_device(x):
        _pool_pixels_kernel[grid](x, *outs, geo.C, geo.P, S, split, geo.N * geo.C,
                                  geo.P if S == 1 else 1, **kw)
        if S > 1:
            _combine(1, *outs, mean, mx if with_max else None, arg if with_max else None, S,
                     P=geo.P, has_max=with_max)
    return mean, mx, arg


def pool_channels(x: torch.Tensor, a: torch.Tensor, group: torch.Tensor | None, size0: int,
                  size1: int):
    """(avg, max, argmax), each (N, G, P) (G = 1 without group, 2 with it): per group g, the
    mean over its channels of a x, and the max over all channels of a x masked to g (a
    masked-out channel counts as 0) with its first channel index; an empty group gives zeros."""
    op = "pool_channels"
    geo = _geometry(x, op)
    acc = _acc_dtype(x)
    _check_small(a, x, (geo.N, geo.C), acc, f"{op}: a")
    size0, size1 = int(size0), int(size1)
    ng = _groups(x, geo, group, op, (size0, size1))
    new = _new(x)
    shape = (geo.N, ng, geo.P)
    avg, mx, arg = new(shape, acc), new(shape, acc), new(shape, torch.int32)
    if x.numel() == 0:
        return avg, mx, arg
    grid, S, split, kw = _reduction_launch(geo, x, op, {"G": ng}, over_pixels=False)
    outs = _partials(S, avg, mx, arg)
    with on_device(x):
        _pool_channels_kernel[grid](x, a, _u8(group), *outs, geo.C, geo.P, S, split,
                                    geo.N * ng * geo.P, size0, size1, **kw)
        if S > 1:
            _combine(2, *outs, avg, mx, arg, S, P=geo.P, size0=size0, size1=size1, groups=ng)
    return avg, mx, arg


def gate(x: torch.Tensor, a: torch.Tensor, s: torch.Tensor | None,
         group: torch.Tensor | None) -> torch.Tensor:
    """y = s[n, g(c), p] a[n, c] x (without s: y = a x), in x's dtype and strides."""
    op = "gate"
    geo = _geometry(x, op)
    acc = _acc_dtype(x)
    _check_small(a, x, (geo.N, geo.C), acc, f"{op}: a")
    ng = _groups(x, geo, group, op)
    if s is not None:
        _check_small(s, x, (geo.N, ng, geo.P), acc, f"{op}: s")
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    has_s = s is not None
    flags = {"G": ng if has_s else 1, "HAS_S": has_s}
    grid, kw = _elementwise_launch(geo, x, op, flags)
    with on_device(x):
        _gate_kernel[grid](x, a, s, _u8(group) if has_s else None, y, geo.C, geo.P, **kw)
    return y


def gate_grad_s(dy: torch.Tensor, x: torch.Tensor, a: torch.Tensor,
                group: torch.Tensor | None) -> torch.Tensor:
    """ds[n, g, p] = sum over the channels c of group g of dy a x: (N, G, P), accumulation
    dtype."""
    op = "gate_grad_s"
    geo = _geometry(x, op)
    _check_like(dy, x, op)
    acc = _acc_dtype(x)
    _check_small(a, x, (geo.N, geo.C), acc, f"{op}: a")
    ng = _groups(x, geo, group, op)
    ds = _new(x)((geo.N, ng, geo.P), acc)
    if x.numel() == 0:
        return ds
    grid, S, split, kw = _reduction_launch(geo, x, op, {"G": ng}, over_pixels=False)
    out, = _partials(S, ds)
    with on_device(x):
        _gate_grad_s_kernel[grid](dy, x, a, _u8(group), out, geo.C, geo.P, S, split,
                                  geo.N * ng * geo.P, **kw)
        if S > 1:
            _combine(0, out, None, None, ds, None, None, S, has_max=False)
    return ds


def grad_a(x: torch.Tensor, dy: torch.Tensor, s: torch.Tensor | None, group: torch.Tensor | None,
           d_avg: torch.Tensor | None, d_max: torch.Tensor | None, argmax: torch.Tensor | None,
           size0: int, size1: int) -> torch.Tensor:
    """da[n, c] = sum over pixels of x (dy s_g + d_avg_g / |g| + [argmax_g == c] d_max_g),
    g = g(c); without the maps (s, d_avg, d_max, argmax all None) sum over pixels of x dy:
    (N, C), accumulation dtype."""
    op = "grad_a"
    geo = _geometry(x, op)
    _check_like(dy, x, op)
    acc = _acc_dtype(x)
    size0, size1 = int(size0), int(size1)
    ng = _groups(x, geo, group, op, (size0, size1))
    maps = _check_maps(x, geo, ng, s, d_avg, d_max, argmax, op)
    da = _new(x)((geo.N, geo.C), acc)
    if x.numel() == 0:
        return da
    flags = {"G": ng if maps else 1, "HAS_MAPS": maps}
    grid, S, split, kw = _reduction_launch(geo, x, op, flags, over_pixels=True)
    out, = _partials(S, da)
    with on_device(x):
        _grad_a_kernel[grid](x, dy, s, _u8(group) if maps else None, d_avg, d_max, argmax, out,
                             geo.C, geo.P, S, split, geo.N * geo.C, size0, size1, **kw)
        if S > 1:
            _combine(0, out, None, None, da, None, None, S, has_max=False)
    return da


def grad_x(dy: torch.Tensor, a: torch.Tensor, s: torch.Tensor | None, group: torch.Tensor | None,
           d_avg: torch.Tensor | None, d_max: torch.Tensor | None, argmax: torch.Tensor | None,
           size0: int, size1: int, d_mean_c: torch.Tensor, d_max_c: torch.Tensor | None,
           argmax_c: torch.Tensor | None) -> torch.Tensor:
    """dx = dy s_g a + a (d_avg_g / |g| + [argmax_g == c] d_max_g) + d_mean_c / P
    + [p == argmax_c] d_max_c, in dy's dtype and strides; without the maps (s, d_avg, d_max,
    argmax all None) the first two terms are dy a, without d_max_c and argmax_c (both None) the
    last is 0."""
    op = "grad_x"
    geo = _geometry(dy, op)
    acc = _acc_dtype(dy)
    _check_small(a, dy, (geo.N, geo.C), acc, f"{op}: a")
    size0, size1 = int(size0), int(size1)
    ng = _groups(dy, geo, group, op, (size0, size1))
    maps = _check_maps(dy, geo, ng, s, d_avg, d_max, argmax, op)
    _check_small(d_mean_c, dy, (geo.N, geo.C), acc, f"{op}: d_mean_c")
    if (d_max_c is None) != (argmax_c is None):
        raise ValueError(f"{op}: d_max_c and argmax_c must be given together or not at all")
    pixel_max = d_max_c is not None
    if pixel_max:
        _check_small(d_max_c, dy, (geo.N, geo.C), acc, f"{op}: d_max_c")
        _check_small(argmax_c, dy, (geo.N, geo.C), torch.int32, f"{op}: argmax_c")
    dx = torch.empty_like(dy)
    if dy.numel() == 0:
        return dx
    flags = {"G": ng if maps else 1, "HAS_MAPS": maps, "HAS_PIXEL_MAX": pixel_max}
    grid, kw = _elementwise_launch(geo, dy, op, flags)
    with on_device(dy):
        _grad_x_kernel[grid](dy, a, s, _u8(group) if maps else None, d_avg, d_max, argmax,
                             d_mean_c, d_max_c, argmax_c, dx, geo.C, geo.P, size0, size1, **kw)
    return dx
