// The generic attention passes over full-size tensors, on CUDA tensors: pool_pixels, pool_channels,
// gate, gate_grad_s, grad_a, grad_x (fusedattn/spec/passes.md states the math; the schemas are in
// csrc/ops.cpp, the shape and argument checks in csrc/pass_check.h, shared with the CPU kernels of
// csrc/cpu/passes.cpp, which give the same outputs). Element (n, c, p) lies at n sN + c sC + p sP:
// "planar" is the contiguous layout (sC = P, sP = 1), "cl" dense channels-last (sC = 1, sP = C);
// 1x1 maps (both at once) take the cl kernels. Work shapes (BX = 8..32 lanes along channel packs,
// BY = 256 / BX rows; packs are 16 bytes when aligned):
//
//  pixel reductions, per (n, c): pool_pixels (mean; max, argmax with_max), grad_a (da)
//   * planar: a warp per (plane, pixel split), lanes along pixels; shuffles combine the lanes.
//   * cl: a block of BX x BY rows of pixels per (sample, channel tile, pixel split); the rows
//     combine through shared memory in row order.
//  channel reductions, per (n, g, p): pool_channels (avg, max, argmax), gate_grad_s (ds)
//   * planar: a block of 32 pixel lanes x 8 channel rows per (sample, 32 pixels, channel split),
//     the channels' (a, group) staged in shared memory 256 at a time; the rows combine through
//     shared memory in row order.
//   * cl: a block of BX x BY, one pixel per row; shuffles combine the row's lanes.
//  elementwise, gate (y) and grad_x (dx): the pixel reductions' work items, without the combine.
//
// Variants (compile-time, so that a pass reads only what it is given and HAM's kernels keep their
// code): NG = G, the channel groups, 1 without `group` (every channel in group 0, maps (N, 1, P),
// no group flags read) or 2 with it; NG = 0 for gate without s and grad_a / grad_x without the
// maps (s, d_avg, d_max, argmax; the groups then play no part); MAX: pool_pixels with_max; PMAX:
// grad_x with d_max_c / argmax_c. Instantiated are the combinations the modules use: HAM (NG = 2,
// maxima), CBAM (NG = 1, maxima) and SE / ECA (NG = 0, with or without the pixel max); grad_x with
// the maps but without the pixel max (no module) runs the PMAX variant with argmax_c = -1, which
// no pixel matches.
//
// Where the other dimensions give too few work items, the reduced extent is split over blocks,
// whose partials merge_splits combines in split order. Sums have a fixed order; an argmax is the
// first index attaining the max (NaN largest, as torch.max; every combine of interleaved index
// sets takes the lower index on equal values); no atomics: results are bitwise reproducible (the
// split counts do not depend on the device). No floating-point division in the kernels (the
// reciprocals come from the host). 64-bit element offsets; 32-bit grid and index math where it
// fits (pixel and channel indices < 2^31). Loops over samples and batches are not unrolled: the
// U loads of a batch give the memory parallelism. Launched on the current stream, under a
// CUDAGuard of the input's device; empty inputs launch no pass kernel (the small outputs are
// zero-filled, as on CPU).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "layout.h"
#include "pass_check.h"

