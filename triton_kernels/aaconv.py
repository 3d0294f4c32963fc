"""2-D relative self-attention of attention-augmented convolution (Bello et al. 2019;
fusedattn/spec/aaconv.md) in Triton: the kernels and host launchers behind
``fusedattn::rel_attention_triton`` / ``rel_attention_backward_triton`` (fusedattn/ops/aaconv.py
states the contract: arguments, results, layouts).

Per (n, head), with L = H W and pixel i = iy W + ix (query), j = jy W + jx (key)::

    logit[i, j] = scale (q_i . k_j + q_i . rel_w[jx - ix + W - 1] + q_i . rel_h[jy - iy + H - 1])
    out_i = sum_j softmax_j(logit[i, :]) v_j,        lse_i = log sum_j exp(logit[i, j])

Flash-attention style: no (HW)^2 tensor exists, in registers or in memory.

Relative terms: per-query tables. ``_tables_kernel`` computes, per block of queries, the
relative tables ``q rel_w^T`` (2W - 1 per query) and ``q rel_h^T`` (2H - 1) with one MMA each
and shifts them per query (``tl.gather``) into *absolute* tables over key columns and key rows,
``Tw[i, x] = q_i . rel_w[x - ix + W - 1]`` (x < W) and ``Th[i, y] = q_i . rel_h[y - iy + H - 1]``
(y < H), stored in q's dtype as ``t`` (N, Nh, 2G, L): rows x < G of Tw, G + y of Th, queries
contiguous (G = the grid's longer side rounded up to a power of two, >= 16; L 2G values per
head, the issue's HW x (2W - 1) tables, never (HW)^2). The attention kernels then read the bias
of a (query block, key block) tile as ``Tw[i, jx] + Th[i, jy]``: each key column j loads one row
of each table, contiguous along the queries (L2 traffic about that of another q tile, no MMA, no
registers held across the key loop). The forward and the backward read the same tables, so they
add the same bias. The tables are a temporary of each call (forward and backward), not saved.

Forward (``_fwd_kernel``, per (n, h, query block)): loop over key blocks, S = q k^T + bias,
online softmax with a running maximum in base 2 (base e for fp64), out = P v / l, lse.

Backward (recomputation from q, k, v, the tables, out and lse; D_i = rowsum(dout_i out_i) by
``_bwd_pre_kernel``):

- ``_bwd_dq_kernel``, per query block, loops over key blocks: dlogit = P (dP - D),
  ``dq += dlogit k``, and the sums of dlogit over the keys of each key column and key row,
  ``g[i, x] += dlogit @ onehot(jx)^T``, ``g[i, G + y] += dlogit @ onehot(jy)^T`` (MMAs with
  one-hot matrices built in registers). It writes g and the content part of dq (ACC) to its
  row of a scratch; ``_bwd_rel_kernel`` (same program index) reads g back shifted to relative
  offsets, ``g_rel[i, t] = g[i, t + ix - W + 1]`` (a gather through memory), and completes
  ``dq_i += sum_t g_rel[i, t] rel_w[t]`` (and the rel_h term), and the block's share of the
  tables' gradients ``scale sum_i g_rel[i, t] q_i``. Those shares are written, not added
  atomically: the kernels run in waves of at most DQ_PROGRAMS query blocks (so the scratch is
  bounded), program p owns workspace slot p and adds the blocks of later waves into it in wave
  order; ``_sum_rows_kernel`` then sums the slots in a fixed order (in two levels). The MMAs
  whose one operand is in the accumulation dtype split it into a high and a low half in the
  input dtype (fp16/bf16), so the tables' gradients keep about fp32 accuracy.
- ``_bwd_dkdv_kernel``, per key block, loops over query blocks: ``dv += P^T dout``,
  ``dk += dlogit^T q``.

Every shape choice (tiles, waves) depends on the shape and dtype only, never on the GPU, and
nothing uses atomics: results are bitwise repeatable on any GPU.

dtypes: fp16, bf16 (MMAs in the input dtype, accumulation in fp32), fp32 (MMAs as 3xTF32,
``FP32_DOT``, about fp32 accuracy on the tensor cores), fp64 (DMMA on sm_80+; accumulation in
fp64). Head sizes dkh, dvh in 1..64 are padded inside the kernels to DK, DV in (16, 32, 64)
(masked loads and stores; nothing padded in memory). q, k, v, dout and out have any strides in
their batch, head and channel dimensions; the kernels read the pixel dimension with unit
stride (the module's views of the qkv convolution have it, as do out and the gradients), and
the launchers copy a tensor whose pixels are not unit-stride to that layout first. Pointers are
not specialised on alignment and integers not at all (``do_not_specialize``), so the compiled
forms are exactly those ``aot_variants()`` lists.

Interpreter (TRITON_INTERPRET=1): its tl.dot reads bf16 operands as integers and its fp32 ->
bf16 casts truncate, so there (only) bf16 operands are upcast before tl.dot and casts to bf16
round to nearest even in integer arithmetic first (``_mm``, ``_cast``); ``tl.debug_barrier``
orders the scratch's writes and reads on the GPU (the interpreter runs whole blocks at once).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import aot_signature
from .simam import _scalar, on_device

MAX_L = 4096          # H W at most 64 x 64 (the spec's limit)
MAX_SIDE = 64         # H and W at most 64 with relative tables (G <= 64)
MAX_HEAD = 64         # dkh, dvh at most 64
HEAD_PADS = (16, 32, 64)
GRID_PADS = (16, 32, 64)
DQ_PROGRAMS = 1024    # the dq kernel runs at most this many programs (a constant, not the SM
                      # count, so that the grouping of query blocks, and with it the order of the
                      # additions of the tables' gradients, is the same on every GPU)
SUM_CHUNK = 32        # slots each program of the first level of the workspace sum adds
SUM_BLOCK = 512       # elements per program of the workspace sum
PRE_BLOCK = 64        # queries per program of the D = rowsum(dout * out) kernel
REL_WARPS = 8         # warps of the tables-gradient kernel
STAGES = 3            # software-pipelining stages of every launch but the exceptions below
                      # (_SPILL_FIXES, _REL_STAGES): Triton's default on CUDA

# 3xTF32: fp32 operands split in a high and a low TF32 part (three MMAs), error about fp32's
FP32_DOT: tl.constexpr = tl.constexpr("tf32x3")
# the interpreter's tl.dot reads bf16 operands as integers: there they are upcast first (exact)
_INTERPRET: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
REL_ROWS: tl.constexpr = tl.constexpr(16)  # queries per MMA of the tables-gradient kernel


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _mm(a, b, acc):
    """acc + a @ b on the tensor cores in the operands' dtype (fp16/bf16 -> fp32, fp32 as
    FP32_DOT, fp64 -> fp64); acc may be None."""
    if _INTERPRET:
        if a.dtype == tl.bfloat16:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            return tl.dot(a, b, acc)
    else:
        if a.dtype == tl.float32:
            return tl.dot(a, b, acc, input_precision=FP32_DOT)
        else:
            return tl.dot(a, b, acc)


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """x.to(dtype), rounding to nearest even. (The interpreter truncates fp32 -> bf16: there the
    value is rounded to bf16's precision first, in integer arithmetic, and then cut exactly.)"""
    if _INTERPRET and dtype == tl.bfloat16:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        return b.to(tl.float32, bitcast=True).to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def _mm_fine_a(a, b):
    """a @ b for a in the accumulation dtype and b in the operands' dtype, to about the
    accumulation precision: for fp16/bf16 b, a as a high and a low part in b's dtype (two
    MMAs); fp32 as FP32_DOT; fp64 exact."""
    if b.dtype == tl.float16 or b.dtype == tl.bfloat16:
        hi = _cast(a, b.dtype)
        return _mm(hi, b, _mm(_cast(a - hi.to(tl.float32), b.dtype), b, None))
    else:
        return _mm(a.to(b.dtype), b, None)


@triton.jit
def _mm_fine_b(a, b):
    """a @ b for a in the operands' dtype and b in the accumulation dtype (as _mm_fine_a)."""
    if a.dtype == tl.float16 or a.dtype == tl.bfloat16:
        hi = _cast(b, a.dtype)
        return _mm(a, hi, _mm(a, _cast(b - hi.to(tl.float32), a.dtype), None))
    else:
        return _mm(a, b.to(a.dtype), None)


@triton.jit
def _exp(x, ACC: tl.constexpr):
    """e^x for fp64; 2^x for fp32 (the logits are then pre-scaled by log2 e)."""
    if ACC == tl.float64:
        return tl.exp(x)
    else:
        return tl.exp2(x)


@triton.jit
def _abs_table_t(q_t, r_ptr, s_r, s_rd, rows, pos, side, dk, DK: tl.constexpr, G: tl.constexpr):
    """[G, BLOCK] in the accumulation dtype: T[x, i] = q_i . rel[x - pos_i + side - 1] for
    x < side (beyond: some other entry of rel q^T, finite, never read). One MMA for the
    relative table rel q^T ([2G, BLOCK]) and a per-column shift (tl.gather) to key columns."""
    t = tl.arange(0, 2 * G)
    d = tl.arange(0, DK)
    rel = tl.load(r_ptr + t[:, None] * s_r + d[None, :] * s_rd,
                  mask=(t < rows)[:, None] & (d < dk)[None, :], other=0.0)
    rt = _mm(rel.to(q_t.dtype), q_t, None)
    x = tl.arange(0, G)
    # (clamped: columns past the grid, i >= L, have iy >= H)
    idx = tl.minimum(tl.maximum(x[:, None] - pos[None, :] + (side - 1), 0), 2 * G - 1)
    return tl.gather(rt, idx, 0)


@triton.jit
def _onehot_t(idx, G: tl.constexpr, dtype: tl.constexpr):
    """[BLOCK, G] one-hot rows: (idx_j == x)."""
    x = tl.arange(0, G)
    return _cast(tl.where(idx[:, None] == x[None, :], 1.0, 0.0), dtype)


@triton.jit
def _unit(pid, QB, Nh):
    """(n, h, block) of program unit pid: blocks of one (n, h) are consecutive."""
    bh = pid // QB
    return bh // Nh, bh % Nh, pid % QB


@triton.jit
def _bias(t_ptr, i, j, W, L, GL, mask, ACC: tl.constexpr):
    """The bias tile [BLOCK_M, BLOCK_N] of queries i and keys j, Tw[i, jx] + Th[i, jy], from
    one head's tables t (rows x < G of Tw, then Th from offset GL = G L; L queries per row):
    every column j reads one row of each table, contiguous along the queries."""
    jx = j % W
    jy = j // W
    bw = tl.load(t_ptr + jx[None, :] * L + i[:, None], mask=mask, other=0.0)
    bh = tl.load(t_ptr + GL + jy[None, :] * L + i[:, None], mask=mask, other=0.0)
    return bw.to(ACC) + bh.to(ACC)


# ----------------------------------------------------------------------------- kernels

_INTS = ["Nh", "L", "H", "W", "GL", "dk", "dv", "QB", "U0", "P", "E", "CHUNK",
         "s_qn", "s_qh", "s_qd", "s_kn", "s_kh", "s_kd", "s_vn", "s_vh", "s_vd",
         "s_on", "s_oh", "s_od", "s_gn", "s_gh", "s_gd", "s_an", "s_ah", "s_ad",
         "s_bn", "s_bh", "s_bd", "s_rw", "s_rwd", "s_rh", "s_rhd"]
_PTRS = ["q_ptr", "k_ptr", "v_ptr", "rw_ptr", "rh_ptr", "rel_ptr", "scale_ptr", "out_ptr", "lse_ptr",
         "do_ptr", "d_ptr", "t_ptr", "dq_ptr", "dk_ptr", "dv_ptr", "ws_ptr", "scr_ptr",
         "src_ptr", "dst_ptr"]
# Full-size tensors (q, k, v, out, dout, dq, dk, dv) have unit stride along the pixels (the
# launchers make them so); element (n, h, i, d) is at n s_*n + h s_*h + i + d s_*d.


@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=_PTRS)
def _fwd_kernel(q_ptr, k_ptr, v_ptr, t_ptr, scale_ptr, out_ptr, lse_ptr, Nh, L, W, GL, dk, dv,
                QB, s_qn, s_qh, s_qd, s_kn, s_kh, s_kd, s_vn, s_vh, s_vd, s_on, s_oh, s_od,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DK: tl.constexpr,
                DV: tl.constexpr, RELATIVE: tl.constexpr, ACC: tl.constexpr):
    """Program (n, h, query block): out and lse of its queries, online softmax over key blocks;
    the bias read from the tables t (2 GL values per head)."""
    n, h, qb = _unit(tl.program_id(0), QB, Nh)
    i = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    imask = i < L
    dkk = tl.arange(0, DK)
    dvv = tl.arange(0, DV)
    k_ptr += n.to(tl.int64) * s_kn + h.to(tl.int64) * s_kh
    v_ptr += n.to(tl.int64) * s_vn + h.to(tl.int64) * s_vh
    q = tl.load(q_ptr + n.to(tl.int64) * s_qn + h.to(tl.int64) * s_qh
                + i[:, None] + dkk[None, :] * s_qd,
                mask=imask[:, None] & (dkk < dk)[None, :], other=0.0)
    scale = tl.load(scale_ptr)
    if ACC == tl.float64:
        c = scale
    else:
        c = scale * _LOG2E
    if RELATIVE:
        t_ptr += (n * Nh + h).to(tl.int64) * (2 * GL)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, DV], ACC)
    for j0 in range(0, L, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jmask = j < L
        k_t = tl.load(k_ptr + j[None, :] + dkk[:, None] * s_kd,
                      mask=(dkk < dk)[:, None] & jmask[None, :], other=0.0)
        s = _mm(q, k_t, None)
        if RELATIVE:
            s += _bias(t_ptr, i, j, W, L, GL, imask[:, None] & jmask[None, :], ACC)
        s = tl.where(jmask[None, :], s * c, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = _exp(s - m_new[:, None], ACC)
        alpha = _exp(m_i - m_new, ACC)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + j[:, None] + dvv[None, :] * s_vd,
                    mask=jmask[:, None] & (dvv < dv)[None, :], other=0.0)
        acc = _mm(_cast(p, v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    out = acc / l_i[:, None]
    if ACC == tl.float64:
        lse = m_i + tl.log(l_i)
    else:
        lse = (m_i + tl.log2(l_i)) * _LN2
    out_ptr += n.to(tl.int64) * s_on + h.to(tl.int64) * s_oh
    tl.store(out_ptr + i[:, None] + dvv[None, :] * s_od, _cast(out, out_ptr.dtype.element_ty),
             mask=imask[:, None] & (dvv < dv)[None, :])
    tl.store(lse_ptr + (n * Nh + h).to(tl.int64) * L + i, lse, mask=imask)


@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=_PTRS)
def _bwd_pre_kernel(do_ptr, out_ptr, d_ptr, Nh, L, dv, QB, s_gn, s_gh, s_gd, s_on, s_oh, s_od,
                    BLOCK_M: tl.constexpr, DV: tl.constexpr, ACC: tl.constexpr):
    """D_i = sum_d dout[i, d] out[i, d] (the softmax backward's row term), in ACC."""
    n, h, qb = _unit(tl.program_id(0), QB, Nh)
    i = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    dvv = tl.arange(0, DV)
    mask = (i < L)[:, None] & (dvv < dv)[None, :]
    g = tl.load(do_ptr + n.to(tl.int64) * s_gn + h.to(tl.int64) * s_gh
                + i[:, None] + dvv[None, :] * s_gd, mask=mask, other=0.0).to(ACC)
    o = tl.load(out_ptr + n.to(tl.int64) * s_on + h.to(tl.int64) * s_oh
                + i[:, None] + dvv[None, :] * s_od, mask=mask, other=0.0).to(ACC)
    tl.store(d_ptr + (n * Nh + h).to(tl.int64) * L + i, tl.sum(g * o, 1), mask=i < L)


@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=_PTRS)
def _tables_kernel(q_ptr, rw_ptr, rh_ptr, t_ptr, Nh, L, H, W, dk, QB, s_qn, s_qh, s_qd,
                   s_rw, s_rwd, s_rh, s_rhd,
                   BLOCK_M: tl.constexpr, DK: tl.constexpr, G: tl.constexpr):
    """The absolute tables in q's dtype, t[n, h, x, i] = Tw[i, x] = q_i . rel_w[x - ix + W - 1]
    and t[n, h, G + y, i] = Th[i, y] = q_i . rel_h[y - iy + H - 1] (x, y < G; rows of L
    queries), which the attention kernels read the bias from."""
    n, h, qb = _unit(tl.program_id(0), QB, Nh)
    i = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    imask = i < L
    dkk = tl.arange(0, DK)
    q_t = tl.load(q_ptr + n.to(tl.int64) * s_qn + h.to(tl.int64) * s_qh
                  + i[None, :] + dkk[:, None] * s_qd,
                  mask=imask[None, :] & (dkk < dk)[:, None], other=0.0)
    x = tl.arange(0, G)
    base = t_ptr + (n * Nh + h).to(tl.int64) * (2 * G) * L + x[:, None] * L + i[None, :]
    tw = _abs_table_t(q_t, rw_ptr, s_rw, s_rwd, 2 * W - 1, i % W, W, dk, DK, G)
    tl.store(base, _cast(tw, q_t.dtype), mask=imask[None, :])
    th = _abs_table_t(q_t, rh_ptr, s_rh, s_rhd, 2 * H - 1, i // W, H, dk, DK, G)
    tl.store(base + G * L, _cast(th, q_t.dtype), mask=imask[None, :])


@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=_PTRS)
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, t_ptr, scale_ptr, do_ptr, lse_ptr, d_ptr, dq_ptr,
                   scr_ptr, Nh, L, W, dk, dv, QB, U0,
                   s_qn, s_qh, s_qd, s_kn, s_kh, s_kd, s_vn, s_vh, s_vd, s_gn, s_gh, s_gd,
                   s_an, s_ah, s_ad,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DK: tl.constexpr,
                   DV: tl.constexpr, G: tl.constexpr, RELATIVE: tl.constexpr,
                   ACC: tl.constexpr):
    """Program p: query block U0 + p (of all N Nh QB), over key blocks. Without tables it
    writes dq. With them it writes to its scratch row p (ACC) the sums over key columns and key
    rows of dlogit / scale, g[i, x] (x < G) and g[i, G + y], and the content part of
    dq / scale, for _bwd_rel_kernel to finish."""
    pid = tl.program_id(0)
    n, h, qb = _unit(U0 + pid, QB, Nh)
    i = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    imask = i < L
    dkk = tl.arange(0, DK)
    dvv = tl.arange(0, DV)
    scale = tl.load(scale_ptr)
    if ACC == tl.float64:
        c = scale
    else:
        c = scale * _LOG2E
    k_ptr += n.to(tl.int64) * s_kn + h.to(tl.int64) * s_kh
    v_ptr += n.to(tl.int64) * s_vn + h.to(tl.int64) * s_vh
    qmask = imask[:, None] & (dkk < dk)[None, :]
    q = tl.load(q_ptr + n.to(tl.int64) * s_qn + h.to(tl.int64) * s_qh
                + i[:, None] + dkk[None, :] * s_qd, mask=qmask, other=0.0)
    do = tl.load(do_ptr + n.to(tl.int64) * s_gn + h.to(tl.int64) * s_gh
                 + i[:, None] + dvv[None, :] * s_gd,
                 mask=imask[:, None] & (dvv < dv)[None, :], other=0.0)
    row = (n * Nh + h).to(tl.int64) * L + i
    if ACC == tl.float64:
        lse = tl.load(lse_ptr + row, mask=imask, other=0.0)
    else:
        lse = tl.load(lse_ptr + row, mask=imask, other=0.0) * _LOG2E
    dd = tl.load(d_ptr + row, mask=imask, other=0.0)
    if RELATIVE:
        t_ptr += (n * Nh + h).to(tl.int64) * (2 * G) * L
        gw = tl.zeros([BLOCK_M, G], ACC)
        gh = tl.zeros([BLOCK_M, G], ACC)
    dq = tl.zeros([BLOCK_M, DK], ACC)
    for j0 in range(0, L, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jmask = j < L
        mask = imask[:, None] & jmask[None, :]
        k_t = tl.load(k_ptr + j[None, :] + dkk[:, None] * s_kd,
                      mask=(dkk < dk)[:, None] & jmask[None, :], other=0.0)
        v_t = tl.load(v_ptr + j[None, :] + dvv[:, None] * s_vd,
                      mask=(dvv < dv)[:, None] & jmask[None, :], other=0.0)
        s = _mm(q, k_t, None)
        if RELATIVE:
            s += _bias(t_ptr, i, j, W, L, G * L, mask, ACC)
        p = tl.where(mask, _exp(s * c - lse[:, None], ACC), 0.0)
        dp = _mm(do, v_t, None)
        ds = _cast(p * (dp - dd[:, None]), q.dtype)     # dlogit / scale
        dq = _mm(ds, tl.trans(k_t), dq)
        if RELATIVE:
            gw = _mm(ds, _onehot_t(j % W, G, q.dtype), gw)
            gh = _mm(ds, _onehot_t(j // W, G, q.dtype), gh)
    if RELATIVE:
        r = tl.arange(0, BLOCK_M)
        x = tl.arange(0, G)
        scr = scr_ptr + pid.to(tl.int64) * BLOCK_M * (2 * G + DK) + r[:, None] * (2 * G + DK)
        tl.store(scr + x[None, :], gw)
        tl.store(scr + G + x[None, :], gh)
        tl.store(scr + 2 * G + dkk[None, :], dq)
    else:
        tl.store(dq_ptr + n.to(tl.int64) * s_an + h.to(tl.int64) * s_ah
                 + i[:, None] + dkk[None, :] * s_ad,
                 _cast(dq * scale, dq_ptr.dtype.element_ty), mask=qmask)


@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=_PTRS)
def _bwd_rel_kernel(q_ptr, rel_ptr, scale_ptr, scr_ptr, dq_ptr, ws_ptr,
                    Nh, L, H, W, dk, QB, U0, s_qn, s_qh, s_qd, s_an, s_ah, s_ad,
                    BLOCK_M: tl.constexpr, DK: tl.constexpr, G: tl.constexpr,
                    ACC: tl.constexpr):
    """Program p, after _bwd_dq_kernel's program p, finishes query block U0 + p from its
    scratch row (per query: g[i, x] = sum of dlogit[i, j] / scale over the keys of key column
    x < G, the same over key rows at G + y, and the content part of dq / scale). rel holds
    rel_w's 2W - 1 rows, then rel_h's 2H - 1 (contiguous, dk wide). With the relative sums
    g_rel[i, t] = g[i, t + pos_i - side + 1] (t < 2 side - 1; pos, side = ix, W for rel_w
    and iy, H for rel_h), read back shifted from the scratch: dq_i += sum_t g_rel[i, t] rel[t],
    and the block's share of rel's gradient, scale sum_i g_rel[i, t] q_i, is added into
    workspace slot p (rel's shape) after what earlier waves (U0 > 0) left there. Four passes
    (table x half of the offsets t; a loop, so that nothing of one pass stays live in the
    next), each over chunks of REL_ROWS queries; dq / scale accumulates in the scratch."""
    pid = tl.program_id(0)
    n, h, qb = _unit(U0 + pid, QB, Nh)
    x = tl.arange(0, G)
    d = tl.arange(0, DK)
    rc = tl.arange(0, REL_ROWS)
    scale = tl.load(scale_ptr)
    q_ptr += n.to(tl.int64) * s_qn + h.to(tl.int64) * s_qh
    scr = scr_ptr + pid.to(tl.int64) * BLOCK_M * (2 * G + DK)
    slot = ws_ptr + pid.to(tl.int64) * (2 * W - 1 + 2 * H - 1) * dk
    later = U0 > 0
    dtype = q_ptr.dtype.element_ty
    # rows of the block inside the grid (a runtime bound: the chunk loops stay loops)
    valid = tl.minimum(BLOCK_M, L - qb * BLOCK_M)
    for ps in range(4):
        tab = ps // 2
        side = tl.where(tab == 0, W, H)
        row0 = tab * (2 * W - 1)
        t = (ps % 2) * G + x
        tmask = t < 2 * side - 1
        rel_t = tl.load(rel_ptr + (row0 + t)[None, :] * dk + d[:, None],
                        mask=tmask[None, :] & (d < dk)[:, None], other=0.0).to(dtype)  # [DK, G]
        part = tl.zeros([G, DK], ACC)
        for r0 in range(0, valid, REL_ROWS):
            rr = r0 + rc
            i = qb * BLOCK_M + rr
            pos = tl.where(tab == 0, i % W, i // W)
            a = t[:, None] + pos[None, :] - (side - 1)                     # [G, REL_ROWS]
            g_rel_t = tl.load(scr + rr[None, :] * (2 * G + DK) + tab * G + a,
                              mask=(a >= 0) & (a < side), other=0.0)
            dq_t = scr + rr[None, :] * (2 * G + DK) + 2 * G + d[:, None]      # [DK, REL_ROWS]
            tl.store(dq_t, tl.load(dq_t) + _mm_fine_b(rel_t, g_rel_t))
            q_c = tl.load(q_ptr + i[:, None] + d[None, :] * s_qd,
                          mask=(i < L)[:, None] & (d < dk)[None, :], other=0.0)
            part += _mm_fine_a(g_rel_t, q_c)
        off = (row0 + t)[:, None] * dk + d[None, :]
        wmask = tmask[:, None] & (d < dk)[None, :]
        part = part * scale + tl.load(slot + off, mask=wmask & later, other=0.0)
        tl.store(slot + off, part, mask=wmask)
        tl.debug_barrier()  # the next pass reads dq from the scratch in other threads
    for r0 in range(0, valid, REL_ROWS):
        i = qb * BLOCK_M + r0 + rc
        dq = tl.load(scr + (r0 + rc)[:, None] * (2 * G + DK) + 2 * G + d[None, :])
        tl.store(dq_ptr + n.to(tl.int64) * s_an + h.to(tl.int64) * s_ah
                 + i[:, None] + d[None, :] * s_ad, _cast(dq * scale, dq_ptr.dtype.element_ty),
                 mask=(i < L)[:, None] & (d < dk)[None, :])


@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=_PTRS)
def _bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, t_ptr, scale_ptr, do_ptr, lse_ptr, d_ptr,
                     dk_ptr, dv_ptr, Nh, L, W, GL, dk, dv, QB,
                     s_qn, s_qh, s_qd, s_kn, s_kh, s_kd, s_vn, s_vh, s_vd, s_gn, s_gh, s_gd,
                     s_an, s_ah, s_ad, s_bn, s_bh, s_bd,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DK: tl.constexpr,
                     DV: tl.constexpr, RELATIVE: tl.constexpr, ACC: tl.constexpr):
    """Program (n, h, key block): dk and dv of its keys, over query blocks, on transposed
    tiles (rows are keys); the bias read from the tables t (2 GL values per head)."""
    n, h, kb = _unit(tl.program_id(0), QB, Nh)  # QB: key blocks per (n, h) here
    j = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    jmask = j < L
    dkk = tl.arange(0, DK)
    dvv = tl.arange(0, DV)
    q_ptr += n.to(tl.int64) * s_qn + h.to(tl.int64) * s_qh
    do_ptr += n.to(tl.int64) * s_gn + h.to(tl.int64) * s_gh
    kmask = jmask[:, None] & (dkk < dk)[None, :]
    vmask = jmask[:, None] & (dvv < dv)[None, :]
    k = tl.load(k_ptr + n.to(tl.int64) * s_kn + h.to(tl.int64) * s_kh
                + j[:, None] + dkk[None, :] * s_kd, mask=kmask, other=0.0)
    v = tl.load(v_ptr + n.to(tl.int64) * s_vn + h.to(tl.int64) * s_vh
                + j[:, None] + dvv[None, :] * s_vd, mask=vmask, other=0.0)
    scale = tl.load(scale_ptr)
    if ACC == tl.float64:
        c = scale
    else:
        c = scale * _LOG2E
    row0 = (n * Nh + h).to(tl.int64) * L
    if RELATIVE:
        t_ptr += (n * Nh + h).to(tl.int64) * (2 * GL)
        jx = j % W
        jy = j // W
    dk_acc = tl.zeros([BLOCK_N, DK], ACC)
    dv_acc = tl.zeros([BLOCK_N, DV], ACC)
    for i0 in range(0, L, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M)
        imask = i < L
        mask = jmask[:, None] & imask[None, :]
        q_t = tl.load(q_ptr + i[None, :] + dkk[:, None] * s_qd,
                      mask=(dkk < dk)[:, None] & imask[None, :], other=0.0)
        do = tl.load(do_ptr + i[:, None] + dvv[None, :] * s_gd,
                     mask=imask[:, None] & (dvv < dv)[None, :], other=0.0)
        if ACC == tl.float64:
            lse = tl.load(lse_ptr + row0 + i, mask=imask, other=0.0)
        else:
            lse = tl.load(lse_ptr + row0 + i, mask=imask, other=0.0) * _LOG2E
        dd = tl.load(d_ptr + row0 + i, mask=imask, other=0.0)
        s_t = _mm(k, q_t, None)                               # [BLOCK_N, BLOCK_M]
        if RELATIVE:
            bw = tl.load(t_ptr + jx[:, None] * L + i[None, :], mask=mask, other=0.0)
            bh = tl.load(t_ptr + GL + jy[:, None] * L + i[None, :], mask=mask, other=0.0)
            s_t += bw.to(ACC) + bh.to(ACC)
        p_t = tl.where(mask, _exp(s_t * c - lse[None, :], ACC), 0.0)
        dv_acc = _mm(_cast(p_t, q_t.dtype), do, dv_acc)
        dp_t = _mm(v, tl.trans(do), None)
        ds_t = _cast(p_t * (dp_t - dd[None, :]), q_t.dtype)
        dk_acc = _mm(ds_t, tl.trans(q_t), dk_acc)
    tl.store(dk_ptr + n.to(tl.int64) * s_an + h.to(tl.int64) * s_ah
             + j[:, None] + dkk[None, :] * s_ad,
             _cast(dk_acc * scale, dk_ptr.dtype.element_ty), mask=kmask)
    tl.store(dv_ptr + n.to(tl.int64) * s_bn + h.to(tl.int64) * s_bh
             + j[:, None] + dvv[None, :] * s_bd,
             _cast(dv_acc, dv_ptr.dtype.element_ty), mask=vmask)


@triton.jit(do_not_specialize=_INTS, do_not_specialize_on_alignment=_PTRS)
def _sum_rows_kernel(src_ptr, dst_ptr, P, E, CHUNK, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """dst[c, e] = sum of src[p, e] over p in [c CHUNK, min(P, (c+1) CHUNK)), in order."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = e < E
    ch = tl.program_id(1)
    acc = tl.zeros([BLOCK], ACC)
    for p in range(ch * CHUNK, tl.minimum(P, (ch + 1) * CHUNK)):
        acc += tl.load(src_ptr + p * E + e, mask=mask, other=0.0)
    tl.store(dst_ptr + ch.to(tl.int64) * E + e, acc, mask=mask)


# ----------------------------------------------------------------------------- configurations


@dataclass(frozen=True)
class Config:
    """One launch specialisation of a main kernel: query block, key block, warps,
    software-pipelining stages of the key (query) loop."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int = STAGES


KERNELS = ("fwd", "dq", "dkdv")

# (BLOCK_M, BLOCK_N, warps) of the main kernels by element size: the largest tiles (tried in
# steps of two) whose worst case (DK = DV = G = 64) compiles without spills for sm_80 and sm_90
# (python -m fusedattn.aot). With mma.sync (sm_80) a warp holds 16 rows of the A operand and
# its share of the B operand (the whole of it when the warps are laid along the rows, as for
# 64-row tiles; split over warps along the columns for 16- and 32-row tiles), so what bounds
# a tile is the B operands' K x N, doubled by fp32's 3xTF32 halves and by fp64.
_TILES = {
    2: {"fwd": (64, 64, 4), "dq": (64, 16, 4), "dkdv": (16, 64, 4)},
    4: {"fwd": (64, 32, 4), "dq": (16, 16, 4), "dkdv": (16, 32, 4)},
    8: {"fwd": (32, 32, 4), "dq": (16, 16, 4), "dkdv": (16, 32, 4)},
}
_TABLES_BLOCK = {2: (32, 4), 4: (16, 8), 8: (16, 4)}  # (queries, warps)
# Smaller tiles where the padded head sizes or grid side make the default tile spill registers
# (a 64-wide head or table, or DK + DV >= 64; python -m fusedattn.aot reports no spills). The
# dq kernel's BLOCK_M is shared with the tables-gradient kernel, so it must not depend on DV.
_WIDE = {(4, "dkdv"): (16, 16, 4), (8, "dkdv"): (16, 16, 4),
         (2, "fwd"): (64, 32, 4)}
# Single specialisations where ptxas spills with the _TILES / _WIDE choice on sm_80 or sm_90
# (fp32's 3xTF32 keeps a high and a low half of every operand live), each replaced by the
# nearest form that spills on neither (a sweep over tiles, warps and stages; python -m
# fusedattn.aot): one pipelining stage (no prefetched k, v tiles held across the loop), and for
# fp32 dq with tables, DK = 64 and G = 16 a 32-query block on 8 warps (16-query blocks spill
# for DV = 64 at every warp and stage count tried; BLOCK_M is shared with the tables-gradient
# kernel, so DV = 16, which did not spill, takes it too, keeping STAGES). Key: (element bytes,
# kernel, DK, DV, G for dq else None, relative); value: (BLOCK_M, BLOCK_N, warps, stages).
_SPILL_FIXES = {
    (4, "dq", 32, 32, 16, True): (16, 16, 4, 1),
    (4, "dq", 64, 16, 16, True): (32, 16, 8, 3),
    (4, "dq", 64, 32, 16, True): (32, 16, 8, 1),
    (4, "dq", 64, 64, 16, True): (32, 16, 8, 1),
    (4, "dkdv", 16, 64, None, False): (16, 16, 4, 1),
}
# Stages of the tables-gradient kernel where STAGES spills, by (element bytes, DK, G).
_REL_STAGES = {(8, 32, 64): 2}


def _pad(n: int) -> int:
    """n rounded up to a power of two, at least 16 (tl.dot's smallest side)."""
    return max(16, 1 << max(0, (n - 1).bit_length()))


def config(kernel: str, elem_bytes: int, DK: int, DV: int, G: int, relative: bool) -> Config:
    """The launcher's choice for a main kernel ("fwd", "dq", "dkdv"): _TILES by element size,
    _WIDE where the padded head sizes (or dq's grid side) are large, _SPILL_FIXES for single
    specialisations. Never the GPU."""
    fix = _SPILL_FIXES.get((elem_bytes, kernel, DK, DV, G if kernel == "dq" else None,
                            bool(relative)))
    if fix is not None:
        return Config(*fix)
    bm, bn, warps = _TILES[elem_bytes][kernel]
    wide = _WIDE.get((elem_bytes, kernel))
    g = (G or 0) if kernel == "dq" else 0  # only dq specialises on the grid side
    if wide is not None and (max(DK, DV) == 64 or g >= 32 or DK + DV >= 64):
        bm, bn, warps = wide
    return Config(bm, bn, warps)


def tables_config(elem_bytes: int) -> tuple[int, int]:
    """(queries per program, warps) of the tables kernel (per table a [2G, DK] x [DK, BLOCK]
    MMA, the [2G, DK] operand split over the warps)."""
    return _TABLES_BLOCK[elem_bytes]


def rel_config(elem_bytes: int, DK: int, G: int) -> tuple[int, int, int]:
    """(queries per program, warps, stages) of the tables-gradient kernel: the dq kernel's
    query block (the scratch rows it leaves), REL_WARPS, STAGES but for _REL_STAGES."""
    return (config("dq", elem_bytes, DK, HEAD_PADS[0], G, True).block_m, REL_WARPS,
            _REL_STAGES.get((elem_bytes, DK, G), STAGES))


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_TL_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
             torch.float64: "fp64"}
# pointers to full-size tensors and the tables (q's dtype); the others: accumulation dtype
_FULL_PTRS = {"q_ptr", "k_ptr", "v_ptr", "rw_ptr", "rh_ptr", "rel_ptr", "out_ptr", "do_ptr",
              "dq_ptr", "dk_ptr", "dv_ptr", "t_ptr"}


_params = aot_signature.params


def _eb(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _grids(kernel: str):
    """(relative, G) of a main kernel's forms: dq specialises on the padded grid side G (its
    accumulators have G columns); fwd and dkdv only read the tables (G: None), with or without
    them."""
    if kernel == "dq":
        return [(True, g) for g in GRID_PADS] + [(False, GRID_PADS[0])]
    return [(True, None), (False, None)]


def specializations():
    """Every (kernel, dtype, DK, DV, G, relative, Config) the launchers can pick for the main
    kernels: each dtype x padded head sizes x (dq) padded grid side G with tables, or no tables
    (G unused: 16 for dq, None for the others)."""
    return [(kernel, dtype, DK, DV, G, rel, config(kernel, _eb(dtype), DK, DV, G, rel))
            for kernel in KERNELS for dtype in _TL_NAMES for DK in HEAD_PADS for DV in HEAD_PADS
            for rel, G in _grids(kernel)]


_MAIN = {"fwd": "_fwd_kernel", "dq": "_bwd_dq_kernel", "dkdv": "_bwd_dkdv_kernel"}


def _signature(kernel, t: str, st: str, consts: dict) -> dict:
    return aot_signature.signature(kernel, t, st, consts, _FULL_PTRS)


def aot_variants():
    """(name, kernel, signature, constexprs, attrs, num_warps, num_stages) of every compiled
    form the launchers can produce (``python -m fusedattn.aot``): the three main kernels per
    specializations(); per dtype, the D pre-pass per DV, the tables kernel and the
    tables-gradient kernel per DK and G; the workspace sum per accumulation dtype. Names read
    ``aaconv_<fwd|dq|dkdv>_<dtype>_dk<DK>_dv<DV>_<rel|g<G>|norel>_m<BLOCK_M>_n<BLOCK_N>``,
    ``aaconv_pre_<dtype>_dv<DV>``, ``aaconv_tables_<dtype>_dk<DK>_g<G>``,
    ``aaconv_rel_<dtype>_dk<DK>_g<G>``, ``aaconv_sum_<acc dtype>``. Integers are plain i32 and
    pointers carry no alignment (the kernels opt out of both specialisations: q, k, v are views
    at any offset)."""
    g = globals()
    for kernel, dtype, DK, DV, G, rel, cfg in specializations():
        t, st = _TL_NAMES[dtype], ("fp64" if dtype == torch.float64 else "fp32")
        fn = g[_MAIN[kernel]]
        consts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "DK": DK, "DV": DV,
                  "RELATIVE": rel, "ACC": _acc(dtype)}
        if G is not None:
            consts["G"] = G
        if not rel:
            consts.update({p: None for p in ("t_ptr", "scr_ptr") if p in _params(fn)})
        grid = "norel" if not rel else (f"g{G}" if G is not None else "rel")
        yield (f"aaconv_{kernel}_{t}_dk{DK}_dv{DV}_{grid}_"
               f"m{cfg.block_m}_n{cfg.block_n}", fn, _signature(fn, t, st, consts), consts, {},
               cfg.num_warps, cfg.num_stages)
    for dtype, t in _TL_NAMES.items():
        st = "fp64" if dtype == torch.float64 else "fp32"
        for DV in HEAD_PADS:
            consts = {"BLOCK_M": PRE_BLOCK, "DV": DV, "ACC": _acc(dtype)}
            yield (f"aaconv_pre_{t}_dv{DV}", _bwd_pre_kernel,
                   _signature(_bwd_pre_kernel, t, st, consts), consts, {}, 4, STAGES)
        for DK in HEAD_PADS:
            for G in GRID_PADS:
                bm, warps = tables_config(_eb(dtype))
                consts = {"BLOCK_M": bm, "DK": DK, "G": G}
                yield (f"aaconv_tables_{t}_dk{DK}_g{G}", _tables_kernel,
                       _signature(_tables_kernel, t, st, consts), consts, {}, warps, STAGES)
                bm, warps, stages = rel_config(_eb(dtype), DK, G)
                consts = {"BLOCK_M": bm, "DK": DK, "G": G, "ACC": _acc(dtype)}
                yield (f"aaconv_rel_{t}_dk{DK}_g{G}", _bwd_rel_kernel,
                       _signature(_bwd_rel_kernel, t, st, consts), consts, {}, warps, stages)
    for st, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
        consts = {"BLOCK": SUM_BLOCK, "ACC": _acc(dtype)}
        yield (f"aaconv_sum_{st}", _sum_rows_kernel, _signature(_sum_rows_kernel, st, st, consts),
               consts, {}, 4, STAGES)


# ----------------------------------------------------------------------------- launchers

# The memory order of the results out, dq, dk, dv (fusedattn/ops/aaconv.py): a permutation of
# the logical dimensions (N, Nh, L, d), outermost first. (N, Nh, d, L): the channel-major layout
# of the module's convolutions, so that out is viewed as an (N, Nh d, H, W) map without a copy.
# The one place to change it: the kernels take any strides.
RESULT_ORDER = (0, 1, 3, 2)


def new_result(N: int, Nh: int, L: int, d: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised (N, Nh, L, d) tensor with memory in RESULT_ORDER."""
    sizes = (N, Nh, L, d)
    phys = torch.empty([sizes[k] for k in RESULT_ORDER], dtype=dtype, device=device)
    return phys.permute([RESULT_ORDER.index(k) for k in range(4)])


_I32 = 2**31 - 1


def _pixels_unit(t: torch.Tensor) -> torch.Tensor:
    """t (N, Nh, L, d) with unit stride along the pixels, as the kernels read it: itself when it
    has it (the module's views of the qkv convolution, out, the gradients of the module's
    output), else a copy in the (N, Nh, d, L) order."""
    if t.stride(2) == 1 or t.shape[2] == 1:
        return t
    return t.transpose(2, 3).contiguous().transpose(2, 3)


def _strides(t: torch.Tensor):
    """(s_n, s_h, s_d) of a pixel-unit-stride tensor, after checking that every offset fits
    32 bits within one (n, h) slab (the kernels add those in 32 bits; the slab's base in 64)."""
    if any(s > _I32 for s in t.stride()) or (t.shape[2] - 1) + (t.shape[3] - 1) * t.stride(3) > _I32:
        raise ValueError(f"aaconv: strides {t.stride()} of a {tuple(t.shape)} tensor exceed 32 bits")
    return t.stride(0), t.stride(1), t.stride(3)


def _check(q, k, v, rel_h, rel_w, H, W, op):
    """(N, Nh, L, dkh, dvh) after checking the inputs; ValueError naming what is wrong."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{op}: {name} must be a 4-d (N, Nh, L, d) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if q.dtype not in _TL_NAMES:
        raise TypeError(f"{op}: expected fp16, bf16, fp32 or fp64 q, k, v, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        raise ValueError(f"{op}: q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/"
                         f"{v.dtype} on {q.device}/{k.device}/{v.device}")
    N, Nh, L, dkh = q.shape
    if tuple(k.shape) != tuple(q.shape) or tuple(v.shape[:3]) != (N, Nh, L):
        raise ValueError(f"{op}: expected k of q's shape {tuple(q.shape)} and v of shape "
                         f"({N}, {Nh}, {L}, dvh), got {tuple(k.shape)} and {tuple(v.shape)}")
    dvh = v.shape[3]
    H, W = int(H), int(W)
    if H < 1 or W < 1 or H * W != L:
        raise ValueError(f"{op}: the grid H x W = {H} x {W} does not match L = {L}")
    if L > MAX_L:
        raise ValueError(f"{op}: grids of at most {MAX_L} pixels (64 x 64) are supported, got "
                         f"{H} x {W} = {L}")
    if not (1 <= dkh <= MAX_HEAD and 1 <= dvh <= MAX_HEAD):
        raise ValueError(f"{op}: head sizes dkh, dvh of 1 to {MAX_HEAD} are supported, got "
                         f"{dkh}, {dvh}")
    if (rel_h is None) != (rel_w is None):
        raise ValueError(f"{op}: rel_h and rel_w must be given together or not at all")
    if rel_h is not None:
        if max(H, W) > MAX_SIDE:
            raise ValueError(f"{op}: with relative tables, H and W of at most {MAX_SIDE} are "
                             f"supported, got {H} x {W}")
        for name, t, side in (("rel_h", rel_h, H), ("rel_w", rel_w, W)):
            if (not isinstance(t, torch.Tensor) or tuple(t.shape) != (2 * side - 1, dkh)
                    or t.device != q.device or not t.is_floating_point()):
                got = (f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor)
                       else type(t).__name__)
                raise ValueError(f"{op}: expected {name} of shape ({2 * side - 1}, {dkh}) on "
                                 f"{q.device}, got {got}")
    return N, Nh, L, dkh, dvh


def _rel_args(q, rel_h, rel_w):
    """(rw, rh, strides) as the kernels take them: the tables in q's dtype (a copy of two small
    tensors only when they are not), None without tables."""
    if rel_h is None:
        return None, None, (0, 0, 0, 0)
    rw, rh = rel_w.to(q.dtype), rel_h.to(q.dtype)
    return rw, rh, (*rw.stride(), *rh.stride())


def _sizes(dkh, dvh, H, W, relative):
    return _pad(dkh), _pad(dvh), (_pad(max(H, W)) if relative else GRID_PADS[0])


def _launch_cfg(kernel, q, dkh, dvh, H, W, relative):
    """(Config, kwargs): the constexprs of a main kernel (G only for dq: the others take the
    tables' row offset as an integer)."""
    DK, DV, G = _sizes(dkh, dvh, H, W, relative)
    cfg = config(kernel, q.element_size(), DK, DV, G, relative)
    kw = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DK=DK, DV=DV, RELATIVE=relative,
              ACC=_acc(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if kernel == "dq":
        kw["G"] = G
    return cfg, kw


def _tables(q, rw, rh, rs, H, W, dkh):
    """The absolute tables (N, Nh, 2G, L) in q's dtype (_tables_kernel), on q's device."""
    N, Nh, L = q.shape[:3]
    DK, _, G = _sizes(dkh, 1, H, W, True)
    tables = torch.empty((N, Nh, 2 * G, L), dtype=q.dtype, device=q.device)
    bm, warps = tables_config(q.element_size())
    QB = triton.cdiv(L, bm)
    _tables_kernel[(N * Nh * QB,)](q, rw, rh, tables, Nh, L, H, W, dkh, QB, *_strides(q), *rs,
                                   BLOCK_M=bm, DK=DK, G=G, num_warps=warps, num_stages=STAGES)
    return tables


def forward(q, k, v, rel_h, rel_w, H, W, scale):
    """(out, lse): out (N, Nh, L, dvh) in q's dtype with memory in RESULT_ORDER, lse (N, Nh, L)
    contiguous fp32 (fp64 for fp64). The launch is on q's device and its current stream."""
    N, Nh, L, dkh, dvh = _check(q, k, v, rel_h, rel_w, H, W, "aaconv forward")
    H, W = int(H), int(W)
    acc = _acc_dtype(q.dtype)
    out = new_result(N, Nh, L, dvh, q.dtype, q.device)
    lse = torch.empty((N, Nh, L), dtype=acc, device=q.device)
    if N * Nh == 0:
        return out, lse
    q, k, v = (_pixels_unit(t) for t in (q, k, v))
    relative = rel_h is not None
    rw, rh, rs = _rel_args(q, rel_h, rel_w)
    cfg, kw = _launch_cfg("fwd", q, dkh, dvh, H, W, relative)
    with on_device(q):
        sc = _scalar(float(scale), acc, q.device)
        tables = _tables(q, rw, rh, rs, H, W, dkh) if relative else None
        QB = triton.cdiv(L, cfg.block_m)
        GL = tables.shape[2] // 2 * L if relative else 0
        _fwd_kernel[(N * Nh * QB,)](q, k, v, tables, sc, out, lse, Nh, L, W, GL, dkh, dvh, QB,
                                    *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                                    **kw)
    return out, lse


def dq_waves(units: int) -> tuple[int, int]:
    """(programs, waves) of the backward's dq and tables-gradient kernels with tables: waves of
    at most DQ_PROGRAMS query blocks, each program owning one scratch row and one workspace
    slot. A function of the shape only."""
    programs = min(units, DQ_PROGRAMS)
    return programs, triton.cdiv(units, programs)


def _sum_slots(ws: torch.Tensor) -> torch.Tensor:
    """ws (P, R, d) summed over P in a fixed order: chunks of SUM_CHUNK slots in order, then
    the chunks' sums in order (as many levels as needed)."""
    P = ws.shape[0]
    E = ws[0].numel()
    src = ws
    while P > 1:
        C = triton.cdiv(P, SUM_CHUNK)
        dst = torch.empty((C, *ws.shape[1:]), dtype=ws.dtype, device=ws.device)
        _sum_rows_kernel[(triton.cdiv(E, SUM_BLOCK), C)](src, dst, P, E, SUM_CHUNK,
                                                        BLOCK=SUM_BLOCK, ACC=_acc(ws.dtype),
                                                        num_warps=4, num_stages=STAGES)
        src, P = dst, C
    return src[0]


def backward(dout, q, k, v, rel_h, rel_w, out, lse, H, W, scale):
    """(dq, dk, dv, drel_h, drel_w): dq, dk, dv of q's, k's, v's shapes in q's dtype with memory
    in RESULT_ORDER; drel_h, drel_w contiguous in the tables' dtype (None without tables). dout
    and out of v's shape with any strides; lse as forward returned it."""
    op = "aaconv backward"
    N, Nh, L, dkh, dvh = _check(q, k, v, rel_h, rel_w, H, W, op)
    H, W = int(H), int(W)
    acc = _acc_dtype(q.dtype)
    for name, t in (("dout", dout), ("out", out)):
        if (not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(v.shape)
                or t.dtype != q.dtype or t.device != q.device):
            got = (f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor)
                   else type(t).__name__)
            raise ValueError(f"{op}: expected {name} of v's shape {tuple(v.shape)}, {q.dtype} on "
                             f"{q.device}, got {got}")
    if (not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (N, Nh, L) or lse.dtype != acc
            or lse.device != q.device):
        raise ValueError(f"{op}: expected lse of shape ({N}, {Nh}, {L}), {acc}, as the forward "
                         f"returned it")
    relative = rel_h is not None
    dq = new_result(N, Nh, L, dkh, q.dtype, q.device)
    dk = new_result(N, Nh, L, dkh, q.dtype, q.device)
    dv = new_result(N, Nh, L, dvh, q.dtype, q.device)
    drel_h = drel_w = None
    if N * Nh == 0:
        if relative:
            drel_h, drel_w = torch.zeros_like(rel_h), torch.zeros_like(rel_w)
        return dq, dk, dv, drel_h, drel_w
    q, k, v, dout, out = (_pixels_unit(t) for t in (q, k, v, dout, out))
    lse = lse.contiguous()
    rw, rh, rs = _rel_args(q, rel_h, rel_w)
    sq, sk, sv, sg = _strides(q), _strides(k), _strides(v), _strides(dout)
    with on_device(q):
        sc = _scalar(float(scale), acc, q.device)
        d = torch.empty((N, Nh, L), dtype=acc, device=q.device)
        QB = triton.cdiv(L, PRE_BLOCK)
        _bwd_pre_kernel[(N * Nh * QB,)](dout, out, d, Nh, L, dvh, QB, *sg, *_strides(out),
                                        BLOCK_M=PRE_BLOCK, DV=_pad(dvh), ACC=_acc(q.dtype),
                                        num_warps=4, num_stages=STAGES)
        DK, DV, G = _sizes(dkh, dvh, H, W, relative)
        tables = _tables(q, rw, rh, rs, H, W, dkh) if relative else None
        cfg, kw = _launch_cfg("dq", q, dkh, dvh, H, W, relative)
        QB = triton.cdiv(L, cfg.block_m)
        units = N * Nh * QB
        args = (Nh, L, W, dkh, dvh, QB)
        strides = (*sq, *sk, *sv, *sg, *_strides(dq))
        if not relative:
            _bwd_dq_kernel[(units,)](q, k, v, None, sc, dout, lse, d, dq, None, *args, 0,
                                     *strides, **kw)
        else:
            programs, waves = dq_waves(units)
            rel = torch.cat([rw, rh]).contiguous()  # (2W - 1 + 2H - 1, dkh), rel_w's rows first
            scr = torch.empty((programs, cfg.block_m, 2 * G + DK), dtype=acc, device=q.device)
            ws = torch.empty((programs, 2 * W - 1 + 2 * H - 1, dkh), dtype=acc, device=q.device)
            rel_bm, rel_warps, rel_stages = rel_config(q.element_size(), DK, G)
            assert rel_bm == cfg.block_m  # the scratch rows of a dq program
            for u0 in range(0, units, programs):
                grid = (min(programs, units - u0),)
                _bwd_dq_kernel[grid](q, k, v, tables, sc, dout, lse, d, dq, scr, *args, u0,
                                     *strides, **kw)
                _bwd_rel_kernel[grid](q, rel, sc, scr, dq, ws, Nh, L, H, W, dkh, QB, u0, *sq,
                                      *_strides(dq), BLOCK_M=rel_bm, DK=DK, G=G,
                                      ACC=_acc(q.dtype), num_warps=rel_warps,
                                      num_stages=rel_stages)
        cfg, kw = _launch_cfg("dkdv", q, dkh, dvh, H, W, relative)
        KB = triton.cdiv(L, cfg.block_n)
        _bwd_dkdv_kernel[(N * Nh * KB,)](q, k, v, tables, sc, dout, lse, d, dk, dv, Nh, L, W,
                                         G * L if relative else 0, dkh, dvh, KB, *sq, *sk, *sv,
                                         *sg, *_strides(dk),
                                         *_strides(dv), **kw)
        if relative:
            total = _sum_slots(ws)
            drel_w = total[:2 * W - 1].to(rel_w.dtype, copy=True)
            drel_h = total[2 * W - 1:].to(rel_h.dtype, copy=True)
    return dq, dk, dv, drel_h, drel_w
