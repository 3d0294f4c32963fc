// SimAM on CPU tensors (fusedattn/spec/simam.md), forward and backward; the per-element math is
// csrc/simam_math.h. Vectorised by the compiler through fixed-width lane loops, built for
// x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and baseline x86-64 and picked at load time
// (target_clones).
//
// Reproducibility: every output element's arithmetic is a function of the shape (and of the
// clone), never of the thread count (tests/test_determinism.py). Sums run in fixed lanes over
// fixed chunks and merge in a fixed order; threads only take whole tasks (planes or channel
// blocks) whose results no other task touches. The clones are x86-64-v4 / v3, not bare "avx512f"
// / "avx2": with AVX-512F alone GCC fuses a * b + c into an FMA in 512-bit and scalar code but
// has no FMA for 256-bit vectors, so the 256-bit epilogue of a vectorised loop rounded twice
// where the main loop rounded once, and an element's result depended on where a thread's range
// put it in a loop. In these clones every vector width and the scalar code can fuse, and what is
// fused depends on the code and the shape only. (The clones' results differ from one another in
// the last bits: baseline x86-64 has no FMA, and under generic tuning GCC leaves a * b + c unfused
// where c is a register accumulator of 256 bits or less, which v3's vectors are and v4's are not.)
//
// Three work shapes:
//
//  * planar, large planes (M > kSmallPlane): a task is a plane. Statistics come from two passes
//    over L1-sized chunks, merged in double (Chan et al.); the output pass re-reads the plane
//    while it is still in L2, so x comes from memory once while a plane fits in L2.
//  * planar, small planes: a task is a group of kLanes consecutive planes (kLanes * M elements,
//    a whole number of vectors): per-plane statistics, then one flat pass over the group with
//    the plane constants broadcast into L1 buffers, so no pass runs on short remainders.
//  * channels-last: a task is (sample, block of channels); rows of the block are contiguous, so
//    per-channel statistics accumulate across a row in vector lanes. Statistics stream over
//    row chunks of about L1 size, whose length depends on C alone (not on the block width,
//    which narrows with the thread count); the output pass re-reads the block from L2/L3.
//
// Backward: the first pass forms the two plane sums and stores p = g s + 2 inv a d in dx (for
// fp32/fp64; half types recompute it), the second finishes dx = p - c0 - k2 d without a sigmoid.
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

constexpr int kLanes = 16;                // accumulator lanes of the planar loops
constexpr int64_t kChunk = 4096;          // elements per statistics chunk (planar)
constexpr int64_t kSmallPlane = 256;      // planes up to this size take the grouped path
constexpr int64_t kChunkBytes = 16 << 10;  // bytes per statistics chunk (channels-last)
constexpr int64_t kBlockBytes = 1 << 10;  // channel-block row bytes (channels-last)
constexpr int64_t kTaskElems = 1 << 15;   // smallest amount of work handed to one thread

template <typename T>
constexpr int64_t block_channels() { return kBlockBytes / int64_t(sizeof(T)); }

// Backward keeps p in dx itself when T is the accumulation type.
template <typename T>
constexpr bool kPartialInDx = std::is_same_v<T, acc_t<T>>;

#define FA_INLINE inline __attribute__((always_inline))

// ------------------------------------------------------------------------ shared element steps

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

// (mean, m2) of n contiguous elements: two passes over each L1-sized chunk, chunks merged in
// double (a plane can hold billions of elements, beyond what fp32 running sums keep exact).
template <typename T, typename A>
FA_INLINE void planar_stats(const T* __restrict__ x, int64_t n, A& mean_out, A& m2_out) {
  if (n <= kChunk) {  // one chunk: what the merge below would return, without the merge
    mean_out = lane_sum<T, A>(x, n, [](A v) { return v; }) / A(n);
    const A mean = mean_out;
    m2_out = lane_sum<T, A>(x, n, [mean](A v) { A d = v - mean; return d * d; });
    return;
  }
  double mean = 0, m2 = 0, count = 0;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t len = std::min(kChunk, n - c0);
    const A cmean = lane_sum<T, A>(x + c0, len, [](A v) { return v; }) / A(len);
    const A cm2 = lane_sum<T, A>(x + c0, len, [cmean](A v) { A d = v - cmean; return d * d; });
    chan_merge<double>(mean, m2, count, cmean, cm2, double(len));
  }
  mean_out = A(mean);
  m2_out = A(m2);
}

// Backward first pass for one element: adds a d and a d^2 to the sums, returns p.
template <typename A>
FA_INLINE A bwd_first(A v, A gv, A mean, A iv, A& s1, A& s2) {
  const A d = v - mean;
  A s;
  const A ad = grad_a(v, gv, d, iv, s) * d;
  s1 += ad;
  s2 += ad * d;
  return grad_partial(gv, s, ad, iv);
}

