// 2-D relative self-attention (attention-augmented convolution, fusedattn/spec/aaconv.md) on CPU
// tensors, forward and backward, flash-attention style: no (HW)^2 tensor is ever stored
// (csrc/aaconv_check.h: shapes and layouts; fusedattn/ops/aaconv.py: the math).
//
// Per (n, head), L = H W pixels, query i = (iy, ix), key j = (jy, jx), q' = scale q:
//   s_ij = q'_i . k_j + RW_i[jx - ix + W - 1] + RH_i[jy - iy + H - 1],  RW_i = q'_i rel_w^T,
//   RH_i = q'_i rel_h^T (the per-query tables: (2W - 1) + (2H - 1) numbers).
//
// Vectors run along queries: a block of kBQ = 32 queries is one row of lanes (2 vectors of 16
// floats, 4 of 8 doubles), keys are scalars broadcast into them, so the head sizes dkh, dvh can
// be anything (no padding in memory, no lane wasted on a short head). The relative terms enter
// as two per-block tables laid out like the logits, TW[jx][i] = RW_i[jx - ix + W - 1] and
// TH[jy][i] = RH_i[jy - iy + H - 1] (W + H rows of kBQ lanes), so a key's bias is two vector
// loads. A table is computed on the relative index (a small product with rel_w, rel_h) and
// skewed into that layout.
//
//  * forward, a task per (n, head, query block): tiles of kBK keys, online softmax (running
//    max m, sum l, unnormalised output O^T[c][i]); out = O / l, lse = m + log l.
//  * backward, a task per (n, head), which owns that pair's dq, dk, dv: blocks of kBKB keys
//    against every query (queries as lanes, all of the pair's packed once): P^T = exp(s - lse),
//    g^T = P^T (dP^T - D) with dP = dout v^T and D_i = dout_i . out_i; dq^T += k^T g^T and the
//    per-query sums of g over key columns / rows (GW[jx][i], GH[jy][i]) accumulate across the
//    blocks in key order; dv_j = sum_i P_ij dout_i and dk_j = sum_i g_ij q'_i are lane-parallel
//    dot products over the queries. Each s, P and g is formed once (five products per tile,
//    one exp). The relative parts of dq and the tables' gradients come from GW, GH at the end.
//    The tables' gradients are reduced in a fixed order: the pairs form fixed chunks (a
//    function of the shape), a chunk's pairs run in order on one thread into lane
//    accumulators, the chunk's sum goes to its own partial, and the partials are added in chunk
//    order at the end. No atomics.
//
// Accumulation in fp32 (fp64 for fp64 inputs); exp is a polynomial of the same accuracy as
// libm's (within ~1 ulp). Every output element's arithmetic is a function of the shape alone
// (threads take whole tasks; chunk boundaries are fixed), so results are bitwise the same for
// any thread count and from run to run. The kernels are built for the accumulation types only
// (fp16 / bf16 are converted when packed and when written), with GCC's vector extensions for
// the lanes, for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and baseline x86-64, picked at load
// time (GCC target_clones; the clones' results differ from one another in the last bits).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <vector>

#include "aaconv_check.h"

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace fusedattn {
namespace {

using namespace aaconv;

#define AA_INLINE inline __attribute__((always_inline))
#define AA_INLINE_LAMBDA __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AA_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AA_CLONES
#endif

// ------------------------------------------------------------------------------- lanes

template <typename A>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(64)));
  typedef int32_t itype __attribute__((vector_size(64)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(64)));
  typedef int64_t itype __attribute__((vector_size(64)));
};
template <typename A>
using Vec = typename VecOf<A>::type;

template <typename A>
constexpr int kLanes = int(64 / sizeof(A));
constexpr int kBQ = 32;  // queries per block: one row of lanes
template <typename A>
constexpr int kQV = kBQ / kLanes<A>;  // vectors per row
template <typename A>
constexpr int kRows = 16 / kQV<A>;  // rows per register block (16 accumulators)
constexpr int64_t kBK = 64;          // keys per tile (forward)
constexpr int64_t kBKB = 16;         // keys per block (backward)
constexpr int64_t kMaxChunks = 64;   // chunks of the backward (the relative tables' partial sums)

template <typename A>
AA_INLINE Vec<A> ld(const A* p) {
  return *reinterpret_cast<const Vec<A>*>(p);
}
template <typename A>
AA_INLINE void st(A* p, Vec<A> v) {
  *reinterpret_cast<Vec<A>*>(p) = v;
}
template <typename A>
AA_INLINE Vec<A> bc(A x) {
  return Vec<A>{} + x;
}
template <typename A>
AA_INLINE Vec<A> vmax(Vec<A> a, Vec<A> b) {
  return a > b ? a : b;
}

// exp with Cephes' expf polynomial (fp32, ~1 ulp); inputs below -87.3 give 2^-126 times the
// polynomial (the callers only take exp of s - max <= 0, where that is 0 to the sums' rounding).
AA_INLINE Vec<float> vexp(Vec<float> x) {
  using VI = VecOf<float>::itype;
  x = x < -87.3f ? bc<float>(-87.3f) : x;
  x = x > 88.3f ? bc<float>(88.3f) : x;
  const float magic = 12582912.0f;  // 1.5 2^23: adding it rounds to an integer
  Vec<float> n = x * 1.44269504088896341f + magic;
  n = n - magic;
  Vec<float> r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  Vec<float> p = bc<float>(1.9875691500E-4f);
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * (r * r) + r + 1.0f;
  VI e = (__builtin_convertvector(n, VI) + 127) << 23;
  return p * (Vec<float>)e;
}