namespace fusedattn {
namespace {

using namespace passes;

template <typename T>
using acc_t = at::opmath_type<T>;

constexpr int kThreads = 256;           // threads per block
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 8;                // channel rows of the planar channel-reduction block
constexpr int32_t kNone = INT32_MAX;    // argmax while only -inf was seen
constexpr int64_t kTargetWarps = 8192;  // work items that fill an A100 / H100 (fixed, so that
constexpr int64_t kTargetBlocks = 1024; // the splits and the sums' order do not vary by device)

__device__ __forceinline__ int64_t lo(int64_t a, int64_t b) { return a < b ? a : b; }

// --------------------------------------------------------------------------------- building blocks

// K consecutive values moved as one load or store (16 bytes for x; K sizeof(U) for small maps).
template <typename U, int K>
struct alignas(sizeof(U) * K) Pack {
  U v[K];
};

template <int K, typename U>
__device__ __forceinline__ Pack<U, K> load(const U* p) {
  return *reinterpret_cast<const Pack<U, K>*>(p);
}

template <int K, typename U>
__device__ __forceinline__ void store(U* p, const Pack<U, K>& v) {
  *reinterpret_cast<Pack<U, K>*>(p) = v;
}

// for (i = first; i < end; i += step) in batches of U: the batch's loads, then its uses, in
// rising i. The callbacks index their register arrays with the batch slot u (unrolled). 32-bit
// indices: end < 2^31 (a pixel or channel count) and step U < 2^12, so i never wraps.
template <int U, typename Load, typename Use>
__device__ __forceinline__ void batched(uint32_t first, uint32_t end, uint32_t step, Load&& ld,
                                        Use&& use) {
#pragma unroll 1
  for (uint32_t i = first; i < end; i += step * U) {
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (i + u * step < end) ld(u, i + u * step);
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (i + u * step < end) use(u, i + u * step);
  }
}

// Running max over rising indices: v wins if larger, or NaN over a number (NaN is the largest, as
// in torch.max); an equal value keeps the earlier index.
template <typename A>
__device__ __forceinline__ void take_max(A v, int32_t i, A& best, int32_t& arg) {
  if (v > best || (isnan(v) && !isnan(best))) {
    best = v;
    arg = i;
  }
}

// Max of two partials over interleaved index sets: on equal values (or two NaNs) the lower index.
template <typename A>
__device__ __forceinline__ void merge_max(A v, int32_t i, A& best, int32_t& arg) {
  const bool vn = isnan(v), bn = isnan(best);
  const bool win = (vn || bn) ? (vn && (!bn || i < arg)) : (v > best || (v == best && i < arg));
  if (win) {
    best = v;
    arg = i;
  }
}

// Sum / max over aligned groups of `width` lanes (a power of two <= 32); xor butterflies, so every
// lane of a group ends with the same bits. All 32 lanes must take part.
template <typename A>
__device__ __forceinline__ A lanes_sum(A v, int width) {
  for (int o = width >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename A>
__device__ __forceinline__ void lanes_max(A& best, int32_t& arg, int width) {
  for (int o = width >> 1; o > 0; o >>= 1) {
    const A v = __shfl_xor_sync(0xffffffffu, best, o);
    const int32_t i = __shfl_xor_sync(0xffffffffu, arg, o);
    merge_max(v, i, best, arg);
  }
}

// Where a reduction's results go: the final outputs (parts == 0), or the partials of split k at
// k * parts + j. Final: sum * scale_g; max and argmax (none: 0) unless group g is empty (0, 0).
template <typename A>
struct Sink {
  A* sum;
  A* max;  // null: the op has no max
  int32_t* arg;
  int64_t parts;
  A scale0, scale1;
  bool zero0, zero1;

  __device__ __forceinline__ void put(int64_t j, int split, int g, A s, A m, int32_t i) const {
    if (parts) {
      const int64_t o = split * parts + j;
      sum[o] = s;
      if (max) {
        max[o] = m;
        arg[o] = i;
      }
      return;
    }
    sum[j] = s * (g ? scale1 : scale0);
    if (max) {
      const bool z = g ? zero1 : zero0;
      max[j] = z ? A(0) : m;
      arg[j] = (z || i == kNone) ? 0 : i;
    }
  }
};

// Splits k = 0..S-1 of output j (rows x L outputs, group g = row & gmask), combined in split
// order: the splits cover rising index ranges, so a strict max keeps the first index.
template <typename A>
__global__ void __launch_bounds__(kThreads) merge_splits(
    const A* __restrict__ psum, const A* __restrict__ pmax, const int32_t* __restrict__ parg, int S,
    int64_t rows, int64_t L, int gmask, Sink<A> out) {
  const int64_t M = rows * L;
#pragma unroll 1
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y)
#pragma unroll 1
    for (int64_t col = int64_t(blockIdx.x) * kThreads + threadIdx.x; col < L;
         col += int64_t(gridDim.x) * kThreads) {
      const int64_t j = r * L + col;
      A s = 0, m = A(-INFINITY);
      int32_t i = kNone;
      for (int k = 0; k < S; ++k) {
        s += psum[k * M + j];
        if (pmax) take_max(pmax[k * M + j], parg[k * M + j], m, i);
      }
      out.put(j, 0, int(r & gmask), s, m, i);
    }
}

// The channel pooling's gradient maps (n, g, p) and the gate s, (N, G, P) each. For channel c of
// group g: d_avg / max(size_g, 1) + [argmax == c] d_max.
template <typename A>
struct PoolMaps {
  const A* s;
  const A* avg;
  const A* max;
  const int32_t* arg;
  A inv0, inv1;
};

// Planar: the maps of a plane's group at VEC consecutive pixels.
template <typename A, int VEC>
struct MapPacks {
  Pack<A, VEC> s, avg, max;
  Pack<int32_t, VEC> arg;

  // Pixels [p, p + VEC) of row `row` ((n, g) of the (N, G, P) maps: (n G + g) P).
  __device__ __forceinline__ void read(const PoolMaps<A>& m, int64_t row, uint32_t p) {
    s = load<VEC>(m.s + row + p);
    avg = load<VEC>(m.avg + row + p);
    max = load<VEC>(m.max + row + p);
    arg = load<VEC>(m.arg + row + p);
  }
  // Pixel k's pooling gradient for channel c: d_avg inv + [argmax == c] d_max.
  __device__ __forceinline__ A pool(int k, A inv, int32_t c) const {
    return avg.v[k] * inv + (arg.v[k] == c ? max.v[k] : A(0));
  }
};

// Channels-last: the maps of all NG groups at one pixel (with NG = 2 a pixel's channels fall in
// either group; with NG = 1 every channel is in group 0 and the g arguments are false).
template <typename A, int NG>
struct GroupMaps {
  static_assert(NG == 1 || NG == 2, "GroupMaps: one or two groups");
  A s0, s1, w0, w1, m0, m1;  // s, d_avg (d_avg / max(size, 1) once scaled()), d_max
  int32_t i0, i1;            // argmax

  // Pixel p of rows r0 = (n, 0) and r1 = (n, 1) (NG = 2; NG = 1 reads row r0 only).
  __device__ __forceinline__ void read(const PoolMaps<A>& m, int64_t r0, int64_t r1, uint32_t p) {
    if constexpr (NG == 2) {
      s0 = m.s[r0 + p];
      s1 = m.s[r1 + p];
      w0 = m.avg[r0 + p];
      w1 = m.avg[r1 + p];
      m0 = m.max[r0 + p];
      m1 = m.max[r1 + p];
      i0 = m.arg[r0 + p];
      i1 = m.arg[r1 + p];
    } else {
      s0 = m.s[r0 + p];
      w0 = m.avg[r0 + p];
      m0 = m.max[r0 + p];
      i0 = m.arg[r0 + p];
    }
  }
  // A copy with d_avg / max(size, 1): once per pixel, before the channels' pool().
  __device__ __forceinline__ GroupMaps scaled(A inv0, A inv1) const {
    GroupMaps r = *this;
    r.w0 = w0 * inv0;
    if constexpr (NG == 2) r.w1 = w1 * inv1;
    return r;
  }
  __device__ __forceinline__ A gate(bool g) const {
    if constexpr (NG == 1) return s0;
    else return g ? s1 : s0;
  }
  // The pooling gradient of channel c of group g (of a scaled() copy).
  __device__ __forceinline__ A pool(bool g, int64_t c) const {
    if constexpr (NG == 1) return w0 + (i0 == c ? m0 : A(0));
    else return (g ? w1 : w0) + ((g ? i1 : i0) == c ? (g ? m1 : m0) : A(0));
  }
};

// The group flags of VEC channels (all false, group 0, without flags: NG < 2).
template <int NG, int VEC>
__device__ __forceinline__ Pack<bool, VEC> group_pack(const bool* group, int64_t q) {
  if constexpr (NG == 2) {
    return load<VEC>(group + q);
  } else {
    Pack<bool, VEC> r;
#pragma unroll
    for (int k = 0; k < VEC; ++k) r.v[k] = false;
    return r;
  }
}

// ------------------------------------------------------------- planar: a warp per (plane, split)

// Warp w of the grid: channel w / S, pixels [p0, p1) of split w % S; lane: the thread's lane,
// whose packs of VEC pixels lie 32 VEC apart. 32-bit: the host checks C S < 2^31, and pixel
// indices are < P < 2^31.
struct PlaneTask {
  uint32_t c, s, p0, p1;
  int lane;

  // The task's pixels, batched<U>: this lane's packs of VEC.
  template <int U, int VEC, typename Load, typename Use>
  __device__ __forceinline__ void pixels(Load&& ld, Use&& use) const {
    batched<U>(p0 + lane * VEC, p1, 32 * VEC, ld, use);
  }
};

__device__ __forceinline__ bool plane_task(int C, int S, int64_t P, int64_t chunk, PlaneTask& t) {
  const uint32_t w = blockIdx.x * uint32_t(kWarps) + (threadIdx.x >> 5);
  if (w >= uint32_t(C) * uint32_t(S)) return false;  // whole warps
  t.c = w / uint32_t(S);
  t.s = w - t.c * uint32_t(S);
  t.p0 = uint32_t(t.s * chunk);
  t.p1 = uint32_t(lo(P, t.p0 + chunk));
  t.lane = threadIdx.x & 31;
  return true;
}

// mean[n, c] = sum_p x / P; MAX: max[n, c] = max_p x and its first index.
template <typename T, int VEC, bool MAX>
__global__ void __launch_bounds__(kThreads) pool_pixels_planar(
    const T* __restrict__ x, Sink<acc_t<T>> out, int64_t N, int C, int64_t P, int S, int64_t chunk) {
  using A = acc_t<T>;
  constexpr int U = VEC > 1 ? 2 : 8;
  PlaneTask t;
  if (!plane_task(C, S, P, chunk, t)) return;
#pragma unroll 1
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const int64_t q = n * C + t.c;
    const T* xp = x + q * P;
    A sum = 0, best = A(-INFINITY);
    int32_t arg = kNone;
    Pack<T, VEC> v[U];
    t.pixels<U, VEC>(
        [&](int u, uint32_t p) { v[u] = load<VEC>(xp + p); },
        [&](int u, uint32_t p) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const A f = A(v[u].v[k]);
            sum += f;
            if (MAX) take_max(f, int32_t(p + k), best, arg);
          }
        });
    sum = lanes_sum(sum, 32);
    if (MAX) lanes_max(best, arg, 32);
    if (t.lane == 0) out.put(q, t.s, 0, sum, best, arg);
  }
}

// NG = 1, 2: da[n, c] = sum_p x (dy s_g + d_avg_g / size_g + [argmax_g == c] d_max_g), g = group
// of c (NG = 1: g = 0, no group flags); NG = 0 (no maps): da[n, c] = sum_p x dy.
template <typename T, int VEC, int NG>
__global__ void __launch_bounds__(kThreads) grad_a_planar(
    const T* __restrict__ x, const T* __restrict__ dy, PoolMaps<acc_t<T>> m,
    const bool* __restrict__ group, Sink<acc_t<T>> out, int64_t N, int C, int64_t P, int S,
    int64_t chunk) {
  using A = acc_t<T>;
  constexpr bool MAPS = NG > 0;
  constexpr int U = MAPS ? (VEC > 1 ? 1 : 4) : (VEC > 1 ? 2 : 4);
  PlaneTask t;
  if (!plane_task(C, S, P, chunk, t)) return;
#pragma unroll 1
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const int64_t q = n * C + t.c;
    const int g = NG == 2 && group[q] ? 1 : 0;
    const A inv = g ? m.inv1 : m.inv0;
    const int64_t row = (n * NG + g) * P;
    const T* xp = x + q * P;
    const T* dp = dy + q * P;
    A acc = 0;
    Pack<T, VEC> xv[U], dv[U];
    MapPacks<A, VEC> mp[U];
    t.pixels<U, VEC>(
        [&](int u, uint32_t p) {
          xv[u] = load<VEC>(xp + p);
          dv[u] = load<VEC>(dp + p);
          if (MAPS) mp[u].read(m, row, p);
        },
        [&](int u, uint32_t) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            if (MAPS) {
              const A pool = mp[u].pool(k, inv, int32_t(t.c));
              acc += A(xv[u].v[k]) * (A(dv[u].v[k]) * mp[u].s.v[k] + pool);
            } else {
              acc += A(xv[u].v[k]) * A(dv[u].v[k]);
            }
          }
        });
    acc = lanes_sum(acc, 32);
    if (t.lane == 0) out.put(q, t.s, 0, acc, A(0), 0);
  }
}

