// Shapes and argument checks shared by the HAM kernel sources (csrc/cpu/ham.cpp,
// csrc/cuda/ham.cu). Element (n, c, p) of a tensor in a readable layout lies at
// n sN + c sC + p sP (contiguous: sC = P, sP = 1; channels-last: sC = 1, sP = C). Small tensors
// (indexed by (n, c) or (n, g, p)) are contiguous, in the accumulation dtype (fp32; fp64 for fp64
// x); argmax indices are int32. The Python wrapper makes the layout readable; these checks guard
// direct calls of the ops.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>

#include "layout.h"

namespace fusedattn {
namespace ham {

struct Geom {
  int64_t N, C, P, sN, sC, sP;
};

inline Geom geom(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  if (layout_of(x) == Layout::kChannelsLast) return {N, C, P, P * C, 1, C};
  return {N, C, P, C * P, P, 1};
}

inline void check_ham_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() != 4 || (x.size(1) < INT32_MAX && x.size(2) * x.size(3) < INT32_MAX), op,
              ": C and H W must fit int32 argmax indices, got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": expected a floating-point tensor, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 4, op, ": expected (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(layout_of(x) != Layout::kOther, op,
              ": expected a contiguous or channels_last tensor (the Python op makes it so)");
}

inline void check_small(const at::Tensor& t, const at::Tensor& x, std::initializer_list<int64_t> shape,
                        at::ScalarType dtype, const char* what) {
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape) && t.scalar_type() == dtype && t.is_contiguous()
                  && t.device() == x.device(),
              what, ": expected a contiguous ", dtype, " tensor of shape ", at::IntArrayRef(shape),
              ", got ", t.scalar_type(), " ", t.sizes());
}

inline at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_like_x(const at::Tensor& dy, const at::Tensor& x, const char* op) {
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.strides() == x.strides() &&
                  dy.scalar_type() == x.scalar_type() && dy.device() == x.device(),
              op, ": dy must have x's shape, strides, dtype and device");
}

// The (n, g, p) maps of the backward: d_avg, d_max (accumulation type) and the group's argmax.
inline void check_pool_grads(const at::Tensor& x, const at::Tensor& group, const at::Tensor& d_avg,
                      const at::Tensor& d_max, const at::Tensor& argmax, const char* op) {
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  check_small(group, x, {N, C}, at::kBool, op);
  check_small(d_avg, x, {N, 2, P}, acc_dtype(x), op);
  check_small(d_max, x, {N, 2, P}, acc_dtype(x), op);
  check_small(argmax, x, {N, 2, P}, at::kInt, op);
}

}  // namespace ham
}  // namespace fusedattn