// exp in fp64: Taylor to degree 13 on |r| <= ln2 / 2 (error < 1e-16 relative).
AA_INLINE Vec<double> vexp(Vec<double> x) {
  using VI = VecOf<double>::itype;
  x = x < -708.0 ? bc<double>(-708.0) : x;
  x = x > 709.0 ? bc<double>(709.0) : x;
  const double magic = 6755399441055744.0;  // 1.5 2^52
  Vec<double> n = x * 1.4426950408889634074 + magic;
  n = n - magic;
  Vec<double> r = x - n * 6.93147180369123816490e-01;
  r = r - n * 1.90821492927058770002e-10;
  Vec<double> p = bc<double>(1.0 / 6227020800.0);
  const double c[] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0,
                      1.0 / 40320.0,     1.0 / 5040.0,      1.0 / 720.0,      1.0 / 120.0,
                      1.0 / 24.0,        1.0 / 6.0,         0.5,              1.0,
                      1.0};
  for (double ci : c) p = p * r + ci;
  VI e = (__builtin_convertvector(n, VI) + 1023) << 52;
  return p * (Vec<double>)e;
}

// The sum of a vector's lanes in a fixed order (halving).
template <typename A>
AA_INLINE A hsum(Vec<A> v) {
  alignas(64) A t[kLanes<A>];
  st(t, v);
  for (int w = kLanes<A> / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) t[l] += t[l + w];
  return t[0];
}

// The lane sums of kLanes vectors at once: lane k of the result is hsum(v[k]), added in
// hsum's order (lane l with l + half, then l + half / 2, ...), by a tree of two-vector shuffles:
// each level halves the lanes per vector and doubles the vectors per lane group.
AA_INLINE Vec<float> hsums(const Vec<float>* v) {
  using VI = VecOf<float>::itype;
  const VI lo1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const VI hi1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const VI lo2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const VI hi2 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  const VI lo3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  const VI hi3 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
  const VI lo4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const VI hi4 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  Vec<float> a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], lo1) +
           __builtin_shuffle(v[2 * i], v[2 * i + 1], hi1);
  for (int i = 0; i < 4; ++i)
    b[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], lo2) +
           __builtin_shuffle(a[2 * i], a[2 * i + 1], hi2);
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shuffle(b[2 * i], b[2 * i + 1], lo3) +
           __builtin_shuffle(b[2 * i], b[2 * i + 1], hi3);
  return __builtin_shuffle(c[0], c[1], lo4) + __builtin_shuffle(c[0], c[1], hi4);
}

AA_INLINE Vec<double> hsums(const Vec<double>* v) {
  using VI = VecOf<double>::itype;
  const VI lo1 = {0, 1, 2, 3, 8, 9, 10, 11}, hi1 = {4, 5, 6, 7, 12, 13, 14, 15};
  const VI lo2 = {0, 1, 4, 5, 8, 9, 12, 13}, hi2 = {2, 3, 6, 7, 10, 11, 14, 15};
  const VI lo3 = {0, 2, 4, 6, 8, 10, 12, 14}, hi3 = {1, 3, 5, 7, 9, 11, 13, 15};
  Vec<double> a[4], b[2];
  for (int i = 0; i < 4; ++i)
    a[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], lo1) +
           __builtin_shuffle(v[2 * i], v[2 * i + 1], hi1);
  for (int i = 0; i < 2; ++i)
    b[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], lo2) +
           __builtin_shuffle(a[2 * i], a[2 * i + 1], hi2);
  return __builtin_shuffle(b[0], b[1], lo3) + __builtin_shuffle(b[0], b[1], hi3);
}

// ------------------------------------------------------------------------ micro-kernels

// Rows of lanes: for r in [0, n): out_r = init(r) + sum_{x < K} a[r rs + x ks] * B[x], where
// B[x] is the kBQ-lane row at b + x ldb. epi(r, acc) receives each row.
template <typename A, int U, typename Init, typename Epi>
AA_INLINE void rows_block(const A* a, int64_t rs, int64_t ks, int64_t K, const A* b, int64_t ldb,
                          int64_t r0, Init&& init, Epi&& epi) {
  constexpr int Q = kQV<A>;
  Vec<A> acc[U][Q];
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) acc[u][q] = init(r0 + u, q);
  const A* ar = a + r0 * rs;
  for (int64_t x = 0; x < K; ++x) {
    Vec<A> bv[Q];
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) bv[q] = ld(b + x * ldb + q * kLanes<A>);
    const A* ax = ar + x * ks;
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) {
      const A s = ax[u * rs];
#pragma GCC unroll 4
      for (int q = 0; q < Q; ++q) acc[u][q] += s * bv[q];
    }
  }
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u) epi(r0 + u, acc[u]);
}

template <typename A, typename Init, typename Epi>
AA_INLINE void rows(const A* a, int64_t rs, int64_t ks, int64_t K, const A* b, int64_t ldb,
                    int64_t n, Init&& init, Epi&& epi) {
  constexpr int U = kRows<A>;
  int64_t r = 0;
  for (; r + U <= n; r += U) rows_block<A, U>(a, rs, ks, K, b, ldb, r, init, epi);
  if constexpr (U > 4) {
    if (n - r >= 4) { rows_block<A, 4>(a, rs, ks, K, b, ldb, r, init, epi); r += 4; }
  }
  for (; r < n; ++r) rows_block<A, 1>(a, rs, ks, K, b, ldb, r, init, epi);
}