// NG = 1, 2: y = s[n, g(c), p] a_c x (NG = 1: g = 0, no group flags); NG = 0 (no s): y = a_c x.
template <typename T, int VEC, int NG>
__global__ void __launch_bounds__(kThreads) gate_planar(
    const T* __restrict__ x, const acc_t<T>* __restrict__ a, const acc_t<T>* __restrict__ s,
    const bool* __restrict__ group, T* __restrict__ y, int64_t N, int C, int64_t P, int S,
    int64_t chunk) {
  using A = acc_t<T>;
  constexpr bool HAS_S = NG > 0;
  constexpr int U = HAS_S ? (VEC > 1 ? 2 : 4) : (VEC > 1 ? 2 : 8);
  PlaneTask t;
  if (!plane_task(C, S, P, chunk, t)) return;
#pragma unroll 1
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const int64_t q = n * C + t.c;
    const A ac = a[q];
    const A* sr = HAS_S ? s + (n * NG + (NG == 2 && group[q] ? 1 : 0)) * P : nullptr;
    const T* xp = x + q * P;
    T* yp = y + q * P;
    Pack<T, VEC> xv[U];
    Pack<A, VEC> sv[U];
    t.pixels<U, VEC>(
        [&](int u, uint32_t p) {
          xv[u] = load<VEC>(xp + p);
          if (HAS_S) sv[u] = load<VEC>(sr + p);
        },
        [&](int u, uint32_t p) {
          Pack<T, VEC> o;
#pragma unroll
          for (int k = 0; k < VEC; ++k)
            o.v[k] = HAS_S ? T(sv[u].v[k] * ac * A(xv[u].v[k])) : T(ac * A(xv[u].v[k]));
          store<VEC>(yp + p, o);
        });
  }
}

// NG = 1, 2: dx = dy s a + a (d_avg / size + [argmax_g == c] d_max) + d_mean_c / P, g = group of
// c (NG = 1: g = 0, no group flags); NG = 0 (no maps): dx = dy a + d_mean_c / P.
// PMAX: + [p == argmax_c] d_max_c.
template <typename T, int VEC, int NG, bool PMAX>
__global__ void __launch_bounds__(kThreads) grad_x_planar(
    const T* __restrict__ dy, const acc_t<T>* __restrict__ a, PoolMaps<acc_t<T>> m,
    const bool* __restrict__ group, const acc_t<T>* __restrict__ d_mean_c,
    const acc_t<T>* __restrict__ d_max_c, const int32_t* __restrict__ argmax_c, acc_t<T> invP,
    T* __restrict__ dx, int64_t N, int C, int64_t P, int S, int64_t chunk) {
  using A = acc_t<T>;
  constexpr bool MAPS = NG > 0;
  constexpr int U = MAPS ? (VEC > 1 ? 1 : 4) : (VEC > 1 ? 2 : 8);
  PlaneTask t;
  if (!plane_task(C, S, P, chunk, t)) return;
#pragma unroll 1
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const int64_t q = n * C + t.c;
    const int g = NG == 2 && group[q] ? 1 : 0;
    const A ac = a[q], inv = g ? m.inv1 : m.inv0, dmean = d_mean_c[q] * invP;
    const A dmax = PMAX ? d_max_c[q] : A(0);
    const int32_t amax = PMAX ? argmax_c[q] : -1;
    const int64_t row = (n * NG + g) * P;
    const T* dp = dy + q * P;
    T* op = dx + q * P;
    Pack<T, VEC> dv[U];
    MapPacks<A, VEC> mp[U];
    t.pixels<U, VEC>(
        [&](int u, uint32_t p) {
          dv[u] = load<VEC>(dp + p);
          if (MAPS) mp[u].read(m, row, p);
        },
        [&](int u, uint32_t p) {
          Pack<T, VEC> o;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            A v;
            if (MAPS) {
              const A pool = mp[u].pool(k, inv, int32_t(t.c));
              v = A(dv[u].v[k]) * mp[u].s.v[k] * ac + ac * pool + dmean;
            } else {
              v = A(dv[u].v[k]) * ac + dmean;
            }
            if (PMAX && int64_t(p) + k == amax) v += dmax;
            o.v[k] = T(v);
          }
          store<VEC>(op + p, o);
        });
  }
}

// ----------------------------------------- channels-last: channel packs x pixel rows per block

// Block b of grid.x: channel tile b / S (blockDim.x lanes of VEC channels), pixels [p0, p1) of
// split b % S; threadIdx.y is the pixel row.
struct ClTask {
  int64_t tile_c, c;  // first channel of the tile, of this thread
  uint32_t s, p0, p1;

  // The task's pixels, batched<U>: those of this thread's row, blockDim.y apart.
  template <int U, typename Load, typename Use>
  __device__ __forceinline__ void pixels(Load&& ld, Use&& use) const {
    batched<U>(p0 + threadIdx.y, p1, blockDim.y, ld, use);
  }
};

template <int VEC>
__device__ __forceinline__ ClTask cl_task(int S, int64_t P, int64_t chunk) {
  const uint32_t tile = blockIdx.x / uint32_t(S);
  ClTask t;
  t.s = blockIdx.x - tile * uint32_t(S);
  t.tile_c = int64_t(tile) * blockDim.x * VEC;
  t.c = t.tile_c + threadIdx.x * VEC;
  t.p0 = uint32_t(t.s * chunk);
  t.p1 = uint32_t(lo(P, t.p0 + chunk));
  return t;
}

// Column col of the tile (W channels wide) summed / maxed over the block's rows, in row order.
template <typename A, bool MAX>
__device__ __forceinline__ void merge_rows(const A* sh_sum, const A* sh_max, const int32_t* sh_arg,
                                           int W, int col, A& s, A& m, int32_t& i) {
  s = 0;
  m = A(-INFINITY);
  i = kNone;
  for (int r = 0; r < int(blockDim.y); ++r) {
    s += sh_sum[r * W + col];
    if (MAX) merge_max(sh_max[r * W + col], sh_arg[r * W + col], m, i);
  }
}

// The end of a channels-last pixel reduction's sample: thread (x, y) puts its VEC channels'
// partials (sum[k]; best[k], arg[k] when MAX) in row y of the shared rows (W = blockDim.x VEC
// channels each), and thread col < W merges the tile's channel col over the rows into out.
template <typename A, int VEC, bool MAX>
struct ClMerge {
  A* sh_sum;
  A* sh_max;
  int32_t* sh_arg;
  int W, slot, col;

  __device__ __forceinline__ ClMerge(A* sum, A* max, int32_t* arg)
      : sh_sum(sum), sh_max(max), sh_arg(arg), W(blockDim.x * VEC),
        slot(threadIdx.y * W + threadIdx.x * VEC), col(threadIdx.y * blockDim.x + threadIdx.x) {}

