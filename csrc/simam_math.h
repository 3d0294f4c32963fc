// SimAM per-element formulas and per-plane finishing steps (spec/simam.md), shared by the CPU
// and CUDA sources so the CPU tests execute the arithmetic the GPU runs.
//
// Forward, per plane of M elements:  mu = mean(x), d = x - mu, v = sum(d^2) / max(M-1, 1),
//   inv = 1 / (4 (v + lambda)),  e = d^2 inv + 1/2,  y = x sigmoid(e).
// Backward, with s = sigmoid(e), a = g x s (1 - s), S1 = sum(a d), S2 = sum(a d^2):
//   dx = g s + 2 inv (a d - S1/M) - 8 inv^2 d S2 / n   (evaluated as grad_partial, grad_finish).
// A is the accumulation type: float for half/bfloat16/float inputs, double for double.
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FA_HD __host__ __device__ __forceinline__
#else
#define FA_HD inline __attribute__((always_inline))
#endif

namespace fusedattn {
namespace simam {

// exp(x) for float: Cephes-style range reduction and degree-6 polynomial (about 1 ulp), written
// with plain arithmetic and bit casts so that compilers vectorise it. NaN stays NaN.
FA_HD float exp_f32(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  const float t = x * 1.44269504088896341f + 12582912.0f;  // round(x log2 e) in the mantissa
  const float n = t - 12582912.0f;
  int32_t ti;
  std::memcpy(&ti, &t, sizeof(ti));
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (ti - 0x4B400000 + 127) << 23;  // 2^n, n in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
#endif
}

FA_HD double exp_acc(double x) { return ::exp(x); }
FA_HD float exp_acc(float x) { return exp_f32(x); }

template <typename A>
FA_HD A sigmoid(A e) { return A(1) / (A(1) + exp_acc(-e)); }

// n = max(M - 1, 1): the spec's guard for one-element planes.
template <typename A>
FA_HD A dof(int64_t M) { return M > 1 ? A(M - 1) : A(1); }

// inv = 1 / (4 (v + lambda)) from the plane's sum of squared deviations m2.
template <typename A>
FA_HD A inv_from_m2(A m2, int64_t M, A e_lambda) {
  return A(1) / (A(4) * (m2 / dof<A>(M) + e_lambda));
}

// Forward output for one element, d = x - mu.
template <typename A>
FA_HD A forward(A x, A d, A inv) { return x * sigmoid(d * d * inv + A(0.5)); }

// Chan et al. merge of (mean, m2, count) with a chunk's (cmean, cm2, ccount).
template <typename A>
FA_HD void chan_merge(A& mean, A& m2, A& count, A cmean, A cm2, A ccount) {
  const A total = count + ccount;
  const A delta = cmean - mean;
  const A w = ccount / total;
  mean = mean + delta * w;
  m2 = m2 + cm2 + delta * delta * count * w;
  count = total;
}

// Backward per element: a = g x s (1 - s), with s returned through the reference.
template <typename A>
FA_HD A grad_a(A x, A g, A d, A inv, A& s) {
  s = sigmoid(d * d * inv + A(0.5));
  return g * x * s * (A(1) - s);
}

// dx = p - c0 - k2 d, split so that the first pass can store p = g s + 2 inv a d (which needs
// the sigmoid) and the second pass finishes with the plane constants c0 = 2 inv S1 / M and
// k2 = 8 inv^2 S2 / n.
template <typename A>
FA_HD A grad_partial(A g, A s, A ad, A inv) { return g * s + A(2) * inv * ad; }

template <typename A>
FA_HD A grad_finish(A p, A d, A c0, A k2) { return p - c0 - k2 * d; }

template <typename A>
FA_HD A grad_c0(A S1, A inv, int64_t M) { return A(2) * inv * S1 / A(M); }

template <typename A>
FA_HD A grad_k2(A S2, A inv, int64_t M) { return A(8) * inv * inv * S2 / dof<A>(M); }

}  // namespace simam
}  // namespace fusedattn
