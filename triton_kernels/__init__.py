"""Triton kernels and their host launchers, one module per op family (installed as
``fusedattn.triton_kernels``)."""
