"""Build emulated CUDA sources into shared libraries (g++, one library per sanitizer variant).

A library is one translation unit of "units" (rewritten .cu files, rewrite.py) plus the emulator
runtime (cuda_emu.cpp). A unit's host functions become ops ``torch.ops.<op_namespace>.<name>`` on
CPU tensors (load the library with torch.ops.load_library); the runtime's C ABI
(``emu_launch_log``, ``emu_reset_log``) and the self-tests' (selftest.cu) are called with ctypes.
One translation unit, because ATen's headers dominate the compile: every source of a variant,
clean and seeded copies alike (a seeded copy sits in a namespace of its own), pays for them once.

Variants: ``asan`` (AddressSanitizer + UBSan checks; errors are reported and execution goes on, so
that one run attributes every report to its case), ``tsan`` (-fsanitize=thread), ``plain``.
Builds are cached by the hash of everything that goes into them (default_cache()).

    python tools/cuda_emu/build.py --variant asan        # csrc/cuda/*.cu, all dtypes; prints the .so
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
CUDA_SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
SELFTEST = HERE / "selftest.cu"

if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))
from cuda_emu.rewrite import rewrite  # noqa: E402

CXX = os.environ.get("CXX", "g++")

COMMON = ["-std=c++20", "-fPIC", "-g1", "-fvisibility=hidden",
          "-fvisibility-inlines-hidden", "-ffp-contract=off", "-fno-fast-math",
          "-Wno-unknown-pragmas", "-Wno-attributes", "-D_GLIBCXX_USE_CXX11_ABI=1", "-pthread"]

# -O0: the compile of the kernel instantiations dominates the suite's time (-O1 with UBSan takes
# 2.5 times as long); the emulated kernels' run time is dominated by the thread handoffs.
# UBSan: the checks of -fsanitize=undefined that bear on kernels (alignment: misaligned vector
# loads; bounds: indices into fixed-size arrays, shared ones included), without vptr (torch's
# typeinfo differs across shared objects), null (ASan reports the fault) and pointer-overflow
# (together a tenth of the compile).
UBSAN = ("alignment,bounds,bool,enum,shift,signed-integer-overflow,integer-divide-by-zero,"
         "vla-bound,return,unreachable,builtin")
VARIANTS = {
    "asan": ["-O0", f"-fsanitize=address,{UBSAN}", "-fsanitize-recover=all",
             "-fno-omit-frame-pointer"],
    "tsan": ["-O0", "-fsanitize=thread", "-fno-omit-frame-pointer"],
    "plain": ["-O1"],
}

# The device the kernel sources are compiled "for": their #if __CUDA_ARCH__ paths.
CUDA_ARCH = "800"

# AT_DISPATCH_FLOATING_TYPES_AND2 restricted to some dtypes (fewer kernel instantiations: the
# compile dominates the suite's time). Name -> (ScalarType, C++ type).
DTYPES = {"float": ("at::kFloat", "float"), "double": ("at::kDouble", "double"),
          "half": ("at::kHalf", "at::Half"), "bfloat16": ("at::kBFloat16", "at::BFloat16")}


class CompileError(RuntimeError):
    def __init__(self, cmd: str, output: str):
        super().__init__(f"cuda_emu: compile failed:\n{cmd}\n{output[-8000:]}")
        self.output = output


def cuda_include() -> Path:
    """The CUDA toolkit's include dir (vector_types.h, cuda_fp16.h)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(str(Path(nvcc).resolve().parents[1]))
    for c in cands:
        if c and (Path(c) / "include" / "vector_types.h").exists():
            return Path(c) / "include"
    site = Path(sysconfig.get_paths()["purelib"])
    for p in sorted(site.glob("nvidia/*/include")) + sorted(site.glob("nvidia/*/*/include")):
        if (p / "vector_types.h").exists() and (p / "cuda_fp16.h").exists():
            return p
    raise FileNotFoundError("cuda_emu: no CUDA toolkit headers (vector_types.h) found; set CUDA_HOME")


def torch_dir() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        raise FileNotFoundError("cuda_emu: torch is not importable")
    return Path(spec.origin).parent


def toolchain_problem() -> str:
    """Why the emulated builds cannot run here ('' when they can)."""
    if not shutil.which(CXX):
        return f"no C++ compiler ({CXX})"
    try:
        cuda_include()
    except FileNotFoundError as e:
        return str(e)
    for rt in ("libasan.so", "libtsan.so", "libubsan.so"):
        p = subprocess.run([CXX, f"-print-file-name={rt}"], capture_output=True, text=True).stdout
        if not Path(p.strip()).is_absolute() or not Path(p.strip()).exists():
            return f"{CXX} has no {rt} (install the sanitizer runtimes)"
    return ""