// Backward second pass for one element; `p` is the stored partial (recomputed for half types).
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

// ------------------------------------------------------------ planar, large planes: task = plane

template <typename T>
FA_INLINE void fwd_planar_impl(const T* __restrict__ x, T* __restrict__ y, acc_t<T>* mu,
                               acc_t<T>* inv, int64_t M, acc_t<T> lam, int64_t p0, int64_t p1) {
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

template <typename T>
FA_INLINE void bwd_planar_impl(const T* __restrict__ g, const T* __restrict__ x,
                               const acc_t<T>* mu, const acc_t<T>* inv, T* __restrict__ dx,
                               int64_t M, int64_t p0, int64_t p1) {
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
    const A c0 = grad_c0(A(S1w), iv, M), k2 = grad_k2(A(S2w), iv, M);
    for (int64_t j = 0; j < M; ++j) dp[j] = bwd_second(dp[j], xp[j], gp[j], mean, iv, c0, k2);
  }
}

// ------------------------------------------- planar, small planes: task = group of kLanes planes

// buf[i] = v[i / M] for i < planes * M.
template <typename A>
FA_INLINE void broadcast_planes(A* __restrict__ buf, const A* v, int planes, int64_t M) {
  for (int q = 0; q < planes; ++q)
    for (int64_t i = 0; i < M; ++i) buf[q * M + i] = v[q];
}

template <typename T>
FA_INLINE void fwd_small_impl(const T* __restrict__ x, T* __restrict__ y, acc_t<T>* mu,
                              acc_t<T>* inv, int64_t M, acc_t<T> lam, int64_t p0, int64_t p1) {
  using A = acc_t<T>;
  alignas(64) A mb[kLanes * kSmallPlane], ib[kLanes * kSmallPlane];
  for (int64_t p = p0; p < p1; p += kLanes) {
    const int planes = int(std::min<int64_t>(kLanes, p1 - p));
    for (int q = 0; q < planes; ++q) {
      A m2;
      planar_stats<T, A>(x + (p + q) * M, M, mu[p + q], m2);
      inv[p + q] = inv_from_m2(m2, M, lam);
    }
    broadcast_planes(mb, mu + p, planes, M);
    broadcast_planes(ib, inv + p, planes, M);
    const T* xg = x + p * M;
    T* yg = y + p * M;
    for (int64_t i = 0; i < planes * M; ++i) {
      const A v = A(xg[i]);
      yg[i] = T(forward(v, v - mb[i], ib[i]));
    }
  }
}

template <typename T>
FA_INLINE void bwd_small_impl(const T* __restrict__ g, const T* __restrict__ x,
                              const acc_t<T>* mu, const acc_t<T>* inv, T* __restrict__ dx,
                              int64_t M, int64_t p0, int64_t p1) {
  using A = acc_t<T>;
  alignas(64) A mb[kLanes * kSmallPlane], ib[kLanes * kSmallPlane];
  alignas(64) A ad[kLanes * kSmallPlane], add[kLanes * kSmallPlane];
  for (int64_t p = p0; p < p1; p += kLanes) {
    const int planes = int(std::min<int64_t>(kLanes, p1 - p));
    const int64_t n = planes * M;
    const T* xg = x + p * M;
    const T* gg = g + p * M;
    T* dg = dx + p * M;
    broadcast_planes(mb, mu + p, planes, M);
    broadcast_planes(ib, inv + p, planes, M);
    for (int64_t i = 0; i < n; ++i) {  // a d and a d^2 per element, summed per plane below
      A s1 = 0, s2 = 0;
      const A part = bwd_first(A(xg[i]), A(gg[i]), mb[i], ib[i], s1, s2);
      ad[i] = s1;
      add[i] = s2;
      if constexpr (kPartialInDx<T>) dg[i] = part;
    }
    A c0[kLanes], k2[kLanes];
    for (int q = 0; q < planes; ++q) {
      c0[q] = grad_c0(lane_sum<A, A>(ad + q * M, M, [](A v) { return v; }), inv[p + q], M);
      k2[q] = grad_k2(lane_sum<A, A>(add + q * M, M, [](A v) { return v; }), inv[p + q], M);
    }
    broadcast_planes(ad, c0, planes, M);
    broadcast_planes(add, k2, planes, M);
    for (int64_t i = 0; i < n; ++i) dg[i] = bwd_second(dg[i], xg[i], gg[i], mb[i], ib[i], ad[i], add[i]);
  }
}

// ------------------------------------------ channels-last: task = (sample, block of channels)
// Element (r, c) of a block lies at x[r * C + c], c < cb <= block_channels<T>().