// Lane-parallel dot products: for r < nr, c < nc: epi(r, c, init(r, c) + sum_{v < nv}
// X[r][v] * Y[c][v]) with rows of nv vectors at x + r ldx, y + c ldy; epi gets the lane vector.
template <typename A, int R, int C, typename Init, typename Epi>
AA_INLINE void dots_block(const A* x, int64_t ldx, const A* y, int64_t ldy, int64_t nv, int64_t r0,
                          int64_t c0, Init&& init, Epi&& epi) {
  Vec<A> acc[R][C];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = init(r0 + r, c0 + c);
  for (int64_t v = 0; v < nv; ++v) {
    Vec<A> xv[R], yv[C];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) xv[r] = ld(x + (r0 + r) * ldx + v * kLanes<A>);
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) yv[c] = ld(y + (c0 + c) * ldy + v * kLanes<A>);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] += xv[r] * yv[c];
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) epi(r0 + r, c0 + c, acc[r][c]);
}

template <typename A, int R, typename Init, typename Epi>
AA_INLINE void dots_cols(const A* x, int64_t ldx, const A* y, int64_t ldy, int64_t nv, int64_t r0,
                         int64_t nc, Init&& init, Epi&& epi) {
  int64_t c = 0;
  for (; c + 4 <= nc; c += 4) dots_block<A, R, 4>(x, ldx, y, ldy, nv, r0, c, init, epi);
  for (; c < nc; ++c) dots_block<A, R, 1>(x, ldx, y, ldy, nv, r0, c, init, epi);
}

template <typename A, typename Init, typename Epi>
AA_INLINE void dots(const A* x, int64_t ldx, const A* y, int64_t ldy, int64_t nv, int64_t nr,
                    int64_t nc, Init&& init, Epi&& epi) {
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4) dots_cols<A, 4>(x, ldx, y, ldy, nv, r, nc, init, epi);
  for (; r < nr; ++r) dots_cols<A, 1>(x, ldx, y, ldy, nv, r, nc, init, epi);
}

// Dot products with scalar results: epi(r, c, sum over lanes and v of X[r][v] * Y[c][v]) for
// r < nr, c < nc. 4 x 4 blocks sum their 16 accumulators' lanes together (hsums).
template <typename A, int R, int C, typename Epi>
AA_INLINE void dot_sums_block(const A* x, int64_t ldx, const A* y, int64_t ldy, int64_t nv,
                              int64_t r0, int64_t c0, Epi&& epi) {
  constexpr int L = kLanes<A>;
  alignas(64) Vec<A> acc[R * C];
  dots_block<A, R, C>(x, ldx, y, ldy, nv, r0, c0,
                      [&](int64_t, int64_t) AA_INLINE_LAMBDA { return Vec<A>{}; },
                      [&](int64_t r, int64_t c, Vec<A> a) AA_INLINE_LAMBDA {
                        acc[(r - r0) * C + (c - c0)] = a;
                      });
  if constexpr ((R * C) % L == 0) {
    alignas(64) A sums[R * C];
#pragma GCC unroll 4
    for (int g = 0; g < R * C / L; ++g) st(sums + g * L, hsums(acc + g * L));
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) epi(r0 + r, c0 + c, sums[r * C + c]);
  } else {
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) epi(r0 + r, c0 + c, hsum<A>(acc[r * C + c]));
  }
}

template <typename A, typename Epi>
AA_INLINE void dot_sums(const A* x, int64_t ldx, const A* y, int64_t ldy, int64_t nv, int64_t nr,
                        int64_t nc, Epi&& epi) {
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4) {
    int64_t c = 0;
    for (; c + 4 <= nc; c += 4) dot_sums_block<A, 4, 4>(x, ldx, y, ldy, nv, r, c, epi);
    for (; c < nc; ++c) dot_sums_block<A, 4, 1>(x, ldx, y, ldy, nv, r, c, epi);
  }
  for (; r < nr; ++r)
    for (int64_t c = 0; c < nc; ++c) dot_sums_block<A, 1, 1>(x, ldx, y, ldy, nv, r, c, epi);
}

// ------------------------------------------------------------------------------ buffers

template <typename A>
struct Buf {
  std::unique_ptr<A[], void (*)(void*)> p{nullptr, std::free};
  explicit Buf(int64_t n) {
    const size_t bytes = ((size_t(std::max<int64_t>(n, 1)) * sizeof(A) + 63) / 64) * 64;
    p.reset(static_cast<A*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(p, "rel_attention: out of memory for a ", bytes, "-byte work buffer");
  }
  A* get() const { return p.get(); }
  void zero(int64_t n) const { std::memset(p.get(), 0, size_t(n) * sizeof(A)); }
};

// ------------------------------------------------------------------------- the problem

// A strided (N, Nh, L, d) tensor of any floating dtype: element (n, h, i, x) at
// n s0 + h s1 + i s2 + x s3. The kernels are built for the accumulation types only (float,
// double); these small loops convert fp16 / bf16 / fp32 / fp64 on the way in and out.
struct Src {
  const void* p = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  at::ScalarType dtype = at::kFloat;
  Src() = default;
  explicit Src(const at::Tensor& t)
      : p(t.const_data_ptr()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)),
        dtype(t.scalar_type()) {}
};

// An output in the channel-major layout (contiguous (N, Nh, d, L) memory).
struct Dst {
  void* p = nullptr;
  at::ScalarType dtype = at::kFloat;
  Dst() = default;
  explicit Dst(const at::Tensor& t) : p(t.mutable_data_ptr()), dtype(t.scalar_type()) {}
};

#define AA_IO_DISPATCH(dtype, ...)                                                   \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rel_attention", \
                                  __VA_ARGS__)

