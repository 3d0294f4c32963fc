"""CUDA C++ kernels executed on the CPU: a host-C++ emulation of the CUDA device API
(cuda_emu.h, cuda_emu.cpp), a source rewriter for what g++ cannot parse (rewrite.py), builds
under AddressSanitizer/UBSan and ThreadSanitizer (build.py), the cases that reach every kernel of
csrc/cuda/ (cases.py) and their runner (run_cases.py). tests/test_cuda_emulated.py drives it."""