// Rows per statistics chunk: about kChunkBytes of the widest block C allows. A function of C
// alone, never of the block width cb (split_for narrows blocks as the thread count grows), since
// the chunk boundaries decide how a channel's statistics are rounded.
template <typename T>
FA_INLINE int64_t chunk_rows(int64_t C) {
  const int64_t width = std::min(C, block_channels<T>());
  return std::max<int64_t>(1, kChunkBytes / (width * int64_t(sizeof(T))));
}

template <typename T>
FA_INLINE void fwd_cl_block(const T* __restrict__ x, T* __restrict__ y, acc_t<T>* mu,
                            acc_t<T>* inv, int64_t M, int64_t C, int64_t cb, acc_t<T> lam) {
  using A = acc_t<T>;
  constexpr int64_t B = block_channels<T>();
  const int64_t rows = chunk_rows<T>(C);
  double mw[B] = {}, m2w[B] = {}, count = 0;  // chunks merged in double
  A cm[B], c2[B], mean[B], iv[B];
  for (int64_t r0 = 0; r0 < M; r0 += rows) {
    const int64_t r1 = std::min(M, r0 + rows);
    const A len = A(r1 - r0);
    for (int64_t c = 0; c < cb; ++c) cm[c] = c2[c] = 0;
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < cb; ++c) cm[c] += A(x[r * C + c]);
    for (int64_t c = 0; c < cb; ++c) cm[c] /= len;
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < cb; ++c) { const A d = A(x[r * C + c]) - cm[c]; c2[c] += d * d; }
    for (int64_t c = 0; c < cb; ++c) {
      double n = count;
      chan_merge<double>(mw[c], m2w[c], n, cm[c], c2[c], double(len));
    }
    count += double(len);
  }
  for (int64_t c = 0; c < cb; ++c) {
    mean[c] = A(mw[c]);
    iv[c] = inv_from_m2(A(m2w[c]), M, lam);
    mu[c] = mean[c];
    inv[c] = iv[c];
  }
  for (int64_t r = 0; r < M; ++r)
    for (int64_t c = 0; c < cb; ++c) {
      const A v = A(x[r * C + c]);
      y[r * C + c] = T(forward(v, v - mean[c], iv[c]));
    }
}

template <typename T>
FA_INLINE void bwd_cl_block(const T* __restrict__ g, const T* __restrict__ x, const acc_t<T>* mu,
                            const acc_t<T>* inv, T* __restrict__ dx, int64_t M, int64_t C,
                            int64_t cb) {
  using A = acc_t<T>;
  constexpr int64_t B = block_channels<T>();
  const int64_t rows = chunk_rows<T>(C);
  A mean[B], iv[B], s1[B], s2[B], c0[B], k2[B];
  double S1w[B] = {}, S2w[B] = {};  // chunk sums (A) added up in double
  for (int64_t c = 0; c < cb; ++c) { mean[c] = mu[c]; iv[c] = inv[c]; }
  for (int64_t r0 = 0; r0 < M; r0 += rows) {
    const int64_t r1 = std::min(M, r0 + rows);
    for (int64_t c = 0; c < cb; ++c) s1[c] = s2[c] = 0;
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c = 0; c < cb; ++c) {
        const int64_t o = r * C + c;
        const A part = bwd_first(A(x[o]), A(g[o]), mean[c], iv[c], s1[c], s2[c]);
        if constexpr (kPartialInDx<T>) dx[o] = part;
      }
    for (int64_t c = 0; c < cb; ++c) { S1w[c] += s1[c]; S2w[c] += s2[c]; }
  }
  for (int64_t c = 0; c < cb; ++c) {
    c0[c] = grad_c0(A(S1w[c]), iv[c], M);
    k2[c] = grad_k2(A(S2w[c]), iv[c], M);
  }
  for (int64_t r = 0; r < M; ++r)
    for (int64_t c = 0; c < cb; ++c) {
      const int64_t o = r * C + c;
      dx[o] = bwd_second(dx[o], x[o], g[o], mean[c], iv[c], c0[c], k2[c]);
    }
}

// ------------------------------------------------------------------------------- entry points

// Work split. Planar: tasks are planes (grouped by kLanes for small planes, whose groups the
// kernels form from any range: a plane's statistics never mix with its neighbours', and an
// element's output does not depend on its place in the group's flat loop, see the clones).
// Channels-last: tasks are (sample, channel block); blocks are narrowed (to a multiple of 16
// channels) when there are too few to keep every thread busy, which changes no channel's
// arithmetic (chunk_rows).
struct Split {
  int64_t tasks, grain, block;
};

