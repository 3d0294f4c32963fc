"""Affine sampling of the spatial transformer in Triton: the kernels and host launchers behind
``fusedattn::affine_sample_triton`` / ``affine_sample_backward_triton`` (fusedattn/ops/stn.py
states the contract: math, arguments, layouts, results; csrc/stn_math.h the same math in C++).

No grid tensor: every kernel computes the sampling coordinates of the pixels it touches from
theta in the contract's form, ix = (Ax u + Bx v) + Cx, iy = (Ay u + By v) + Cy with
u = j - (Wo-1)/2, v = i - (Ho-1)/2 (``_load_map``, ``_coords``: one arithmetic, shared by all
kernels; exact for the identity, flips and quarter turns), in fp32 (fp64 for fp64 x); corner
values are loaded in x's dtype and upcast, sums run in fp32 (fp64).

Tiles are ``[BLOCK_C, BLOCK_P]`` (channels x flattened pixels m = row * width + column). Planar
(contiguous) tensors: element (n, c, m) at ``(n C + c) HW + m``, the pixels are the unit-stride
axis (consecutive pixels of the output / input rows, coalesced), a few channels per thread.
Channels-last: at ``(n HW + m) C + c``, the channels are the unit-stride axis (up to 128 bytes of
channels per pixel, a vector along C). Indices are int32 (the contract bounds every tensor by
2^31 elements).

Kernels:

- ``_fwd_kernel``, a program per (n, BLOCK_P output pixels): the pixels' coordinates, corners and
  weights once, then a loop over the channels in blocks of BLOCK_C: four masked corner loads,
  y = ((nw + ne) + sw) + se.
- ``_dtheta_kernel``, a program per (n, BLOCK_P output pixels): per pixel
  gix = sx sum_c dy ((v_ne - v_nw)(1 - ty) + (v_se - v_sw) ty) and giy alike (channel blocks in
  order), then the tile's six partial sums of [gix; giy] (xb, yb, 1) into a workspace
  ws (N, tiles, 6); ``_dtheta_sum_kernel`` (a program per sample) adds the tiles in a fixed
  order (blocks of SUM_BLOCK tiles in order, a tree sum inside each block). No atomics.
- ``_dx_kernel``, a program per (n, BLOCK_P input pixels, BLOCK_C channels): the gather of
  ``stn_math.h``. Per program the window scalars of the sample (``make_window``: the affine map
  (j, i) -> (Ax j + Bx i + wCx, Ay j + By i + wCy), the slack delta, i_half); per lane (input
  pixel (p, q)) the output rows that may read it (``rows``: around the preimage centre, all rows
  when i_half < 0, i.e. a singular or huge preimage), and per row its columns (``cols``: the two
  slabs widened by delta). The loops run to the tile's maxima (``tl.max`` of the per-lane
  counts: rows, then per row the columns) with per-lane masks, lane l visiting candidate
  (i_lo(l) + k, j_lo(l, i) + m): every lane visits its candidates row-major, the order of the
  C++ kernels. Each candidate is decided by ``_weight_at`` with the forward's arithmetic (floor,
  the -2 "no corner" rule, NaN safe); dy is gathered for the channel block and dx += w dy. No
  atomics.

Every shape choice depends on the shape and dtype only (``config``), and nothing is atomic:
results are bitwise repeatable. Divisions are IEEE-rounded (``tl.div_rn`` in fp32: Triton's
``/`` is approximate there). Pointers are not specialised on alignment and integers not at all
(``do_not_specialize``), so the compiled forms are exactly those ``aot_variants()`` lists.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..ops import layout
from . import aot_signature
from .simam import on_device

# ----------------------------------------------------------------------------- device helpers

_INTS = ["C", "H", "W", "Ho", "Wo", "align", "TILES", "CBLOCKS", "T"]
_PTRS = ["x_ptr", "y_ptr", "dy_ptr", "dx_ptr", "th_ptr", "ws_ptr", "out_ptr"]


@triton.jit
def _div(a, b, ACC: tl.constexpr):
    """a / b rounded to nearest (Triton's fp32 ``/`` is an approximate division)."""
    if ACC == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _ratio(a, b, ACC: tl.constexpr):
    """a / b, or 0 for b = 0 (stn_math.h ratio: a size-1 output with align_corners)."""
    nz = b != 0.0
    return tl.where(nz, _div(a, tl.where(nz, b, 1.0), ACC), 0.0)


@triton.jit
def _load_map(th_ptr, n, H, W, Ho, Wo, align, ACC: tl.constexpr):
    """The sample's Map (stn_math.h make_map), scalars in ACC: ix = (Ax u + Bx v) + Cx,
    iy = (Ay u + By v) + Cy with u = j - u0, v = i - v0; the base grid's steps bsx, bsy and
    the unnormalisation's sx, sy (for dtheta)."""
    t = th_ptr + n * 6
    t00 = tl.load(t).to(ACC)
    t01 = tl.load(t + 1).to(ACC)
    t02 = tl.load(t + 2).to(ACC)
    t10 = tl.load(t + 3).to(ACC)
    t11 = tl.load(t + 4).to(ACC)
    t12 = tl.load(t + 5).to(ACC)
    a = tl.where(align != 0, 1.0, 0.0).to(ACC)   # sizes count pixels (0) or pixel gaps (1)
    w = W.to(ACC) - a
    h = H.to(ACC) - a
    wo = Wo.to(ACC) - a
    ho = Ho.to(ACC) - a
    sx = w * 0.5
    sy = h * 0.5
    bsx = _ratio(2.0, wo, ACC)
    bsy = _ratio(2.0, ho, ACC)
    Ax = t00 * _ratio(w, wo, ACC)
    Bx = t01 * _ratio(w, ho, ACC)
    Ay = t10 * _ratio(h, wo, ACC)
    By = t11 * _ratio(h, ho, ACC)
    Cx = t02 * sx + (W - 1).to(ACC) * 0.5
    Cy = t12 * sy + (H - 1).to(ACC) * 0.5
    u0 = (Wo - 1).to(ACC) * 0.5
    v0 = (Ho - 1).to(ACC) * 0.5
    return Ax, Bx, Cx, Ay, By, Cy, u0, v0, bsx, bsy, sx, sy


@triton.jit
def _base(i, j, u0, v0, bsx, bsy, ACC: tl.constexpr):
    """affine_grid's base point (xb, yb) of output pixel (i, j) (stn_math.h base_x, base_y)."""
    return (j.to(ACC) - u0) * bsx, (i.to(ACC) - v0) * bsy


@triton.jit
def _coords(i, j, Ax, Bx, Cx, Ay, By, Cy, u0, v0, ACC: tl.constexpr):
    """The input point (ix, iy) that output pixel (i, j) reads (stn_math.h coords): the one
    formula of every kernel, evaluated in the contract's order."""
    u = j.to(ACC) - u0
    v = i.to(ACC) - v0
    return (Ax * u + Bx * v) + Cx, (Ay * u + By * v) + Cy


@triton.jit
def _corner(c, n):
    """(floor(c) as int32, c - floor(c)); -2 (no corner) when the floor is not in [-1, n-1],
    NaN and inf included (stn_math.h corner)."""
    f = tl.floor(c)
    t = c - f
    ok = (f >= -1.0) & (f <= (n - 1).to(f.dtype))
    return tl.where(ok, f, -2.0).to(tl.int32), t


@triton.jit
def _weight_at(i, j, p, q, H, W, Ax, Bx, Cx, Ay, By, Cy, u0, v0, ACC: tl.constexpr):
    """(w, ok): the weight with which output pixel (i, j) reads input pixel (p, q), and whether
    it does (stn_math.h weight_at); w is 0 where not."""
    ix, iy = _coords(i, j, Ax, Bx, Cx, Ay, By, Cy, u0, v0, ACC)
    x0, tx = _corner(ix, W)
    y0, ty = _corner(iy, H)
    ok = ((x0 == q) | (x0 + 1 == q)) & ((y0 == p) | (y0 + 1 == p)) & (x0 != -2) & (y0 != -2)
    w = tl.where(x0 == q, 1.0 - tx, tx) * tl.where(y0 == p, 1.0 - ty, ty)
    return tl.where(ok, w, 0.0), ok


@triton.jit
def _int_range(lo, hi, n):
    """(ok, a, b): [lo, hi] clamped to [0, n-1] and rounded inwards; ok False when empty or NaN
    (stn_math.h int_range). a, b int32 (0, -1 when empty)."""
    lo = tl.ceil(lo)
    hi = tl.floor(hi)
    lo = tl.where(lo > 0.0, lo, 0.0)
    top = (n - 1).to(hi.dtype)
    hi = tl.where(hi < top, hi, top)
    ok = lo <= hi
    return ok, tl.where(ok, lo, 0.0).to(tl.int32), tl.where(ok, hi, -1.0).to(tl.int32)


@triton.jit
def _slab(a, r, c, delta, lo, hi, ACC: tl.constexpr):
    """(ok, lo, hi): columns j with |a j + r - c| <= 1 + delta intersected into [lo, hi]
    (stn_math.h slab; a NaN a leaves [lo, hi] as it is)."""
    d = 1.0 + delta
    a = tl.zeros_like(r) + a  # per lane (the interpreter cannot mix scalar and vector masks)
    nz = a != 0.0
    a_s = tl.where(nz, a, 1.0)
    u = _div(c - d - r, a_s, ACC)
    v = _div(c + d - r, a_s, ACC)
    swap = u > v
    u2 = tl.where(swap, v, u)
    v2 = tl.where(swap, u, v)
    lo = tl.where(nz & (u2 > lo), u2, lo)
    hi = tl.where(nz & (v2 < hi), v2, hi)
    ok = nz | (tl.abs(r - c) <= d)
    return ok, lo, hi


@triton.jit
def _sample(ix, iy, pm, C, H, W, CL: tl.constexpr):
    """The bilinear sample at (ix, iy) for pixels with mask pm (stn_math.h sample_at): the four
    corners' masks (inside the image), the fractions (0 where no corner is inside: far outside,
    inf, NaN -- nothing then reaches dtheta), the nw corner's offset within one channel of x and
    the steps from it to the ne and sw corners (x0 or y0 may be -1)."""
    x0, tx = _corner(ix, W)
    y0, ty = _corner(iy, H)
    x0in = x0 >= 0
    x1in = (x0 != -2) & (x0 + 1 <= W - 1)
    y0in = y0 >= 0
    y1in = (y0 != -2) & (y0 + 1 <= H - 1)
    m_nw = pm & x0in & y0in
    m_ne = pm & x1in & y0in
    m_sw = pm & x0in & y1in
    m_se = pm & x1in & y1in
    anyc = m_nw | m_ne | m_sw | m_se
    tx = tl.where(anyc, tx, 0.0)
    ty = tl.where(anyc, ty, 0.0)
    o_nw = y0 * W + x0
    if CL:
        return m_nw, m_ne, m_sw, m_se, tx, ty, o_nw * C, C, W * C
    else:
        return m_nw, m_ne, m_sw, m_se, tx, ty, o_nw, 1, W


@triton.jit
def _channel_steps(m, C, HW, HWo, CL: tl.constexpr):
    """(channel step in x, channel step in y / dy, pixel offsets in y / dy) of output pixels m."""
    if CL:
        return 1, 1, m * C
    else:
        return HW, HWo, m


# ----------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=_PTRS)
def _fwd_kernel(x_ptr, th_ptr, y_ptr, C, H, W, Ho, Wo, align, TILES,
                CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                ACC: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // TILES
    HW = H * W
    HWo = Ho * Wo
    m = (pid % TILES) * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = m < HWo
    i = m // Wo
    j = m % Wo
    Ax, Bx, Cx, Ay, By, Cy, u0, v0, bsx, bsy, sx, sy = _load_map(
        th_ptr, n, H, W, Ho, Wo, align, ACC)
    ix, iy = _coords(i, j, Ax, Bx, Cx, Ay, By, Cy, u0, v0, ACC)
    m_nw, m_ne, m_sw, m_se, tx, ty, o_nw, dxs, dys = _sample(ix, iy, pm, C, H, W, CL)
    cs_x, cs_y, ys = _channel_steps(m, C, HW, HWo, CL)
    w_nw = tl.where(m_nw, (1.0 - tx) * (1.0 - ty), 0.0)
    w_ne = tl.where(m_ne, tx * (1.0 - ty), 0.0)
    w_sw = tl.where(m_sw, (1.0 - tx) * ty, 0.0)
    w_se = tl.where(m_se, tx * ty, 0.0)
    xb_ptr = x_ptr + n * C * HW
    yb_ptr = y_ptr + n * C * HWo
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = (c < C)[:, None]
        xc = xb_ptr + (c * cs_x)[:, None] + o_nw[None, :]
        v_nw = tl.load(xc, mask=cm & m_nw[None, :], other=0.0).to(ACC)
        v_ne = tl.load(xc + dxs, mask=cm & m_ne[None, :], other=0.0).to(ACC)
        v_sw = tl.load(xc + dys, mask=cm & m_sw[None, :], other=0.0).to(ACC)
        v_se = tl.load(xc + dys + dxs, mask=cm & m_se[None, :], other=0.0).to(ACC)
        y = (v_nw * w_nw[None, :] + v_ne * w_ne[None, :]) + v_sw * w_sw[None, :] \
            + v_se * w_se[None, :]
        tl.store(yb_ptr + (c * cs_y)[:, None] + ys[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=cm & pm[None, :])


@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=_PTRS)
def _dtheta_kernel(dy_ptr, x_ptr, th_ptr, ws_ptr, C, H, W, Ho, Wo, align, TILES,
                   CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                   ACC: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // TILES
    tile = pid % TILES
    HW = H * W
    HWo = Ho * Wo
    m = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = m < HWo
    i = m // Wo
    j = m % Wo
    Ax, Bx, Cx, Ay, By, Cy, u0, v0, bsx, bsy, sx, sy = _load_map(
        th_ptr, n, H, W, Ho, Wo, align, ACC)
    ix, iy = _coords(i, j, Ax, Bx, Cx, Ay, By, Cy, u0, v0, ACC)
    m_nw, m_ne, m_sw, m_se, tx, ty, o_nw, dxs, dys = _sample(ix, iy, pm, C, H, W, CL)
    cs_x, cs_y, ys = _channel_steps(m, C, HW, HWo, CL)
    xb_ptr = x_ptr + n * C * HW
    gb_ptr = dy_ptr + n * C * HWo
    gx = tl.zeros([BLOCK_P], ACC)
    gy = tl.zeros([BLOCK_P], ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = (c < C)[:, None]
        xc = xb_ptr + (c * cs_x)[:, None] + o_nw[None, :]
        v_nw = tl.load(xc, mask=cm & m_nw[None, :], other=0.0).to(ACC)
        v_ne = tl.load(xc + dxs, mask=cm & m_ne[None, :], other=0.0).to(ACC)
        v_sw = tl.load(xc + dys, mask=cm & m_sw[None, :], other=0.0).to(ACC)
        v_se = tl.load(xc + dys + dxs, mask=cm & m_se[None, :], other=0.0).to(ACC)
        g = tl.load(gb_ptr + (c * cs_y)[:, None] + ys[None, :], mask=cm & pm[None, :],
                    other=0.0).to(ACC)
        gx += tl.sum(g * ((v_ne - v_nw) * (1.0 - ty)[None, :]
                          + (v_se - v_sw) * ty[None, :]), axis=0)
        gy += tl.sum(g * ((v_sw - v_nw) * (1.0 - tx)[None, :]
                          + (v_se - v_ne) * tx[None, :]), axis=0)
    gx = tl.where(pm, gx * sx, 0.0)
    gy = tl.where(pm, gy * sy, 0.0)
    xb, yb = _base(i, j, u0, v0, bsx, bsy, ACC)
    w = ws_ptr + (n * TILES + tile) * 6
    tl.store(w, tl.sum(gx * xb, axis=0))
    tl.store(w + 1, tl.sum(gx * yb, axis=0))
    tl.store(w + 2, tl.sum(gx, axis=0))
    tl.store(w + 3, tl.sum(gy * xb, axis=0))
    tl.store(w + 4, tl.sum(gy * yb, axis=0))
    tl.store(w + 5, tl.sum(gy, axis=0))


@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=_PTRS)
def _dtheta_sum_kernel(ws_ptr, out_ptr, T, BLOCK_T: tl.constexpr, ACC: tl.constexpr):
    """out[n, k] = sum over the tiles t of ws[n, t, k]: blocks of BLOCK_T tiles in order, a
    fixed tree sum inside each."""
    n = tl.program_id(0)
    r = tl.arange(0, BLOCK_T)
    k = tl.arange(0, 8)
    km = (k < 6)[None, :]
    acc = tl.zeros([8], ACC)
    base = ws_ptr + n * T * 6
    for t0 in range(0, T, BLOCK_T):
        t = t0 + r
        v = tl.load(base + t[:, None] * 6 + k[None, :], mask=(t < T)[:, None] & km, other=0.0)
        acc += tl.sum(v.to(ACC), axis=0)
    tl.store(out_ptr + n * 6 + k, acc.to(out_ptr.dtype.element_ty), mask=k < 6)


@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=_PTRS)
def _dx_kernel(dy_ptr, th_ptr, dx_ptr, C, H, W, Ho, Wo, align, TILES, CBLOCKS,
               CL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
               ACC: tl.constexpr):
    pid = tl.program_id(0)
    cb = pid % CBLOCKS
    rest = pid // CBLOCKS
    n = rest // TILES
    HW = H * W
    HWo = Ho * Wo
    m = (rest % TILES) * BLOCK_P + tl.arange(0, BLOCK_P)
    lm = m < HW
    p = m // W
    q = m % W
    pf = p.to(ACC)
    qf = q.to(ACC)
    Ax, Bx, Cx, Ay, By, Cy, u0, v0, bsx, bsy, sx, sy = _load_map(
        th_ptr, n, H, W, Ho, Wo, align, ACC)
    # the window (stn_math.h make_window): ix = Ax j + Bx i + wCx, iy = Ay j + By i + wCy
    wCx = Cx - Ax * u0 - Bx * v0
    wCy = Cy - Ay * u0 - By * v0
    if ACC == tl.float64:
        eps = 2.220446049250313e-16
    else:
        eps = 1.1920928955078125e-07
    fWo = Wo.to(ACC)
    fHo = Ho.to(ACC)
    mag = ((tl.abs(Ax) + tl.abs(Ay)) * fWo + (tl.abs(Bx) + tl.abs(By)) * fHo + tl.abs(Cx)
           + tl.abs(Cy) + 1.0)
    delta = 0.00390625 + 16.0 * eps * mag
    det = Ax * By - Bx * Ay
    nz = det != 0.0
    det_s = tl.where(nz, det, 1.0)
    h = _div((tl.abs(Ax) + tl.abs(Ay)) * (1.0 + delta), tl.abs(det_s), ACC)
    i_half = tl.where(nz & (h < fHo), h, -1.0)
    all_rows = (tl.zeros([BLOCK_P], ACC) + i_half) < 0.0  # per lane (the same for all)
    # rows that may read each lane's pixel (stn_math.h rows)
    ic = _div(Ax * (pf - wCy) - Ay * (qf - wCx), det_s, ACC)
    r_ok, i_lo, i_hi = _int_range(ic - i_half, ic + i_half, Ho)
    i_lo = tl.where(all_rows, 0, i_lo)
    i_hi = tl.where(all_rows, Ho - 1, i_hi)
    r_ok = lm & (all_rows | r_ok)
    rows = tl.max(tl.where(r_ok, i_hi - i_lo + 1, 0), axis=0)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = (c < C)[:, None]
    # int32 offsets (not 64-bit pointers) live across the loops
    if CL:
        g_off = n * C * HWo + c
        ps = C
    else:
        g_off = (n * C + c) * HWo
        ps = 1
    acc = tl.zeros([BLOCK_C, BLOCK_P], ACC)
    for k in range(0, rows):
        i = i_lo + k
        rm = r_ok & (i <= i_hi)
        fi = i.to(ACC)
        # the row's columns (stn_math.h cols)
        lo = tl.zeros([BLOCK_P], ACC)
        hi = tl.zeros([BLOCK_P], ACC) + (Wo - 1).to(ACC)
        okx, lo, hi = _slab(Ax, Bx * fi + wCx, qf, delta, lo, hi, ACC)
        oky, lo, hi = _slab(Ay, By * fi + wCy, pf, delta, lo, hi, ACC)
        okc, j_lo, j_hi = _int_range(lo, hi, Wo)
        cok = rm & okx & oky & okc
        cols = tl.max(tl.where(cok, j_hi - j_lo + 1, 0), axis=0)
        for mm in range(0, cols):
            j = j_lo + mm
            w, ok = _weight_at(i, j, p, q, H, W, Ax, Bx, Cx, Ay, By, Cy, u0, v0, ACC)
            ok = ok & cok & (j <= j_hi)
            o = tl.where(ok, i * Wo + j, 0) * ps
            g = tl.load(dy_ptr + (g_off[:, None] + o[None, :]), mask=cm & ok[None, :],
                        other=0.0).to(ACC)
            acc += g * tl.where(ok, w, 0.0)[None, :]
    if CL:
        d_off = n * C * HW + c[:, None] + (m * C)[None, :]
    else:
        d_off = ((n * C + c) * HW)[:, None] + m[None, :]
    tl.store(dx_ptr + d_off, acc.to(dx_ptr.dtype.element_ty), mask=cm & lm[None, :])


# ----------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Config:
    """One launch specialisation: channels per tile, pixels per tile, warps."""
    block_c: int
    block_p: int
    num_warps: int


KERNELS = ("fwd", "dtheta", "dx")
TILE = 512          # elements of a [BLOCK_C, BLOCK_P] tile: 4 per thread of 4 warps
DX_TILE_FP64 = 256  # dx in fp64: half the tile (a pixel lane's window state is twice as large)
WARPS = 4           # fwd and dtheta: 4 tile elements per thread
DX_WARPS = 8        # dx with one channel per pixel lane (planar c1) or channels-last: 2 tile
                    # elements per thread (a thread's pixel lanes each hold their window state)
CL_BYTES = 128      # channels-last: at most this many bytes of channels per pixel in a tile
SUM_BLOCK = 256     # tiles per step of the dtheta sum
SUM_WARPS = 4

_TL_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
             torch.float64: "fp64"}


def block_c(C: int, channels_last: bool, elem_bytes: int) -> int:
    """Channels per tile. Planar: 1 for one channel, else 4 (registers of a thread, same pixel
    offset). Channels-last: 4 up to 4 channels, 16 up to 16, else CL_BYTES of them (the
    unit-stride axis: a thread group reads a pixel's channels as one segment)."""
    if not channels_last:
        return 1 if C <= 1 else 4
    if C <= 4:
        return 4
    if C <= 16:
        return 16
    return max(16, CL_BYTES // elem_bytes)


def config(kernel: str, C: int, channels_last: bool, elem_bytes: int) -> Config:
    """The launcher's choice for a kernel ("fwd", "dtheta", "dx"): a function of the layout,
    the element size and the channel count only (never the GPU), so every GPU runs the same
    programs and sums in the same order."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown stn kernel {kernel!r}")
    bc = block_c(C, channels_last, elem_bytes)
    tile, warps = TILE, WARPS
    if kernel == "dx":
        if channels_last or bc == 1:
            warps = DX_WARPS
        if elem_bytes == 8:
            tile = min(TILE, DX_TILE_FP64)
    return Config(bc, max(1, tile // bc), warps)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _eb(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# channel counts at every boundary of block_c()
_C_PROBES = (1, 2, 4, 5, 16, 17, 65)


def specializations():
    """Every (kernel, dtype, channels_last, Config) the launchers can pick."""
    seen = []
    for kernel in KERNELS:
        for dtype in _TL_NAMES:
            for cl in (False, True):
                for C in _C_PROBES:
                    key = (kernel, dtype, cl, config(kernel, C, cl, _eb(dtype)))
                    if key not in seen:
                        seen.append(key)
    return seen


_MAIN = {"fwd": "_fwd_kernel", "dtheta": "_dtheta_kernel", "dx": "_dx_kernel"}
_FULL_PTRS = {"x_ptr", "y_ptr", "dy_ptr", "dx_ptr"}


_params = aot_signature.params


def _signature(kernel, t: str, st: str, consts: dict) -> dict:
    return aot_signature.signature(kernel, t, st, consts, _FULL_PTRS, _INTS)


def aot_variants():
    """(name, kernel, signature, constexprs, attrs, num_warps) of every compiled form the
    launchers can produce (``python -m fusedattn.aot``): each kernel x dtype x layout x channel
    block of specializations(), and the dtheta sum per accumulation dtype. Names read
    ``stn_<fwd|dtheta|dx>_<dtype>_<planar|cl>_c<BLOCK_C>_p<BLOCK_P>``, ``stn_sum_<acc dtype>``.
    Integers are plain i32 and pointers carry no alignment (the kernels opt out of both
    specialisations)."""
    g = globals()
    for kernel, dtype, cl, cfg in specializations():
        t = _TL_NAMES[dtype]
        st = "fp64" if dtype == torch.float64 else "fp32"
        fn = g[_MAIN[kernel]]
        consts = {"CL": cl, "BLOCK_C": cfg.block_c, "BLOCK_P": cfg.block_p, "ACC": _acc(dtype)}
        yield (f"stn_{kernel}_{t}_{'cl' if cl else 'planar'}_c{cfg.block_c}_p{cfg.block_p}", fn,
               _signature(fn, t, st, consts), consts, {}, cfg.num_warps)
    for st, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
        consts = {"BLOCK_T": SUM_BLOCK, "ACC": _acc(dtype)}
        yield (f"stn_sum_{st}", _dtheta_sum_kernel,
               _signature(_dtheta_sum_kernel, st, st, consts), consts, {}, SUM_WARPS)


# ----------------------------------------------------------------------------- launchers

_I32 = 2**31


def _check(x, theta, Ho, Wo, op):
    """(N, C, H, W, Ho, Wo) after checking the arguments; TypeError / ValueError naming what is
    wrong."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{op}: x must be an (N, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dtype not in _TL_NAMES:
        raise TypeError(f"{op}: expected fp16, bf16, fp32 or fp64 x, got {x.dtype}")
    N, C, H, W = x.shape
    if H < 1 or W < 1:
        raise ValueError(f"{op}: x must have a positive H and W, got {tuple(x.shape)}")
    if (not isinstance(theta, torch.Tensor) or tuple(theta.shape) != (N, 2, 3)
            or not theta.is_floating_point() or theta.device != x.device):
        got = (f"{theta.dtype} {tuple(theta.shape)} on {theta.device}"
               if isinstance(theta, torch.Tensor) else type(theta).__name__)
        raise ValueError(f"{op}: expected a floating theta of shape ({N}, 2, 3) on {x.device}, "
                         f"got {got}")
    for name, v in (("Ho", Ho), ("Wo", Wo)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{op}: {name} must be a positive int, got {v!r}")
    if x.numel() >= _I32 or N * C * Ho * Wo >= _I32:
        raise ValueError(f"{op}: x {tuple(x.shape)} and y ({N}, {C}, {Ho}, {Wo}) must have "
                         f"fewer than 2^31 elements (32-bit indexing)")
    return N, C, H, W, Ho, Wo


def _channels_last(x: torch.Tensor) -> bool:
    """How the kernels read x and y (fusedattn.ops.stn.memory_format): planar when x is
    contiguous, else channels-last."""
    return not x.is_contiguous()


def _in_layout(t: torch.Tensor, cl: bool) -> torch.Tensor:
    """t itself when the kernels read it in place in the layout (planar or channels-last; size-1
    dimensions' strides ignored), else a copy in it."""
    if layout.is_dense_channels_last(t) if cl else t.is_contiguous():
        return t
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=fmt).copy_(t)


def _theta(theta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return theta.to(_acc_dtype(dtype)).contiguous()


def forward(x: torch.Tensor, theta: torch.Tensor, Ho: int, Wo: int,
            align_corners: bool) -> torch.Tensor:
    """y (N, C, Ho, Wo) in x's dtype and memory format (channels-last x: channels-last y). x
    contiguous or dense channels-last (anything else is read from a contiguous copy); theta
    (N, 2, 3), used in fp32 (fp64 for fp64 x). On x's device and its current stream."""
    N, C, H, W, Ho, Wo = _check(x, theta, Ho, Wo, "affine_sample (triton)")
    x = layout.readable(x)
    cl = _channels_last(x)
    y = torch.empty((N, C, Ho, Wo), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last if cl else torch.contiguous_format)
    if N == 0 or C == 0:
        return y
    th = _theta(theta, x.dtype)
    cfg = config("fwd", C, cl, x.element_size())
    tiles = triton.cdiv(Ho * Wo, cfg.block_p)
    with on_device(x):
        _fwd_kernel[(N * tiles,)](x, th, y, C, H, W, Ho, Wo, int(bool(align_corners)), tiles,
                                  CL=cl, BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p,
                                  ACC=_acc(x.dtype), num_warps=cfg.num_warps)
    return y


def backward(dy: torch.Tensor, x: torch.Tensor, theta: torch.Tensor, align_corners: bool,
             need_dx: bool, need_dtheta: bool):
    """(dx | None, dtheta | None): dx like x (its strides), dtheta (N, 2, 3) contiguous in
    theta's dtype. dy (N, C, Ho, Wo) in x's dtype with any strides (read in y's layout: copied
    when it is not in it). N = 0 or C = 0: empty dx, zero dtheta."""
    op = "affine_sample backward (triton)"
    if not isinstance(dy, torch.Tensor) or dy.dim() != 4:
        raise ValueError(f"{op}: dy must be an (N, C, Ho, Wo) tensor")
    N, C, H, W, Ho, Wo = _check(x, theta, int(dy.shape[2]), int(dy.shape[3]), op)
    if tuple(dy.shape[:2]) != (N, C) or dy.dtype != x.dtype or dy.device != x.device:
        raise ValueError(f"{op}: expected dy of shape ({N}, {C}, Ho, Wo), {x.dtype} on "
                         f"{x.device}, got {dy.dtype} {tuple(dy.shape)} on {dy.device}")
    dtheta = torch.zeros((N, 2, 3), dtype=theta.dtype, device=x.device) if need_dtheta else None
    if N == 0 or C == 0 or not (need_dx or need_dtheta):
        return (torch.empty_like(x) if need_dx else None), dtheta
    x_in = x
    x = layout.readable(x)
    cl = _channels_last(x)
    dx = torch.empty_like(x) if need_dx else None
    th = _theta(theta, x.dtype)
    dy = _in_layout(dy, cl)
    align = int(bool(align_corners))
    eb = x.element_size()
    acc = _acc(x.dtype)
    with on_device(x):
        if need_dx:
            cfg = config("dx", C, cl, eb)
            tiles = triton.cdiv(H * W, cfg.block_p)
            cblocks = triton.cdiv(C, cfg.block_c)
            _dx_kernel[(N * tiles * cblocks,)](dy, th, dx, C, H, W, Ho, Wo, align, tiles,
                                               cblocks, CL=cl, BLOCK_C=cfg.block_c,
                                               BLOCK_P=cfg.block_p, ACC=acc,
                                               num_warps=cfg.num_warps)
        if need_dtheta:
            cfg = config("dtheta", C, cl, eb)
            tiles = triton.cdiv(Ho * Wo, cfg.block_p)
            ws = torch.empty((N, tiles, 6), dtype=th.dtype, device=x.device)
            _dtheta_kernel[(N * tiles,)](dy, x, th, ws, C, H, W, Ho, Wo, align, tiles,
                                         CL=cl, BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p,
                                         ACC=acc, num_warps=cfg.num_warps)
            out = dtheta if dtheta.dtype == th.dtype else torch.empty_like(th)
            _dtheta_sum_kernel[(N,)](ws, out, tiles, BLOCK_T=SUM_BLOCK, ACC=acc,
                                     num_warps=SUM_WARPS)
            if out is not dtheta:
                dtheta.copy_(out)
    if need_dx and x is not x_in:
        dx = torch.empty_like(x_in).copy_(dx)
    return dx, dtheta
