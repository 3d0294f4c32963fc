"""Compile every Triton kernel specialisation for real GPUs, without a GPU.

    python -m fusedattn.aot [--arch 80,90] [--filter simam_fwd] [--quiet]

For each target architecture and each variant the launchers can produce (taken from the
launchers' own ``aot_variants()``, for every Triton module of the op registry), runs Triton's
full pipeline to PTX and cubin, then ptxas -v
on the PTX for the register, spill and shared-memory report, and reads the PTX for the widest
global load of the kernel. Prints one line per kernel and exits non-zero if any kernel fails to
compile or spills (local memory).

A variant is ``(name, kernel, signature, constexprs, attrs, num_warps)``, or the same with a
seventh element ``num_stages`` (software-pipelining stages, as the launcher passes them;
without it, Triton's default).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("fusedattn.aot compiles real GPU code: unset TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402



@dataclass
class Report:
    name: str
    arch: int
    ok: bool
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    load_width_bits: int = 0
    error: str = ""


def _variants(only: str | None):
    import importlib

    from fusedattn import registry
    for mod_name in registry.triton_modules():
        mod = importlib.import_module(f"fusedattn.triton_kernels.{mod_name}")
        for v in mod.aot_variants():
            if len(v) not in (6, 7):
                raise ValueError(f"{mod_name}.aot_variants(): expected (name, kernel, signature, "
                                 f"constexprs, attrs, num_warps[, num_stages]), got {len(v)} items")
            if only is None or only in v[0]:
                yield v


def _ptxas(arch: int) -> str:
    from triton.backends.nvidia import compiler as nv
    return nv.get_ptxas(arch).path


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spill bytes (stores + loads + stack frame) of a PTX module, from ptxas -v."""
    target = re.search(r"\.target (sm_\w+)", ptx).group(1)  # sm_90a for Hopper
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([_ptxas(arch), "-v", f"-arch={target}", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip())
    out = r.stderr + r.stdout
    val = {k: max([int(m) for m in rx.findall(out)] or [0]) for k, rx in _PTXAS_RE.items()}
    return {"registers": val["registers"],
            "spill_bytes": val["spill_stores"] + val["spill_loads"] + val["stack"]}


def widest_global_load(ptx: str) -> int:
    """Bits of the widest ld.global in the PTX (e.g. v4.b32 -> 128)."""
    best = 0
    for vec, bits in re.findall(r"ld\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[bfsu](\d+)", ptx):
        best = max(best, int(vec or 1) * int(bits))
    return best


def compile_one(name, fn, signature, constexprs, attrs, num_warps, arch,
                num_stages: int | None = None) -> Report:
    """Compile one variant for sm_<arch> (num_stages None: Triton's default)."""
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    try:
        src = ASTSource(fn, signature, constexprs, attrs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        ptx = k.asm["ptx"]
        assert k.asm.get("cubin"), "no cubin produced"
        rep = ptxas_report(ptx, arch)
        return Report(name, arch, True, rep["registers"], rep["spill_bytes"],
                      int(getattr(k.metadata, "shared", 0)), widest_global_load(ptx))
    except Exception as exc:  # report and go on: every failure is listed
        return Report(name, arch, False, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])


def _compile_index(job) -> Report:
    arch, only, i = job
    name, fn, sig, consts, attrs, warps, *stages = list(_variants(only))[i]
    return compile_one(name, fn, sig, consts, attrs, warps, arch,
                       num_stages=stages[0] if stages else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusedattn.aot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="80,90", help="comma list of compute capabilities")
    ap.add_argument("--filter", default=None, help="only variants whose name contains this")
    ap.add_argument("--quiet", action="store_true", help="print failures and the summary only")
    ap.add_argument("--jobs", type=int, default=os.cpu_count(), help="compile processes")
    args = ap.parse_args(argv)
    count = sum(1 for _ in _variants(args.filter))
    jobs = [(int(a), args.filter, i) for a in args.arch.split(",") for i in range(count)]
    reports = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for r in pool.map(_compile_index, jobs, chunksize=8):
            reports.append(r)
            arch, name = r.arch, r.name
            bad = not r.ok or r.spill_bytes > 0
            if bad or not args.quiet:
                line = (f"sm_{arch} {name:60s} " + (
                    f"regs {r.registers:3d}  spill {r.spill_bytes:4d} B  smem {r.shared_bytes:6d} B"
                    f"  widest load {r.load_width_bits:3d} bit" if r.ok else f"FAILED {r.error}"))
                print(line + ("  <-- SPILLS" if r.ok and r.spill_bytes > 0 else ""), flush=True)
    failed = [r for r in reports if not r.ok]
    spilled = [r for r in reports if r.ok and r.spill_bytes > 0]
    # kernels that should load full-size tensors as vectors: SimAM's forward, the generic
    # passes' 16-byte-aligned rows
    groups = {"SimAM forward": lambda n: n.startswith("simam_fwd_"),
              "passes aligned": lambda n: not n.startswith("simam") and n.endswith("_aligned")}
    counts = []
    for label, pick in groups.items():
        sel = [r for r in reports if r.ok and pick(r.name)]
        if sel:
            counts.append(f"{label} {sum(r.load_width_bits >= 64 for r in sel)}/{len(sel)}")
    print(f"fusedattn.aot: {len(reports)} kernels compiled for sm_{args.arch.replace(',', ', sm_')}: "
          f"{len(failed)} failed, {len(spilled)} spill; kernels with vectorised global "
          f"loads (>= 64 bit): {', '.join(counts) or 'none checked'}")
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