def sanitizer_runtime(variant: str) -> list[str]:
    """Libraries to LD_PRELOAD into a Python process that loads a library of this variant
    (libstdc++ too: ASan's __cxa_throw interceptor needs it present when ASan starts)."""
    if variant == "plain":
        return []
    name = {"asan": "libasan.so", "tsan": "libtsan.so"}[variant]
    libs = []
    for n in (name, "libstdc++.so.6"):
        p = subprocess.run([CXX, f"-print-file-name={n}"], capture_output=True, text=True,
                           check=True).stdout.strip()
        libs.append(str(Path(p).resolve()))
    return libs


def sanitizer_env(variant: str, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    pre = sanitizer_runtime(variant)
    if pre:
        env["LD_PRELOAD"] = " ".join(pre + ([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else []))
    # report every error and go on (the runner attributes reports to cases)
    env["ASAN_OPTIONS"] = ("detect_leaks=0:halt_on_error=0:detect_odr_violation=0:"
                           "alloc_dealloc_mismatch=0:allocator_may_return_null=1")
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=0"
    env["TSAN_OPTIONS"] = "halt_on_error=0:report_signal_unsafe=0:detect_deadlocks=0:exitcode=0"
    env["OMP_NUM_THREADS"] = "1"
    return env


def _compiler_id() -> str:
    return subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout.splitlines()[0]


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _emu_files_text() -> str:
    """Everything a translation unit includes besides the rewritten sources: the emulator and
    the project's headers (csrc/**/*.h, *.cuh)."""
    files = [HERE / n for n in ("cuda_emu.h", "cuda_emu.cpp", "emu_host.h", "emu_prelude.h")]
    files += sorted(CSRC.rglob("*.h")) + sorted(CSRC.rglob("*.cuh"))
    return "".join(f"{f}\n{f.read_text()}" for f in files)


def _torch_id() -> str:
    v = torch_dir() / "version.py"
    return str(torch_dir()) + (v.read_text() if v.exists() else "")


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise CompileError(" ".join(cmd), r.stdout + r.stderr)


@dataclass
class Source:
    """A CUDA source to emulate: its text (possibly mutated) and the path its reports show."""
    name: str
    text: str
    path: str

    @classmethod
    def of(cls, path: Path, mutate=None, tag: str = "") -> "Source":
        text = path.read_text()
        if mutate is not None:
            text = mutate(text)
        path = Path(path).resolve()
        shown = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        return cls(path.stem, text, (f"{tag}:" if tag else "") + shown)


@dataclass
class Unit:
    """A source in a library: the op namespace of its host functions, the dtypes its dispatch
    instantiates (None: all four), and an optional C++ namespace around it (a mutated copy of a
    source then sits next to the original in the same translation unit)."""
    source: Source
    op_namespace: str = "fusedattn_emu"
    dtypes: tuple | None = None
    wrap: str | None = None


def _dispatch_override(dtypes) -> str:
    cases = "".join(
        f"    if (emu_type == {st}) {{ using scalar_t = {ct}; return __VA_ARGS__(); }} \\\n"
        for st, ct in (DTYPES[d] for d in dtypes))
    return ('#pragma push_macro("AT_DISPATCH_FLOATING_TYPES_AND2")\n'
            "#undef AT_DISPATCH_FLOATING_TYPES_AND2\n"
            "#define AT_DISPATCH_FLOATING_TYPES_AND2(T1, T2, TYPE, NAME, ...) \\\n"
            "  [&] { \\\n"
            "    const at::ScalarType emu_type = (TYPE); \\\n"
            + cases +
            f'    TORCH_CHECK(false, NAME, ": this emulated build has the kernels for '
            f'{", ".join(dtypes)} only, not ", emu_type); \\\n'
            "  }()\n")


def flags(variant: str, torch_headers: bool) -> list[str]:
    inc = ["-I", str(cuda_include()), "-I", str(HERE), "-I", str(CSRC), "-I", str(CSRC / "cuda")]
    if torch_headers:
        td = torch_dir()
        inc += ["-isystem", str(td / "include"),
                "-isystem", str(td / "include" / "torch" / "csrc" / "api" / "include")]
    return COMMON + VARIANTS[variant] + inc


def translation_unit(units: list[Unit], torch_headers: bool) -> str:
    rewritten = [rewrite(u.source.text, u.op_namespace, hoist_includes=True) for u in units]
    head = ['#include "emu_prelude.h"' if torch_headers else '#include "cuda_emu.h"',
            f"#define __CUDA_ARCH__ {CUDA_ARCH}"]
    seen = set()
    for rw in rewritten:  # every include at global scope, with __CUDA_ARCH__ defined
        for inc in rw.includes:
            if inc not in seen:
                seen.add(inc)
                head.append(inc)
    body = ["\n".join(head)]
    for u, rw in zip(units, rewritten):
        pre, post = "", ""
        if u.dtypes is not None:
            pre += _dispatch_override(u.dtypes)
            post = '#pragma pop_macro("AT_DISPATCH_FLOATING_TYPES_AND2")\n'
        if u.wrap:
            pre += (f"namespace {u.wrap} {{ namespace fusedattn {{ using namespace ::fusedattn; }} }}\n"
                    f"namespace {u.wrap} {{\n")
            post = "}\n" + post
        body.append(f'{pre}#line 1 "{u.source.path}"\n{rw.text}\n{post}')
    return "\n".join(body) + "\n"


def default_cache() -> Path:
    """$FUSEDATTN_EMU_CACHE, else a directory of the system's temp dir kept across sessions
    (entries are keyed by the hash of everything that goes into them, so a stale one is never
    used; the least recently used beyond a few are removed)."""
    env = os.environ.get("FUSEDATTN_EMU_CACHE")
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"fusedattn-cuda-emu-{os.getuid()}"


def prune(cache: Path, keep: int = 6) -> None:
    libs = sorted((d for d in Path(cache).glob("lib-*") if d.is_dir() and ".tmp" not in d.name),
                  key=lambda d: d.stat().st_mtime, reverse=True)
    for d in libs[keep:]:
        shutil.rmtree(d, ignore_errors=True)


def build(variant: str, units: list[Unit], cache: Path, torch_headers: bool = True) -> Path:
    """The shared library of `units` (+ the emulator runtime) for `variant`; cached by content."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    f = flags(variant, torch_headers)
    tu_text = translation_unit(units, torch_headers)
    key = _digest(variant, f, tu_text, _emu_files_text(), _compiler_id(),
                  _torch_id() if torch_headers else "")
    out = cache / f"lib-{variant}-{key}" / f"libemu_{variant}.so"
    if out.exists():
        os.utime(out.parent)  # recently used
        return out
    work = Path(str(out.parent) + f".tmp{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    tu = work / "kernels.emu.cpp"
    tu.write_text(tu_text)
    jobs = [[CXX, *f, "-c", str(tu), "-o", str(work / "kernels.o")],
            [CXX, *flags(variant, False), "-c", str(HERE / "cuda_emu.cpp"), "-o",
             str(work / "cuda_emu_rt.o")]]
    with cf.ThreadPoolExecutor(2) as ex:
        for fut in [ex.submit(_run, j) for j in jobs]:
            fut.result()
    link = [CXX, "-shared", *COMMON, *VARIANTS[variant], str(work / "kernels.o"),
            str(work / "cuda_emu_rt.o"), "-o", str(work / out.name)]
    if torch_headers:
        lib = torch_dir() / "lib"
        link += [f"-L{lib}", f"-Wl,-rpath,{lib}", "-ltorch", "-ltorch_cpu", "-lc10"]
    _run(link)
    for o in work.glob("*.o"):
        o.unlink()
    try:
        work.rename(out.parent)
    except OSError:  # built concurrently by another process
        shutil.rmtree(work, ignore_errors=True)
    prune(cache)
    return out


def kernel_units(op_namespace: str = "fusedattn_emu", dtypes=None) -> list[Unit]:
    """csrc/cuda/*.cu as they are."""
    return [Unit(Source.of(p), op_namespace, dtypes) for p in CUDA_SOURCES]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="asan")
    ap.add_argument("--out", default=None, help="cache directory (default: $FUSEDATTN_EMU_CACHE "
                    "or <tmp>/fusedattn-cuda-emu-<uid>)")
    ap.add_argument("--dtypes", default="", help="comma-separated subset of " + ",".join(DTYPES))
    args = ap.parse_args(argv)
    dtypes = tuple(d for d in args.dtypes.split(",") if d) or None
    units = kernel_units(dtypes=dtypes) + [Unit(Source.of(SELFTEST))]
    print(build(args.variant, units, Path(args.out) if args.out else default_cache()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
