"""Build fusedattn._C from csrc/ with ninja.

C++ CPU sources (csrc/*.cpp, csrc/cpu/*.cpp) are always built. CUDA sources (csrc/cuda/*.cu) are
built when a CUDA toolkit (nvcc) and a CUDA build of torch are present, or when forced:

    FUSEDATTN_CUDA=1   build the CUDA sources (fail loudly if they do not compile)
    FUSEDATTN_CUDA=0   never build them
    (unset)            build them when nvcc and a CUDA torch are found

TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" (A100, H100). The CUDA headers that torch needs from
the pip `nvidia` packages (site-packages/nvidia/cu13/include) are put on the include path.

torch: the extension is built against the torch imported here and runs only with that exact
version (C++ extensions have no ABI guarantee across torch releases). pyproject.toml pins it for
the build and at run time (`torch==2.14.1`, as requirements.txt). build_ext writes the version
into `fusedattn/_build_info.py` next to `_C*.so`; `fusedattn.dispatch` refuses to load `_C` under
another torch and says "built against torch X, running torch Y".

Build without network or a second torch (what scripts/env.sh and tests/test_packaging.py do):
`pip install --no-build-isolation --no-deps .` (or `-e .`, or `pip wheel ...`).
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


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's build_ext, then `_build_info.py` (the torch version built against) beside each
    built `_C*.so`: in the build tree (wheels, `pip install .`) and, for `-e .`, in the source
    tree where the .so is copied (git-ignored there)."""

    def run(self):
        super().run()
        text = ('"""Written by setup.py at build time: the torch that fusedattn._C was built '
                f'against."""\nTORCH_VERSION = {torch.__version__!r}\n')
        inplace = self.inplace
        try:
            self.inplace = False
            targets = {Path(self.get_ext_fullpath(e.name)).parent for e in self.extensions}
            self.inplace = inplace
            targets |= {Path(self.get_ext_fullpath(e.name)).parent for e in self.extensions}
        finally:
            self.inplace = inplace
        for folder in targets:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "_build_info.py").write_text(text)


setup(
    packages=["fusedattn", "fusedattn.ops", "fusedattn.triton_kernels"],
    package_dir={"fusedattn.triton_kernels": "triton_kernels"},
    # The math contract the docstrings cite (fusedattn/spec/*.md) ships with the package.
    package_data={"fusedattn": ["spec/*.md"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExt},
)
