// SimAM per-element formulas and per-plane finishing steps (fusedattn/spec/simam.md), shared by
// the CPU and CUDA sources so the CPU tests execute the arithmetic the GPU runs.
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

constexpr double kLog2e = 1.4426950408889634;

// 2^z for z <= 0 (or NaN) in float: z is clamped at -126, split as n + f with n = round(z) and
// f in [-1/2, 1/2], and 2^f is a degree-5 polynomial (1.8e-7 relative); 2^n goes straight into
// the exponent bits. Plain arithmetic and bit casts, so that compilers vectorise it.
inline float exp2_neg_f32(float z) {  // host only (devices have exp2f)
  z = z < -126.0f ? -126.0f : z;
  const float t = z + 12582912.0f;  // 1.5 * 2^23: round(z) lands in the low mantissa bits
  const float n = t - 12582912.0f;
  const float f = z - n;
  float p = 1.32186722e-3f;
  p = p * f + 9.67169832e-3f;
  p = p * f + 5.55089302e-2f;
  p = p * f + 2.40222380e-1f;
  p = p * f + 6.93146884e-1f;
  p = p * f + 1.0f;
  uint32_t ti;
  std::memcpy(&ti, &t, sizeof(ti));
  const uint32_t bits = (ti - 0x4B400000u + 127u) << 23;  // n + 127 in [1, 127]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// t = exp(-e) for the energy e = d2 inv + 1/2 >= 1/2 (inv >= 0; NaN propagates). In float it is
// 2^z with z = d2 (-inv log2 e) - log2(e)/2: one multiply-add, as -inv log2 e is a plane
// constant that compilers hoist. The relative error of t reaches sigmoid(e) scaled by
// t / (1 + t) <= 0.38.
FA_HD double exp_neg_energy(double d2, double inv) { return ::exp(-(d2 * inv + 0.5)); }
FA_HD float exp_neg_energy(float d2, float inv) {
#if defined(__CUDA_ARCH__)
  return exp2f(d2 * (inv * float(-kLog2e)) + float(-0.5 * kLog2e));
#else
  return exp2_neg_f32(d2 * (inv * float(-kLog2e)) + float(-0.5 * kLog2e));
#endif
}

// 1 / a and a / b. On CUDA devices in fp64 these use the correctly rounded reciprocal (a fp64
// divide there calls a slow-path subroutine whose register saves go to local memory).
FA_HD float recip(float a) { return 1.0f / a; }
FA_HD float div(float a, float b) { return a / b; }
FA_HD double recip(double a) {
#if defined(__CUDA_ARCH__)
  return __drcp_rn(a);
#else
  return 1.0 / a;
#endif
}
// 1 / a for a in [1, 2] (the sigmoid's 1 + exp(-e)). On CUDA devices in fp64: a float
// reciprocal refined by two fp64 Newton steps, with no slow-path call (the only division inside
// the per-element loops, where a call would spill live registers).
FA_HD float recip_1to2(float a) { return 1.0f / a; }
FA_HD double recip_1to2(double a) {
#if defined(__CUDA_ARCH__)
  double r = double(__frcp_rn(float(a)));
  r = fma(r, fma(-a, r, 1.0), r);
  return fma(r, fma(-a, r, 1.0), r);
#else
  return 1.0 / a;
#endif
}

FA_HD double div(double a, double b) {
#if defined(__CUDA_ARCH__)
  return a * __drcp_rn(b);
#else
  return a / b;
#endif
}

// n = max(M - 1, 1): the spec's guard for one-element planes.
template <typename A>
FA_HD A dof(int64_t M) { return M > 1 ? A(M - 1) : A(1); }

// inv = 1 / (4 (v + lambda)) from the plane's sum of squared deviations m2.
template <typename A>
FA_HD A inv_from_m2(A m2, int64_t M, A e_lambda) {
  return recip(A(4) * (div(m2, dof<A>(M)) + e_lambda));
}

// Forward output for one element, d = x - mu: y = x sigmoid(e) = x / (1 + exp(-e)).
template <typename A>
FA_HD A forward(A x, A d, A inv) {
#if defined(__CUDA_ARCH__)
  return x * recip_1to2(A(1) + exp_neg_energy(d * d, inv));
#else
  return x / (A(1) + exp_neg_energy(d * d, inv));
#endif
}

// Chan et al. merge of (mean, m2, count) with a chunk's (cmean, cm2, ccount).
template <typename A>
FA_HD void chan_merge(A& mean, A& m2, A& count, A cmean, A cm2, A ccount) {
  const A total = count + ccount;
  const A delta = cmean - mean;
  const A w = div(ccount, total);
  mean = mean + delta * w;
  m2 = m2 + cm2 + delta * delta * count * w;
  count = total;
}

// Backward per element: a = g x s (1 - s), with s returned through the reference.
template <typename A>
FA_HD A grad_a(A x, A g, A d, A inv, A& s) {
  s = recip_1to2(A(1) + exp_neg_energy(d * d, inv));
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
FA_HD A grad_c0(A S1, A inv, int64_t M) { return div(A(2) * inv * S1, A(M)); }

template <typename A>
FA_HD A grad_k2(A S2, A inv, int64_t M) { return div(A(8) * inv * inv * S2, dof<A>(M)); }

}  // namespace simam
}  // namespace fusedattn