// Lanes: out[x ld + i] = scale t[n, h, i0 + i, x] for i < nq, 0 up to the next multiple of
// kBQ, x < D.
template <typename A>
__attribute__((noinline)) void pack_lanes(const Src& t, int64_t n, int64_t h, int64_t i0, int64_t nq, int64_t D, A scale,
                A* out, int64_t ld) {
  const int64_t padded = ((nq + kBQ - 1) / kBQ) * kBQ;
  AA_IO_DISPATCH(t.dtype, [&] {
    const scalar_t* base = static_cast<const scalar_t*>(t.p) + n * t.s0 + h * t.s1 + i0 * t.s2;
    for (int64_t x = 0; x < D; ++x) {
      A* o = out + x * ld;
      const scalar_t* src = base + x * t.s3;
      if (t.s2 == 1) {
        for (int64_t i = 0; i < nq; ++i) o[i] = scale * A(src[i]);
      } else {
        for (int64_t i = 0; i < nq; ++i) o[i] = scale * A(src[i * t.s2]);
      }
      for (int64_t i = nq; i < padded; ++i) o[i] = A(0);
    }
  });
}

// Rows: out[j D + x] = t[n, h, t0 + j, x] for j < nt, x < D.
template <typename A>
__attribute__((noinline)) void pack_rows(const Src& t, int64_t n, int64_t h, int64_t t0, int64_t nt, int64_t D, A* out) {
  AA_IO_DISPATCH(t.dtype, [&] {
    const scalar_t* base = static_cast<const scalar_t*>(t.p) + n * t.s0 + h * t.s1 + t0 * t.s2;
    for (int64_t x = 0; x < D; ++x) {
      const scalar_t* src = base + x * t.s3;
      for (int64_t j = 0; j < nt; ++j) out[j * D + x] = A(src[j * t.s2]);
    }
  });
}