  __device__ __forceinline__ void put(const ClTask& t, int64_t n, int C, const A* sum,
                                      const A* best, const int32_t* arg, const Sink<A>& out) const {
    __syncthreads();  // the previous sample's merge has read the shared rows
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      sh_sum[slot + k] = sum[k];
      if (MAX) {
        sh_max[slot + k] = best[k];
        sh_arg[slot + k] = arg[k];
      }
    }
    __syncthreads();
    if (col < W && t.tile_c + col < C) {
      A s, m;
      int32_t i;
      merge_rows<A, MAX>(sh_sum, sh_max, sh_arg, W, col, s, m, i);
      out.put(n * C + t.tile_c + col, t.s, 0, s, m, i);
    }
  }
};

template <typename T, int VEC, bool MAX>
__global__ void __launch_bounds__(kThreads) pool_pixels_cl(
    const T* __restrict__ x, Sink<acc_t<T>> out, int64_t N, int C, int64_t P, int S, int64_t chunk) {
  using A = acc_t<T>;
  constexpr int U = VEC > 1 ? 2 : (MAX || sizeof(T) < 8 ? 8 : 4);  // (fp64, no max, 8: a spill)
  __shared__ A sh_sum[kThreads * VEC], sh_max[MAX ? kThreads * VEC : 1];
  __shared__ int32_t sh_arg[MAX ? kThreads * VEC : 1];
  const ClTask t = cl_task<VEC>(S, P, chunk);
  const ClMerge<A, VEC, MAX> merge(sh_sum, sh_max, sh_arg);
#pragma unroll 1
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    A sum[VEC], best[VEC];
    int32_t arg[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      sum[k] = 0;
      best[k] = A(-INFINITY);
      arg[k] = kNone;
    }
    if (t.c < C) {
      const T* xs = x + n * P * C + t.c;
      Pack<T, VEC> v[U];
      t.pixels<U>(
          [&](int u, uint32_t p) { v[u] = load<VEC>(xs + int64_t(p) * C); },
          [&](int u, uint32_t p) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              const A f = A(v[u].v[k]);
              sum[k] += f;
              if (MAX) take_max(f, int32_t(p), best[k], arg[k]);
            }
          });
    }
    merge.put(t, n, C, sum, best, arg, out);
  }
}

// NG = 1, 2: grad_a with the maps of NG groups (NG = 1: no group flags); NG = 0: without maps.
template <typename T, int VEC, int NG>
__global__ void __launch_bounds__(kThreads) grad_a_cl(
    const T* __restrict__ x, const T* __restrict__ dy, PoolMaps<acc_t<T>> m,
    const bool* __restrict__ group, Sink<acc_t<T>> out, int64_t N, int C, int64_t P, int S,
    int64_t chunk) {
  using A = acc_t<T>;
  constexpr int U = VEC > 1 || sizeof(A) == 8 ? 2 : 4;
  __shared__ A sh_sum[kThreads * VEC];
  const ClTask t = cl_task<VEC>(S, P, chunk);
  const ClMerge<A, VEC, false> merge(sh_sum, nullptr, nullptr);
#pragma unroll 1
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    A acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = 0;
    if (t.c < C) {
      const Pack<bool, VEC> gv = group_pack<NG, VEC>(group, n * C + t.c);
      const int64_t r0 = n * NG * P, r1 = r0 + P;
      const T* xs = x + n * P * C + t.c;
      const T* ds = dy + n * P * C + t.c;
      Pack<T, VEC> xv[U], dv[U];
      GroupMaps<A, NG ? NG : 1> gm[U];
      t.pixels<U>(
          [&](int u, uint32_t p) {
            xv[u] = load<VEC>(xs + int64_t(p) * C);
            dv[u] = load<VEC>(ds + int64_t(p) * C);
            if (NG) gm[u].read(m, r0, r1, p);
          },
          [&](int u, uint32_t) {
            if constexpr (NG == 0) {
#pragma unroll
              for (int k = 0; k < VEC; ++k) acc[k] += A(xv[u].v[k]) * A(dv[u].v[k]);
            } else {
              const auto pm = gm[u].scaled(m.inv0, m.inv1);
#pragma unroll
              for (int k = 0; k < VEC; ++k) {
                const bool g = gv.v[k];
                const A pool = pm.pool(g, t.c + k);
                acc[k] += A(xv[u].v[k]) * (A(dv[u].v[k]) * pm.gate(g) + pool);
              }
            }
          });
    }
    merge.put(t, n, C, acc, nullptr, nullptr, out);
  }
}

// NG = 1, 2: y = s[n, g(c), p] a_c x with the gate of NG groups (NG = 1: no group flags);
// NG = 0: y = a_c x.
template <typename T, int VEC, int NG>
__global__ void __launch_bounds__(kThreads) gate_cl(
    const T* __restrict__ x, const acc_t<T>* __restrict__ a, const acc_t<T>* __restrict__ s,
    const bool* __restrict__ group, T* __restrict__ y, int64_t N, int C, int64_t P, int S,
    int64_t chunk) {
  using A = acc_t<T>;
  constexpr int U = VEC > 1 ? 2 : 4;
  const ClTask t = cl_task<VEC>(S, P, chunk);
  if (t.c >= C) return;
#pragma unroll 1
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const Pack<A, VEC> av = load<VEC>(a + n * C + t.c);
    const Pack<bool, VEC> gv = group_pack<NG, VEC>(group, n * C + t.c);
    const A* s0 = NG ? s + n * NG * P : nullptr;
    const A* s1 = NG == 2 ? s0 + P : nullptr;
    const T* xs = x + n * P * C + t.c;
    T* ys = y + n * P * C + t.c;
    Pack<T, VEC> xv[U];
    A sa[U], sb[U];
    t.pixels<U>(
        [&](int u, uint32_t p) {
          xv[u] = load<VEC>(xs + int64_t(p) * C);
          if (NG) sa[u] = s0[p];
          if (NG == 2) sb[u] = s1[p];
        },
        [&](int u, uint32_t p) {
          Pack<T, VEC> o;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            if constexpr (NG == 0) o.v[k] = T(av.v[k] * A(xv[u].v[k]));
            else if constexpr (NG == 1) o.v[k] = T(sa[u] * av.v[k] * A(xv[u].v[k]));
            else o.v[k] = T((gv.v[k] ? sb[u] : sa[u]) * av.v[k] * A(xv[u].v[k]));
          }
          store<VEC>(ys + int64_t(p) * C, o);
        });
  }
}

// NG = 1, 2: grad_x with the maps of NG groups (NG = 1: no group flags); NG = 0: without maps.
// PMAX: with the pixel max's gradient d_max_c at argmax_c.
template <typename T, int VEC, int NG, bool PMAX>
__global__ void __launch_bounds__(kThreads) grad_x_cl(
    const T* __restrict__ dy, const acc_t<T>* __restrict__ a, PoolMaps<acc_t<T>> m,
    const bool* __restrict__ group, const acc_t<T>* __restrict__ d_mean_c,
    const acc_t<T>* __restrict__ d_max_c, const int32_t* __restrict__ argmax_c, acc_t<T> invP,
    T* __restrict__ dx, int64_t N, int C, int64_t P, int S, int64_t chunk) {
  using A = acc_t<T>;
  constexpr int U = NG ? (VEC > 1 ? 1 : (sizeof(A) == 8 ? 2 : 4)) : (VEC > 1 ? 2 : 4);
  const ClTask t = cl_task<VEC>(S, P, chunk);
  if (t.c >= C) return;
#pragma unroll 1
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const int64_t q = n * C + t.c;
    const Pack<A, VEC> av = load<VEC>(a + q);
    Pack<A, VEC> dxc;
    Pack<int32_t, VEC> axc;
    if constexpr (PMAX) dxc = load<VEC>(d_max_c + q);
    const Pack<bool, VEC> gv = group_pack<NG, VEC>(group, q);
    if constexpr (PMAX) axc = load<VEC>(argmax_c + q);
    Pack<A, VEC> dmc = load<VEC>(d_mean_c + q);
#pragma unroll
    for (int k = 0; k < VEC; ++k) dmc.v[k] *= invP;
    const int64_t r0 = n * NG * P, r1 = r0 + P;
    const T* ds = dy + n * P * C + t.c;
    T* os = dx + n * P * C + t.c;
    Pack<T, VEC> dv[U];
    GroupMaps<A, NG ? NG : 1> gm[U];
    t.pixels<U>(
        [&](int u, uint32_t p) {
          dv[u] = load<VEC>(ds + int64_t(p) * C);
          if (NG) gm[u].read(m, r0, r1, p);
        },
        [&](int u, uint32_t p) {
          GroupMaps<A, NG ? NG : 1> pm;
          if constexpr (NG > 0) pm = gm[u].scaled(m.inv0, m.inv1);
          Pack<T, VEC> o;
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const A ac = av.v[k];
            A v;
            if constexpr (NG == 0) {
              v = A(dv[u].v[k]) * ac + dmc.v[k];
            } else {
              const bool g = gv.v[k];
              const A pool = pm.pool(g, t.c + k);
              v = A(dv[u].v[k]) * pm.gate(g) * ac + ac * pool + dmc.v[k];
            }
            if constexpr (PMAX)
              if (int64_t(p) == axc.v[k]) v += dxc.v[k];
            o.v[k] = T(v);
          }
          store<VEC>(os + int64_t(p) * C, o);
        });
  }
}

