// Stand-ins for the CUDA runtime parts of ATen / c10 that the host code of csrc/cuda/*.cu uses,
// so that the launchers themselves (geometry, variant choice, alignment checks, split buffers)
// run in the emulation, on CPU tensors. The rewriter comments out the real includes.
#pragma once

#include <c10/core/Device.h>

#include "cuda_emu.h"

namespace at {
namespace cuda {
inline cudaStream_t getCurrentCUDAStream(c10::DeviceIndex = -1) { return nullptr; }
}  // namespace cuda
}  // namespace at

namespace c10 {
namespace cuda {
// The emulated ops take CPU tensors: the guard accepts any device.
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
struct OptionalCUDAGuard {
  explicit OptionalCUDAGuard(std::optional<c10::Device>) {}
};
}  // namespace cuda
}  // namespace c10

// Launch errors are thrown by the launch itself (emu::Error).
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
#define C10_CUDA_CHECK(expr) (void)(expr)
