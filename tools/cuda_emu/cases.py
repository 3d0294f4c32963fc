"""The cases that execute every CUDA kernel of csrc/cuda/ through the extension's own host code,
and how their results are judged against the CPU ops.

A case is an op call (``torch.ops.<namespace>.<op>(*args)``) on small CPU tensors, chosen so that
the launcher picks a given path: warp-, block-per-plane and looped SimAM, channels-last tiles,
split reductions and their merge, vectorised and scalar variants (aligned or offset pointers,
sizes that are or are not multiples of the pack), each channel-group variant, several blocks,
partial warps and tiles. ``expect`` names the kernel instantiations the case must launch (checked
against the emulator's launch log), so that a case that drifts off its path fails instead of
silently testing another one.

Judging (``check``): against the CPU op on the same inputs (torch.ops.fusedattn.*). The maxima
and their argmax must be bitwise equal to it; elementwise outputs (gate, grad_x) must be bitwise
equal to the same IEEE operations in the kernel's order (evaluated here with torch, one rounded
operation at a time: the emulation, like the CPU ops, does not contract a * b + c into an FMA,
which nvcc does by default on a GPU) and within the tolerance rule of the CPU op; sums in another
order, and SimAM's device math (fp64 reciprocal by Newton steps, exp2f), follow the project's
tolerance rule against the CPU op in fp64 (fp64: agreement to 1e-12 relative).

Used by tests/test_cuda_emulated.py (emulated, on the CPU) and by run_cases.py --device cuda
(scripts/gpu_sanitize.sh: the same cases on a GPU under compute-sanitizer).
"""
from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field

import torch

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

# The C++ spelling of each dtype in a kernel's __PRETTY_FUNCTION__.
CPP_TYPE = {F32: "float", F64: "double", F16: "c10::Half", BF16: "c10::BFloat16"}
DTYPE_NAME = {F32: "float", F64: "double", F16: "half", BF16: "bfloat16"}

# Absolute slack added to 2x the CPU op's error (tests/helpers.py's ATOL), scaled by the
# magnitude of the exact result.
ATOL = {F16: 1e-3, BF16: 8e-3, F32: 2e-6, F64: 1e-12}


@dataclass
class Case:
    id: str
    op: str
    args: list
    expect: list = field(default_factory=list)  # [(kernel name, {template param: value})]
    # per output: False = the tolerance rule against the CPU op; True = bitwise equal to the CPU
    # op; "order" = bitwise equal to the same operations in the kernel's order (same_order()),
    # and the tolerance rule against the CPU op
    exact: tuple = ()
    dtype: torch.dtype = F32
    note: str = ""

    def call(self, namespace: str = "fusedattn", device: str = "cpu"):
        args = [to_device(a, device) if isinstance(a, torch.Tensor) else a for a in self.args]
        return getattr(getattr(torch.ops, namespace), self.op)(*args)


    def with_dtype(self, dtype: torch.dtype) -> "Case":
        """The same case with its full-size tensors (those of the case's dtype) in `dtype`, same
        strides and storage offsets; the small tensors (accumulation dtype) as they are."""
        args = [convert(a, dtype) if isinstance(a, torch.Tensor) and a.dtype == self.dtype else a
                for a in self.args]
        expect = [(n, {k: (CPP_TYPE[dtype] if k == "T" else v) for k, v in p.items()})
                  for n, p in self.expect]
        return Case(f"{self.id}@{DTYPE_NAME[dtype]}", self.op, args, expect, self.exact, dtype,
                    self.note)


# fp16 and bf16 take the same code paths (2 bytes, packs of 8, fp32 accumulation)
SIBLING = {F16: BF16, BF16: F16}


def for_build(case: Case, dtypes) -> Case | None:
    """The case as a build instantiating only `dtypes` (None: all) runs it: itself, its fp16 /
    bf16 twin, or None."""
    if dtypes is None or DTYPE_NAME[case.dtype] in dtypes:
        return case
    sib = SIBLING.get(case.dtype)
    if sib is not None and DTYPE_NAME[sib] in dtypes:
        return case.with_dtype(sib)
    return None


