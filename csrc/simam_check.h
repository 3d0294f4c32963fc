// Argument checks and shape helpers shared by every SimAM kernel source. The Python wrapper
// raises TypeError/ValueError first; these guard direct calls of the ops.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

namespace fusedattn {

inline at::ScalarType stat_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// M = prod(S), the number of elements of one (n, c) plane.
inline int64_t plane_size(const at::Tensor& x) {
  int64_t M = 1;
  for (int64_t i = 2; i < x.dim(); ++i) M *= x.size(i);
  return M;
}

// Outputs of the forward for x in a readable layout: y in x's strides, and mu, inv of shape
// (N, C) in the statistics dtype (zero-filled: an empty x launches no kernel).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> simam_forward_outputs(const at::Tensor& x) {
  const auto opts = x.options().dtype(stat_dtype(x.scalar_type()));
  return {at::empty_like(x), at::zeros({x.size(0), x.size(1)}, opts),
          at::zeros({x.size(0), x.size(1)}, opts)};
}

inline void check_simam_input(const at::Tensor& x, double e_lambda) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "simam: expected a floating-point tensor, got dtype ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 3, "simam: expected a tensor of shape (N, C, *spatial) with at least one "
              "spatial dim, got shape ", x.sizes());
  TORCH_CHECK(std::isfinite(e_lambda) && e_lambda >= 0,
              "simam: e_lambda must be finite and >= 0, got ", e_lambda);
}

inline void check_simam_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mu,
                                 const at::Tensor& inv) {
  check_simam_input(x, 0.0);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() &&
                  grad.device() == x.device(),
              "simam_backward: grad must match x in shape, dtype and device; got ", grad.sizes(),
              " ", grad.scalar_type(), " vs ", x.sizes(), " ", x.scalar_type());
  const auto st = stat_dtype(x.scalar_type());
  for (const at::Tensor* t : {&mu, &inv})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == x.size(0) && t->size(1) == x.size(1) &&
                    t->scalar_type() == st && t->device() == x.device(),
                "simam_backward: mu and inv must be (N, C) tensors of dtype ", st, " on ",
                x.device(), "; got ", t->sizes(), " ", t->scalar_type());
}

}  // namespace fusedattn