// ------------------------------------------------------------------------- channel reductions
// pool_channels (GRAD false): f = a_c x; per group g: sum of f over its channels, max over all
// channels of (f if c in g else 0) with the first argmax (G = 1: the max of f over all channels).
// gate_grad_s (GRAD true): sum of dy a_c x over the group's channels.

// A channel's weight and group, staged in shared memory (one 8- or 16-byte load).
template <typename A>
struct alignas(2 * sizeof(A)) ChannelW {
  A a;
  int32_t g;
};

// Planar: threadIdx.x = pixel lane (32 pixels per tile), threadIdx.y = channel row; block b of
// grid.x is pixel tile b / S, channels [c0, c1) of split b % S. Row r takes channels r, r + 8, ...
// of every piece of 256. The channel is the same across a warp, so the branch on its group is
// uniform: only the own group's max is updated, and the masked-out 0 of the other group enters
// once, as (0, first channel outside the group). NG = 1: no group flags, every channel in group 0
// (none is outside it), and only row 0 of the (N, 1, P) outputs is written.
template <typename T, bool GRAD, int NG>
__global__ void __launch_bounds__(kThreads) channels_planar(
    const T* __restrict__ x, const T* __restrict__ dy, const acc_t<T>* __restrict__ a,
    const bool* __restrict__ group, Sink<acc_t<T>> out, int64_t N, int C, int64_t P, int S,
    int64_t cchunk) {
  using A = acc_t<T>;
  constexpr int U = GRAD ? 4 : 8;
  __shared__ ChannelW<A> sh_w[kThreads];
  __shared__ A sh_sum[2][kRows][32], sh_max[2][kRows][32];
  __shared__ int32_t sh_arg[2][kRows][32];
  const uint32_t tile = blockIdx.x / uint32_t(S);
  const int split = int(blockIdx.x - tile * uint32_t(S));
  const int64_t p = int64_t(tile) * 32 + threadIdx.x;
  const int tid = threadIdx.y * 32 + threadIdx.x;
  const int64_t c0 = int64_t(split) * cchunk, c1 = lo(C, c0 + cchunk);
#pragma unroll 1
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    A sum0 = 0, sum1 = 0, best0 = A(-INFINITY), best1 = A(-INFINITY);
    int32_t arg0 = kNone, arg1 = kNone, out0 = kNone, out1 = kNone;  // out_g: first channel not in g
#pragma unroll 1
    for (int64_t cb = c0; cb < c1; cb += kThreads) {
      const int len = int(lo(kThreads, c1 - cb));
      __syncthreads();  // the previous piece (or sample) is done with sh_w and the shared rows
      if (tid < len) sh_w[tid] = {a[n * C + cb + tid], NG == 2 && group[n * C + cb + tid] ? 1 : 0};
      __syncthreads();
      if (p >= P) continue;
      const T* xp = x + (n * C + cb) * P + p;
      const T* dp = GRAD ? dy + (n * C + cb) * P + p : nullptr;
      T xv[U], dv[U];
      batched<U>(
          threadIdx.y, len, kRows,
          [&](int u, uint32_t j) {
            xv[u] = xp[j * P];
            if (GRAD) dv[u] = dp[j * P];
          },
          [&](int u, uint32_t j) {
            const ChannelW<A> w = sh_w[j];
            const bool g1 = NG == 2 && w.g;
            const int32_t c = int32_t(cb + j);
            if (GRAD) {
              const A d = A(dv[u]) * w.a * A(xv[u]);
              if (g1) sum1 += d;
              else sum0 += d;
            } else {
              const A f = w.a * A(xv[u]);
              if (g1) {
                sum1 += f;
                take_max(f, c, best1, arg1);
                out0 = min(out0, c);
              } else {
                sum0 += f;
                take_max(f, c, best0, arg0);
                if (NG == 2) out1 = min(out1, c);
              }
            }
          });
    }
    if (!GRAD) {
      if (out0 != kNone) merge_max(A(0), out0, best0, arg0);
      if (out1 != kNone) merge_max(A(0), out1, best1, arg1);
    }
    const int r = threadIdx.y, l = threadIdx.x;
    sh_sum[0][r][l] = sum0;
    sh_sum[1][r][l] = sum1;
    if (!GRAD) {
      sh_max[0][r][l] = best0;
      sh_max[1][r][l] = best1;
      sh_arg[0][r][l] = arg0;
      sh_arg[1][r][l] = arg1;
    }
    __syncthreads();
    if (threadIdx.y < NG && p < P) {  // row g merges group g, rows in order
      const int g = threadIdx.y;
      A s = 0, m = A(-INFINITY);
      int32_t i = kNone;
      for (int k = 0; k < kRows; ++k) {
        s += sh_sum[g][k][l];
        if (!GRAD) merge_max(sh_max[g][k][l], sh_arg[g][k][l], m, i);
      }
      out.put((n * NG + g) * P + p, split, g, s, m, i);
    }
  }
}

// Channels-last: threadIdx.x = lane along channel packs (blockDim.x lanes per pixel, within a
// warp), threadIdx.y = pixel; each lane walks its packs in rising channel order, then shuffles
// combine the lanes. NG = 2: branch-free on the group (it varies across the lanes); NG = 1: no
// group flags, one sum and max over all channels.
template <typename T, int VEC, bool GRAD, int NG>
__global__ void __launch_bounds__(kThreads) channels_cl(
    const T* __restrict__ x, const T* __restrict__ dy, const acc_t<T>* __restrict__ a,
    const bool* __restrict__ group, Sink<acc_t<T>> out, int64_t N, int C, int64_t P) {
  static_assert(NG == 1 || NG == 2, "channels_cl: one or two groups");
  using A = acc_t<T>;
  // 16-bit packs with NG = 1 take U = 1: with 2, ptxas (sm_90) spills to stay at 64 registers.
  constexpr int U = VEC > 1 ? (NG == 1 && sizeof(T) == 2 ? 1 : 2) : 4;
  const int64_t p = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  const int width = blockDim.x;
#pragma unroll 1
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    A sum0 = 0, sum1 = 0, best0 = A(-INFINITY), best1 = A(-INFINITY);
    int32_t arg0 = kNone, arg1 = kNone;
    if (p < P) {
      const T* xr = x + (n * P + p) * C;
      const T* dr = GRAD ? dy + (n * P + p) * C : nullptr;
      const A* ar = a + n * C;
      const bool* gr = NG == 2 ? group + n * C : nullptr;
      Pack<T, VEC> xv[U], dv[U];
      Pack<A, VEC> av[U];
      Pack<bool, VEC> gv[U];
      batched<U>(
          threadIdx.x * VEC, C, uint32_t(width) * VEC,
          [&](int u, uint32_t c) {
            xv[u] = load<VEC>(xr + c);
            if (GRAD) dv[u] = load<VEC>(dr + c);
            av[u] = load<VEC>(ar + c);
            if (NG == 2) gv[u] = load<VEC>(gr + c);
          },
          [&](int u, uint32_t c) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              const A f = GRAD ? A(dv[u].v[k]) * av[u].v[k] * A(xv[u].v[k])
                               : av[u].v[k] * A(xv[u].v[k]);
              if constexpr (NG == 1) {
                sum0 += f;
                if (!GRAD) take_max(f, int32_t(c + k), best0, arg0);
              } else {
                const bool g = gv[u].v[k];
                sum0 += g ? A(0) : f;  // + 0 leaves the sum's value as it is
                sum1 += g ? f : A(0);
                if (!GRAD) {
                  take_max(g ? A(0) : f, int32_t(c + k), best0, arg0);
                  take_max(g ? f : A(0), int32_t(c + k), best1, arg1);
                }
              }
            }
          });
    }
    sum0 = lanes_sum(sum0, width);
    if (NG == 2) sum1 = lanes_sum(sum1, width);
    if (!GRAD) {
      lanes_max(best0, arg0, width);
      if (NG == 2) lanes_max(best1, arg1, width);
    }
    if (threadIdx.x == 0 && p < P) {
      out.put((n * NG) * P + p, 0, 0, sum0, best0, arg0);
      if (NG == 2) out.put((n * NG + 1) * P + p, 0, 1, sum1, best1, arg1);
    }
  }
}

