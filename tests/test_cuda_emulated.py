"""Every CUDA C++ kernel of csrc/cuda/ executed on the CPU (tools/cuda_emu: the .cu sources
compiled as host C++ over an emulation of the CUDA device API, each CUDA thread an OS thread),
through the extension's own host code, under AddressSanitizer + UndefinedBehaviorSanitizer and
under ThreadSanitizer, and compared with the CPU ops.

One library per sanitizer build holds csrc/cuda/*.cu, the emulator's self-tests
(tools/cuda_emu/selftest.cu) and seeded-bug copies of the sources; each runs all its entries in
one process of its own (run_cases.py, sanitizer runtime preloaded), which marks every entry in
its stderr so that each sanitizer report is attributed to the entry that caused it. The builds
and runs are shared by the whole session; the libraries are compiled in a directory of the temp
dir (FUSEDATTN_EMU_CACHE to choose another) under the hash of all their inputs, so a later
session with the same sources reuses them.

* every case of tools/cuda_emu/cases.py: ran, launched the kernels it is meant to reach, agrees
  with the CPU op (bitwise or the tolerance rule), no sanitizer report;
* every __global__ function of csrc/cuda/ ran (listed from the sources);
* the emulator's semantics against hand-computed tables (shuffles of each mode and width, votes,
  barrier predicates, atomics, shared memory fill) and its own error reports;
* each sanitizer finds its kind of bug in a small kernel, and stays silent on the correct twin;
* seeded bugs in copies of the real sources are caught: an off-by-one bound, a removed
  __syncthreads, a wrong shuffle width, a misaligned vector load.
"""
from __future__ import annotations

import concurrent.futures as cf
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from cuda_emu import build as B  # noqa: E402
from cuda_emu import cases as C  # noqa: E402
from cuda_emu.rewrite import global_functions, rewrite  # noqa: E402

pytestmark = pytest.mark.cuda_emulated

VARIANTS = ("asan", "tsan")
# The dtypes each build instantiates (the compile of the kernel instantiations dominates the
# suite's time). fp16 and bf16 take the same code paths, so each build has one of them and runs
# the other's cases as twins in its own (cases.for_build): every case runs in both builds.
BUILD_DTYPES = {"asan": ("float", "double", "bfloat16"), "tsan": ("float", "double", "half")}
REPORT = {"asan": r"ERROR: AddressSanitizer", "ubsan": r"runtime error:",
          "tsan": r"WARNING: ThreadSanitizer"}
ANY_REPORT = "|".join(REPORT.values())


def _native_ok() -> bool:
    try:
        import fusedattn  # noqa: F401
        return hasattr(torch.ops.fusedattn, "simam_forward") and \
            torch._C._dispatch_has_kernel_for_dispatch_key("fusedattn::gate", "CPU")
    except Exception:
        return False


# ----------------------------------------------------------------------------- seeded bugs

@dataclass
class Seed:
    name: str
    source: str   # stem of the csrc/cuda file mutated
    variant: str  # the build that must catch it
    old: str      # mutated text (must occur exactly once)
    new: str
    case: str     # the case run on the mutated copy
    detect: str   # "asan", "ubsan", "tsan" (a report in the case's output) or "mismatch"


SEEDS = [
    Seed("off_by_one", "simam", "asan", "ok[k] = i < M;", "ok[k] = i <= M;",
         "simam/warp_items2/fwd", "asan"),
    Seed("no_syncthreads", "simam", "tsan",
         "  if (lane == 0) sh[warp] = v;\n  __syncthreads();\n", "  if (lane == 0) sh[warp] = v;\n",
         "simam/block_items32_rank3/fwd", "tsan"),
    Seed("shuffle_width", "simam", "asan", "v += __shfl_xor_sync(0xffffffffu, v, o);",
         "v += __shfl_xor_sync(0xffffffffu, v, o, 16);", "simam/warp_items2/fwd", "mismatch"),
    Seed("misaligned_pack", "passes", "asan",
         "with_vec<T>((cl ? cl_vec<T>(G.C) : G.P % kVec<T> == 0) && aligned(xp, 16), [&](auto V) {",
         "with_vec<T>((cl ? cl_vec<T>(G.C) : G.P % kVec<T> == 0), [&](auto V) {",
         "passes/pool_pixels/planar_offset", "ubsan"),
]


