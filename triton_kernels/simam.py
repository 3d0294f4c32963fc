"""SimAM in Triton (fusedattn/spec/simam.md).

A program owns a tile of ``BLOCK_P`` planes of one sample (consecutive channels) by ``BLOCK_M``
plane elements; element ``m`` of plane ``(n, c)`` lies at ``n*s_n + c*s_c + m*s_m`` (planar:
``s_c = M, s_m = 1``; channels-last: ``s_c = 1, s_m = C``), so both layouts are read in place and
the stride-1 axis is the tile's contiguous one.

Forward: ``mu = mean(x)``, ``inv = 1/(4 (sum((x-mu)^2)/max(M-1,1) + lambda))``,
``y = x sigmoid((x-mu)^2 inv + 1/2)``.
Backward: ``s = sigmoid(e)``, ``a = g x s (1-s)``, ``S1 = sum(a d)``, ``S2 = sum(a d^2)``,
``dx = g s + 2 inv (a d - S1/M) - 8 inv^2 d S2 / n``.

``ONCHIP`` variants hold the whole plane in registers (forward reads x once; backward reads x and
g once). Looped variants stream the plane in ``BLOCK_M`` chunks: statistics merged chunk by chunk
(Chan et al., merge state in fp64) and then the output pass (forward reads x twice; backward x and g twice). Math in
fp32 (fp64 for fp64 inputs); no atomics, so results are bitwise deterministic.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_WARPS = 16   # largest program: 512 threads, 128 registers each
LOOP_WARPS = 4   # program of the looped variants


@triton.jit
def _sigmoid_energy(d, inv, ACC: tl.constexpr):
    """sigmoid(e) for e = d^2 inv + 1/2, per plane inv of shape [BLOCK_P]. In fp32 as
    1 / (1 + 2^z), z = d^2 (-inv log2 e) - log2(e)/2: one multiply-add into exp2."""
    if ACC == tl.float64:
        return 1.0 / (1.0 + tl.exp(-(d * d * inv[:, None] + 0.5)))
    else:
        kz = (inv * -1.4426950408889634)[:, None]
        return 1.0 / (1.0 + tl.exp2(d * d * kz - 0.7213475204444817))


@triton.jit
def _plane_tile(pid, C, M, s_n, s_c, s_m, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row offsets (int64, [BLOCK_P, 1]), column offsets (int64, [1, BLOCK_M]), masks and the
    plane index of the tile's planes."""
    tiles_c = tl.cdiv(C, BLOCK_P)
    n = pid // tiles_c
    c = (pid % tiles_c) * BLOCK_P + tl.arange(0, BLOCK_P)
    cmask = c < C
    base = n.to(tl.int64) * s_n + c.to(tl.int64) * s_c
    m = tl.arange(0, BLOCK_M)
    return base[:, None], m, cmask, n.to(tl.int64) * C + c


@triton.jit
def _tile_at(base, m0, m, cmask, M, s_m):
    """Offsets (int64) and mask of the tile's elements m0 + m of every plane."""
    mm = m0 + m
    return base + mm[None, :].to(tl.int64) * s_m, cmask[:, None] & (mm < M)[None, :]