// ------------------------------------------------------------------------------------ host side

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
constexpr int kVec = 16 / int(sizeof(T));  // elements of a 16-byte pack

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// f(std::integral_constant<int, V>) with V = kVec<T> when `vec`, else 1.
template <typename T, typename F>
void with_vec(bool vec, F&& f) {
  if (vec) f(std::integral_constant<int, kVec<T>>{});
  else f(std::integral_constant<int, 1>{});
}

// The gradient maps of the backward in packs of V (planar rows start at multiples of V when P is).
template <typename A>
bool maps_aligned(const PoolMaps<A>& m, int V) {
  return aligned(m.s, V * sizeof(A)) && aligned(m.avg, V * sizeof(A)) &&
         aligned(m.max, V * sizeof(A)) && aligned(m.arg, V * sizeof(int32_t));
}

// Lanes of a channels-last block: one per channel pack, rounded up to a power of two in [8, 32].
int cl_lanes(int64_t C, int vec) {
  const int64_t packs = ceil_div(C, vec);
  int bx = 8;
  while (bx < 32 && bx < packs) bx *= 2;
  return bx;
}

// 16-byte packs along channels in channels-last tensors: whole packs, at least 8 per pixel.
template <typename T>
bool cl_vec(int64_t C) {
  return C % kVec<T> == 0 && C / kVec<T> >= 8;
}

// S splits of `extent` into chunks (multiples of `align`, at least `min_len` long) so that
// `units` work items times S reach `target`.
struct Split {
  int S;
  int64_t chunk;
};

Split split_for(int64_t units, int64_t extent, int64_t align, int64_t min_len, int64_t target) {
  int64_t s = units >= target ? 1 : ceil_div(target, units);
  s = std::max<int64_t>(1, std::min(s, extent / min_len));
  const int64_t chunk = ceil_div(ceil_div(extent, s), align) * align;
  return {int(ceil_div(extent, chunk)), chunk};
}

// grid.x = x blocks (32-bit), grid.y over the samples (the kernels loop over the rest).
dim3 grid_for(int64_t x, int64_t N) {
  TORCH_CHECK(x <= INT32_MAX, "fusedattn passes (CUDA): too many blocks for one launch: ", x);
  return dim3(unsigned(x), unsigned(std::min<int64_t>(N, 65535)));
}

// Blocks of the planar warp-per-(plane, split) kernels (their 32-bit task math needs C S < 2^31).
dim3 plane_grid(int64_t C, const Split& sp, int64_t N) {
  TORCH_CHECK(C * sp.S < INT32_MAX, "fusedattn passes (CUDA): too many planes for one launch");
  return grid_for(ceil_div(C * sp.S, kWarps), N);
}

// A reduction's outputs: with S > 1 splits the kernel writes partials (S, M) that merge_splits
// turns into the final outputs.
template <typename A>
struct Reduction {
  Sink<A> fin, part;
  at::Tensor psum, pmax, parg;
  int S;

  Reduction(const Sink<A>& final_sink, int S_, int64_t M, const at::TensorOptions& opts)
      : fin(final_sink), part(final_sink), S(S_) {
    if (S == 1) return;
    psum = at::empty({S, M}, opts);
    part.sum = psum.mutable_data_ptr<A>();
    if (fin.max) {
      pmax = at::empty({S, M}, opts);
      parg = at::empty({S, M}, opts.dtype(at::kInt));
      part.max = pmax.mutable_data_ptr<A>();
      part.arg = parg.mutable_data_ptr<int32_t>();
    }
    part.parts = M;
  }
  const Sink<A>& first() const { return S > 1 ? part : fin; }