def _mutate(seed: Seed):
    def f(text: str) -> str:
        n = text.count(seed.old)
        if n != 1:
            raise AssertionError(f"seed {seed.name}: the text to mutate occurs {n} times in "
                                 f"csrc/cuda/{seed.source}.cu (update the seed)")
        return text.replace(seed.old, seed.new)
    return f


SEED_PROBLEMS: dict[str, str] = {}  # seeds whose mutation no longer applies (left out)


def _units(variant: str) -> list:
    units = B.kernel_units(dtypes=BUILD_DTYPES[variant]) + [B.Unit(B.Source.of(B.SELFTEST))]
    for s in SEEDS:
        if s.variant == variant:
            try:
                src = B.Source.of(ROOT / "csrc" / "cuda" / f"{s.source}.cu", _mutate(s),
                                  f"seed-{s.name}")
            except AssertionError as e:
                SEED_PROBLEMS[s.name] = str(e)
                continue
            units.append(B.Unit(src, f"fusedattn_emu_seed_{s.name}", ("float",),
                                f"emu_seed_{s.name}"))
    return units


# ------------------------------------------------------------------------------ self-tests

# __shfl*_sync of 100 + lane, hand-computed from the CUDA programming guide (a group of `width`
# lanes reads earlier groups but gets its own value for later ones; srcLane is taken modulo width)
SHFL_TABLES = {
    # (mode: 0 idx, 1 up, 2 down, 3 xor; arg; width)
    (3, 16, 16): [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115,
                  100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115],
    (1, 3, 8): [100, 101, 102, 100, 101, 102, 103, 104, 108, 109, 110, 108, 109, 110, 111, 112,
                116, 117, 118, 116, 117, 118, 119, 120, 124, 125, 126, 124, 125, 126, 127, 128],
    (2, 2, 16): [102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115, 114, 115,
                 118, 119, 120, 121, 122, 123, 124, 125, 126, 127, 128, 129, 130, 131, 130, 131],
    (0, 37, 32): [105] * 32,
    (3, 4, 4): [100, 101, 102, 103, 100, 101, 102, 103, 108, 109, 110, 111, 108, 109, 110, 111,
                116, 117, 118, 119, 116, 117, 118, 119, 124, 125, 126, 127, 124, 125, 126, 127],
    (0, 3, 8): [103] * 8 + [111] * 8 + [119] * 8 + [127] * 8,
    (3, 1, 32): [100 + (lane ^ 1) for lane in range(32)],
}


def shfl_model(mode: int, arg: int, width: int, lane: int) -> int:
    """PTX shfl.sync (c = ((32 - width) << 8) | (up ? 0 : 31)) on the value 100 + lane."""
    seg, c, b = (32 - width) & 31, 0 if mode == 1 else 31, arg & 31
    max_lane, min_lane = (lane & seg) | (c & ~seg), lane & seg
    if mode == 1:
        j, ok = lane - b, lane - b >= max_lane
    elif mode == 2:
        j, ok = lane + b, lane + b <= max_lane
    elif mode == 3:
        j, ok = lane ^ b, (lane ^ b) <= max_lane
    else:
        j = min_lane | (b & ~seg)
        ok = j <= max_lane
    return 100 + (j if ok else lane)


SHFL_SWEEP = [(m, a, w) for m in range(4) for w in (1, 2, 4, 8, 16, 32) for a in (0, 1, 3, 5, 16, 31, 33)]

# emu_st_error(which): what the emulator must say
EMU_ERRORS = {
    0: r"divergent __syncthreads(: this thread exits while| at .*: \d+ thread\(s\) of the "
       r"block have exited)",
    1: r"divergent __syncthreads: this thread waits at selftest\.cu:\d+ while",
    2: r"(__shfl_xor_sync at .* names lanes \{[\d,]+\} that have exited|exits while lanes "
       r"\{.*\} wait in __shfl_xor_sync at .* with mask 0xffffffff, which names this lane)",
    3: r"does not name the calling lane",
    4: r"lane 0 reads lane 20, which is not in the mask 0x0000ffff",
    5: r"width 12 is not a power of two",
    6: r"deadlock: every live thread of the block waits \(16 in __shfl_xor_sync .*16 in __syncthreads",
    7: r"128 threads per block exceeds the kernel's __launch_bounds__\(64\)",
    8: r"grid extent 0 \(cudaErrorInvalidConfiguration\)",
    9: r"invalid block \(2048,1,1\)",
    10: r"static shared memory of the block reaches 65536 bytes with __shared__ more",
}

