// The contract of fusedattn::affine_sample / affine_sample_backward (csrc/ops.cpp declares them;
// fusedattn/ops/stn.py states the math and the layouts): shapes, dtypes and argument checks,
// written once for every device's kernels. The Python function checks first and raises
// ValueError / TypeError; these guard direct calls of the ops.
//
// x (N, C, H, W) contiguous or dense channels-last, floating; theta (N, 2, 3) contiguous in the
// accumulation dtype (float32, float64 for float64 x), on x's device; Ho, Wo >= 1; H, W >= 1;
// every tensor and the output below 2^31 elements (the GPU kernels index with 32 bits).
// y (N, C, Ho, Wo) in x's memory format; dy in y's strides; dx in x's; dtheta like theta.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "layout.h"

namespace fusedattn {
namespace stn {

constexpr int64_t kMaxElements = (int64_t(1) << 31) - 1;

inline at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::MemoryFormat format_of(const at::Tensor& x) {
  return layout_of(x) == Layout::kPlanar ? at::MemoryFormat::Contiguous
                                         : at::MemoryFormat::ChannelsLast;
}

inline void check_inputs(const at::Tensor& x, const at::Tensor& theta, int64_t Ho, int64_t Wo,
                         const char* op) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": expected a floating-point x, got ",
              x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": expected x of shape (N, C, H, W), got ", x.sizes());
  TORCH_CHECK_VALUE(layout_of(x) != Layout::kOther, op,
                    ": expected a contiguous or channels-last x, got strides ", x.strides());
  TORCH_CHECK_VALUE(x.size(2) >= 1 && x.size(3) >= 1 && Ho >= 1 && Wo >= 1, op,
                    ": expected positive input and output sizes, got input ", x.size(2), " x ",
                    x.size(3), ", output ", Ho, " x ", Wo);
  TORCH_CHECK_VALUE(theta.dim() == 3 && theta.size(0) == x.size(0) && theta.size(1) == 2 &&
                        theta.size(2) == 3,
                    op, ": expected theta of shape (", x.size(0), ", 2, 3), got ", theta.sizes());
  TORCH_CHECK(theta.scalar_type() == acc_dtype(x) && theta.is_contiguous() &&
                  theta.device() == x.device(),
              op, ": expected a contiguous theta of dtype ", acc_dtype(x), " on ", x.device(),
              ", got ", theta.scalar_type(), " on ", theta.device());
  TORCH_CHECK_VALUE(x.numel() <= kMaxElements && x.size(0) * x.size(1) * Ho * Wo <= kMaxElements,
                    op, ": tensors of 2^31 elements or more are not supported");
}

inline at::Tensor empty_output(const at::Tensor& x, int64_t Ho, int64_t Wo) {
  return at::empty({x.size(0), x.size(1), Ho, Wo}, x.options().memory_format(format_of(x)));
}

inline void check_grad(const at::Tensor& dy, const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(dy.dim() == 4 && dy.size(0) == x.size(0) && dy.size(1) == x.size(1), op,
                    ": expected dy of shape (", x.size(0), ", ", x.size(1), ", Ho, Wo), got ",
                    dy.sizes());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type() && dy.device() == x.device(), op,
              ": expected dy in x's dtype ", x.scalar_type(), " on ", x.device(), ", got ",
              dy.scalar_type(), " on ", dy.device());
}

}  // namespace stn
}  // namespace fusedattn
