// The contract of fusedattn::rel_attention / rel_attention_backward (csrc/ops.cpp declares them;
// fusedattn/ops/aaconv.py states the math and the layouts): shapes, dtypes and argument checks,
// written once for every device's kernels. The Python function checks the same things first and
// raises ValueError / TypeError; these checks guard direct calls of the ops.
//
// q, k: (N, Nh, L, dkh); v: (N, Nh, L, dvh), any strides, one floating dtype; rel_h (2H - 1, dkh),
// rel_w (2W - 1, dkh) in q's dtype, both or neither; L = H W <= kMaxPixels.
// out, dq, dk, dv: memory ordered (N, Nh, d, L) (the (N, Nh, L, d) view with strides
// (Nh d L, d L, 1, L)); lse (N, Nh, L) contiguous in the accumulation dtype.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace fusedattn {
namespace aaconv {

constexpr int64_t kMaxPixels = 4096;  // H W: 64 x 64

struct Dims {
  int64_t N, Nh, L, H, W, dk, dv;
  bool rel;
};

inline at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_like(const at::Tensor& t, const at::Tensor& q, at::IntArrayRef shape,
                       const char* op, const char* what) {
  TORCH_CHECK_VALUE(t.sizes() == shape, op, ": expected ", what, " of shape ", shape, ", got ",
                    t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": expected ", what, " in q's dtype ",
              q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), op, ": expected ", what, " on ", q.device(), ", got ",
              t.device());
}

inline Dims check_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& rel_h,
                          const std::optional<at::Tensor>& rel_w, int64_t H, int64_t W,
                          const char* op) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
                    ": expected q, k of shape (N, Nh, H W, dkh) and v of shape (N, Nh, H W, dvh),"
                    " got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op, ": expected floating-point q, got ",
              q.scalar_type());
  TORCH_CHECK_VALUE(H >= 1 && W >= 1, op, ": expected a positive grid, got H = ", H, ", W = ", W);
  TORCH_CHECK_VALUE(H * W <= kMaxPixels, op, ": the attention grid H x W = ", H, " x ", W, " = ",
                    H * W, " pixels exceeds the limit of ", kMaxPixels, " pixels (64 x 64)");
  const int64_t N = q.size(0), Nh = q.size(1), L = q.size(2), dk = q.size(3), dv = v.size(3);
  TORCH_CHECK_VALUE(L == H * W, op, ": q has ", L, " pixels, expected H W = ", H, " x ", W, " = ",
                    H * W);
  TORCH_CHECK_VALUE(dk >= 1 && dv >= 1, op, ": expected head sizes dkh, dvh >= 1, got ", dk, ", ",
                    dv);
  check_like(k, q, q.sizes(), op, "k");
  check_like(v, q, {N, Nh, L, dv}, op, "v");
  TORCH_CHECK_VALUE(rel_h.has_value() == rel_w.has_value(), op,
                    ": rel_h and rel_w must be given together or not at all");
  if (rel_h) {
    check_like(*rel_h, q, {2 * H - 1, dk}, op, "rel_h");
    check_like(*rel_w, q, {2 * W - 1, dk}, op, "rel_w");
  }
  return {N, Nh, L, H, W, dk, dv, rel_h.has_value()};
}

inline void check_backward(const Dims& d, const at::Tensor& q, const at::Tensor& dout,
                           const at::Tensor& out, const at::Tensor& lse, const char* op) {
  check_like(dout, q, {d.N, d.Nh, d.L, d.dv}, op, "dout");
  check_like(out, q, {d.N, d.Nh, d.L, d.dv}, op, "out");
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef({d.N, d.Nh, d.L}), op,
                    ": expected lse of shape ", at::IntArrayRef({d.N, d.Nh, d.L}), ", got ",
                    lse.sizes());
  TORCH_CHECK(lse.scalar_type() == acc_dtype(q) && lse.device() == q.device(), op,
              ": expected lse in ", acc_dtype(q), " on ", q.device(), ", got ", lse.scalar_type(),
              " on ", lse.device());
}

// The layout of out, dq, dk, dv: (N, Nh, L, d) with memory ordered (N, Nh, d, L).
inline at::Tensor empty_channel_major(const at::Tensor& like, int64_t N, int64_t Nh, int64_t L,
                                      int64_t d) {
  return at::empty({N, Nh, d, L}, like.options()).transpose(2, 3);
}

}  // namespace aaconv
}  // namespace fusedattn