# UBSan's words for a typed access through a misaligned pointer
MISALIGNED = r"runtime error: (load of|reference binding to|member access within) misaligned address .* for type "

# emu_st_sanitize(which, bad): the build whose sanitizer must report the bad twin, and how
SANITIZE = {
    0: ("asan", r"AddressSanitizer: heap-buffer-overflow.*\n(.*\n)*?.*READ of size 4"),
    1: ("asan", r"AddressSanitizer: heap-buffer-overflow.*\n(.*\n)*?.*WRITE of size 4"),
    2: ("asan", MISALIGNED + r"'const (struct )?float4', which requires 16 byte alignment"),
    3: ("asan", MISALIGNED + r"'const (struct )?__half2', which requires 4 byte alignment"),
    4: ("asan", r"runtime error: index 8 out of bounds for type 'float \[8\]\[33\]'|"
                r"AddressSanitizer: heap-buffer-overflow"),
    5: ("tsan", r"WARNING: ThreadSanitizer: data race"),
    6: ("tsan", r"WARNING: ThreadSanitizer: data race"),
    7: ("tsan", r"WARNING: ThreadSanitizer: data race"),
    8: ("tsan", r"WARNING: ThreadSanitizer: data race"),
}
SANITIZE_NAMES = {0: "shared_overrun", 1: "global_overrun", 2: "misaligned_float4",
                  3: "misaligned_half2", 4: "shared_2d_bounds", 5: "missing_barrier",
                  6: "warp_sync_reduction", 7: "shuffle_is_no_fence", 8: "blocks_overlap"}


def _selftest_entries(variant: str) -> list[dict]:
    e = []
    for (mode, arg, width) in sorted(set(SHFL_TABLES) | set(SHFL_SWEEP)):
        e.append({"id": f"st/shfl/{mode}/{arg}/{width}", "kind": "selftest", "fn": "shfl",
                  "args": [mode, arg, width], "outs": [("i", 32, -1)]})
    e.append({"id": "st/shfl_double", "kind": "selftest", "fn": "shfl_double", "args": [],
              "outs": [("i", 32, -1)]})
    e.append({"id": "st/votes", "kind": "selftest", "fn": "votes", "args": [],
              "outs": [("u", 18, 0)]})
    e.append({"id": "st/partial_mask", "kind": "selftest", "fn": "partial_mask", "args": [],
              "outs": [("i", 32, -1)]})
    e.append({"id": "st/block_sum", "kind": "selftest", "fn": "block_sum", "args": [],
              "outs": [("i", 4, 0), ("f", 1, 0.0)]})
    e.append({"id": "st/shared_fill", "kind": "selftest", "fn": "shared_fill", "args": [],
              "outs": [("f", 5, 0.0)]})
    for which in EMU_ERRORS:
        e.append({"id": f"st/error/{which}", "kind": "selftest", "fn": "error", "args": [which],
                  "outs": []})
    for which, (v, _) in SANITIZE.items():
        e.append({"id": f"st/sanitize/{SANITIZE_NAMES[which]}/good", "kind": "selftest",
                  "fn": "sanitize", "args": [which, 0], "outs": []})
        if v == variant:  # a bad twin only where its sanitizer watches (a stray write elsewhere
            e.append({"id": f"st/sanitize/{SANITIZE_NAMES[which]}/bad", "kind": "selftest",
                      "fn": "sanitize", "args": [which, 1], "outs": []})  # would go unseen)
    return e


# ------------------------------------------------------------------------------- the runs

def _for_build(case: C.Case, variant: str):
    return C.for_build(case, BUILD_DTYPES[variant])


@dataclass
class Run:
    variant: str
    returncode: int
    stderr: str
    results: dict
    segments: dict   # entry id -> its stderr between @@CASE and @@DONE
    outside: str     # stderr outside every entry


def _segments(stderr: str):
    segs, outside, cur, buf = {}, [], None, []
    for line in stderr.splitlines(keepends=True):
        m = re.match(r"@@(CASE|DONE|END) (.*)$", line.rstrip("\n"))
        if m and m.group(1) == "CASE":
            cur, buf = m.group(2), []
        elif m and m.group(1) == "DONE" and cur == m.group(2):
            segs[cur] = "".join(buf)
            cur = None
        elif m:
            continue
        elif cur is not None:
            buf.append(line)
        else:
            outside.append(line)
    if cur is not None:  # the process died inside this entry
        segs[cur] = "".join(buf)
    return segs, "".join(outside)