def convert(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype` with the same storage size, strides and storage offset."""
    flat = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())
    return flat.to(dtype).as_strided(t.shape, t.stride(), t.storage_offset())


def to_device(t: torch.Tensor, device: str) -> torch.Tensor:
    """t on `device` with the same storage size, strides and storage offset (a misaligned view
    stays misaligned)."""
    if t.device.type == torch.device(device).type:
        return t
    flat = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())
    return flat.to(device).as_strided(t.shape, t.stride(), t.storage_offset())


def K(name: str, **params) -> tuple:
    return (name, {k: (CPP_TYPE[v] if isinstance(v, torch.dtype) else
                       ("true" if v is True else "false" if v is False else str(v)))
                   for k, v in params.items()})


def launched(expect: tuple, log: list[str]) -> bool:
    """Whether a launch-log line (a kernel's __PRETTY_FUNCTION__ ...) is the expected one."""
    name, params = expect
    for line in log:
        if not re.search(rf"::{re.escape(name)}\(", line):
            continue
        if all(re.search(rf"\b{re.escape(k)} = {re.escape(v)}[;\]]", line)
               for k, v in params.items()):
            return True
    return False


# ------------------------------------------------------------------------------- tensors

def _gen(key: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


def dense(g, shape, dtype, layout="planar", offset=0, values="randn"):
    """(N, C, *S) in `layout` ('planar' = contiguous, 'cl' = dense channels-last of any rank), its
    storage exactly `offset` elements longer than the tensor (the view starts at `offset`)."""
    n = math.prod(shape)
    if values == "ties":  # small integers: many equal maxima
        flat = torch.randint(-2, 3, (n + offset,), generator=g).double()
    else:
        flat = torch.randn(n + offset, generator=g, dtype=F64)
    flat = flat.to(dtype)
    base = flat[offset:]
    if layout == "planar":
        return base.view(shape)
    t = base.view(shape[0], *shape[2:], shape[1])
    return t.permute(0, t.dim() - 1, *range(1, t.dim() - 1))


def small(g, shape, dtype, offset=0):
    n = math.prod(shape)
    return torch.randn(n + offset, generator=g, dtype=F64).to(dtype)[offset:].view(shape)


def acc(dtype):
    return F64 if dtype == F64 else F32


def groups_of(g, N, C, size1):
    """(N, C) bool flags with exactly size1 channels of group 1 in every sample."""
    rows = []
    for _ in range(N):
        perm = torch.randperm(C, generator=g)
        rows.append(perm < size1)
    return torch.stack(rows), C - size1, size1


def maps(g, N, G, P, C, dtype, offset=0):
    """The backward's spatial maps s, d_avg, d_max (acc dtype) and argmax (int32), (N, G, P)."""
    a = acc(dtype)
    arg = torch.randint(0, C, (N * G * P + offset,), generator=g, dtype=torch.int32)
    return (small(g, (N, G, P), a, offset), small(g, (N, G, P), a, offset),
            small(g, (N, G, P), a, offset), arg[offset:].view(N, G, P))


# ------------------------------------------------------------------------------- SimAM

def simam_cases() -> list[Case]:
    """Forward and backward of each plan of csrc/cuda/simam.cu (plan(): warp per plane up to
    256 elements, block per plane up to 8192, looped beyond; channels-last rows in registers up
    to 256 rows, looped beyond), register item counts 2, 8, 32."""
    spec = [
        # id, shape, dtype, layout, kernel suffix, template params, note
        ("warp_items2", (2, 5, 7, 9), F32, "planar", "planar_onchip", dict(ITEMS=2, WARP=True),
         "M = 63: 10 planes on 2 blocks of 8 warps, 6 warps of the second exit at once"),
        ("warp_items8_f16", (1, 3, 13, 17), F16, "planar", "planar_onchip",
         dict(ITEMS=8, WARP=True), "M = 221, one block, 5 warps exit"),
        ("warp_m1_f64", (2, 3, 1, 1), F64, "planar", "planar_onchip", dict(ITEMS=2, WARP=True),
         "one-element planes (n = max(M - 1, 1))"),
        ("block_items2_bf16", (1, 2, 15, 20), BF16, "planar", "planar_onchip",
         dict(ITEMS=2, WARP=False), "M = 300"),
        ("block_items8_f64", (1, 2, 25, 40), F64, "planar", "planar_onchip",
         dict(ITEMS=8, WARP=False), "M = 1000"),
        ("block_items32_rank3", (1, 2, 5000), F32, "planar", "planar_onchip",
         dict(ITEMS=32, WARP=False), "(N, C, L), M = 5000"),
        ("looped", (1, 2, 91, 91), F32, "planar", "planar_looped", {}, "M = 8281 > 8192"),
        ("looped_f16_rank5", (1, 1, 3, 55, 55), F16, "planar", "planar_looped", {}, "M = 9075"),
        ("cl_rows2", (2, 40, 3, 5), F32, "cl", "cl", dict(ROWS=2),
         "C = 40: 2 channel tiles, the second 8 of 32 lanes wide"),
        ("cl_rows8_f16", (1, 33, 7, 9), F16, "cl", "cl", dict(ROWS=8), "C = 33, M = 63"),
        ("cl_rows32_f64", (1, 8, 16, 16), F64, "cl", "cl", dict(ROWS=32), "M = 256"),
        ("cl_rows32_bf16_rank5", (1, 5, 2, 8, 8), BF16, "cl", "cl", dict(ROWS=32),
         "channels_last_3d, M = 128"),
        ("cl_rows8_rank3", (2, 16, 50), F32, "cl", "cl", dict(ROWS=8),
         "(N, C, L) stored as (N, L, C)"),
        ("cl_looped", (2, 3, 17, 19), F32, "cl", "cl", dict(ROWS=0), "M = 323 > 256"),
        ("cl_looped_bf16", (1, 70, 20, 20), BF16, "cl", "cl", dict(ROWS=0), "C = 70: 3 tiles"),
    ]
    out = []
    for cid, shape, dtype, layout, suffix, params, note in spec:
        g = _gen("simam/" + cid)
        x = dense(g, shape, dtype, layout)
        out += _simam_pair(cid, x, g, suffix, params, note)
    # a view the kernels cannot read (copied to contiguous), and one at a storage offset
    g = _gen("simam/transposed")
    x = dense(g, (2, 3, 9, 7), F32).transpose(2, 3)
    out += _simam_pair("transposed", x, g, "planar_onchip", dict(ITEMS=2, WARP=True),
                       "a transposed view: the host copies it")
    g = _gen("simam/offset")
    x = dense(g, (2, 4, 6, 6), F32, offset=1)
    out += _simam_pair("offset", x, g, "planar_onchip", dict(ITEMS=2, WARP=True),
                       "storage offset 1, grad in channels-last (copied to x's strides)",
                       grad_layout="cl")
    g = _gen("simam/empty")
    x = torch.empty(0, 3, 4, 4)
    out.append(Case("simam/empty/fwd", "simam_forward", [x, 1e-4], [], (False,) * 3, F32,
                    "empty: no launch"))
    return out


def _simam_pair(cid, x, g, suffix, params, note, grad_layout=None):
    dtype = x.dtype
    lam = 1e-4 if "f16" not in cid else 0.1
    fwd = Case(f"simam/{cid}/fwd", "simam_forward", [x, lam],
               [K("fwd_" + suffix, T=dtype, **params)], (False, False, False), dtype, note)
    if x.numel() == 0:
        return [fwd]
    _, mu, inv = torch.ops.fusedattn.simam_forward(x, lam)
    if grad_layout == "cl":
        grad = dense(g, tuple(x.shape), dtype, "cl")
    else:
        grad = dense(g, tuple(x.shape), dtype)
    bwd = Case(f"simam/{cid}/bwd", "simam_backward", [grad, x, mu, inv],
               [K("bwd_" + suffix, T=dtype, **params)], (False,), dtype, note)
    return [fwd, bwd]


# ------------------------------------------------------------------------------ passes
# Geometry (csrc/cuda/passes.cu, host side): planar pixel passes are a warp per (plane, split),
# splits when N C < 8192 warps and P >= 2 x 2048 (reductions) or 2 x 512 (gate, grad_x, fp32
# packs); channels-last pixel passes are blocks of (bx = 8..32 lanes) x (256 / bx rows), splits
# when P >= 2 x 16 rows of the block; planar channel reductions split C from 128 channels up;
# 16-byte packs (VEC = 4 fp32, 8 fp16/bf16, 2 fp64) when the sizes and pointers allow.

def _x(case, shape, dtype, layout="planar", offset=0, values="randn"):
    return dense(_gen("passes/" + case), shape, dtype, layout, offset, values)


def passes_cases() -> list[Case]:
    c: list[Case] = []

    def add(cid, op, args, expect, exact, dtype, note=""):
        c.append(Case(f"passes/{cid}", op, args, expect, exact, dtype, note))

    def vec(dtype):
        return {F32: 4, F64: 2, F16: 8, BF16: 8}[dtype]

    # -- pool_pixels(x, with_max) -> (mean, max, argmax)
    E3 = (False, True, True)
    O = ("order",)
    x = _x("pp1", (2, 3, 8, 8), F32, values="ties")
    add("pool_pixels/planar_vec_max", "pool_pixels", [x, True],
        [K("pool_pixels_planar", T=F32, VEC=4, MAX=True)], E3, F32, "ties: first index")
    x = _x("pp2", (1, 5, 7, 9), F16)
    add("pool_pixels/planar_scalar_f16", "pool_pixels", [x, False],
        [K("pool_pixels_planar", T=F16, VEC=1, MAX=False)], E3, F16, "P = 63: no packs")
    x = _x("pp3", (1, 2, 64, 65), F32, values="ties")
    add("pool_pixels/planar_split_max", "pool_pixels", [x, True],
        [K("pool_pixels_planar", T=F32, VEC=4, MAX=True), K("merge_splits", A="float")], E3, F32,
        "P = 4160: 2 splits of 2176, merged in order (ties across splits)")
    x = _x("pp4", (1, 1, 70, 70), BF16, offset=1)
    add("pool_pixels/planar_split_offset_bf16", "pool_pixels", [x, False],
        [K("pool_pixels_planar", T=BF16, VEC=1, MAX=False), K("merge_splits", A="float")], E3,
        BF16, "storage offset 1: misaligned, scalar loads; 2 splits")
    x = _x("pp4f", (1, 2, 8, 8), F32, offset=1)
    add("pool_pixels/planar_offset", "pool_pixels", [x, True],
        [K("pool_pixels_planar", T=F32, VEC=1, MAX=True)], E3, F32,
        "P = 64 but the data 4 bytes off a 16-byte boundary: scalar loads")
    x = _x("pp5", (2, 32, 5, 7), F32, "cl", values="ties")
    add("pool_pixels/cl_vec_max", "pool_pixels", [x, True],
        [K("pool_pixels_cl", T=F32, VEC=4, MAX=True)], E3, F32, "8 lanes x 32 rows")
    x = _x("pp6", (1, 19, 17, 19), F64, "cl")
    add("pool_pixels/cl_scalar_split_f64", "pool_pixels", [x, False],
        [K("pool_pixels_cl", T=F64, VEC=1, MAX=False), K("merge_splits", A="double")], E3, F64,
        "C = 19: 32 lanes, 13 idle; 2 splits")
    x = _x("pp7", (1, 64, 32, 32), F16, "cl", values="ties")
    add("pool_pixels/cl_vec_split_max_f16", "pool_pixels", [x, True],
        [K("pool_pixels_cl", T=F16, VEC=8, MAX=True), K("merge_splits", A="float")], E3, F16,
        "P = 1024: 2 splits")
    x = _x("pp8", (3, 20, 1, 1), F32)
    add("pool_pixels/1x1", "pool_pixels", [x, True],
        [K("pool_pixels_cl", T=F32, VEC=1, MAX=True)], E3, F32, "1x1 maps take the cl kernels")
    x = _x("pp9", (2, 3, 5, 5), F32).clone()
    x[0, 1, 2, 3] = float("nan")
    x[1, 2, 0, 0] = float("-inf")
    add("pool_pixels/nan", "pool_pixels", [x, True],
        [K("pool_pixels_planar", T=F32, VEC=1, MAX=True)], E3, F32, "NaN is the largest")

    # -- pool_channels(x, a, group, size0, size1) -> (avg, max, argmax)
    g = _gen("pc")
    x = _x("pc1", (2, 5, 7, 9), F32, values="ties")
    add("pool_channels/planar_g1", "pool_channels", [x, small(g, (2, 5), F32), None, 5, 0],
        [K("channels_planar", T=F32, GRAD=False, NG=1)], E3, F32, "P = 63: 2 pixel tiles")
    x = _x("pc2", (1, 130, 5, 7), F32, values="ties")
    grp, s0, s1 = groups_of(g, 1, 130, 47)
    add("pool_channels/planar_g2_split", "pool_channels",
        [x, small(g, (1, 130), F32), grp, s0, s1],
        [K("channels_planar", T=F32, GRAD=False, NG=2), K("merge_splits", A="float")], E3, F32,
        "C = 130: 2 channel splits, merged per group")
    x = _x("pc2w", (1, 130, 15, 20), F32)
    grp, s0, s1 = groups_of(g, 1, 130, 64)
    add("pool_channels/planar_g2_split_wide", "pool_channels",
        [x, small(g, (1, 130), F32), grp, s0, s1],
        [K("channels_planar", T=F32, GRAD=False, NG=2), K("merge_splits", A="float")], E3, F32,
        "P = 300: 10 pixel tiles x 2 splits; the merge spans 2 x 2 blocks, the second 44 wide")
    x = _x("pc3", (2, 6, 4, 4), F16)
    grp = torch.zeros(2, 6, dtype=torch.bool)
    add("pool_channels/planar_g2_empty_group_f16", "pool_channels",
        [x, small(g, (2, 6), F32), grp, 6, 0],
        [K("channels_planar", T=F16, GRAD=False, NG=2)], E3, F16, "group 1 empty")
    x = _x("pc4", (2, 32, 3, 5), F32, "cl", values="ties")
    grp, s0, s1 = groups_of(g, 2, 32, 13)
    add("pool_channels/cl_vec_g2", "pool_channels", [x, small(g, (2, 32), F32), grp, s0, s1],
        [K("channels_cl", T=F32, VEC=4, GRAD=False, NG=2)], E3, F32)
    x = _x("pc5", (1, 24, 5, 5), BF16, "cl")
    add("pool_channels/cl_scalar_g1_bf16", "pool_channels", [x, small(g, (1, 24), F32), None, 24, 0],
        [K("channels_cl", T=BF16, VEC=1, GRAD=False, NG=1)], E3, BF16)
    x = _x("pc6", (1, 16, 3, 3), F64, "cl")
    add("pool_channels/cl_vec_g1_f64", "pool_channels", [x, small(g, (1, 16), F64), None, 16, 0],
        [K("channels_cl", T=F64, VEC=2, GRAD=False, NG=1)], E3, F64)

    # -- gate_grad_s(dy, x, a, group) -> ds
    x = _x("gs1", (1, 130, 5, 7), F32)
    add("gate_grad_s/planar_g1_split", "gate_grad_s",
        [_x("gs1d", (1, 130, 5, 7), F32), x, small(g, (1, 130), F32), None],
        [K("channels_planar", T=F32, GRAD=True, NG=1), K("merge_splits", A="float")], (False,),
        F32, "2 channel splits, merged (no max)")
    x = _x("gs2", (2, 7, 6, 6), BF16)
    grp, _, _ = groups_of(g, 2, 7, 3)
    add("gate_grad_s/planar_g2_bf16", "gate_grad_s",
        [_x("gs2d", (2, 7, 6, 6), BF16), x, small(g, (2, 7), F32), grp],
        [K("channels_planar", T=BF16, GRAD=True, NG=2)], (False,), BF16)
    x = _x("gs3", (1, 64, 3, 3), F16, "cl")
    grp, _, _ = groups_of(g, 1, 64, 20)
    add("gate_grad_s/cl_vec_g2_f16", "gate_grad_s",
        [_x("gs3d", (1, 64, 3, 3), F16, "cl"), x, small(g, (1, 64), F32), grp],
        [K("channels_cl", T=F16, VEC=8, GRAD=True, NG=2)], (False,), F16)
    x = _x("gs4", (2, 5, 4, 4), F32, "cl")
    add("gate_grad_s/cl_scalar_g1", "gate_grad_s",
        [_x("gs4d", (2, 5, 4, 4), F32, "cl"), x, small(g, (2, 5), F32), None],
        [K("channels_cl", T=F32, VEC=1, GRAD=True, NG=1)], (False,), F32)

    # -- gate(x, a, s, group) -> y
    x = _x("ga1", (2, 3, 8, 8), F32)
    add("gate/planar_vec_g0", "gate", [x, small(g, (2, 3), F32), None, None],
        [K("gate_planar", T=F32, VEC=4, NG=0)], O, F32)
    x = _x("ga2", (1, 2, 30, 35), F16)
    add("gate/planar_scalar_g1_split_f16", "gate",
        [x, small(g, (1, 2), F32), small(g, (1, 1, 1050), F32), None],
        [K("gate_planar", T=F16, VEC=1, NG=1)], O, F16, "P = 1050: 7 splits, 2 blocks")
    x = _x("ga3", (2, 4, 8, 16), BF16)
    grp, _, _ = groups_of(g, 2, 4, 1)
    add("gate/planar_vec_g2_bf16", "gate", [x, small(g, (2, 4), F32), small(g, (2, 2, 128), F32), grp],
        [K("gate_planar", T=BF16, VEC=8, NG=2)], O, BF16)
    x = _x("ga4", (2, 32, 4, 5), F32, "cl")
    grp, _, _ = groups_of(g, 2, 32, 9)
    add("gate/cl_vec_g2", "gate", [x, small(g, (2, 32), F32), small(g, (2, 2, 20), F32), grp],
        [K("gate_cl", T=F32, VEC=4, NG=2)], O, F32)
    x = _x("ga5", (1, 6, 3, 3), F64, "cl", offset=1)
    add("gate/cl_scalar_g0_offset_f64", "gate", [x, small(g, (1, 6), F64), None, None],
        [K("gate_cl", T=F64, VEC=1, NG=0)], O, F64, "storage offset 1")
    x = _x("ga6", (1, 8, 24, 24), F32, "cl")
    add("gate/cl_scalar_g1_split", "gate", [x, small(g, (1, 8), F32), small(g, (1, 1, 576), F32), None],
        [K("gate_cl", T=F32, VEC=1, NG=1)], O, F32, "P = 576: 2 splits")

    # -- grad_a(x, dy, s, group, d_avg, d_max, argmax, size0, size1) -> da
    x = _x("gr1", (2, 3, 8, 8), F32)
    add("grad_a/planar_vec_g0", "grad_a",
        [x, _x("gr1d", (2, 3, 8, 8), F32), None, None, None, None, None, 3, 0],
        [K("grad_a_planar", T=F32, VEC=4, NG=0)], (False,), F32)
    x = _x("gr2", (1, 2, 65, 65), F32)
    grp, s0, s1 = groups_of(g, 1, 2, 1)
    s_, dav, dmx, am = maps(g, 1, 2, 4225, 2, F32)
    add("grad_a/planar_scalar_g2_split", "grad_a",
        [x, _x("gr2d", (1, 2, 65, 65), F32), s_, grp, dav, dmx, am, s0, s1],
        [K("grad_a_planar", T=F32, VEC=1, NG=2), K("merge_splits", A="float")], (False,), F32,
        "P = 4225: 2 splits")
    x = _x("gr3", (2, 3, 4, 8), F16)
    s_, dav, dmx, am = maps(g, 2, 1, 32, 3, F16)
    add("grad_a/planar_vec_g1_f16", "grad_a",
        [x, _x("gr3d", (2, 3, 4, 8), F16), s_, None, dav, dmx, am, 3, 0],
        [K("grad_a_planar", T=F16, VEC=8, NG=1)], (False,), F16)
    x = _x("gr3o", (2, 3, 4, 8), F32)
    s_, dav, dmx, am = maps(g, 2, 1, 32, 3, F32, offset=1)
    add("grad_a/planar_maps_offset", "grad_a",
        [x, _x("gr3od", (2, 3, 4, 8), F32), s_, None, dav, dmx, am, 3, 0],
        [K("grad_a_planar", T=F32, VEC=1, NG=1)], (False,), F32,
        "maps at a storage offset: scalar loads")
    x = _x("gr4", (1, 32, 5, 5), F32, "cl")
    grp, s0, s1 = groups_of(g, 1, 32, 11)
    s_, dav, dmx, am = maps(g, 1, 2, 25, 32, F32)
    add("grad_a/cl_vec_g2", "grad_a",
        [x, _x("gr4d", (1, 32, 5, 5), F32, "cl"), s_, grp, dav, dmx, am, s0, s1],
        [K("grad_a_cl", T=F32, VEC=4, NG=2)], (False,), F32)
    x = _x("gr5", (1, 12, 20, 30), BF16, "cl")
    add("grad_a/cl_scalar_g0_split_bf16", "grad_a",
        [x, _x("gr5d", (1, 12, 20, 30), BF16, "cl"), None, None, None, None, None, 12, 0],
        [K("grad_a_cl", T=BF16, VEC=1, NG=0), K("merge_splits", A="float")], (False,), BF16,
        "16 lanes x 16 rows, P = 600: 2 splits")
    x = _x("gr6", (2, 16, 3, 3), F64, "cl")
    s_, dav, dmx, am = maps(g, 2, 1, 9, 16, F64)
    add("grad_a/cl_vec_g1_f64", "grad_a",
        [x, _x("gr6d", (2, 16, 3, 3), F64, "cl"), s_, None, dav, dmx, am, 16, 0],
        [K("grad_a_cl", T=F64, VEC=2, NG=1)], (False,), F64)

    # -- grad_x(dy, a, s, group, d_avg, d_max, argmax, size0, size1, d_mean_c, d_max_c, argmax_c)
    def pix(N, C, P):
        return small(g, (N, C), F32), torch.randint(0, P, (N, C), generator=g, dtype=torch.int32)

    dy = _x("gx1", (2, 3, 8, 8), F32)
    add("grad_x/planar_vec_g0", "grad_x",
        [dy, small(g, (2, 3), F32), None, None, None, None, None, 3, 0, small(g, (2, 3), F32),
         None, None],
        [K("grad_x_planar", T=F32, VEC=4, NG=0, PMAX=False)], O, F32)
    dy = _x("gx2", (1, 3, 5, 7), F16)
    add("grad_x/planar_scalar_g0_pmax_f16", "grad_x",
        [dy, small(g, (1, 3), F32), None, None, None, None, None, 3, 0, small(g, (1, 3), F32),
         *pix(1, 3, 35)],
        [K("grad_x_planar", T=F16, VEC=1, NG=0, PMAX=True)], O, F16)
    dy = _x("gx3", (2, 4, 4, 8), BF16)
    grp, s0, s1 = groups_of(g, 2, 4, 2)
    s_, dav, dmx, am = maps(g, 2, 2, 32, 4, BF16)
    add("grad_x/planar_vec_g2_pmax_bf16", "grad_x",
        [dy, small(g, (2, 4), F32), s_, grp, dav, dmx, am, s0, s1, small(g, (2, 4), F32),
         *pix(2, 4, 32)],
        [K("grad_x_planar", T=BF16, VEC=8, NG=2, PMAX=True)], O, BF16)
    dy = _x("gx4", (1, 1, 40, 40), F32)
    s_, dav, dmx, am = maps(g, 1, 1, 1600, 1, F32)
    add("grad_x/planar_vec_g1_maps_nopmax_split", "grad_x",
        [dy, small(g, (1, 1), F32), s_, None, dav, dmx, am, 1, 0, small(g, (1, 1), F32), None,
         None],
        [K("grad_x_planar", T=F32, VEC=4, NG=1, PMAX=True)], O, F32,
        "the maps without the pixel max (argmax_c = -1); P = 1600: 3 splits")
    dy = _x("gx5", (1, 32, 3, 4), F32, "cl")
    grp, s0, s1 = groups_of(g, 1, 32, 16)
    s_, dav, dmx, am = maps(g, 1, 2, 12, 32, F32)
    add("grad_x/cl_vec_g2_pmax", "grad_x",
        [dy, small(g, (1, 32), F32), s_, grp, dav, dmx, am, s0, s1, small(g, (1, 32), F32),
         *pix(1, 32, 12)],
        [K("grad_x_cl", T=F32, VEC=4, NG=2, PMAX=True)], O, F32)
    dy = _x("gx6", (2, 5, 3, 3), F64, "cl")
    s_, dav, dmx, am = maps(g, 2, 1, 9, 5, F64)
    add("grad_x/cl_scalar_g1_pmax_f64", "grad_x",
        [dy, small(g, (2, 5), F64), s_, None, dav, dmx, am, 5, 0, small(g, (2, 5), F64),
         small(g, (2, 5), F64), torch.randint(0, 9, (2, 5), generator=g, dtype=torch.int32)],
        [K("grad_x_cl", T=F64, VEC=1, NG=1, PMAX=True)], O, F64)
    dy = _x("gx7", (1, 64, 2, 3), F16, "cl")
    add("grad_x/cl_vec_g0_f16", "grad_x",
        [dy, small(g, (1, 64), F32), None, None, None, None, None, 64, 0,
         small(g, (1, 64), F32), None, None],
        [K("grad_x_cl", T=F16, VEC=8, NG=0, PMAX=False)], O, F16)
    dy = _x("gx8", (1, 8, 24, 24), F32, "cl")
    add("grad_x/cl_scalar_g0_pmax_split", "grad_x",
        [dy, small(g, (1, 8), F32), None, None, None, None, None, 8, 0, small(g, (1, 8), F32),
         *pix(1, 8, 576)],
        [K("grad_x_cl", T=F32, VEC=1, NG=0, PMAX=True)], O, F32, "P = 576: 2 splits")

    # -- empty tensors: no launch, zero-filled small outputs
    add("pool_pixels/empty", "pool_pixels", [torch.empty(0, 3, 4, 4), True], [], E3, F32)
    add("grad_x/empty", "grad_x",
        [torch.empty(2, 3, 0, 4), small(g, (2, 3), F32), None, None, None, None, None, 3, 0,
         small(g, (2, 3), F32), None, None], [], O, F32)
    return c


# ------------------------------------------------------------------------------ affine sampling
# Geometry (csrc/cuda/stn.cu, host side): blocks of L x R = 256 threads, a pixel per row, L lanes
# along the channels (planar L = 1; channels-last L = the power of two >= C, 32 at most). forward
# and dx: a row per output / input pixel; dtheta: blocks of `iters` x R output pixels, at most 128
# per sample (B blocks), their partials summed by stn_grad_theta_finish when B > 1.

def _theta(g, N, dtype, kinds=None):
    """(N, 2, 3) in the accumulation dtype of `dtype`: rotation, anisotropic scale (zooms in and
    out, so that some pixels read outside the image), shear and translation; `kinds` (one per
    sample) picks special ones: 'zero' (zero linear part: every pixel reads one point), 'rank1'
    (a rank-1 linear part: pixels read a line), 'far' (translated beyond the image: nothing
    read), 'edge' (partly outside)."""
    a = acc(dtype)
    if N == 0:
        return torch.empty(0, 2, 3, dtype=a)
    rows = []
    for n in range(N):
        r = torch.rand(6, generator=g, dtype=F64)
        ang, sx, sy, sh = (r[0] - 0.5) * 2.0, 0.6 + 0.8 * r[1], 0.6 + 0.8 * r[2], (r[3] - 0.5) * 0.4
        t = torch.tensor([[sx * math.cos(ang), -sy * math.sin(ang) + sh, (r[4] - 0.5) * 0.6],
                          [sx * math.sin(ang), sy * math.cos(ang), (r[5] - 0.5) * 0.6]], dtype=F64)
        kind = kinds[n] if kinds else None
        if kind == "zero":
            t[:, :2] = 0
        elif kind == "rank1":
            t[1, :2] = 0.5 * t[0, :2]
        elif kind == "far":
            t[0, 2], t[1, 2] = 7.5, -9.0
        elif kind == "edge":
            t[0, 2] = 1.4
        rows.append(t)
    return torch.stack(rows).to(a).contiguous()


def stn_cases() -> list[Case]:
    c: list[Case] = []

    def x_of(cid, shape, dtype, layout="planar", offset=0):
        return dense(_gen("stn/" + cid), shape, dtype, layout, offset)

    def fwd(cid, x, theta, Ho, Wo, align, note=""):
        cl = x.dim() == 4 and not x.is_contiguous()
        c.append(Case(f"stn/fwd/{cid}", "affine_sample", [x, theta, Ho, Wo, align],
                      [K("stn_forward", T=x.dtype, CL=cl)], (False,), x.dtype, note))

    def bwd(cid, dy, x, theta, align, need_dx, need_dtheta, finish=False, note=""):
        cl = not x.is_contiguous()
        expect = []
        if x.shape[0] * x.shape[1] > 0:
            if need_dx:
                expect.append(K("stn_grad_x", T=x.dtype, CL=cl))
            if need_dtheta:
                expect.append(K("stn_grad_theta_partial", T=x.dtype, CL=cl))
                if finish:
                    expect.append(K("stn_grad_theta_finish", A=acc(x.dtype)))
        c.append(Case(f"stn/bwd/{cid}", "affine_sample_backward",
                      [dy, x, theta, align, need_dx, need_dtheta], expect, (False, False),
                      x.dtype, note))

    # -- forward
    g = _gen("stn/f1")
    fwd("planar_tail", x_of("f1", (2, 3, 7, 9), F32), _theta(g, 2, F32), 13, 17, False,
        "442 output pixels: 2 blocks, the second partial; output larger than the input")
    g = _gen("stn/f2")
    fwd("planar_row_align_f64", x_of("f2", (2, 2, 9, 7), F64), _theta(g, 2, F64), 1, 5, True,
        "Ho = 1 (base grid 0 in y), align_corners")
    g = _gen("stn/f3")
    fwd("cl_l8_f16", x_of("f3", (2, 5, 6, 8), F16, "cl"), _theta(g, 2, F16), 9, 7, True,
        "C = 5: 8 lanes x 32 rows, 126 pixels on 4 blocks")
    g = _gen("stn/f4")
    fwd("cl_l32_bf16", x_of("f4", (1, 40, 5, 6), BF16, "cl"), _theta(g, 1, BF16, ["edge"]), 6, 5,
        False, "C = 40: 32 lanes, a second channel pass 8 lanes wide; partly outside")
    g = _gen("stn/f5")
    fwd("planar_special_f64", x_of("f5", (4, 2, 5, 6), F64),
        _theta(g, 4, F64, ["zero", "rank1", "far", None]), 4, 7, False,
        "singular (zero, rank-1) and far-translated theta")
    g = _gen("stn/f6")
    fwd("cl_special", x_of("f6", (4, 3, 5, 6), F32, "cl", offset=1),
        _theta(g, 4, F32, ["zero", "rank1", "far", "edge"]), 6, 3, True,
        "C = 3 (4 lanes), x at storage offset 1; singular and far theta")
    g = _gen("stn/f7")
    fwd("planar_wo1_bf16", x_of("f7", (1, 2, 4, 4), BF16), _theta(g, 1, BF16), 6, 1, True,
        "Wo = 1")

    # -- backward
    def dy_of(cid, x, Ho, Wo, layout=None):
        lay = layout or ("planar" if x.is_contiguous() else "cl")
        return dense(_gen("stn/dy/" + cid), (x.shape[0], x.shape[1], Ho, Wo), x.dtype, lay)

    g = _gen("stn/b1")
    x = x_of("b1", (2, 3, 7, 9), F32)
    bwd("planar_both", dy_of("b1", x, 13, 17), x, _theta(g, 2, F32), False, True, True,
        note="126 input pixels (1 block); 221 output pixels: one dtheta block per sample")
    g = _gen("stn/b2")
    x = x_of("b2", (2, 2, 20, 14), F64)
    bwd("planar_finish_f64", dy_of("b2", x, 24, 25), x, _theta(g, 2, F64), True, True, True,
        finish=True, note="560 input pixels: 3 blocks; 600 output pixels: 3 dtheta blocks")
    g = _gen("stn/b3")
    x = x_of("b3", (1, 33, 11, 11), F32, "cl")
    bwd("cl_iters", dy_of("b3", x, 33, 33), x, _theta(g, 1, F32), False, True, True, finish=True,
        note="C = 33: 32 lanes x 8 rows; 1089 output pixels: 69 dtheta blocks of 2 x 8 pixels")
    g = _gen("stn/b4")
    x = x_of("b4", (2, 5, 6, 8), F16, "cl")
    bwd("cl_dx_only_f16", dy_of("b4", x, 9, 7), x, _theta(g, 2, F16), True, True, False,
        note="8 lanes; dtheta not asked for")
    g = _gen("stn/b5")
    x = x_of("b5", (2, 4, 8, 8), BF16)
    bwd("planar_dtheta_only_bf16", dy_of("b5", x, 8, 8), x, _theta(g, 2, BF16, [None, "edge"]),
        False, False, True, note="dx not asked for")
    g = _gen("stn/b6")
    x = x_of("b6", (2, 6, 9, 10), F64, "cl")
    bwd("cl_dtheta_only_finish_f64", dy_of("b6", x, 12, 11), x, _theta(g, 2, F64), True, False,
        True, finish=True, note="8 lanes x 32 rows; 132 output pixels: 5 dtheta blocks")
    g = _gen("stn/b7")
    x = x_of("b7", (4, 2, 5, 6), F64)
    bwd("planar_special_f64", dy_of("b7", x, 4, 7), x,
        _theta(g, 4, F64, ["zero", "rank1", "far", None]), False, True, True,
        note="singular theta: the gather scans every output row")
    g = _gen("stn/b8")
    x = x_of("b8", (4, 3, 5, 6), F32, "cl")
    bwd("cl_special", dy_of("b8", x, 6, 3), x, _theta(g, 4, F32, ["zero", "rank1", "far", "edge"]),
        True, True, True, note="C = 3 (4 lanes x 64 rows); singular and far theta")
    g = _gen("stn/b9")
    x = x_of("b9", (2, 3, 7, 9), BF16, "cl")
    bwd("cl_dy_planar_bf16", dy_of("b9", x, 5, 11, "planar"), x, _theta(g, 2, BF16), True, True,
        True, note="dy contiguous for a channels-last x: copied into y's strides")
    g = _gen("stn/b10")
    x = x_of("b10", (2, 3, 6, 5), F32, offset=1)
    dy = dense(_gen("stn/dy/b10"), (2, 3, 9, 4), F32).transpose(2, 3)
    bwd("planar_dy_transposed", dy, x, _theta(g, 2, F32), False, True, True,
        note="dy a transposed view (copied), x at storage offset 1")
    g = _gen("stn/b11")
    x = x_of("b11", (2, 4, 6, 7), F32)
    dy = dense(_gen("stn/dy/b11"), (1, 4, 1, 1), F32).expand(2, 4, 5, 8)
    bwd("planar_dy_stride0", dy, x, _theta(g, 2, F32), True, True, True,
        note="dy with stride 0 (as from sum().backward())")
    g = _gen("stn/b12")
    x = x_of("b12", (1, 2, 3, 3), F32)
    bwd("neither", dy_of("b12", x, 3, 3), x, _theta(g, 1, F32), False, False, False,
        note="no gradient asked for: no launch")

    # -- empty: no launch; dtheta zeros
    g = _gen("stn/e")
    fwd_e = Case("stn/fwd/empty_n0", "affine_sample", [torch.empty(0, 3, 4, 4), _theta(g, 0, F32),
                                                       5, 6, False], [], (False,), F32)
    c.append(fwd_e)
    x = torch.empty(2, 0, 4, 4)
    bwd("empty_c0", torch.empty(2, 0, 3, 5), x, _theta(g, 2, F32), False, True, True,
        note="C = 0: dx empty, dtheta zeros")
    x = torch.empty(0, 3, 4, 4)
    bwd("empty_n0", torch.empty(0, 3, 3, 5), x, _theta(g, 0, F32), True, True, True)
    return c


def all_cases() -> list[Case]:
    return simam_cases() + passes_cases() + stn_cases()


# ------------------------------------------------------------------------------- judging

def _tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _to64(a):
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        return a.double()
    return a


def _bits(t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point():
        return t
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _finite_err(o: torch.Tensor, e: torch.Tensor, what: str) -> float:
    """Max |o - e| over the finite elements of e; non-finite ones must match exactly."""
    o, e = o.double(), e.double()
    fin = torch.isfinite(e)
    if not fin.all():
        same = torch.where(torch.isnan(e), torch.isnan(o), o == e)
        assert bool(same[~fin].all()), f"{what}: non-finite values differ from the fp64 result"
    return (o - e)[fin].abs().max().item() if fin.any() else 0.0


def same_order(case: Case) -> torch.Tensor:
    """gate / grad_x evaluated with the kernels' operations in the kernels' order, each rounded
    on its own (torch elementwise ops on CPU tensors), in the accumulation dtype."""
    if case.op == "gate":
        x, a, s, group = case.args
        A = acc(x.dtype)
        N, C = x.shape[:2]
        xf = x.to(A).reshape(N, C, -1)
        ac = a[:, :, None]
        if s is None:
            y = ac * xf
        else:
            sg = s[:, :1] if group is None else torch.where(group[:, :, None], s[:, 1:2], s[:, :1])
            y = (sg * ac) * xf
        return y.reshape(x.shape).to(x.dtype)
    assert case.op == "grad_x"
    dy, a, s, group, d_avg, d_max, argmax, size0, size1, d_mean_c, d_max_c, argmax_c = case.args
    A = acc(dy.dtype)
    N, C = dy.shape[:2]
    P = dy.shape[2] * dy.shape[3]
    one = torch.ones((), dtype=A)
    df = dy.to(A).reshape(N, C, P)
    ac = a[:, :, None]
    dmean = d_mean_c[:, :, None] * (one / torch.tensor(float(P), dtype=A))
    if s is None:
        v = df * ac + dmean
    else:
        inv = [one / torch.tensor(float(max(size0, 1)), dtype=A),
               one / torch.tensor(float(max(size1, 1)), dtype=A)]

        def per_channel(m, scale=None):
            rows = [m[:, :1], m[:, 1:2]] if group is not None else [m[:, :1]]
            if scale is not None:
                rows = [r * scale[i] for i, r in enumerate(rows)]
            return rows[0] if group is None else torch.where(group[:, :, None], rows[1], rows[0])

        cs = torch.arange(C).view(1, C, 1)
        pool = per_channel(d_avg, inv) + torch.where(per_channel(argmax) == cs, per_channel(d_max),
                                                     torch.zeros((), dtype=A))
        v = ((df * per_channel(s)) * ac + ac * pool) + dmean
    if d_max_c is not None:
        ps = torch.arange(P).view(1, 1, P)
        v = torch.where(ps == argmax_c[:, :, None], v + d_max_c[:, :, None], v)
    return v.reshape(dy.shape).to(dy.dtype)


def check(case: Case, out, cpu_out=None) -> None:
    """Raises AssertionError when `out` (the emulated or GPU result, on the CPU) disagrees with
    the CPU op under the case's rule."""
    outs = _tuple(out)
    ref = _tuple(cpu_out if cpu_out is not None else case.call("fusedattn"))
    assert len(outs) == len(ref), f"{case.id}: {len(outs)} outputs, CPU op gives {len(ref)}"
    exact = case.exact or (False,) * len(ref)
    ref64 = None
    for i, (o, r) in enumerate(zip(outs, ref)):
        what = f"{case.id} output {i}"
        if o is None or r is None:  # an optional output (Tensor?) that was not asked for
            assert o is None and r is None, f"{what}: {o is None=}, CPU op: {r is None=}"
            continue
        assert o.shape == r.shape and o.dtype == r.dtype, \
            f"{what}: {o.dtype} {tuple(o.shape)}, CPU op gives {r.dtype} {tuple(r.shape)}"
        if o.numel() > 1:
            assert o.stride() == r.stride(), f"{what}: strides {o.stride()} vs CPU {r.stride()}"
        if o.numel() == 0:
            continue
        rule = exact[i]
        if rule == "order":
            want = same_order(case)
            if not torch.equal(_bits(o), _bits(want.contiguous(memory_format=_fmt(o)))):
                bad = (_bits(o) != _bits(want.contiguous(memory_format=_fmt(o)))).nonzero()[:4]
                raise AssertionError(f"{what}: not bitwise equal to the kernel's operations in "
                                     f"order at {bad.tolist()}")
        if rule is True or not o.is_floating_point():
            if not torch.equal(_bits(o), _bits(r)):
                bad = (_bits(o) != _bits(r)).nonzero()[:4].tolist()
                raise AssertionError(f"{what}: not bitwise equal to the CPU op at {bad} "
                                     f"(emulated {o.flatten()[:6].tolist()}, CPU {r.flatten()[:6].tolist()})")
            continue
        if o.dtype == F64:
            scale = max(1.0, r[torch.isfinite(r)].abs().max().item() if torch.isfinite(r).any() else 1.0)
            err = _finite_err(o, r, what)
            assert err <= 1e-12 * scale, f"{what}: fp64 error {err:.3g} (scale {scale:.3g})"
            continue
        if ref64 is None:
            ref64 = _tuple(getattr(torch.ops.fusedattn, case.op)(*[_to64(a) for a in case.args]))
        e = ref64[i].double()
        err_o = _finite_err(o, e, what)
        err_r = _finite_err(r, e, what + " (CPU op)")
        fin = e[torch.isfinite(e)]
        atol = ATOL[o.dtype] * max(1.0, fin.abs().max().item() if fin.numel() else 1.0)
        assert err_o <= 2 * err_r + atol, \
            f"{what}: error {err_o:.3g} against fp64 > 2 x the CPU op's {err_r:.3g} + {atol:.2g}"


def _fmt(t: torch.Tensor):
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
