// The contract of the generic attention passes (csrc/ops.cpp declares them;
// fusedattn/spec/passes.md states the math), shared by the CPU (csrc/cpu/passes.cpp) and CUDA
// (csrc/cuda/passes.cu) sources: shapes, layouts and argument checks, written once.
//
// Element (n, c, p) of a full-size tensor in a readable layout lies at n sN + c sC + p sP
// (contiguous: sC = P, sP = 1; channels-last: sC = 1, sP = C). Small tensors (indexed by (n, c)
// or (n, g, p)) are contiguous, in the accumulation dtype (fp32; fp64 for fp64 x); argmax
// indices are int32. Channel groups: without a `group` tensor every channel is in group 0 and
// the (n, g, p) maps have G = 1 row per sample; with one ((N, C) bool, true = group 1) G = 2.
// The Python wrappers make the layout readable; these checks guard direct calls of the ops.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <optional>

#include "layout.h"

namespace fusedattn {
namespace passes {

struct Geom {
  int64_t N, C, P, sN, sC, sP;
};

inline Geom geom(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  if (layout_of(x) == Layout::kChannelsLast) return {N, C, P, P * C, 1, C};
  return {N, C, P, C * P, P, 1};
}

inline void check_x(const at::Tensor& x, const char* op) {
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
              " on ", x.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

inline at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_like_x(const at::Tensor& dy, const at::Tensor& x, const char* op) {
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.strides() == x.strides() &&
                  dy.scalar_type() == x.scalar_type() && dy.device() == x.device(),
              op, ": dy must have x's shape, strides, dtype and device");
}

// The number of channel groups G (1 without `group`, 2 with it), after checking the group flags
// and the group sizes: G = 1 needs size0 = C, size1 = 0; G = 2 needs size0 + size1 = C (the
// sizes are the counts of false / true flags per sample, which the caller guarantees).
inline int64_t groups(const at::Tensor& x, const std::optional<at::Tensor>& group, int64_t size0,
                      int64_t size1, const char* op) {
  const int64_t N = x.size(0), C = x.size(1);
  if (!group.has_value()) {
    TORCH_CHECK(size0 == C && size1 == 0, op, ": without group, expected size0 = C = ", C,
                " and size1 = 0, got ", size0, ", ", size1);
    return 1;
  }
  check_small(*group, x, {N, C}, at::kBool, op);
  TORCH_CHECK(size0 >= 0 && size1 >= 0 && size0 + size1 == C, op,
              ": expected group sizes size0 + size1 = C = ", C, ", got ", size0, ", ", size1);
  return 2;
}

// Groups of a pass that gets no sizes (gate, gate_grad_s): 1 without `group`, else 2.
inline int64_t groups(const at::Tensor& x, const std::optional<at::Tensor>& group, const char* op) {
  if (group.has_value()) check_small(*group, x, {x.size(0), x.size(1)}, at::kBool, op);
  return group.has_value() ? 2 : 1;
}

// The spatial maps of the backward, all given or all absent: the gate s, the channel pooling's
// gradients d_avg, d_max (accumulation dtype) and its argmax, each (N, G, P). Returns whether
// they are given.
inline bool check_maps(const at::Tensor& x, int64_t G, const std::optional<at::Tensor>& s,
                       const std::optional<at::Tensor>& d_avg, const std::optional<at::Tensor>& d_max,
                       const std::optional<at::Tensor>& argmax, const char* op) {
  const bool any = s || d_avg || d_max || argmax, all = s && d_avg && d_max && argmax;
  TORCH_CHECK(any == all, op, ": s, d_avg, d_max and argmax must be given together or not at all");
  if (!all) return false;
  const int64_t N = x.size(0), P = x.size(2) * x.size(3);
  check_small(*s, x, {N, G, P}, acc_dtype(x), op);
  check_small(*d_avg, x, {N, G, P}, acc_dtype(x), op);
  check_small(*d_max, x, {N, G, P}, acc_dtype(x), op);
  check_small(*argmax, x, {N, G, P}, at::kInt, op);
  return true;
}

// The pixel max's gradient of grad_x: d_max_c and argmax_c ((N, C)) together or not at all.
inline bool check_pixel_max(const at::Tensor& x, const std::optional<at::Tensor>& d_max_c,
                            const std::optional<at::Tensor>& argmax_c, const char* op) {
  TORCH_CHECK(d_max_c.has_value() == argmax_c.has_value(), op,
              ": d_max_c and argmax_c must be given together or not at all");
  if (!d_max_c) return false;
  check_small(*d_max_c, x, {x.size(0), x.size(1)}, acc_dtype(x), op);
  check_small(*argmax_c, x, {x.size(0), x.size(1)}, at::kInt, op);
  return true;
}

}  // namespace passes
}  // namespace fusedattn