  // rows x L outputs, group = row & gmask (G - 1 for the (N G) x P maps, 0 for (N, C)).
  void merge(int64_t rows, int64_t L, int gmask, cudaStream_t stream) const {
    if (S == 1) return;
    merge_splits<A><<<grid_for(std::min<int64_t>(ceil_div(L, kThreads), 65535), rows), kThreads, 0,
                      stream>>>(part.sum, part.max, part.arg, S, rows, L, gmask, fin);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

constexpr int64_t kMinPlaneSplit = 2048;  // pixels per split of a planar pixel reduction
constexpr int64_t kMinChannelSplit = 64;  // channels per split of a planar channel reduction

// Launch shape of a pass per (n, c) over the pixels (pool_pixels, grad_a, gate, grad_x): planar,
// a warp per (plane, pixel split), splits of at least min_planar pixels; channels-last, blocks of
// bx x by (channel packs x pixel rows) per (channel tile, pixel split), splits of at least
// min_rows block rows.
struct PixelLaunch {
  dim3 grid, block;
  Split sp;
};

template <int VEC>
PixelLaunch pixel_launch(const Geom& G, bool cl, int64_t min_planar, int64_t min_rows) {
  if (!cl) {
    const Split sp = split_for(G.N * G.C, G.P, 32 * VEC, min_planar, kTargetWarps);
    return {plane_grid(G.C, sp, G.N), dim3(kThreads), sp};
  }
  const int bx = cl_lanes(G.C, VEC), by = kThreads / bx;
  const int64_t tiles = ceil_div(G.C, int64_t(bx) * VEC);
  const Split sp = split_for(G.N * tiles, G.P, by, int64_t(by) * min_rows, kTargetBlocks);
  return {grid_for(tiles * sp.S, G.N), dim3(bx, by), sp};
}

// f(std::integral_constant<int, NG>) with NG = the group count ng (1 or 2).
template <typename F>
void with_group_count(int64_t ng, F&& f) {
  if (ng == 1) f(std::integral_constant<int, 1>{});
  else f(std::integral_constant<int, 2>{});
}

// f(std::integral_constant<int, NG>): NG = 0 without the maps (or s), else the group count ng.
template <typename F>
void with_groups(bool maps, int64_t ng, F&& f) {
  if (!maps) f(std::integral_constant<int, 0>{});
  else with_group_count(ng, f);
}

using OptTensor = std::optional<at::Tensor>;

// The pointer of an optional tensor, or null.
template <typename U>
const U* opt_ptr(const OptTensor& t) {
  return t.has_value() ? t->const_data_ptr<U>() : nullptr;
}

// ------------------------------------------------------------------------------------------ ops

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_pixels_cuda(const at::Tensor& x,
                                                                bool with_max) {
  check_x(x, "pool_pixels");
  const c10::cuda::CUDAGuard guard(x.device());
  const Geom G = geom(x);
  const auto opts = x.options().dtype(acc_dtype(x));
  const auto iopts = x.options().dtype(at::kInt);
  at::Tensor mean = at::empty({G.N, G.C}, opts);
  at::Tensor mx = with_max ? at::empty({G.N, G.C}, opts) : at::empty({0}, opts);
  at::Tensor arg = with_max ? at::empty({G.N, G.C}, iopts) : at::empty({0}, iopts);
  if (x.numel() == 0) {
    mean.zero_();
    if (with_max) {
      mx.zero_();
      arg.zero_();
    }
    return {mean, mx, arg};
  }
  const bool cl = G.sC == 1;  // channels-last, or 1x1 maps (the same memory)
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto dtype = x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "pool_pixels_cuda", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const T* xp = x.const_data_ptr<T>();
    const A invP = A(1) / A(G.P);
    const Sink<A> fin{mean.mutable_data_ptr<A>(), with_max ? mx.mutable_data_ptr<A>() : nullptr,
                      with_max ? arg.mutable_data_ptr<int32_t>() : nullptr, 0, invP, invP, false,
                      false};
    with_vec<T>((cl ? cl_vec<T>(G.C) : G.P % kVec<T> == 0) && aligned(xp, 16), [&](auto V) {
      constexpr int VEC = decltype(V)::value;
      const PixelLaunch L = pixel_launch<VEC>(G, cl, kMinPlaneSplit, 16);
      const Reduction<A> red(fin, L.sp.S, G.N * G.C, opts);
      const auto kernel =
          with_max ? (cl ? pool_pixels_cl<T, VEC, true> : pool_pixels_planar<T, VEC, true>)
                   : (cl ? pool_pixels_cl<T, VEC, false> : pool_pixels_planar<T, VEC, false>);
      kernel<<<L.grid, L.block, 0, stream>>>(xp, red.first(), G.N, int(G.C), G.P, L.sp.S,
                                             L.sp.chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      red.merge(G.N, G.C, 0, stream);
    });
  });
  return {mean, mx, arg};
}

// pool_channels and gate_grad_s: the channel reductions of x (dy null: pool_channels) into fin,
// the (N, ng, P) maps (group: the flags with ng = 2, null with ng = 1).
template <typename T>
void channel_reduction(const at::Tensor& x, const at::Tensor* dy, const at::Tensor& a,
                       const bool* gp, int64_t ng, const Sink<acc_t<T>>& fin) {
  using A = acc_t<T>;
  const Geom G = geom(x);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const T* xp = x.const_data_ptr<T>();
  const T* dp = dy ? dy->const_data_ptr<T>() : nullptr;
  const A* ap = a.const_data_ptr<A>();
  if (G.sC != 1) {  // planar (1x1 maps take the channels-last path)
    const int64_t tiles = ceil_div(G.P, 32);
    const Split sp = split_for(G.N * tiles, G.C, kRows, kMinChannelSplit, kTargetBlocks);
    const Reduction<A> red(fin, sp.S, G.N * ng * G.P, x.options().dtype(acc_dtype(x)));
    const dim3 grid = grid_for(tiles * sp.S, G.N), block(32, kRows);
    with_group_count(ng, [&](auto NGc) {
      constexpr int NG = decltype(NGc)::value;
      const auto kernel = dy ? channels_planar<T, true, NG> : channels_planar<T, false, NG>;
      kernel<<<grid, block, 0, stream>>>(xp, dp, ap, gp, red.first(), G.N, int(G.C), G.P, sp.S,
                                         sp.chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    red.merge(G.N * ng, G.P, int(ng - 1), stream);
    return;
  }
  const bool vec = cl_vec<T>(G.C) && aligned(xp, 16) && (!dp || aligned(dp, 16)) &&
                   aligned(ap, kVec<T> * sizeof(A)) && (!gp || aligned(gp, kVec<T>));
  with_vec<T>(vec, [&](auto V) {
    with_group_count(ng, [&](auto NGc) {
      constexpr int VEC = decltype(V)::value, NG = decltype(NGc)::value;
      const int bx = cl_lanes(G.C, VEC), by = kThreads / bx;
      const dim3 grid = grid_for(ceil_div(G.P, by), G.N), block(bx, by);
      const auto kernel = dy ? channels_cl<T, VEC, true, NG> : channels_cl<T, VEC, false, NG>;
      kernel<<<grid, block, 0, stream>>>(xp, dp, ap, gp, fin, G.N, int(G.C), G.P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_channels_cuda(
    const at::Tensor& x, const at::Tensor& a, const OptTensor& group, int64_t size0,
    int64_t size1) {
  check_x(x, "pool_channels");
  const Geom G = geom(x);
  const int64_t ng = groups(x, group, size0, size1, "pool_channels");
  check_small(a, x, {G.N, G.C}, acc_dtype(x), "pool_channels: a");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options().dtype(acc_dtype(x));
  at::Tensor avg = at::empty({G.N, ng, G.P}, opts), mx = at::empty({G.N, ng, G.P}, opts);
  at::Tensor arg = at::empty({G.N, ng, G.P}, x.options().dtype(at::kInt));
  if (x.numel() == 0) return {avg.zero_(), mx.zero_(), arg.zero_()};
  const auto dtype = x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "pool_channels_cuda", [&] {
    using A = acc_t<scalar_t>;
    const A inv0 = size0 ? A(1) / A(size0) : A(0), inv1 = size1 ? A(1) / A(size1) : A(0);
    const Sink<A> fin{avg.mutable_data_ptr<A>(), mx.mutable_data_ptr<A>(),
                      arg.mutable_data_ptr<int32_t>(), 0, inv0, inv1, size0 == 0, size1 == 0};
    channel_reduction<scalar_t>(x, nullptr, a, opt_ptr<bool>(group), ng, fin);
  });
  return {avg, mx, arg};
}

at::Tensor gate_grad_s_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& a,
                            const OptTensor& group) {
  check_x(x, "gate_grad_s");
  const Geom G = geom(x);
  check_like_x(dy, x, "gate_grad_s");
  const int64_t ng = groups(x, group, "gate_grad_s");
  check_small(a, x, {G.N, G.C}, acc_dtype(x), "gate_grad_s: a");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor ds = at::empty({G.N, ng, G.P}, x.options().dtype(acc_dtype(x)));
  if (x.numel() == 0) return ds.zero_();
  const auto dtype = x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gate_grad_s_cuda", [&] {
    using A = acc_t<scalar_t>;
    const Sink<A> fin{ds.mutable_data_ptr<A>(), nullptr, nullptr, 0, A(1), A(1), false, false};
    channel_reduction<scalar_t>(x, &dy, a, opt_ptr<bool>(group), ng, fin);
  });
  return ds;
}

// The backward maps (given: check_maps returned true), or none.
template <typename A>
PoolMaps<A> pool_maps(bool given, const OptTensor& s, const OptTensor& d_avg,
                      const OptTensor& d_max, const OptTensor& argmax, int64_t size0,
                      int64_t size1) {
  if (!given) return {nullptr, nullptr, nullptr, nullptr, A(0), A(0)};
  return {s->const_data_ptr<A>(), d_avg->const_data_ptr<A>(), d_max->const_data_ptr<A>(),
          argmax->const_data_ptr<int32_t>(), A(1) / A(std::max<int64_t>(size0, 1)),
          A(1) / A(std::max<int64_t>(size1, 1))};
}

at::Tensor grad_a_cuda(const at::Tensor& x, const at::Tensor& dy, const OptTensor& s,
                       const OptTensor& group, const OptTensor& d_avg, const OptTensor& d_max,
                       const OptTensor& argmax, int64_t size0, int64_t size1) {
  check_x(x, "grad_a");
  const Geom G = geom(x);
  check_like_x(dy, x, "grad_a");
  const int64_t ng = groups(x, group, size0, size1, "grad_a");
  const bool maps = check_maps(x, ng, s, d_avg, d_max, argmax, "grad_a");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto opts = x.options().dtype(acc_dtype(x));
  at::Tensor da = at::empty({G.N, G.C}, opts);
  if (x.numel() == 0) return da.zero_();
  const bool cl = G.sC == 1;  // channels-last, or 1x1 maps (the same memory)
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto dtype = x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "grad_a_cuda", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const T* xp = x.const_data_ptr<T>();
    const T* dp = dy.const_data_ptr<T>();
    const bool* gp = maps ? opt_ptr<bool>(group) : nullptr;  // without maps the groups play no part
    const PoolMaps<A> m = pool_maps<A>(maps, s, d_avg, d_max, argmax, size0, size1);
    const Sink<A> fin{da.mutable_data_ptr<A>(), nullptr, nullptr, 0, A(1), A(1), false, false};
    const bool vec = aligned(xp, 16) && aligned(dp, 16) &&
                     (cl ? cl_vec<T>(G.C) && (!gp || aligned(gp, kVec<T>))
                         : G.P % kVec<T> == 0 && (!maps || maps_aligned(m, kVec<T>)));
    with_vec<T>(vec, [&](auto V) {
      with_groups(maps, ng, [&](auto NGc) {
        constexpr int VEC = decltype(V)::value, NG = decltype(NGc)::value;
        const PixelLaunch L = pixel_launch<VEC>(G, cl, kMinPlaneSplit, 16);
        const Reduction<A> red(fin, L.sp.S, G.N * G.C, opts);
        const auto kernel = cl ? grad_a_cl<T, VEC, NG> : grad_a_planar<T, VEC, NG>;
        kernel<<<L.grid, L.block, 0, stream>>>(xp, dp, m, gp, red.first(), G.N, int(G.C), G.P,
                                               L.sp.S, L.sp.chunk);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        red.merge(G.N, G.C, 0, stream);
      });
    });
  });
  return da;
}

at::Tensor gate_cuda(const at::Tensor& x, const at::Tensor& a, const OptTensor& s,
                     const OptTensor& group) {
  check_x(x, "gate");
  const Geom G = geom(x);
  const int64_t ng = groups(x, group, "gate");
  check_small(a, x, {G.N, G.C}, acc_dtype(x), "gate: a");
  if (s) check_small(*s, x, {G.N, ng, G.P}, acc_dtype(x), "gate: s");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const bool cl = G.sC == 1;  // channels-last, or 1x1 maps (the same memory)
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto dtype = x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gate_cuda", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const T* xp = x.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    const A* ap = a.const_data_ptr<A>();
    const A* sp_ = opt_ptr<A>(s);
    const bool* gp = s ? opt_ptr<bool>(group) : nullptr;  // without s the groups play no part
    const bool vec = aligned(xp, 16) && aligned(yp, 16) &&
                     (cl ? cl_vec<T>(G.C) && aligned(ap, kVec<T> * sizeof(A)) &&
                               (!gp || aligned(gp, kVec<T>))
                         : G.P % kVec<T> == 0 && (!sp_ || aligned(sp_, kVec<T> * sizeof(A))));
    with_vec<T>(vec, [&](auto V) {
      with_groups(s.has_value(), ng, [&](auto NGc) {
        constexpr int VEC = decltype(V)::value, NG = decltype(NGc)::value;
        const PixelLaunch L = pixel_launch<VEC>(G, cl, 32 * VEC * 4, 8);
        const auto kernel = cl ? gate_cl<T, VEC, NG> : gate_planar<T, VEC, NG>;
        kernel<<<L.grid, L.block, 0, stream>>>(xp, ap, sp_, gp, yp, G.N, int(G.C), G.P, L.sp.S,
                                               L.sp.chunk);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return y;
}

at::Tensor grad_x_cuda(const at::Tensor& dy, const at::Tensor& a, const OptTensor& s,
                       const OptTensor& group, const OptTensor& d_avg, const OptTensor& d_max,
                       const OptTensor& argmax, int64_t size0, int64_t size1,
                       const at::Tensor& d_mean_c, const OptTensor& d_max_c,
                       const OptTensor& argmax_c) {
  check_x(dy, "grad_x");
  const Geom G = geom(dy);
  const int64_t ng = groups(dy, group, size0, size1, "grad_x");
  check_small(a, dy, {G.N, G.C}, acc_dtype(dy), "grad_x: a");
  const bool maps = check_maps(dy, ng, s, d_avg, d_max, argmax, "grad_x");
  check_small(d_mean_c, dy, {G.N, G.C}, acc_dtype(dy), "grad_x: d_mean_c");
  const bool pmax = check_pixel_max(dy, d_max_c, argmax_c, "grad_x");
  const c10::cuda::CUDAGuard guard(dy.device());
  at::Tensor dx = at::empty_like(dy);
  if (dy.numel() == 0) return dx;
  // The maps without the pixel max (no module passes them so) take the pixel-max kernels with
  // argmax_c = -1, which no pixel matches (d_max_c is then never added: any (N, C) will do).
  const at::Tensor no_argmax_c =
      maps && !pmax ? at::full({G.N, G.C}, -1, dy.options().dtype(at::kInt)) : at::Tensor();
  const bool cl = G.sC == 1;  // channels-last, or 1x1 maps (the same memory)
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto dtype = dy.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "grad_x_cuda", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const T* dp = dy.const_data_ptr<T>();
    T* op = dx.mutable_data_ptr<T>();
    const A* ap = a.const_data_ptr<A>();
    const bool* gp = maps ? opt_ptr<bool>(group) : nullptr;  // without maps the groups play no part
    const A* dmc = d_mean_c.const_data_ptr<A>();
    const A* dxc = pmax ? d_max_c->const_data_ptr<A>() : maps ? dmc : nullptr;
    const int32_t* axc = pmax ? argmax_c->const_data_ptr<int32_t>()
                              : maps ? no_argmax_c.const_data_ptr<int32_t>() : nullptr;
    const PoolMaps<A> m = pool_maps<A>(maps, s, d_avg, d_max, argmax, size0, size1);
    const A invP = A(1) / A(G.P);
    const int V = kVec<T>;
    const bool vec =
        aligned(dp, 16) && aligned(op, 16) &&
        (cl ? cl_vec<T>(G.C) && (!gp || aligned(gp, V)) && aligned(ap, V * sizeof(A)) &&
                  aligned(dmc, V * sizeof(A)) && (!dxc || aligned(dxc, V * sizeof(A))) &&
                  (!axc || aligned(axc, V * sizeof(int32_t)))
            : G.P % V == 0 && (!maps || maps_aligned(m, V)));
    with_vec<T>(vec, [&](auto VV) {
      with_groups(maps, ng, [&](auto NGc) {
        constexpr int VEC = decltype(VV)::value, NG = decltype(NGc)::value;
        const PixelLaunch L = pixel_launch<VEC>(G, cl, 32 * VEC * 4, 8);
        auto launch = [&](auto kernel) {
          kernel<<<L.grid, L.block, 0, stream>>>(dp, ap, m, gp, dmc, dxc, axc, invP, op, G.N,
                                                 int(G.C), G.P, L.sp.S, L.sp.chunk);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        };
        if constexpr (NG > 0)  // HAM, CBAM: with the pixel max
          launch(cl ? grad_x_cl<T, VEC, NG, true> : grad_x_planar<T, VEC, NG, true>);
        else if (axc)  // SE / ECA with the pixel max
          launch(cl ? grad_x_cl<T, VEC, 0, true> : grad_x_planar<T, VEC, 0, true>);
        else
          launch(cl ? grad_x_cl<T, VEC, 0, false> : grad_x_planar<T, VEC, 0, false>);
      });
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedattn, CUDA, m) {
  m.impl("pool_pixels", &pool_pixels_cuda);
  m.impl("pool_channels", &pool_channels_cuda);
  m.impl("gate", &gate_cuda);
  m.impl("gate_grad_s", &gate_grad_s_cuda);
  m.impl("grad_a", &grad_a_cuda);
  m.impl("grad_x", &grad_x_cuda);
}

}  // namespace fusedattn