@triton.jit
def _simam_fwd_kernel(x_ptr, y_ptr, mu_ptr, inv_ptr, lam_ptr, C, M, s_n, s_c, s_m, dof,
                      BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, ONCHIP: tl.constexpr,
                      ACC: tl.constexpr):
    base, m, cmask, plane = _plane_tile(tl.program_id(0), C, M, s_n, s_c, s_m, BLOCK_P, BLOCK_M)
    lam = tl.load(lam_ptr).to(ACC)
    if ONCHIP:
        off, mask = _tile_at(base, 0, m, cmask, M, s_m)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        mean = tl.sum(x, axis=1) / M
        d = tl.where(mask, x - mean[:, None], 0.0)
        m2 = tl.sum(d * d, axis=1)
    else:
        # chunk statistics in ACC, merged across chunks in fp64 (planes can be huge)
        mean64 = tl.zeros([BLOCK_P], tl.float64)
        m2_64 = tl.zeros([BLOCK_P], tl.float64)
        count = tl.zeros([BLOCK_P], tl.float64)
        for m0 in range(0, M, BLOCK_M):
            off, mask = _tile_at(base, m0, m, cmask, M, s_m)
            x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
            cnt = tl.sum((m0 + m < M).to(ACC), axis=0)
            cmean = tl.sum(x, axis=1) / cnt
            d = tl.where(mask, x - cmean[:, None], 0.0)
            cm2 = tl.sum(d * d, axis=1)
            w = cnt.to(tl.float64) / (count + cnt)
            delta = cmean.to(tl.float64) - mean64
            mean64 = mean64 + delta * w
            m2_64 = m2_64 + cm2 + delta * delta * count * w
            count += cnt
        mean = mean64.to(ACC)
        m2 = m2_64.to(ACC)
    inv = 1.0 / (4.0 * (m2 / dof + lam))
    if ONCHIP:
        d = x - mean[:, None]
        s = _sigmoid_energy(d, inv, ACC)
        tl.store(y_ptr + off, (x * s).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        for m0 in range(0, M, BLOCK_M):
            off, mask = _tile_at(base, m0, m, cmask, M, s_m)
            x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
            d = x - mean[:, None]
            s = _sigmoid_energy(d, inv, ACC)
            tl.store(y_ptr + off, (x * s).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mu_ptr + plane, mean, mask=cmask)
    tl.store(inv_ptr + plane, inv, mask=cmask)


@triton.jit
def _simam_bwd_terms(x, g, mean, inv, ACC: tl.constexpr):
    d = x - mean[:, None]
    s = _sigmoid_energy(d, inv, ACC)
    a = g * x * s * (1.0 - s)
    return d, s, a


@triton.jit
def _simam_bwd_kernel(g_ptr, x_ptr, mu_ptr, inv_ptr, dx_ptr, C, M, s_n, s_c, s_m, dof,
                      BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, ONCHIP: tl.constexpr,
                      ACC: tl.constexpr):
    base, m, cmask, plane = _plane_tile(tl.program_id(0), C, M, s_n, s_c, s_m, BLOCK_P, BLOCK_M)
    mean = tl.load(mu_ptr + plane, mask=cmask, other=0.0).to(ACC)
    inv = tl.load(inv_ptr + plane, mask=cmask, other=0.0).to(ACC)
    if ONCHIP:
        off, mask = _tile_at(base, 0, m, cmask, M, s_m)
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(ACC)
        d, s, a = _simam_bwd_terms(x, g, mean, inv, ACC)
        ad = tl.where(mask, a * d, 0.0)
        S1 = tl.sum(ad, axis=1)
        S2 = tl.sum(ad * d, axis=1)
    else:
        S1 = tl.zeros([BLOCK_P], tl.float64)  # chunk sums added up in fp64
        S2 = tl.zeros([BLOCK_P], tl.float64)
        for m0 in range(0, M, BLOCK_M):
            off, mask = _tile_at(base, m0, m, cmask, M, s_m)
            x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
            g = tl.load(g_ptr + off, mask=mask, other=0.0).to(ACC)
            d, s, a = _simam_bwd_terms(x, g, mean, inv, ACC)
            ad = tl.where(mask, a * d, 0.0)
            S1 += tl.sum(ad, axis=1)
            S2 += tl.sum(ad * d, axis=1)
    k1 = (S1.to(ACC) / M)[:, None]
    k2 = (8.0 * inv * inv * S2.to(ACC) / dof)[:, None]
    inv2 = 2.0 * inv[:, None]
    if ONCHIP:
        dx = g * s + inv2 * (a * d - k1) - k2 * d
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        for m0 in range(0, M, BLOCK_M):
            off, mask = _tile_at(base, m0, m, cmask, M, s_m)
            x = tl.load(x_ptr + off, mask=mask, other=0.0).to(ACC)
            g = tl.load(g_ptr + off, mask=mask, other=0.0).to(ACC)
            d, s, a = _simam_bwd_terms(x, g, mean, inv, ACC)
            dx = g * s + inv2 * (a * d - k1) - k2 * d
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class Config:
    """One launch specialisation: tile shape, on-chip or looped, warps."""
    block_p: int
    block_m: int
    onchip: bool
    num_warps: int


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


_BLOCK_M = (16, 64, 256, 512, 1024, 2048, 4096, 8192)  # tile lengths along the plane


def per_thread(channels_last: bool, elem_bytes: int) -> int:
    """Tile elements per thread that the backward (x and dy held at once, 64-bit addresses per
    element) keeps in 128 registers without spilling, as the AOT check measures: fewer for fp64
    and for channels-last, whose rows are rarely 16-byte aligned."""
    return 4 if elem_bytes == 8 else (8 if channels_last else 16)


def config(C: int, M: int, channels_last: bool, elem_bytes: int) -> Config:
    """The launcher's choice for planes of M elements. Planar: the shortest tile length from
    _BLOCK_M that holds the plane, and enough planes per program for 1024-element tiles.
    Channels-last: 32 bytes of channels per program (a full sector per row). Warps: the tile
    over per_thread() elements per thread, at most MAX_WARPS; a plane that does not fit is
    looped in tiles of 4 warps."""
    pt = per_thread(channels_last, elem_bytes)
    block_p = max(1, 32 // elem_bytes) if channels_last else 1
    for block_m in _BLOCK_M:
        if not channels_last:
            block_p = max(1, 1024 // block_m)
        tile = block_p * block_m
        if block_m >= M and tile <= MAX_WARPS * 32 * pt:
            return Config(block_p, block_m, True, max(1, min(MAX_WARPS, tile // (32 * pt))))
    block_p = block_p if channels_last else 1
    return Config(block_p, max(16, LOOP_WARPS * 32 * pt // block_p), False, LOOP_WARPS)


def specializations() -> list[tuple[bool, int, Config]]:
    """Every (channels_last, element bytes, Config) the launcher can pick: config() over plane
    sizes at each boundary of its choice (it depends on M only through the _BLOCK_M steps)."""
    seen = []
    for cl in (False, True):
        for eb in (2, 4, 8):
            for M in (*_BLOCK_M, _BLOCK_M[-1] + 1):
                key = (cl, eb, config(1, M, cl, eb))
                if key not in seen:
                    seen.append(key)
    return seen


_TL_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
             torch.float64: "fp64"}


def aot_variants():
    """(name, kernel, signature, constexprs, attrs, num_warps) of every compiled form the launchers can
    produce, for ahead-of-time compilation (``python -m fusedattn.aot``): each specialisation x
    each dtype of its element size, forward and backward. Pointer and integer arguments are typed
    as the launcher passes them; the unit stride of the layout (s_m = 1 planar, s_c = 1
    channels-last) is a constant, as Triton specialises arguments equal to 1."""
    for cl, eb, cfg in specializations():
        for dtype in (d for d in _TL_NAMES if torch.empty((), dtype=d).element_size() == eb):
            t = _TL_NAMES[dtype]
            st = "fp64" if dtype == torch.float64 else "fp32"
            unit = "s_c" if cl else "s_m"
            ints = {k: "i32" for k in ("C", "M", "s_n", "s_c", "s_m", "dof")}
            ints[unit] = "constexpr"
            consts = {unit: 1, "BLOCK_P": cfg.block_p, "BLOCK_M": cfg.block_m,
                      "ONCHIP": cfg.onchip, "ACC": _acc(dtype)}
            meta = {k: "constexpr" for k in ("BLOCK_P", "BLOCK_M", "ONCHIP", "ACC")}
            layout = "cl" if cl else "planar"
            name = f"{t}_{layout}_p{cfg.block_p}_m{cfg.block_m}_{'onchip' if cfg.onchip else 'looped'}"
            fwd = {"x_ptr": f"*{t}", "y_ptr": f"*{t}", "mu_ptr": f"*{st}", "inv_ptr": f"*{st}",
                   "lam_ptr": f"*{st}", **{k: ints[k] for k in ("C", "M", "s_n", "s_c", "s_m", "dof")},
                   **meta}
            bwd = {"g_ptr": f"*{t}", "x_ptr": f"*{t}", "mu_ptr": f"*{st}", "inv_ptr": f"*{st}",
                   "dx_ptr": f"*{t}", **{k: ints[k] for k in ("C", "M", "s_n", "s_c", "s_m", "dof")},
                   **meta}
            for aligned in (True, False):
                # as the launcher specialises: 16-byte aligned pointers; integer arguments
                # divisible by 16 (shapes with multiples of 16) or not
                for kind, kernel, sig in (("fwd", _simam_fwd_kernel, fwd), ("bwd", _simam_bwd_kernel, bwd)):
                    attrs = {(i,): [["tt.divisibility", 16]] for i, (k, v) in enumerate(sig.items())
                             if v.startswith("*") or (aligned and v == "i32")}
                    yield (f"simam_{kind}_{name}_{'div16' if aligned else 'any'}", kernel, sig,
                           consts, attrs, cfg.num_warps)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


_scalars: dict = {}


def on_device(x: torch.Tensor):
    """The context of a launch for ``x``: Triton 3 launches on torch's current CUDA device, on that
    device's current stream (``torch.cuda.current_device()``, ``torch.cuda.current_stream()``), so
    x's device is made current for the launch; the stream is then x's device's current stream,
    the one torch's own ops on x use. Nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached one-element tensor (Triton passes Python floats as fp32; lambda must reach fp64
    kernels in full precision). A CUDA one is filled on the current stream, which is synchronised
    once, so that kernels on any stream read it filled; under CUDA graph capture it is made per
    call (the fill is captured with the launch)."""
    key = (value, dtype, device)
    t = _scalars.get(key)
    if t is None:
        t = torch.full((1,), value, dtype=dtype, device=device)
        if device.type == "cuda":
            if torch.cuda.is_current_stream_capturing():
                return t
            torch.cuda.current_stream(device).synchronize()
        _scalars[key] = t
    return t


def _geometry(x: torch.Tensor):
    """(N, C, M, s_n, s_c, s_m, channels_last) of a tensor in a readable layout."""
    N, C = x.shape[:2]
    M = x[0, 0].numel() if x.numel() else 0
    channels_last = not x.is_contiguous()
    if channels_last:
        return N, C, M, M * C, 1, C, True
    return N, C, M, C * M, M, 1, False


def forward(x: torch.Tensor, e_lambda: float):
    """(y, mu, inv) for ``x`` in a readable layout (see fusedattn.ops.layout). The launch is on x's
    device and its current stream (on_device)."""
    N, C, M, s_n, s_c, s_m, cl = _geometry(x)
    y = torch.empty_like(x)
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    mu = torch.zeros((N, C), dtype=stat, device=x.device)
    inv = torch.zeros((N, C), dtype=stat, device=x.device)
    if x.numel() == 0:
        return y, mu, inv
    cfg = config(C, M, cl, x.element_size())
    grid = (N * triton.cdiv(C, cfg.block_p),)
    with on_device(x):
        lam = _scalar(float(e_lambda), stat, x.device)
        _simam_fwd_kernel[grid](x, y, mu, inv, lam, C, M, s_n, s_c, s_m, max(M - 1, 1),
                                BLOCK_P=cfg.block_p, BLOCK_M=cfg.block_m, ONCHIP=cfg.onchip,
                                ACC=_acc(x.dtype), num_warps=cfg.num_warps)
    return y, mu, inv


def backward(g: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, inv: torch.Tensor):
    """dx for ``x`` in a readable layout and ``g`` in exactly x's strides, on x's device and its
    current stream."""
    N, C, M, s_n, s_c, s_m, cl = _geometry(x)
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx
    cfg = config(C, M, cl, x.element_size())
    grid = (N * triton.cdiv(C, cfg.block_p),)
    with on_device(x):
        _simam_bwd_kernel[grid](g, x, mu.contiguous(), inv.contiguous(), dx, C, M, s_n, s_c, s_m,
                                max(M - 1, 1), BLOCK_P=cfg.block_p, BLOCK_M=cfg.block_m,
                                ONCHIP=cfg.onchip, ACC=_acc(x.dtype), num_warps=cfg.num_warps)
    return dx
