"""Run cases in a process of their own: emulated kernels (a library from build.py, loaded under
its sanitizer runtime) or, on a GPU, the extension's real CUDA kernels.

Emulated (the test suite starts this under LD_PRELOAD of the sanitizer runtime):

    run_cases.py --lib libemu_asan.so --cases cases.pt --results results.pt

  ``cases.pt`` (torch.save) is a list of entries: ``{"id", "kind": "op", "ns", "op", "args"}``
  calls ``torch.ops.<ns>.<op>(*args)``; ``{"id", "kind": "selftest", "fn", "args", "outs"}``
  calls the C function ``emu_st_<fn>(*args, *out buffers, err, errlen)`` of the library
  (tools/cuda_emu/selftest.cu). Before and after each entry the runner writes ``@@CASE <id>`` and
  ``@@DONE <id>`` to stderr, so that every sanitizer report can be attributed to its entry. The
  results (outputs, the launch log of each entry, errors) go to ``results.pt``.

On a GPU (scripts/gpu_sanitize.sh runs this under compute-sanitizer):

    run_cases.py --device cuda [--only REGEX]

  runs tools/cuda_emu/cases.py's cases with torch.ops.fusedattn on CUDA tensors and judges each
  against the CPU op (cases.check); exit status 1 if any disagrees.
"""
from __future__ import annotations

import argparse
import ctypes
import re
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _mark(tag: str, cid: str) -> None:
    sys.stderr.write(f"@@{tag} {cid}\n")
    sys.stderr.flush()


_CTYPES = {"i": ctypes.c_int, "u": ctypes.c_uint, "f": ctypes.c_float}


def run_emulated(lib_path: str, cases_path: str, results_path: str) -> int:
    import torch
    torch.ops.load_library(lib_path)
    lib = ctypes.CDLL(lib_path)
    lib.emu_launch_log.restype = ctypes.c_char_p
    entries = torch.load(cases_path, weights_only=False)
    results = {}
    for e in entries:
        cid = e["id"]
        lib.emu_reset_log()
        _mark("CASE", cid)
        r = {"status": "ok"}
        try:
            if e["kind"] == "op":
                out = getattr(getattr(torch.ops, e["ns"]), e["op"])(*e["args"])
                r["out"] = out
            else:
                bufs = [(_CTYPES[t] * n)(*([init] * n)) for t, n, init in e["outs"]]
                err = ctypes.create_string_buffer(4096)
                fn = getattr(lib, "emu_st_" + e["fn"])
                rc = fn(*[ctypes.c_int(a) for a in e["args"]], *bufs, err, ctypes.c_int(4096))
                r["rc"] = rc
                r["error"] = err.value.decode(errors="replace")
                r["out"] = [list(b) for b in bufs]
        except Exception as exc:  # an emulator finding raised inside an op: RuntimeError
            r["status"] = "error"
            r["error"] = f"{type(exc).__name__}: {exc}"
        r["launches"] = [ln for ln in lib.emu_launch_log().decode().splitlines() if ln]
        _mark("DONE", cid)
        results[cid] = r
    torch.save(results, results_path)
    _mark("END", "-")
    return 0


def run_gpu(only: str) -> int:
    import torch
    sys.path.insert(0, str(HERE.parent))
    import fusedattn  # noqa: F401  (the ops)
    from cuda_emu import cases as C
    if not torch.cuda.is_available():
        print("run_cases.py --device cuda: no CUDA device", file=sys.stderr)
        return 2
    bad = 0
    for case in C.all_cases():
        if only and not re.search(only, case.id):
            continue
        try:
            out = case.call("fusedattn", "cuda")
            torch.cuda.synchronize()
            out = tuple(t.cpu() for t in C._tuple(out))
            C.check(case, out)
            print(f"ok    {case.id}")
        except Exception:
            bad += 1
            print(f"FAIL  {case.id}\n{traceback.format_exc()}")
    print(f"{bad} case(s) failed")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib")
    ap.add_argument("--cases")
    ap.add_argument("--results")
    ap.add_argument("--device", choices=["emulated", "cuda"], default="emulated")
    ap.add_argument("--only", default="", help="regex on case ids (--device cuda)")
    a = ap.parse_args(argv)
    if a.device == "cuda":
        return run_gpu(a.only)
    return run_emulated(a.lib, a.cases, a.results)


if __name__ == "__main__":
    sys.exit(main())