template <typename T>
Split split_for(Layout layout, int64_t N, int64_t C, int64_t M) {
  if (layout == Layout::kPlanar) {
    const int64_t per = M <= kSmallPlane ? M * kLanes : M;
    const int64_t grain = std::max<int64_t>(1, kTaskElems / per) * (M <= kSmallPlane ? kLanes : 1);
    return {N * C, grain, 0};
  }
  const int64_t want = (2 * at::get_num_threads() + N - 1) / N;  // blocks per sample wanted
  int64_t block = std::min(block_channels<T>(), C);
  if (want > 1) block = std::min(block, std::max<int64_t>(16, (C / want + 15) / 16 * 16));
  const int64_t blocks = (C + block - 1) / block;
  return {N * blocks, std::max<int64_t>(1, kTaskElems / (M * block)), block};
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// x86-64-v4 / v3 rather than bare "avx512f" / "avx2": see the note on reproducibility above.
#define FA_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FA_CLONES
#endif

// One out-of-line, multi-versioned entry point per dtype and direction, over tasks [t0, t1).
#define FA_KERNELS(T)                                                                          \
  FA_CLONES void fwd_range(const T* __restrict__ x, T* __restrict__ y, acc_t<T>* mu,          \
                           acc_t<T>* inv, Layout layout, int64_t M, int64_t C, int64_t block,  \
                           acc_t<T> lam, int64_t t0, int64_t t1) {                             \
    if (layout != Layout::kPlanar) {                                                           \
      const int64_t blocks = (C + block - 1) / block;                                          \
      for (int64_t t = t0; t < t1; ++t) {                                                      \
        const int64_t n = t / blocks, c = (t % blocks) * block;                                \
        fwd_cl_block<T>(x + n * M * C + c, y + n * M * C + c, mu + n * C + c, inv + n * C + c, \
                        M, C, std::min(block, C - c), lam);                                    \
      }                                                                                        \
    } else if (M <= kSmallPlane) {                                                             \
      fwd_small_impl<T>(x, y, mu, inv, M, lam, t0, t1);                                        \
    } else {                                                                                   \
      fwd_planar_impl<T>(x, y, mu, inv, M, lam, t0, t1);                                       \
    }                                                                                          \
  }                                                                                            \
  FA_CLONES void bwd_range(const T* __restrict__ g, const T* __restrict__ x,                  \
                           const acc_t<T>* mu, const acc_t<T>* inv, T* __restrict__ dx,        \
                           Layout layout, int64_t M, int64_t C, int64_t block, int64_t t0,     \
                           int64_t t1) {                                                       \
    if (layout != Layout::kPlanar) {                                                           \
      const int64_t blocks = (C + block - 1) / block;                                          \
      for (int64_t t = t0; t < t1; ++t) {                                                      \
        const int64_t n = t / blocks, c = (t % blocks) * block, o = n * M * C + c;             \
        bwd_cl_block<T>(g + o, x + o, mu + n * C + c, inv + n * C + c, dx + o, M, C,           \
                        std::min(block, C - c));                                               \
      }                                                                                        \
    } else if (M <= kSmallPlane) {                                                             \
      bwd_small_impl<T>(g, x, mu, inv, dx, M, t0, t1);                                         \
    } else {                                                                                   \
      bwd_planar_impl<T>(g, x, mu, inv, dx, M, t0, t1);                                        \
    }                                                                                          \
  }

FA_KERNELS(float)
FA_KERNELS(double)
FA_KERNELS(at::Half)
FA_KERNELS(at::BFloat16)

std::tuple<at::Tensor, at::Tensor, at::Tensor> simam_forward_cpu(const at::Tensor& x_in,
                                                                 double e_lambda) {
  check_simam_input(x_in, e_lambda);
  const at::Tensor x = readable(x_in);
  const int64_t N = x.size(0), C = x.size(1), M = plane_size(x);
  auto [y, mu, inv] = simam_forward_outputs(x);
  if (x.numel() == 0) return {y, mu, inv};
  const Layout layout = layout_of(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "simam_forward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    A* mup = mu.mutable_data_ptr<A>();
    A* ivp = inv.mutable_data_ptr<A>();
    const Split s = split_for<scalar_t>(layout, N, C, M);
    at::parallel_for(0, s.tasks, s.grain, [&](int64_t b, int64_t e) {
      fwd_range(xp, yp, mup, ivp, layout, M, C, s.block, A(e_lambda), b, e);
    });
  });
  return {y, mu, inv};
}

at::Tensor simam_backward_cpu(const at::Tensor& grad, const at::Tensor& x_in,
                              const at::Tensor& mu_in, const at::Tensor& inv_in) {
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
    const Split s = split_for<scalar_t>(layout, N, C, M);
    at::parallel_for(0, s.tasks, s.grain, [&](int64_t b, int64_t e) {
      bwd_range(gp, xp, mu.const_data_ptr<A>(), inv.const_data_ptr<A>(), dp, layout, M, C,
                s.block, b, e);
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