// dst[off + i] = src[i] * (mul ? mul[i] : s), rounded to dst's dtype, i < n.
template <typename A>
__attribute__((noinline)) void write(const Dst& dst, int64_t off, const A* src, const A* mul, A s, int64_t n) {
  AA_IO_DISPATCH(dst.dtype, [&] {
    scalar_t* o = static_cast<scalar_t*>(dst.p) + off;
    if (mul) {
      for (int64_t i = 0; i < n; ++i) o[i] = scalar_t(src[i] * mul[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) o[i] = scalar_t(src[i] * s);
    }
  });
}

template <typename A>
struct Problem {
  Dims d;
  A scale;
  Src q, k, v, dout, out;
  const A* rw = nullptr;  // (2W - 1, dk), contiguous, accumulation dtype
  const A* rh = nullptr;  // (2H - 1, dk)
  const A* lse = nullptr;  // (N, Nh, L)
  Dst o;                   // out: (N, Nh, dv, L) memory
  A* lse_out = nullptr;
  Dst dq, dk, dv;          // (N, Nh, d, L) memory
  int64_t nqb = 0;         // query blocks per (n, head)
  const int32_t* xs = nullptr;  // pixel p = y W + x: xs[p] = x, ys[p] = y
  const int32_t* ys = nullptr;
};

// The tables of one row of lanes (queries i0 + i, i < kBQ, QT their scaled q): TW[jx][i] =
// q'_i . rel_w[jx - ix + W - 1] (W rows), TH[jy][i] = q'_i . rel_h[jy - iy + H - 1] (H rows),
// rows ld apart. rel: a work row block of (2 max(H, W) - 1) kBQ lanes.
template <typename A>
AA_INLINE void tables(const Dims& d, const A* rw, const A* rh, const A* QT, int64_t ldq,
                      int64_t i0, int64_t nq, A* TW, A* TH, int64_t ld, A* rel) {
  constexpr int Q = kQV<A>;
  for (int which = 0; which < 2; ++which) {
    const int64_t G = which == 0 ? d.W : d.H;  // grid extent along this axis
    const A* table = which == 0 ? rw : rh;
    A* out = which == 0 ? TW : TH;
    rows<A>(table, d.dk, 1, d.dk, QT, ldq, 2 * G - 1,
            [&](int64_t, int) AA_INLINE_LAMBDA { return Vec<A>{}; },
            [&](int64_t r, Vec<A>* acc) AA_INLINE_LAMBDA {
              for (int q = 0; q < Q; ++q) st(rel + r * kBQ + q * kLanes<A>, acc[q]);
            });
    for (int64_t i = 0; i < kBQ; ++i) {
      if (i >= nq) {
        for (int64_t g = 0; g < G; ++g) out[g * ld + i] = A(0);
        continue;
      }
      const int64_t p = i0 + i, c = which == 0 ? p % d.W : p / d.W;
      const A* src = rel + (G - 1 - c) * kBQ + i;
      for (int64_t g = 0; g < G; ++g) out[g * ld + i] = src[g * kBQ];
    }
  }
}

// ------------------------------------------------------------------------------ forward

template <typename A>
struct Scratch {
  int64_t pair = -1;  // the (n, head) whose K, V are packed
  Buf<A> K, V;        // (L, dk), (L, dv)
  Buf<A> QT, TW, TH, rel, S, OT;
  explicit Scratch(const Dims& d)
      : K(d.L * d.dk), V(d.L * d.dv), QT(d.dk * kBQ), TW(d.W * kBQ), TH(d.H * kBQ),
        rel((2 * std::max(d.H, d.W) - 1) * kBQ), S(kBK * kBQ), OT(d.dv * kBQ) {}
  AA_INLINE void pack_kv(const Problem<A>& P, int64_t n, int64_t h) {
    if (pair == n * P.d.Nh + h) return;
    pair = n * P.d.Nh + h;
    pack_rows(P.k, n, h, 0, P.d.L, P.d.dk, K.get());
    pack_rows(P.v, n, h, 0, P.d.L, P.d.dv, V.get());
  }
};

// The bias rows of keys t0 + t from the tables (or 0 without them).
template <typename A>
struct Bias {
  const A* TW;
  const A* TH;
  const int32_t* xs;  // the keys' grid columns and rows
  const int32_t* ys;
  int64_t stride, t0;
  bool rel;
  AA_INLINE Vec<A> operator()(int64_t t, int q) const {
    if (!rel) return Vec<A>{};
    const int64_t j = t0 + t;
    return ld(TW + xs[j] * stride + q * kLanes<A>) + ld(TH + ys[j] * stride + q * kLanes<A>);
  }
};

template <typename A>
AA_INLINE void forward_task(const Problem<A>& P, Scratch<A>& W_, int64_t task) {
  constexpr int Q = kQV<A>;
  const Dims& d = P.d;
  const int64_t pair = task / P.nqb, n = pair / d.Nh, h = pair % d.Nh;
  const int64_t i0 = (task % P.nqb) * kBQ, nq = std::min<int64_t>(kBQ, d.L - i0);
  W_.pack_kv(P, n, h);
  A* QT = W_.QT.get();
  pack_lanes(P.q, n, h, i0, nq, d.dk, P.scale, QT, kBQ);
  if (d.rel) tables(d, P.rw, P.rh, QT, kBQ, i0, nq, W_.TW.get(), W_.TH.get(), kBQ, W_.rel.get());
  Vec<A> m[Q], l[Q];
  for (int q = 0; q < Q; ++q) {
    m[q] = bc<A>(-std::numeric_limits<A>::infinity());
    l[q] = Vec<A>{};
  }
  A* OT = W_.OT.get();
  W_.OT.zero(d.dv * kBQ);
  A* S = W_.S.get();
  const A* K = W_.K.get();
  const A* V = W_.V.get();
  for (int64_t t0 = 0; t0 < d.L; t0 += kBK) {
    const int64_t nk = std::min<int64_t>(kBK, d.L - t0);
    const Bias<A> bias{W_.TW.get(), W_.TH.get(), P.xs, P.ys, kBQ, t0, d.rel};
    rows<A>(K + t0 * d.dk, d.dk, 1, d.dk, QT, kBQ, nk, bias,
            [&](int64_t t, Vec<A>* acc) AA_INLINE_LAMBDA {
              for (int q = 0; q < Q; ++q) st(S + t * kBQ + q * kLanes<A>, acc[q]);
            });
    Vec<A> mx[Q], alpha[Q], sum[Q];
    for (int q = 0; q < Q; ++q) mx[q] = m[q];
    for (int64_t t = 0; t < nk; ++t)
      for (int q = 0; q < Q; ++q) mx[q] = vmax<A>(mx[q], ld(S + t * kBQ + q * kLanes<A>));
    for (int q = 0; q < Q; ++q) {
      alpha[q] = vexp(m[q] - mx[q]);
      sum[q] = Vec<A>{};
    }
    for (int64_t t = 0; t < nk; ++t)
      for (int q = 0; q < Q; ++q) {
        const Vec<A> p = vexp(ld(S + t * kBQ + q * kLanes<A>) - mx[q]);
        st(S + t * kBQ + q * kLanes<A>, p);
        sum[q] += p;
      }
    for (int q = 0; q < Q; ++q) {
      l[q] = l[q] * alpha[q] + sum[q];
      m[q] = mx[q];
    }
    // O^T[c] = alpha O^T[c] + sum_t v[t][c] P[t]
    rows<A>(V + t0 * d.dv, 1, d.dv, nk, S, kBQ, d.dv,
            [&](int64_t c, int q) AA_INLINE_LAMBDA {
              return ld(OT + c * kBQ + q * kLanes<A>) * alpha[q];
            },
            [&](int64_t c, Vec<A>* acc) AA_INLINE_LAMBDA {
              for (int q = 0; q < Q; ++q) st(OT + c * kBQ + q * kLanes<A>, acc[q]);
            });
  }
  alignas(64) A inv[kBQ], lse[kBQ];
  for (int q = 0; q < Q; ++q) {
    st(inv + q * kLanes<A>, A(1) / l[q]);
    st(lse + q * kLanes<A>, m[q]);
  }
  const int64_t base = (n * d.Nh + h) * d.L;
  for (int64_t i = 0; i < nq; ++i) P.lse_out[base + i0 + i] = lse[i] + std::log(A(1) / inv[i]);
  for (int64_t c = 0; c < d.dv; ++c) write(P.o, base * d.dv + c * d.L + i0, OT + c * kBQ, inv, A(1), nq);
}

// What the backward accumulates besides its pair's results: the chunk's lane accumulators of
// the relative tables' gradients ((2W - 1) dk and (2H - 1) dk lane vectors).
template <typename A>
struct RelAcc {
  A* w;
  A* h;
};

// ------------------------------------------------------------------------------ backward

// A task is one (n, head): it owns that pair's dq, dk, dv, so nothing is shared between tasks
// but the relative tables' gradients (lane accumulators of the task's chunk, see run_backward).
template <typename A>
struct ScratchB {
  int64_t Lp;
  Buf<A> QT, dOT, O, dQT, TW, TH, GW, GH, lse, D, rel, RG, Kb, Vb, PT, GT, R;
  explicit ScratchB(const Dims& d)
      : Lp(((d.L + kBQ - 1) / kBQ) * kBQ), QT(d.dk * Lp), dOT(d.dv * Lp), O(d.dv * kBQ),
        dQT(d.dk * Lp), TW(d.W * Lp), TH(d.H * Lp), GW(d.W * Lp), GH(d.H * Lp), lse(Lp), D(Lp),
        rel((2 * std::max(d.H, d.W) - 1) * kBQ), RG((2 * std::max(d.H, d.W) - 1) * kBQ),
        Kb(kBKB * d.dk), Vb(kBKB * d.dv), PT(kBKB * Lp), GT(kBKB * Lp),
        R(std::max(d.dk, d.dv) * kBKB) {}

  // The pair's queries as lanes: q' (scaled), dout, the bias tables, lse, D = dout . out.
  AA_INLINE void pack_pair(const Problem<A>& P, int64_t n, int64_t h) {
    const Dims& d = P.d;
    const int64_t base = (n * d.Nh + h) * d.L;
    A* Ob = O.get();
    for (int64_t i0 = 0; i0 < Lp; i0 += kBQ) {
      const int64_t nq = std::min<int64_t>(kBQ, d.L - i0);
      pack_lanes(P.q, n, h, i0, nq, d.dk, P.scale, QT.get() + i0, Lp);
      pack_lanes(P.dout, n, h, i0, nq, d.dv, A(1), dOT.get() + i0, Lp);
      if (d.rel)
        tables(d, P.rw, P.rh, QT.get() + i0, Lp, i0, nq, TW.get() + i0, TH.get() + i0, Lp,
               rel.get());
      pack_lanes(P.out, n, h, i0, nq, d.dv, A(1), Ob, kBQ);
      for (int64_t i = 0; i < kBQ; ++i) {
        A Dv = 0;
        for (int64_t c = 0; c < d.dv; ++c) Dv += dOT.get()[c * Lp + i0 + i] * Ob[c * kBQ + i];
        D.get()[i0 + i] = i < nq ? Dv : A(0);
        lse.get()[i0 + i] = i < nq ? P.lse[base + i0 + i] : A(0);
      }
    }
    dQT.zero(d.dk * Lp);
    if (d.rel) {
      GW.zero(d.W * Lp);
      GH.zero(d.H * Lp);
    }
  }
};

template <typename A>
AA_INLINE void backward_pair(const Problem<A>& P, ScratchB<A>& W_, int64_t pair, RelAcc<A> racc) {
  constexpr int Q = kQV<A>;
  const Dims& d = P.d;
  const int64_t n = pair / d.Nh, h = pair % d.Nh, base = pair * d.L;
  W_.pack_pair(P, n, h);
  const int64_t Lp = W_.Lp, nv = Lp / kLanes<A>;
  A* Kb = W_.Kb.get();
  A* Vb = W_.Vb.get();
  A* PT = W_.PT.get();
  A* GT = W_.GT.get();
  A* R = W_.R.get();
  A* dQT = W_.dQT.get();
  A* GW = W_.GW.get();
  A* GH = W_.GH.get();
  const A* QT = W_.QT.get();
  const A* dOT = W_.dOT.get();
  // Blocks of kBKB keys against every query: P^T = exp(s - lse), g^T = P^T (dP^T - D); dq^T and
  // the per-query sums of g over key columns / rows accumulate across the blocks in key order.
  for (int64_t j0 = 0; j0 < d.L; j0 += kBKB) {
    const int64_t nk = std::min<int64_t>(kBKB, d.L - j0);
    pack_rows(P.k, n, h, j0, nk, d.dk, Kb);
    pack_rows(P.v, n, h, j0, nk, d.dv, Vb);
    for (int64_t i0 = 0; i0 < Lp; i0 += kBQ) {
      Vec<A> lse_v[Q], negD[Q];
      for (int q = 0; q < Q; ++q) {
        lse_v[q] = ld(W_.lse.get() + i0 + q * kLanes<A>);
        negD[q] = -ld(W_.D.get() + i0 + q * kLanes<A>);
      }
      const Bias<A> bias{W_.TW.get() + i0, W_.TH.get() + i0, P.xs, P.ys, Lp, j0, d.rel};
      rows<A>(Kb, d.dk, 1, d.dk, QT + i0, Lp, nk, bias,
              [&](int64_t t, Vec<A>* acc) AA_INLINE_LAMBDA {
                for (int q = 0; q < Q; ++q)
                  st(PT + t * Lp + i0 + q * kLanes<A>, vexp(acc[q] - lse_v[q]));
              });
      rows<A>(Vb, d.dv, 1, d.dv, dOT + i0, Lp, nk,
              [&](int64_t, int q) AA_INLINE_LAMBDA { return negD[q]; },
              [&](int64_t t, Vec<A>* acc) AA_INLINE_LAMBDA {
                const int64_t j = j0 + t;
                A* gw = GW + P.xs[j] * Lp + i0;
                A* gh = GH + P.ys[j] * Lp + i0;
                for (int q = 0; q < Q; ++q) {
                  const Vec<A> g = ld(PT + t * Lp + i0 + q * kLanes<A>) * acc[q];
                  st(GT + t * Lp + i0 + q * kLanes<A>, g);
                  if (d.rel) {
                    st(gw + q * kLanes<A>, ld(gw + q * kLanes<A>) + g);
                    st(gh + q * kLanes<A>, ld(gh + q * kLanes<A>) + g);
                  }
                }
              });
      // dQ^T[x] += sum_t k[t][x] g^T[t]
      rows<A>(Kb, 1, d.dk, nk, GT + i0, Lp, d.dk,
              [&](int64_t x, int q) AA_INLINE_LAMBDA { return ld(dQT + x * Lp + i0 + q * kLanes<A>); },
              [&](int64_t x, Vec<A>* acc) AA_INLINE_LAMBDA {
                for (int q = 0; q < Q; ++q) st(dQT + x * Lp + i0 + q * kLanes<A>, acc[q]);
              });
    }
    // dv_j = sum_i P_ij dout_i, dk_j = sum_i g_ij q'_i: lane-parallel dots over the queries
    dot_sums<A>(PT, Lp, dOT, Lp, nv, nk, d.dv,
                [&](int64_t t, int64_t c, A sum) AA_INLINE_LAMBDA { R[c * kBKB + t] = sum; });
    for (int64_t c = 0; c < d.dv; ++c)
      write(P.dv, base * d.dv + c * d.L + j0, R + c * kBKB, (const A*)nullptr, A(1), nk);
    dot_sums<A>(GT, Lp, QT, Lp, nv, nk, d.dk,
                [&](int64_t t, int64_t x, A sum) AA_INLINE_LAMBDA { R[x * kBKB + t] = sum; });
    for (int64_t x = 0; x < d.dk; ++x)
      write(P.dk, base * d.dk + x * d.L + j0, R + x * kBKB, (const A*)nullptr, A(1), nk);
  }
  // The relative parts, a row of query lanes at a time: the sums over key columns (rows) GW
  // (GH) unskewed to the relative index, RG[m][i] = G[g][i] at m = g - c_i + G - 1; then
  // dq^T += table^T RG and the chunk's lanes of dtable[m][x] += RG[m] . q'[x].
  for (int64_t i0 = 0; i0 < Lp && d.rel; i0 += kBQ) {
    const int64_t nq = std::min<int64_t>(kBQ, d.L - i0);
    A* RG = W_.RG.get();
    for (int which = 0; which < 2; ++which) {
      const int64_t Gn = which == 0 ? d.W : d.H, M = 2 * Gn - 1;
      const A* table = which == 0 ? P.rw : P.rh;
      const A* Gs = (which == 0 ? GW : GH) + i0;
      A* lanes = which == 0 ? racc.w : racc.h;
      std::memset(RG, 0, size_t(M * kBQ) * sizeof(A));
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t p = i0 + i, c = which == 0 ? p % d.W : p / d.W;
        A* dst = RG + (Gn - 1 - c) * kBQ + i;
        for (int64_t g = 0; g < Gn; ++g) dst[g * kBQ] = Gs[g * Lp + i];
      }
      rows<A>(table, 1, d.dk, M, RG, kBQ, d.dk,
              [&](int64_t x, int q) AA_INLINE_LAMBDA { return ld(dQT + x * Lp + i0 + q * kLanes<A>); },
              [&](int64_t x, Vec<A>* acc) AA_INLINE_LAMBDA {
                for (int q = 0; q < Q; ++q) st(dQT + x * Lp + i0 + q * kLanes<A>, acc[q]);
              });
      dots<A>(RG, kBQ, QT + i0, Lp, Q, M, d.dk,
              [&](int64_t m, int64_t x) AA_INLINE_LAMBDA {
                return ld(lanes + (m * d.dk + x) * kLanes<A>);
              },
              [&](int64_t m, int64_t x, Vec<A> acc) AA_INLINE_LAMBDA {
                st(lanes + (m * d.dk + x) * kLanes<A>, acc);
              });
    }
  }
  for (int64_t x = 0; x < d.dk; ++x)
    write(P.dq, base * d.dk + x * d.L, dQT + x * Lp, (const A*)nullptr, P.scale, d.L);
}