@pytest.fixture(scope="session")
def emu_runs(tmp_path_factory):
    if not _native_ok():
        pytest.skip("fusedattn._C with the CPU ops is not loaded (the reference for the "
                    "emulated kernels)")
    problem = B.toolchain_problem()
    if problem:
        pytest.skip(f"CUDA emulation cannot be built here: {problem}")
    cache = B.default_cache()
    work = tmp_path_factory.mktemp("cuda_emu_runs")
    cases = CASES
    with cf.ThreadPoolExecutor(2) as ex:  # the two builds side by side
        libs = dict(zip(VARIANTS, ex.map(lambda v: B.build(v, _units(v), cache), VARIANTS)))

    def run(variant: str) -> Run:
        entries = [{"id": c.id, "kind": "op", "ns": "fusedattn_emu", "op": c.op, "args": c.args}
                   for c in (_for_build(c, variant) for c in cases) if c is not None]
        entries += _selftest_entries(variant)
        by_id = {c.id: c for c in cases}
        for s in SEEDS:  # seeded copies last: their findings must not disturb the others
            if s.variant == variant and s.name not in SEED_PROBLEMS:
                c = by_id[s.case]
                entries.append({"id": f"seed/{s.name}", "kind": "op",
                                "ns": f"fusedattn_emu_seed_{s.name}", "op": c.op, "args": c.args})
        cases_pt, results_pt = work / f"{variant}-cases.pt", work / f"{variant}-results.pt"
        torch.save(entries, cases_pt)
        p = subprocess.run([sys.executable, str(ROOT / "tools" / "cuda_emu" / "run_cases.py"),
                            "--lib", str(libs[variant]), "--cases", str(cases_pt),
                            "--results", str(results_pt)],
                           env=B.sanitizer_env(variant), capture_output=True, text=True,
                           timeout=900)
        results = torch.load(results_pt, weights_only=False) if results_pt.exists() else {}
        segs, outside = _segments(p.stderr)
        return Run(variant, p.returncode, p.stderr, results, segs, outside)

    with cf.ThreadPoolExecutor(2) as ex:
        runs = dict(zip(VARIANTS, ex.map(run, VARIANTS)))
    return runs


def _result(run: Run, eid: str) -> dict:
    if eid not in run.results:
        tail = run.segments.get(eid, run.stderr)[-6000:]
        pytest.fail(f"{run.variant}: no result for {eid} (the run exited with {run.returncode}); "
                    f"its output:\n{tail}")
    return run.results[eid]


def _no_report(run: Run, eid: str):
    seg = run.segments.get(eid, "")
    m = re.search(ANY_REPORT, seg)
    assert not m, f"{run.variant}: sanitizer report in {eid}:\n{seg[max(0, m.start() - 200):][:6000]}"


# ------------------------------------------------------------------------------- the tests

CASES = C.all_cases() if _native_ok() else []


RUNS = [(v, cb) for c in CASES for v in VARIANTS if (cb := _for_build(c, v)) is not None]


