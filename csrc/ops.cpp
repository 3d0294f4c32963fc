// Schemas of every fusedattn op; kernels register per device in csrc/cpu and csrc/cuda.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(fusedattn, m) {
  // y = x * sigmoid(e); also returns the per-plane mean and inv = 1/(4(v + e_lambda)), (N, C),
  // fp32 (fp64 for fp64 x), which the backward uses.
  m.def("simam_forward(Tensor x, float e_lambda) -> (Tensor y, Tensor mu, Tensor inv)");
  m.def("simam_backward(Tensor grad, Tensor x, Tensor mu, Tensor inv) -> Tensor");
}

namespace {
bool cuda_compiled() {
#ifdef FUSEDATTN_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedattn C++/CUDA kernels; ops are registered under torch.ops.fusedattn";
  m.def("cuda_compiled", &cuda_compiled, "whether the CUDA sources were built into this module");
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." +
                            std::to_string(TORCH_VERSION_MINOR) + "." +
                            std::to_string(TORCH_VERSION_PATCH);
}