// ------------------------------------------------------------- multi-versioned entry points

#define AA_RUN(A)                                                                             \
  AA_CLONES void run_forward(const Problem<A>& P, int64_t t0, int64_t t1) {                   \
    Scratch<A> W_(P.d);                                                                       \
    for (int64_t t = t0; t < t1; ++t) forward_task(P, W_, t);                                 \
  }                                                                                           \
  AA_CLONES void run_backward(const Problem<A>& P, int64_t c0, int64_t c1, int64_t per,       \
                              int64_t pairs, A* partial) {                                    \
    ScratchB<A> W_(P.d);                                                                      \
    const Dims& d = P.d;                                                                      \
    const int64_t nw = (2 * d.W - 1) * d.dk, nh = (2 * d.H - 1) * d.dk;                       \
    Buf<A> lanes(d.rel ? (nw + nh) * kLanes<A> : 0);                                          \
    for (int64_t c = c0; c < c1; ++c) {                                                       \
      if (d.rel) lanes.zero((nw + nh) * kLanes<A>);                                           \
      const RelAcc<A> racc{lanes.get(), lanes.get() + nw * kLanes<A>};                        \
      for (int64_t t = c * per; t < std::min(pairs, (c + 1) * per); ++t)                      \
        backward_pair(P, W_, t, racc);                                                        \
      if (d.rel)                                                                              \
        for (int64_t e = 0; e < nw + nh; ++e)                                                 \
          partial[c * (nw + nh) + e] = hsum<A>(ld(lanes.get() + e * kLanes<A>));              \
    }                                                                                         \
  }
