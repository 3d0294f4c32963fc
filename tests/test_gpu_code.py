"""GPU code verified without a GPU: the CUDA build holds sm_80 and sm_90 code with no local
memory, and every Triton specialisation compiles for both with no spills."""
import os
import re
import shutil
import subprocess
import sys

import pytest

import fusedattn
from fusedattn import dispatch


def _cuobjdump() -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else (shutil.which("cuobjdump") or "")


def _extension_path() -> str:
    return dispatch.native().__file__


@pytest.fixture(scope="module")
def cuda_build():
    if not dispatch.native().cuda_compiled():
        if shutil.which("nvcc"):
            pytest.fail("nvcc is on PATH but fusedattn._C was built without the CUDA sources "
                        "(FUSEDATTN_CUDA=0?): the README's test command builds them")
        pytest.skip("no nvcc here: the CUDA sources were not built")
    tool = _cuobjdump()
    if not tool:
        pytest.skip("cuobjdump not found (it ships with triton's NVIDIA backend)")
    return tool


def test_cuda_build_has_sm80_and_sm90(cuda_build):
    out = subprocess.run([cuda_build, "--list-elf", _extension_path()], capture_output=True,
                         text=True, check=True).stdout
    archs = set(re.findall(r"\.(sm_\d+)\.cubin", out))
    assert {"sm_80", "sm_90"} <= archs, out


def test_cuda_kernels_use_no_local_memory(cuda_build):
    out = subprocess.run([cuda_build, "-res-usage", _extension_path()], capture_output=True,
                         text=True, check=True).stdout
    usage = re.findall(r"Function (\S+):\s*\n?\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    # per arch: SimAM's kernels (40 or more) and the generic passes' 242 (csrc/cuda/passes.cu)
    assert len(usage) >= 2 * (40 + 242), \
        f"expected every SimAM and generic-pass kernel for two archs, got {len(usage)}"
    bad = [(name, stack, local) for name, _, stack, _, local in usage if int(stack) or int(local)]
    assert not bad, f"kernels using local memory (stack, local bytes): {bad[:5]}"


def test_triton_aot_every_specialisation_sm80_sm90():
    """python -m fusedattn.aot: every kernel variant the launchers can pick compiles to cubin for
    sm_80 and sm_90 with no spills (run outside the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "fusedattn.aot", "--quiet"], capture_output=True,
                       text=True, env=env, timeout=1800)
    # exit status 1 on any failure or spill: the summary and the lines before it say which
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"kernels compiled for sm_80, sm_90: 0 failed, 0 spill", r.stdout), \
        r.stdout[-3000:] + r.stderr[-3000:]


def test_cuda_backend_reports_why_it_cannot_run_here():
    import torch
    for op, report in fusedattn.backends().items():
        st = report["cuda"]
        if torch.cuda.is_available():
            assert st.available, (op, st.reason)
        else:
            assert not st.available and st.reason, op