@pytest.mark.parametrize("variant,case", RUNS, ids=[f"{v}-{c.id}" for v, c in RUNS])
def test_kernel_case(emu_runs, variant, case):
    """The case ran through the host code into the kernels it targets, agrees with the CPU op,
    and no sanitizer reported anything."""
    run = emu_runs[variant]
    r = _result(run, case.id)
    _no_report(run, case.id)
    assert r["status"] == "ok", f"{variant} {case.id}: {r.get('error')}"
    for e in case.expect:
        assert C.launched(e, r["launches"]), \
            f"{case.id}: expected a launch of {e}, the host code launched:\n" + \
            "\n".join(r["launches"])
    if not case.expect:
        assert not r["launches"], f"{case.id}: expected no launch, got {r['launches']}"
    C.check(case, r["out"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_global_function_runs(emu_runs, variant):
    """Each __global__ function of csrc/cuda/*.cu (listed from the sources) ran in at least one
    case of the unmodified sources."""
    launched = set()
    for eid, r in emu_runs[variant].results.items():
        if eid.startswith(("simam/", "passes/", "stn/")):
            for line in r.get("launches", []):
                m = re.match(r"void fusedattn::\{anonymous\}::(\w+)\(", line)
                if m:
                    launched.add(m.group(1))
    defined = {(p.name, k) for p in B.CUDA_SOURCES for k in global_functions(p.read_text())}
    assert len(defined) >= 17, defined
    missing = sorted(f"{f}: {k}" for f, k in defined if k not in launched)
    assert not missing, f"{variant}: __global__ functions no case executed: {missing}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_report_outside_entries(emu_runs, variant):
    run = emu_runs[variant]
    m = re.search(ANY_REPORT, run.outside)
    assert not m, f"{variant}: sanitizer report outside the entries:\n{run.outside[-6000:]}"
    assert run.returncode == 0, f"{variant}: the run exited with {run.returncode}:\n" \
                                f"{run.stderr[-6000:]}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_shuffle_semantics(emu_runs, variant):
    """__shfl*_sync against the hand-computed tables, and every mode x width x lane operand of the
    sweep against PTX's definition."""
    bad = []
    for cfg in sorted(set(SHFL_TABLES) | set(SHFL_SWEEP)):
        mode, arg, width = cfg
        eid = f"st/shfl/{mode}/{arg}/{width}"
        r = _result(emu_runs[variant], eid)
        _no_report(emu_runs[variant], eid)
        assert r["rc"] == 0, (cfg, r["error"])
        got = r["out"][0]
        if cfg in SHFL_TABLES and got != SHFL_TABLES[cfg]:
            bad.append(f"{cfg}: table {SHFL_TABLES[cfg]}, got {got}")
        want = [shfl_model(mode, arg, width, lane) for lane in range(32)]
        if got != want:
            bad.append(f"{cfg}: PTX model {want}, got {got}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("variant", VARIANTS)
def test_warp_votes_barriers_atomics_shared(emu_runs, variant):
    run = emu_runs[variant]
    res = {k: _result(run, k) for k in ("st/shfl_double", "st/votes", "st/partial_mask",
                                        "st/block_sum", "st/shared_fill")}
    for k, r in res.items():
        _no_report(run, k)
        assert r["rc"] == 0, (k, r["error"])
    assert res["st/shfl_double"]["out"][0] == [1] * 32
    # per warp: ballot, any, all, __syncthreads_count, _and, _or, reduce add, min, max
    # (pred = lane % 3 == 0; warp 1 votes all / and on 1)
    w0 = [0x49249249, 1, 0, 22, 0, 1, 496, (5 - 31) & 0xffffffff, 5]
    w1 = [0x49249249, 1, 1, 22, 0, 1, 496, (5 - 31) & 0xffffffff, 5]
    assert res["st/votes"]["out"][0] == w0 + w1
    assert res["st/partial_mask"]["out"][0] == [100 + (lane ^ 8) for lane in range(16)] + [-1] * 16
    ints, floats = res["st/block_sum"]["out"]
    assert ints == [32640, 32640, 0, 250] and floats == [32640.0]
    # static and dynamic shared memory read before written: NaN (int: -1); then the values
    assert res["st/shared_fill"]["out"][0] == [1.0, 1.0, -1.0, 63.0, 126.0]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("which", sorted(EMU_ERRORS))
def test_emulator_reports(emu_runs, variant, which):
    """Divergent barriers, bad masks, deadlocks, bad launches: the launch fails, saying why."""
    eid = f"st/error/{which}"
    r = _result(emu_runs[variant], eid)
    _no_report(emu_runs[variant], eid)
    assert r["rc"] == 1, f"emu_st_error({which}) completed; expected: {EMU_ERRORS[which]}"
    assert re.search(EMU_ERRORS[which], r["error"]), r["error"]


@pytest.mark.parametrize("which", sorted(SANITIZE), ids=[SANITIZE_NAMES[w] for w in sorted(SANITIZE)])
def test_sanitizers_catch(emu_runs, which):
    """The bad twin gets the expected report in its own output; the correct twin none, in either
    build."""
    variant, pattern = SANITIZE[which]
    name = SANITIZE_NAMES[which]
    run = emu_runs[variant]
    _result(run, f"st/sanitize/{name}/bad")
    seg = run.segments.get(f"st/sanitize/{name}/bad", "")
    assert re.search(pattern, seg), f"{variant} did not report {name}:\n{seg[-4000:]}"
    for v in VARIANTS:
        r = _result(emu_runs[v], f"st/sanitize/{name}/good")
        assert r["rc"] == 0, r["error"]
        _no_report(emu_runs[v], f"st/sanitize/{name}/good")


@pytest.mark.parametrize("seed", SEEDS, ids=[s.name for s in SEEDS])
def test_seeded_bug_is_caught(emu_runs, seed):
    """A copy of the real source with one bug: the harness fails it."""
    assert seed.name not in SEED_PROBLEMS, SEED_PROBLEMS.get(seed.name)
    run = emu_runs[seed.variant]
    eid = f"seed/{seed.name}"
    r = _result(run, eid)
    seg = run.segments.get(eid, "")
    case = next(c for c in CASES if c.id == seed.case)
    if seed.detect == "mismatch":
        assert r["status"] == "ok", r.get("error")
        with pytest.raises(AssertionError):
            C.check(case, r["out"])
        return
    pattern = {"asan": r"ERROR: AddressSanitizer: heap-buffer-overflow",
               "ubsan": MISALIGNED + r"'const (struct )?[^']*Pack[^']*', which requires 16 byte "
                        r"alignment",
               "tsan": r"WARNING: ThreadSanitizer: data race"}[seed.detect]
    assert re.search(pattern, seg), f"seed {seed.name} not reported by {seed.variant}:\n{seg[-4000:]}"
    if seed.detect == "tsan":  # the report points at the shared array of block_sum
        assert "simam.cu" in seg


# ---------------------------------------------------------------------- the rewriter alone

def test_rewriter_keeps_lines_and_skips_comments():
    src = (
        "// a comment with <<<1, 2>>> and __shared__ int x[3];\n"
        'const char* s = "__global__ void f() {}";\n'
        "template <typename T>\n"
        "__global__ void __launch_bounds__(256, 2)\n  k(T* p, int n) {\n"
        "  __shared__ float a[4][33], b[2];\n"
        "  extern __shared__ __align__(16) unsigned char dyn[];\n"
        "  p[0] = a[0][0] + b[1] + dyn[0];\n}\n"
        "void host(float* p, cudaStream_t st) {\n"
        "  k<float><<<dim3(2, 3),\n      256, 0, st>>>(p, 3);\n"
        "  ns::other<<<(n + 7) / 8, 32>>>(p);\n}\n"
        "TORCH_LIBRARY_IMPL(fusedattn, CUDA, m) {\n  m.impl(\"op\", &host);\n}\n"
    )
    rw = rewrite(src, "ns_emu")
    assert rw.text.count("\n") == src.count("\n")
    assert rw.kernels == ["k"] and rw.launches == 2 and rw.shared == ["a", "b", "dyn"]
    assert rw.ops == ["op"]
    lines = rw.text.splitlines()
    assert lines[0] == src.splitlines()[0] and lines[1] == src.splitlines()[1]
    assert "EMU_KERNEL_ENTRY(256);" in lines[4] and "__global__" not in lines[3]
    assert "::emu::id<float [4][33]>& a" in lines[5] and "::emu::id<float [2]>& b" in lines[5]
    assert "unsigned char* dyn = ::emu::dynamic_shared<unsigned char>();" in lines[6]
    assert "::emu::launch(k<float>, __FILE__, __LINE__, dim3(2, 3)," in lines[10]
    assert "::emu::launch(ns::other, __FILE__, __LINE__, (n + 7) / 8, 32)(p);" in lines[12]
    assert "TORCH_LIBRARY_FRAGMENT(ns_emu, m)" in rw.text and 'm.def("op"' in rw.text


def test_selftest_kernels_are_cuda():
    """The self-test kernels are plain CUDA: nvcc compiles them for sm_80 (the one the device
    refuses, too much shared memory, is left out there: ptxas rejects it as the emulator does)."""
    import shutil
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).exists():
        pytest.skip("no nvcc")
    r = subprocess.run([nvcc, "-c", "-arch=sm_80", "-std=c++17", str(B.SELFTEST), "-o", os.devnull],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_rewriter_finds_every_kernel_of_the_sources():
    names = {k for p in B.CUDA_SOURCES for k in global_functions(p.read_text())}
    text = "".join(p.read_text() for p in B.CUDA_SOURCES)
    assert len(names) == len(set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)",
                                             re.sub(r"//[^\n]*", "", text))))