AA_RUN(float)
AA_RUN(double)
#undef AA_RUN

// ------------------------------------------------------------------------------- host ops

using OptT = std::optional<at::Tensor>;

// Runs f with A = the accumulation type of x's dtype (double for fp64, else float).
template <typename F>
void with_acc(const at::Tensor& x, F&& f) {
  if (x.scalar_type() == at::kDouble) {
    f(double(0));
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                    x.scalar_type() == at::kBFloat16,
                "rel_attention: expected fp16, bf16, fp32 or fp64 tensors, got ", x.scalar_type());
    f(float(0));
  }
}

// The grid coordinates of the pixels: xs[p] = p mod W, ys[p] = p div W.
struct Coords {
  std::vector<int32_t> xs, ys;
  explicit Coords(const Dims& d) : xs(size_t(d.L)), ys(size_t(d.L)) {
    for (int64_t p = 0; p < d.L; ++p) {
      xs[p] = int32_t(p % d.W);
      ys[p] = int32_t(p / d.W);
    }
  }
};

template <typename A>
Problem<A> problem(const Dims& d, const Coords& xy, double scale, const at::Tensor& q,
                   const at::Tensor& k, const at::Tensor& v, const at::Tensor& rw,
                   const at::Tensor& rh) {
  Problem<A> P;
  P.xs = xy.xs.data();
  P.ys = xy.ys.data();
  P.d = d;
  P.scale = A(scale);
  P.q = Src(q);
  P.k = Src(k);
  P.v = Src(v);
  if (d.rel) {
    P.rw = rw.const_data_ptr<A>();
    P.rh = rh.const_data_ptr<A>();
  }
  P.nqb = (d.L + kBQ - 1) / kBQ;
  return P;
}

