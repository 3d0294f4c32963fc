// Memory layouts the SimAM kernels read without a copy. A tensor (N, C, *S) with M = prod(S) is
//   kPlanar:       contiguous; plane (n, c) is the run [(n C + c) M, (n C + c + 1) M)
//   kChannelsLast: dense channels-last of any rank (channels_last / channels_last_3d / (N, L, C)
//                  storage for rank 3); element (n, c, m) lies at n M C + m C + c
// Anything else is copied to kPlanar first (fusedattn/ops/layout.py mirrors this rule for the
// fake kernels, so both agree on output strides).
#pragma once

#include <ATen/ATen.h>

namespace fusedattn {

enum class Layout { kPlanar, kChannelsLast, kOther };

inline bool is_dense_channels_last(const at::Tensor& x) {
  // Expected strides of (N, C, S1..Sk) stored as (N, S1..Sk, C); size-1 dims are ignored.
  const int64_t d = x.dim();
  int64_t expected = 1;
  auto check = [&](int64_t dim) {
    if (x.size(dim) != 1 && x.stride(dim) != expected) return false;
    expected *= x.size(dim);
    return true;
  };
  if (!check(1)) return false;
  for (int64_t i = d - 1; i >= 2; --i)
    if (!check(i)) return false;
  return check(0);
}

inline Layout layout_of(const at::Tensor& x) {
  if (x.is_contiguous()) return Layout::kPlanar;
  if (is_dense_channels_last(x)) return Layout::kChannelsLast;
  return Layout::kOther;
}

// x itself when its layout is read in place, else a contiguous copy.
inline at::Tensor readable(const at::Tensor& x) {
  return layout_of(x) == Layout::kOther ? x.contiguous() : x;
}

// t in exactly the strides of `like` (a copy only when they differ), for grads with odd strides.
inline at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  return at::empty_like(like).copy_(t);
}

}  // namespace fusedattn
