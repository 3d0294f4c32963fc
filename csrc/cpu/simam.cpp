// SimAM on CPU tensors (spec/simam.md): forward and backward, parallel over planes (planar
// layout) or over (sample, channel tile) (channels-last layout), vectorised by the compiler with
// fixed-width lane accumulators (the same bits on every run and thread count), built for AVX-512,
// AVX2 and baseline x86-64 and picked at load time (target_clones).
//
// Traffic: statistics are merged chunk by chunk (Chan et al.) from chunks that sit in L1, and the
// output pass re-reads the plane (or channel tile) while it is still in L2, so x comes from
// memory once when the plane fits in cache and twice otherwise. Backward: one pass for the two
// plane sums, one for dx (x and g read once from memory while the plane fits in cache).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "layout.h"
#include "simam_check.h"
#include "simam_math.h"

namespace fusedattn {
namespace {

using namespace simam;

template <typename T>
using acc_t = at::opmath_type<T>;

constexpr int kLanes = 16;             // accumulator lanes of the planar reductions
constexpr int64_t kChunk = 4096;       // elements per statistics chunk (planar)
constexpr int64_t kChunkRows = 256;    // rows per statistics chunk (channels-last)
constexpr int64_t kTaskElems = 1 << 15;  // smallest amount of work handed to one thread

#ifndef FA_TILE_BYTES
#define FA_TILE_BYTES 64
#endif
template <typename T>
constexpr int tile_channels() { return FA_TILE_BYTES / int(sizeof(T)); }  // one cache line of channels

#define FA_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------- planar: plane (n,c) is x[0, M)

// Sum of the lanes by halving (fixed order, log2 depth).
template <typename A>
FA_INLINE A tree_sum(A* acc) {
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

template <typename T, typename A, typename F>
FA_INLINE A lane_sum(const T* __restrict__ x, int64_t n, F f) {
  A acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += f(A(x[i + l]));
  A s = tree_sum(acc);
  for (; i < n; ++i) s += f(A(x[i]));
  return s;
}

// Plane statistics: two passes over each L1-sized chunk in A, chunks merged in double (a plane
// can hold billions of elements, beyond what fp32 running sums keep exact).
template <typename T, typename A>
FA_INLINE void planar_stats(const T* __restrict__ x, int64_t M, A& mean_out, A& m2_out) {
  double mean = 0, m2 = 0, count = 0;
  for (int64_t c0 = 0; c0 < M; c0 += kChunk) {
    const int64_t len = std::min(kChunk, M - c0);
    const A cmean = lane_sum<T, A>(x + c0, len, [](A v) { return v; }) / A(len);
    const A cm2 = lane_sum<T, A>(x + c0, len, [cmean](A v) { A d = v - cmean; return d * d; });
    chan_merge<double>(mean, m2, count, cmean, cm2, double(len));
  }
  mean_out = A(mean);
  m2_out = A(m2);
}

template <typename T>
FA_INLINE void fwd_planar_impl(const T* __restrict__ x, T* __restrict__ y, acc_t<T>* mu, acc_t<T>* inv, int64_t M,
                               acc_t<T> lam, int64_t p0, int64_t p1) {
  using A = acc_t<T>;
  for (int64_t p = p0; p < p1; ++p) {
    const T* xp = x + p * M;
    T* yp = y + p * M;
    A mean, m2;
    planar_stats<T, A>(xp, M, mean, m2);
    const A iv = inv_from_m2(m2, M, lam);
    for (int64_t i = 0; i < M; ++i) {
      const A v = A(xp[i]);
      yp[i] = T(forward(v, v - mean, iv));
    }
    mu[p] = mean;
    inv[p] = iv;
  }
}

// Backward keeps p = g s + 2 inv a d from the first pass in dx itself when T is the accumulation
// type (so the second pass needs no sigmoid); half types recompute it in the second pass.
template <typename T>
constexpr bool kPartialInDx = std::is_same_v<T, acc_t<T>>;

// First-pass terms of one element: adds a d and a d^2 to the sums, returns p.
template <typename A>
FA_INLINE A bwd_first(A v, A gv, A mean, A iv, A& s1, A& s2) {
  const A d = v - mean;
  A s;
  const A ad = grad_a(v, gv, d, iv, s) * d;
  s1 += ad;
  s2 += ad * d;
  return grad_partial(gv, s, ad, iv);
}

// Second-pass dx of one element; `p` is the stored partial (ignored when recomputed).
template <typename T, typename A>
FA_INLINE T bwd_second(T p, T xv, T gv, A mean, A iv, A c0, A k2) {
  const A v = A(xv), d = v - mean;
  if constexpr (kPartialInDx<T>) {
    return T(grad_finish(A(p), d, c0, k2));
  } else {
    A s1 = 0, s2 = 0;
    return T(grad_finish(bwd_first(v, A(gv), mean, iv, s1, s2), d, c0, k2));
  }
}

template <typename T>
FA_INLINE void bwd_planar_impl(const T* __restrict__ g, const T* __restrict__ x, const acc_t<T>* mu, const acc_t<T>* inv,
                               T* __restrict__ dx, int64_t M, int64_t p0, int64_t p1) {
  using A = acc_t<T>;
  for (int64_t p = p0; p < p1; ++p) {
    const T* xp = x + p * M;
    const T* gp = g + p * M;
    T* dp = dx + p * M;
    const A mean = mu[p], iv = inv[p];
    double S1w = 0, S2w = 0;  // chunk sums (A) added up in double
    for (int64_t c0 = 0; c0 < M; c0 += kChunk) {
      const int64_t end = std::min(M, c0 + kChunk);
      A s1[kLanes] = {}, s2[kLanes] = {};
      int64_t i = c0;
      for (; i + kLanes <= end; i += kLanes)
        for (int l = 0; l < kLanes; ++l) {
          const A part = bwd_first(A(xp[i + l]), A(gp[i + l]), mean, iv, s1[l], s2[l]);
          if constexpr (kPartialInDx<T>) dp[i + l] = part;
        }
      A cs1 = tree_sum(s1), cs2 = tree_sum(s2);
      for (; i < end; ++i) {
        const A part = bwd_first(A(xp[i]), A(gp[i]), mean, iv, cs1, cs2);
        if constexpr (kPartialInDx<T>) dp[i] = part;
      }
      S1w += cs1;
      S2w += cs2;
    }
    const A S1 = A(S1w), S2 = A(S2w);
    const A c0 = grad_c0(S1, iv, M), k2 = grad_k2(S2, iv, M);
    for (int64_t j = 0; j < M; ++j) dp[j] = bwd_second(dp[j], xp[j], gp[j], mean, iv, c0, k2);
  }
}

// ------------------------------------------------- channels-last: element (n,c,m) at n M C + m C + c
// A task is one (n, tile of W channels); W is a compile-time constant for full tiles (vectorised)
// and 0 for the last, narrower tile (width w at run time).

// out[l] = sum over rows r < R of f(x[r C + l], l), with kRowAcc independent accumulators per
// lane (rows r, r + kRowAcc, ...) combined in a fixed order.
constexpr int kRowAcc = 4;
template <typename T, int W, typename F>
FA_INLINE void rows_sum(const T* __restrict__ x, int64_t R, int64_t C, int w_rt,
                        acc_t<T>* out, F f) {
  using A = acc_t<T>;
  constexpr int TW = tile_channels<T>();
  const int w = W ? W : w_rt;
  A acc[kRowAcc][TW] = {};
  int64_t r = 0;
  for (; r + kRowAcc <= R; r += kRowAcc)
    for (int k = 0; k < kRowAcc; ++k)
      for (int l = 0; l < w; ++l) acc[k][l] += f(A(x[(r + k) * C + l]), l);
  for (; r < R; ++r)
    for (int l = 0; l < w; ++l) acc[0][l] += f(A(x[r * C + l]), l);
  for (int l = 0; l < w; ++l) out[l] = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
}

template <typename T, int W>
FA_INLINE void fwd_cl_tile(const T* __restrict__ x, T* __restrict__ y, acc_t<T>* mu, acc_t<T>* inv, int64_t M, int64_t C,
                           acc_t<T> lam, int w_rt) {
  using A = acc_t<T>;
  constexpr int TW = tile_channels<T>();
  const int w = W ? W : w_rt;
  double mw[TW] = {}, m2w[TW] = {}, count = 0;  // chunks merged in double
  for (int64_t r0 = 0; r0 < M; r0 += kChunkRows) {
    const int64_t len = std::min(kChunkRows, M - r0);
    A cm[TW], c2[TW];
    rows_sum<T, W>(x + r0 * C, len, C, w, cm, [](A v, int) { return v; });
    for (int l = 0; l < w; ++l) cm[l] /= A(len);
    rows_sum<T, W>(x + r0 * C, len, C, w, c2, [&cm](A v, int l) { const A d = v - cm[l]; return d * d; });
    for (int l = 0; l < w; ++l) { double c = count; chan_merge<double>(mw[l], m2w[l], c, cm[l], c2[l], double(len)); }
    count += double(len);
  }
  A mean[TW], iv[TW];
  for (int l = 0; l < w; ++l) { mean[l] = A(mw[l]); iv[l] = inv_from_m2(A(m2w[l]), M, lam); }
  for (int64_t r = 0; r < M; ++r)
    for (int l = 0; l < w; ++l) {
      const A v = A(x[r * C + l]);
      y[r * C + l] = T(forward(v, v - mean[l], iv[l]));
    }
  for (int l = 0; l < w; ++l) { mu[l] = mean[l]; inv[l] = iv[l]; }
}

template <typename T, int W>
FA_INLINE void bwd_cl_tile(const T* __restrict__ g, const T* __restrict__ x, const acc_t<T>* mu, const acc_t<T>* inv,
                           T* __restrict__ dx, int64_t M, int64_t C, int w_rt) {
  using A = acc_t<T>;
  constexpr int TW = tile_channels<T>();
  const int w = W ? W : w_rt;
  A mean[TW], iv[TW];
  double S1w[TW] = {}, S2w[TW] = {};  // chunk sums (A) added up in double
  for (int l = 0; l < w; ++l) { mean[l] = mu[l]; iv[l] = inv[l]; }
  for (int64_t r0 = 0; r0 < M; r0 += kChunkRows) {
    const int64_t end = std::min(M, r0 + kChunkRows);
    A S1[TW] = {}, S2[TW] = {};
    for (int64_t r = r0; r < end; ++r)
      for (int l = 0; l < w; ++l) {
        const A part = bwd_first(A(x[r * C + l]), A(g[r * C + l]), mean[l], iv[l], S1[l], S2[l]);
        if constexpr (kPartialInDx<T>) dx[r * C + l] = part;
      }
    for (int l = 0; l < w; ++l) { S1w[l] += S1[l]; S2w[l] += S2[l]; }
  }
  A c0[TW], k2[TW];
  for (int l = 0; l < w; ++l) {
    c0[l] = grad_c0(A(S1w[l]), iv[l], M);
    k2[l] = grad_k2(A(S2w[l]), iv[l], M);
  }
  for (int64_t r = 0; r < M; ++r)
    for (int l = 0; l < w; ++l) {
      const int64_t o = r * C + l;
      dx[o] = bwd_second(dx[o], x[o], g[o], mean[l], iv[l], c0[l], k2[l]);
    }
}

// Tasks [t0, t1) of the channels-last layout: task t is sample t / tiles, tile t % tiles.
template <typename T>
FA_INLINE void fwd_cl_impl(const T* __restrict__ x, T* __restrict__ y, acc_t<T>* mu, acc_t<T>* inv, int64_t M, int64_t C,
                           acc_t<T> lam, int64_t t0, int64_t t1) {
  constexpr int TW = tile_channels<T>();
  const int64_t tiles = (C + TW - 1) / TW;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / tiles, c0 = (t % tiles) * TW;
    const int64_t off = n * M * C + c0, soff = n * C + c0;
    const int w = int(std::min<int64_t>(TW, C - c0));
    if (w == TW) fwd_cl_tile<T, TW>(x + off, y + off, mu + soff, inv + soff, M, C, lam, w);
    else fwd_cl_tile<T, 0>(x + off, y + off, mu + soff, inv + soff, M, C, lam, w);
  }
}

template <typename T>
FA_INLINE void bwd_cl_impl(const T* __restrict__ g, const T* __restrict__ x, const acc_t<T>* mu, const acc_t<T>* inv,
                           T* __restrict__ dx, int64_t M, int64_t C, int64_t t0, int64_t t1) {
  constexpr int TW = tile_channels<T>();
  const int64_t tiles = (C + TW - 1) / TW;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / tiles, c0 = (t % tiles) * TW;
    const int64_t off = n * M * C + c0, soff = n * C + c0;
    const int w = int(std::min<int64_t>(TW, C - c0));
    if (w == TW) bwd_cl_tile<T, TW>(g + off, x + off, mu + soff, inv + soff, dx + off, M, C, w);
    else bwd_cl_tile<T, 0>(g + off, x + off, mu + soff, inv + soff, dx + off, M, C, w);
  }
}

// One out-of-line, multi-versioned entry point per dtype and kernel.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FA_CLONES
#endif

#define FA_KERNELS(T)                                                                          \
  FA_CLONES void fwd_planar(const T* __restrict__ x, T* __restrict__ y, acc_t<T>* mu, acc_t<T>* inv, int64_t M,         \
                            acc_t<T> lam, int64_t p0, int64_t p1) {                           \
    fwd_planar_impl<T>(x, y, mu, inv, M, lam, p0, p1);                                        \
  }                                                                                            \
  FA_CLONES void bwd_planar(const T* __restrict__ g, const T* __restrict__ x, const acc_t<T>* mu, const acc_t<T>* inv,  \
                            T* __restrict__ dx, int64_t M, int64_t p0, int64_t p1) {                       \
    bwd_planar_impl<T>(g, x, mu, inv, dx, M, p0, p1);                                         \
  }                                                                                            \
  FA_CLONES void fwd_cl(const T* __restrict__ x, T* __restrict__ y, acc_t<T>* mu, acc_t<T>* inv, int64_t M, int64_t C,  \
                        acc_t<T> lam, int64_t t0, int64_t t1) {                               \
    fwd_cl_impl<T>(x, y, mu, inv, M, C, lam, t0, t1);                                         \
  }                                                                                            \
  FA_CLONES void bwd_cl(const T* __restrict__ g, const T* __restrict__ x, const acc_t<T>* mu, const acc_t<T>* inv,      \
                        T* __restrict__ dx, int64_t M, int64_t C, int64_t t0, int64_t t1) {                \
    bwd_cl_impl<T>(g, x, mu, inv, dx, M, C, t0, t1);                                          \
  }

FA_KERNELS(float)
FA_KERNELS(double)
FA_KERNELS(at::Half)
FA_KERNELS(at::BFloat16)

// Work split: planar tasks are planes; channels-last tasks are (sample, channel tile).
struct Tasks {
  int64_t count, grain;
};

template <typename T>
Tasks tasks_for(Layout layout, int64_t N, int64_t C, int64_t M) {
  const int64_t per_task = layout == Layout::kPlanar ? M : M * tile_channels<T>();
  const int64_t count = layout == Layout::kPlanar
                            ? N * C
                            : N * ((C + tile_channels<T>() - 1) / tile_channels<T>());
  return {count, std::max<int64_t>(1, kTaskElems / std::max<int64_t>(per_task, 1))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> simam_forward_cpu(const at::Tensor& x_in,
                                                                 double e_lambda) {
  check_simam_input(x_in, e_lambda);
  const at::Tensor x = readable(x_in);
  const int64_t N = x.size(0), C = x.size(1), M = plane_size(x);
  at::Tensor y = at::empty_like(x);
  const auto stat_opts = x.options().dtype(stat_dtype(x.scalar_type()));
  at::Tensor mu = at::zeros({N, C}, stat_opts), inv = at::zeros({N, C}, stat_opts);
  if (x.numel() == 0) return {y, mu, inv};
  const Layout layout = layout_of(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "simam_forward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    A* mup = mu.mutable_data_ptr<A>();
    A* ivp = inv.mutable_data_ptr<A>();
    const A lam = A(e_lambda);
    const Tasks t = tasks_for<scalar_t>(layout, N, C, M);
    at::parallel_for(0, t.count, t.grain, [&](int64_t b, int64_t e) {
      if (layout == Layout::kPlanar) fwd_planar(xp, yp, mup, ivp, M, lam, b, e);
      else fwd_cl(xp, yp, mup, ivp, M, C, lam, b, e);
    });
  });
  return {y, mu, inv};
}

at::Tensor simam_backward_cpu(const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& mu_in,
                              const at::Tensor& inv_in) {
  check_simam_backward(grad, x_in, mu_in, inv_in);
  const at::Tensor x = readable(x_in);
  const at::Tensor g = in_layout_of(grad, x);
  const at::Tensor mu = mu_in.contiguous(), inv = inv_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), M = plane_size(x);
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  const Layout layout = layout_of(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "simam_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    const A* mup = mu.const_data_ptr<A>();
    const A* ivp = inv.const_data_ptr<A>();
    const Tasks t = tasks_for<scalar_t>(layout, N, C, M);
    at::parallel_for(0, t.count, t.grain, [&](int64_t b, int64_t e) {
      if (layout == Layout::kPlanar) bwd_planar(gp, xp, mup, ivp, dp, M, b, e);
      else bwd_cl(gp, xp, mup, ivp, dp, M, C, b, e);
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedattn, CPU, m) {
  m.impl("simam_forward", &simam_forward_cpu);
  m.impl("simam_backward", &simam_backward_cpu);
}

}  // namespace fusedattn