// The tables in the accumulation dtype, contiguous (or undefined without them).
std::pair<at::Tensor, at::Tensor> acc_tables(const Dims& d, const at::Tensor& q, const OptT& rel_h,
                                             const OptT& rel_w) {
  if (!d.rel) return {at::Tensor(), at::Tensor()};
  const auto dt = acc_dtype(q);
  return {rel_w->to(dt).contiguous(), rel_h->to(dt).contiguous()};
}

std::tuple<at::Tensor, at::Tensor> rel_attention(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, const OptT& rel_h,
                                                 const OptT& rel_w, int64_t H, int64_t W,
                                                 double scale) {
  const Dims d = check_forward(q, k, v, rel_h, rel_w, H, W, "rel_attention");
  at::Tensor out = empty_channel_major(q, d.N, d.Nh, d.L, d.dv);
  at::Tensor lse = at::empty({d.N, d.Nh, d.L}, q.options().dtype(acc_dtype(q)));
  if (d.N * d.Nh == 0) return {out, lse};
  auto [rw, rh] = acc_tables(d, q, rel_h, rel_w);
  const Coords xy(d);
  with_acc(q, [&](auto zero) {
    using A = decltype(zero);
    Problem<A> P = problem<A>(d, xy, scale, q, k, v, rw, rh);
    P.o = Dst(out);
    P.lse_out = lse.mutable_data_ptr<A>();
    at::parallel_for(0, d.N * d.Nh * P.nqb, 1,
                     [&](int64_t b, int64_t e) { run_forward(P, b, e); });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, OptT, OptT> rel_attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const OptT& rel_h, const OptT& rel_w, const at::Tensor& out, const at::Tensor& lse, int64_t H,
    int64_t W, double scale) {
  const Dims d = check_forward(q, k, v, rel_h, rel_w, H, W, "rel_attention_backward");
  check_backward(d, q, dout, out, lse, "rel_attention_backward");
  at::Tensor dq = empty_channel_major(q, d.N, d.Nh, d.L, d.dk);
  at::Tensor dk = empty_channel_major(q, d.N, d.Nh, d.L, d.dk);
  at::Tensor dv = empty_channel_major(q, d.N, d.Nh, d.L, d.dv);
  OptT drel_h, drel_w;
  const auto acc = acc_dtype(q);
  if (d.rel) {
    drel_h = at::zeros({2 * H - 1, d.dk}, rel_h->options().memory_format(at::MemoryFormat::Contiguous));
    drel_w = at::zeros({2 * W - 1, d.dk}, rel_w->options().memory_format(at::MemoryFormat::Contiguous));
  }
  if (d.N * d.Nh == 0) return {dq, dk, dv, drel_h, drel_w};
  auto [rw, rh] = acc_tables(d, q, rel_h, rel_w);
  const Coords xy(d);
  const at::Tensor lse_c = lse.contiguous();
  // chunks of consecutive (n, head) pairs, a fixed function of the shape
  const int64_t pairs = d.N * d.Nh;
  const int64_t per = (pairs + kMaxChunks - 1) / kMaxChunks;
  const int64_t chunks = (pairs + per - 1) / per;
  const int64_t nrel = d.rel ? (2 * W - 1 + 2 * H - 1) * d.dk : 0;
  at::Tensor partial = at::empty({std::max<int64_t>(chunks * nrel, 1)}, q.options().dtype(acc));
  with_acc(q, [&](auto zero) {
    using A = decltype(zero);
    Problem<A> P = problem<A>(d, xy, scale, q, k, v, rw, rh);
    P.dout = Src(dout);
    P.out = Src(out);
    P.lse = lse_c.const_data_ptr<A>();
    P.dq = Dst(dq);
    P.dk = Dst(dk);
    P.dv = Dst(dv);
    A* part = partial.mutable_data_ptr<A>();
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      run_backward(P, b, e, per, pairs, part);
    });
    if (d.rel) {
      // the chunks' partials in chunk order
      std::vector<A> sum(size_t(nrel), A(0));
      for (int64_t c = 0; c < chunks; ++c)
        for (int64_t e = 0; e < nrel; ++e) sum[e] += part[c * nrel + e];
      const int64_t nw = (2 * W - 1) * d.dk;
      at::Tensor sw = at::from_blob(sum.data(), {2 * W - 1, d.dk}, at::TensorOptions().dtype(acc));
      at::Tensor sh = at::from_blob(sum.data() + nw, {2 * H - 1, d.dk}, at::TensorOptions().dtype(acc));
      drel_w->copy_(sw);
      drel_h->copy_(sh);
    }
  });
  return {dq, dk, dv, drel_h, drel_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedattn, CPU, m) {
  m.impl("rel_attention", &rel_attention);
  m.impl("rel_attention_backward", &rel_attention_backward);
}

}  // namespace fusedattn
