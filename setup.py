"""Build fusedattn._C from csrc/ with ninja.

C++ CPU sources (csrc/*.cpp, csrc/cpu/*.cpp) are always built. CUDA sources (csrc/cuda/*.cu) are
built when a CUDA toolkit (nvcc) and a CUDA build of torch are present, or when forced:

    FUSEDATTN_CUDA=1   build the CUDA sources (fail loudly if they do not compile)
    FUSEDATTN_CUDA=0   never build them
    (unset)            build them when nvcc and a CUDA torch are found

TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" (A100, H100). The CUDA headers that torch needs from
the pip `nvidia` packages (site-packages/nvidia/cu13/include) are put on the include path.
"""
import glob
import os
import sysconfig
from pathlib import Path

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent


def _want_cuda() -> bool:
    flag = os.environ.get("FUSEDATTN_CUDA", "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    if flag:
        raise SystemExit(f"FUSEDATTN_CUDA must be 0 or 1, got {flag!r}")
    return CUDA_HOME is not None and torch.version.cuda is not None


def _nvidia_include_dirs() -> list[str]:
    site = Path(sysconfig.get_paths()["purelib"])
    return [str(p) for p in sorted(site.glob("nvidia/cu*/include")) if p.is_dir()]


def _cudart_dirs() -> list[str]:
    """Directories holding libcudart.so for the link (CUDA_HOME is derived from nvcc's path,
    which can be a wrapper outside the toolkit)."""
    roots = [CUDA_HOME, os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    dirs = [str(Path(r) / sub) for r in roots if r for sub in ("lib64", "lib")]
    found = [d for d in dirs if (Path(d) / "libcudart.so").exists()]
    if not found:
        raise SystemExit(f"fusedattn: building the CUDA sources needs libcudart.so; looked in {dirs}")
    return found[:1]


def _extension():
    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cu = sorted(glob.glob("csrc/cuda/*.cu"))
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas"]
    include_dirs = [str(ROOT / "csrc")]
    if _want_cuda() and cu:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "-Xptxas=-v",
                "-DFUSEDATTN_WITH_CUDA"]
        return CUDAExtension(
            "fusedattn._C", cpp + cu,
            include_dirs=include_dirs + _nvidia_include_dirs(),
            library_dirs=_cudart_dirs(),
            extra_compile_args={"cxx": cxx + ["-DFUSEDATTN_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("fusedattn._C", cpp, include_dirs=include_dirs,
                        extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


setup(
    packages=["fusedattn", "fusedattn.ops", "fusedattn.triton_kernels"],
    package_dir={"fusedattn.triton_kernels": "triton_kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
