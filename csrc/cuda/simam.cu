// SimAM on CUDA tensors (fusedattn/spec/simam.md); the per-element math is csrc/simam_math.h,
// shared with the CPU kernels. Work shapes (chosen by plan() below):
//
//  * planar, M <= 32 * kWarpItems:   one warp per plane, the plane in registers
//  * planar, M <= kBlock * 32:       one block per plane, the plane in registers (ITEMS per thread)
//  * planar, larger:                 one block per plane, streamed twice (fp64 shifted sums)
//  * channels-last: a block is 32 consecutive channels x kRowGroups row groups of one sample;
//    rows in registers while M <= kRowGroups * 32, else streamed twice.
//
// Register-held variants read x once in the forward and x, dy once in the backward; every
// reduction has a fixed order (no atomics), so results are bitwise deterministic. 64-bit offsets
// throughout. Launched on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "layout.h"
#include "simam_check.h"
#include "simam_math.h"

namespace fusedattn {
namespace {

using namespace simam;

template <typename T>
using acc_t = at::opmath_type<T>;

constexpr int kBlock = 256;       // threads per block
constexpr int kWarpItems = 8;     // most elements per lane of the warp-per-plane variant
constexpr int kRowGroups = 8;     // row groups of the channels-last block (32 channels wide)

// ----------------------------------------------------------------------------- reductions

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (fixed order: warp butterflies, then warp 0 over the warp partials).
// Every thread gets the result. `sh` holds at least kBlock / 32 values.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  A t = lane < (blockDim.x >> 5) ? sh[lane] : A(0);
  return warp_sum(t);
}

// ---------------------------------------------------- planar: one plane per warp or per block

// Plane held in registers: x[k] = plane[t + k * G] for the G threads of the group (a warp or the
// block). `group_sum` reduces over the group.
template <typename T, int ITEMS, bool WARP>
__device__ __forceinline__ void load_plane(const T* __restrict__ p, int64_t M, int t, int G,
                                           acc_t<T> (&v)[ITEMS], bool (&ok)[ITEMS]) {
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t i = t + int64_t(k) * G;
    ok[k] = i < M;
    v[k] = ok[k] ? acc_t<T>(p[i]) : acc_t<T>(0);
  }
}

template <typename A, bool WARP>
__device__ __forceinline__ A group_sum(A v, A* sh) {
  if constexpr (WARP) return warp_sum(v);
  else return block_sum(v, sh);
}

template <typename T, int ITEMS, bool WARP>
__global__ void __launch_bounds__(kBlock) fwd_planar_onchip(
    const T* __restrict__ x, T* __restrict__ y, acc_t<T>* __restrict__ mu,
    acc_t<T>* __restrict__ inv, int64_t P, int64_t M, acc_t<T> lam) {
  using A = acc_t<T>;
  __shared__ A sh[kBlock / 32];
  const int G = WARP ? 32 : kBlock;
  const int t = WARP ? (threadIdx.x & 31) : threadIdx.x;
  const int64_t p = WARP ? int64_t(blockIdx.x) * (kBlock / 32) + (threadIdx.x >> 5) : blockIdx.x;
  if (p >= P) return;  // whole warps only (WARP), or never (block per plane)
  const T* xp = x + p * M;
  A v[ITEMS];
  bool ok[ITEMS];
  load_plane<T, ITEMS, WARP>(xp, M, t, G, v, ok);
  A s = 0;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) s += v[k];
  const A mean = div(group_sum<A, WARP>(s, sh), A(M));
  A q = 0;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) { const A d = ok[k] ? v[k] - mean : A(0); q += d * d; }
  const A iv = inv_from_m2(group_sum<A, WARP>(q, sh), M, lam);
  T* yp = y + p * M;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k)
    if (ok[k]) yp[t + int64_t(k) * G] = T(forward(v[k], v[k] - mean, iv));
  if (t == 0) { mu[p] = mean; inv[p] = iv; }
}

template <typename T, int ITEMS, bool WARP>
__global__ void __launch_bounds__(kBlock) bwd_planar_onchip(
    const T* __restrict__ g, const T* __restrict__ x, const acc_t<T>* __restrict__ mu,
    const acc_t<T>* __restrict__ inv, T* __restrict__ dx, int64_t P, int64_t M) {
  using A = acc_t<T>;
  __shared__ A sh[kBlock / 32];
  const int G = WARP ? 32 : kBlock;
  const int t = WARP ? (threadIdx.x & 31) : threadIdx.x;
  const int64_t p = WARP ? int64_t(blockIdx.x) * (kBlock / 32) + (threadIdx.x >> 5) : blockIdx.x;
  if (p >= P) return;
  A xv[ITEMS], gv[ITEMS];
  bool ok[ITEMS];
  load_plane<T, ITEMS, WARP>(x + p * M, M, t, G, xv, ok);
  load_plane<T, ITEMS, WARP>(g + p * M, M, t, G, gv, ok);
  const A mean = mu[p], iv = inv[p];
  A part[ITEMS], s1 = 0, s2 = 0;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const A d = xv[k] - mean;
    A s = 0;
    const A ad = ok[k] ? grad_a(xv[k], gv[k], d, iv, s) * d : A(0);
    s1 += ad;
    s2 += ad * d;
    part[k] = grad_partial(gv[k], s, ad, iv);
  }
  const A c0 = grad_c0(group_sum<A, WARP>(s1, sh), iv, M);
  const A k2 = grad_k2(group_sum<A, WARP>(s2, sh), iv, M);
  T* dp = dx + p * M;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k)
    if (ok[k]) dp[t + int64_t(k) * G] = T(grad_finish(part[k], xv[k] - mean, c0, k2));
}

// Large planes: statistics streamed once, output a second time. Sums are of x - K in fp64, with
// K = x[0] of the plane (no division in the loop; the shift keeps the variance's cancellation to
// at most log2(M) bits of fp64).
template <typename T>
__global__ void __launch_bounds__(kBlock) fwd_planar_looped(
    const T* __restrict__ x, T* __restrict__ y, acc_t<T>* __restrict__ mu,
    acc_t<T>* __restrict__ inv, int64_t M, acc_t<T> lam) {
  using A = acc_t<T>;
  __shared__ double sh[kBlock / 32];
  const int64_t p = blockIdx.x;
  const T* xp = x + p * M;
  const double K = double(xp[0]);
  double s1 = 0, s2 = 0;
  for (int64_t i = threadIdx.x; i < M; i += kBlock) {
    const double d = double(xp[i]) - K;
    s1 += d;
    s2 += d * d;
  }
  s1 = block_sum(s1, sh);
  s2 = block_sum(s2, sh);
  const double mean_shift = div(s1, double(M));
  const A mn = A(K + mean_shift), iv = inv_from_m2(A(s2 - s1 * mean_shift), M, lam);
  T* yp = y + p * M;
  for (int64_t i = threadIdx.x; i < M; i += kBlock) {
    const A v = A(xp[i]);
    yp[i] = T(forward(v, v - mn, iv));
  }
  if (threadIdx.x == 0) { mu[p] = mn; inv[p] = iv; }
}

template <typename T>
__global__ void __launch_bounds__(kBlock) bwd_planar_looped(
    const T* __restrict__ g, const T* __restrict__ x, const acc_t<T>* __restrict__ mu,
    const acc_t<T>* __restrict__ inv, T* __restrict__ dx, int64_t M) {
  using A = acc_t<T>;
  __shared__ double sh[kBlock / 32];
  const int64_t p = blockIdx.x;
  const T* xp = x + p * M;
  const T* gp = g + p * M;
  const A mean = mu[p], iv = inv[p];
  double s1 = 0, s2 = 0;
  for (int64_t i = threadIdx.x; i < M; i += kBlock) {
    const A v = A(xp[i]), d = v - mean;
    A s;
    const A ad = grad_a(v, A(gp[i]), d, iv, s) * d;
    s1 += ad;
    s2 += ad * d;
  }
  const A c0 = grad_c0(A(block_sum(s1, sh)), iv, M);
  const A k2 = grad_k2(A(block_sum(s2, sh)), iv, M);
  T* dp = dx + p * M;
  for (int64_t i = threadIdx.x; i < M; i += kBlock) {
    const A v = A(xp[i]), gv = A(gp[i]), d = v - mean;
    A s;
    const A ad = grad_a(v, gv, d, iv, s) * d;
    dp[i] = T(grad_finish(grad_partial(gv, s, ad, iv), d, c0, k2));
  }
}

// ------------------------------------------- channels-last: (sample, 32 channels) per block
// threadIdx.x = channel lane (32), threadIdx.y = row group; element (r, c) at n M C + r C + c.
// ROWS > 0: each thread keeps its rows r = ty + k kRowGroups, k < ROWS, in registers;
// ROWS == 0: streamed (statistics, then output).

template <typename A>
__device__ __forceinline__ A column_sum(A v, A (*sh)[33]) {
  // sum over threadIdx.y for each lane, fixed order; result in every thread of the column
  __syncthreads();
  sh[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  A t = 0;
#pragma unroll
  for (int r = 0; r < kRowGroups; ++r) t += sh[r][threadIdx.x];
  return t;
}

template <typename T, int ROWS>
__global__ void __launch_bounds__(kBlock) fwd_cl(
    const T* __restrict__ x, T* __restrict__ y, acc_t<T>* __restrict__ mu,
    acc_t<T>* __restrict__ inv, int64_t C, int64_t M, acc_t<T> lam) {
  using A = acc_t<T>;
  __shared__ A sh[kRowGroups][33];
  const uint32_t tiles = uint32_t((C + 31) / 32);  // 32-bit: no division subroutine
  const int64_t n = blockIdx.x / tiles, c = int64_t(blockIdx.x % tiles) * 32 + threadIdx.x;
  const bool cok = c < C;
  const T* xs = x + n * M * C + c;
  T* ys = y + n * M * C + c;
  A mean, iv;
  if constexpr (ROWS > 0) {
    A v[ROWS];
    A s = 0;
#pragma unroll
    for (int k = 0; k < ROWS; ++k) {
      const int64_t r = threadIdx.y + int64_t(k) * kRowGroups;
      v[k] = (cok && r < M) ? A(xs[r * C]) : A(0);
      s += v[k];
    }
    mean = div(column_sum(s, sh), A(M));
    A q = 0;
#pragma unroll
    for (int k = 0; k < ROWS; ++k) {
      const int64_t r = threadIdx.y + int64_t(k) * kRowGroups;
      const A d = (cok && r < M) ? v[k] - mean : A(0);
      q += d * d;
    }
    iv = inv_from_m2(column_sum(q, sh), M, lam);
#pragma unroll
    for (int k = 0; k < ROWS; ++k) {
      const int64_t r = threadIdx.y + int64_t(k) * kRowGroups;
      if (cok && r < M) ys[r * C] = T(forward(v[k], v[k] - mean, iv));
    }
  } else {
    __shared__ double shd[kRowGroups][33];
    const double K = cok ? double(xs[0]) : 0.0;  // shift: row 0 of the channel
    double s1 = 0, s2 = 0;
    if (cok)
      for (int64_t r = threadIdx.y; r < M; r += kRowGroups) {
        const double d = double(xs[r * C]) - K;
        s1 += d;
        s2 += d * d;
      }
    s1 = column_sum(s1, shd);
    s2 = column_sum(s2, shd);
    const double mean_shift = div(s1, double(M));
    const double am = K + mean_shift, am2 = s2 - s1 * mean_shift;
    mean = A(am);
    iv = inv_from_m2(A(am2), M, lam);
    if (cok)
      for (int64_t r = threadIdx.y; r < M; r += kRowGroups) {
        const A v = A(xs[r * C]);
        ys[r * C] = T(forward(v, v - mean, iv));
      }
  }
  if (cok && threadIdx.y == 0) { mu[n * C + c] = mean; inv[n * C + c] = iv; }
}

template <typename T, int ROWS>
__global__ void __launch_bounds__(kBlock) bwd_cl(
    const T* __restrict__ g, const T* __restrict__ x, const acc_t<T>* __restrict__ mu,
    const acc_t<T>* __restrict__ inv, T* __restrict__ dx, int64_t C, int64_t M) {
  using A = acc_t<T>;
  __shared__ A sh[kRowGroups][33];
  const uint32_t tiles = uint32_t((C + 31) / 32);  // 32-bit: no division subroutine
  const int64_t n = blockIdx.x / tiles, c = int64_t(blockIdx.x % tiles) * 32 + threadIdx.x;
  const bool cok = c < C;
  const int64_t off = n * M * C + c;
  const A mean = cok ? mu[n * C + c] : A(0), iv = cok ? inv[n * C + c] : A(0);
  if constexpr (ROWS > 0) {
    A xv[ROWS], gv[ROWS], part[ROWS], s1 = 0, s2 = 0;
#pragma unroll
    for (int k = 0; k < ROWS; ++k) {
      const int64_t r = threadIdx.y + int64_t(k) * kRowGroups;
      const bool ok = cok && r < M;
      xv[k] = ok ? A(x[off + r * C]) : A(0);
      gv[k] = ok ? A(g[off + r * C]) : A(0);
      const A d = xv[k] - mean;
      A s = 0;
      const A ad = ok ? grad_a(xv[k], gv[k], d, iv, s) * d : A(0);
      s1 += ad;
      s2 += ad * d;
      part[k] = grad_partial(gv[k], s, ad, iv);
    }
    const A c0 = grad_c0(column_sum(s1, sh), iv, M);
    const A k2 = grad_k2(column_sum(s2, sh), iv, M);
#pragma unroll
    for (int k = 0; k < ROWS; ++k) {
      const int64_t r = threadIdx.y + int64_t(k) * kRowGroups;
      if (cok && r < M) dx[off + r * C] = T(grad_finish(part[k], xv[k] - mean, c0, k2));
    }
  } else {
    __shared__ double shd[kRowGroups][33];
    double s1 = 0, s2 = 0;
    if (cok)
      for (int64_t r = threadIdx.y; r < M; r += kRowGroups) {
        const A v = A(x[off + r * C]), d = v - mean;
        A s;
        const A ad = grad_a(v, A(g[off + r * C]), d, iv, s) * d;
        s1 += ad;
        s2 += ad * d;
      }
    const A c0 = grad_c0(A(column_sum(s1, shd)), iv, M);
    const A k2 = grad_k2(A(column_sum(s2, shd)), iv, M);
    if (cok)
      for (int64_t r = threadIdx.y; r < M; r += kRowGroups) {
        const A v = A(x[off + r * C]), gv = A(g[off + r * C]), d = v - mean;
        A s;
        const A ad = grad_a(v, gv, d, iv, s) * d;
        dx[off + r * C] = T(grad_finish(grad_partial(gv, s, ad, iv), d, c0, k2));
      }
  }
}

// ----------------------------------------------------------------------------------- host side

// Which variant runs a (layout, M): the same rule for forward and backward.
struct Plan {
  enum Kind { kWarp, kBlockItems, kLooped, kClRows, kClLooped } kind;
  int items;  // per-thread register items of the register-held variants
};

// Register items per thread come in three sizes (each one more kernel instantiation per dtype).
inline int items_for(int64_t per_thread) {
  for (int k : {2, 8, 32})
    if (per_thread <= k) return k;
  return 0;
}

inline Plan plan(Layout layout, int64_t M) {
  if (layout == Layout::kChannelsLast) {
    const int k = items_for((M + kRowGroups - 1) / kRowGroups);
    return k ? Plan{Plan::kClRows, k} : Plan{Plan::kClLooped, 0};
  }
  if (M <= 32 * kWarpItems) return {Plan::kWarp, items_for((M + 31) / 32)};
  const int k = items_for((M + kBlock - 1) / kBlock);
  return k ? Plan{Plan::kBlockItems, k} : Plan{Plan::kLooped, 0};
}

// Calls f(std::integral_constant<int, K>) for the K equal to `items`.
template <typename F>
void with_items(int items, F&& f) {
  switch (items) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: f(std::integral_constant<int, 32>{}); break;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> simam_forward_cuda(const at::Tensor& x_in,
                                                                  double e_lambda) {
  check_simam_input(x_in, e_lambda);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = readable(x_in);
  const int64_t N = x.size(0), C = x.size(1), M = plane_size(x), P = N * C;
  auto [y, mu, inv] = simam_forward_outputs(x);
  if (x.numel() == 0) return {y, mu, inv};
  const Layout layout = layout_of(x);
  const Plan pl = plan(layout, M);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "simam_forward_cuda", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    A* mup = mu.mutable_data_ptr<A>();
    A* ivp = inv.mutable_data_ptr<A>();
    const A lam = A(e_lambda);
    const int64_t cl_blocks = N * ((C + 31) / 32);
    with_items(pl.items, [&](auto K) {
      constexpr int k = decltype(K)::value;
      switch (pl.kind) {
        case Plan::kWarp:
          fwd_planar_onchip<scalar_t, k, true><<<(P + kBlock / 32 - 1) / (kBlock / 32), kBlock, 0, stream>>>(
              xp, yp, mup, ivp, P, M, lam);
          break;
        case Plan::kBlockItems:
          fwd_planar_onchip<scalar_t, k, false><<<P, kBlock, 0, stream>>>(xp, yp, mup, ivp, P, M, lam);
          break;
        case Plan::kLooped:
          fwd_planar_looped<scalar_t><<<P, kBlock, 0, stream>>>(xp, yp, mup, ivp, M, lam);
          break;
        case Plan::kClRows:
          fwd_cl<scalar_t, k><<<cl_blocks, dim3(32, kRowGroups), 0, stream>>>(xp, yp, mup, ivp, C, M, lam);
          break;
        case Plan::kClLooped:
          fwd_cl<scalar_t, 0><<<cl_blocks, dim3(32, kRowGroups), 0, stream>>>(xp, yp, mup, ivp, C, M, lam);
          break;
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mu, inv};
}

at::Tensor simam_backward_cuda(const at::Tensor& grad, const at::Tensor& x_in,
                               const at::Tensor& mu_in, const at::Tensor& inv_in) {
  check_simam_backward(grad, x_in, mu_in, inv_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = readable(x_in);
  const at::Tensor g = in_layout_of(grad, x);
  const at::Tensor mu = mu_in.contiguous(), inv = inv_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), M = plane_size(x), P = N * C;
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  const Plan pl = plan(layout_of(x), M);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "simam_backward_cuda", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    const A* mup = mu.const_data_ptr<A>();
    const A* ivp = inv.const_data_ptr<A>();
    const int64_t cl_blocks = N * ((C + 31) / 32);
    with_items(pl.items, [&](auto K) {
      constexpr int k = decltype(K)::value;
      switch (pl.kind) {
        case Plan::kWarp:
          bwd_planar_onchip<scalar_t, k, true><<<(P + kBlock / 32 - 1) / (kBlock / 32), kBlock, 0, stream>>>(
              gp, xp, mup, ivp, dp, P, M);
          break;
        case Plan::kBlockItems:
          bwd_planar_onchip<scalar_t, k, false><<<P, kBlock, 0, stream>>>(gp, xp, mup, ivp, dp, P, M);
          break;
        case Plan::kLooped:
          bwd_planar_looped<scalar_t><<<P, kBlock, 0, stream>>>(gp, xp, mup, ivp, dp, M);
          break;
        case Plan::kClRows:
          bwd_cl<scalar_t, k><<<cl_blocks, dim3(32, kRowGroups), 0, stream>>>(gp, xp, mup, ivp, dp, C, M);
          break;
        case Plan::kClLooped:
          bwd_cl<scalar_t, 0><<<cl_blocks, dim3(32, kRowGroups), 0, stream>>>(gp, xp, mup, ivp, dp, C, M);
          break;
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedattn, CUDA, m) {
  m.impl("simam_forward", &simam_forward_cuda);
  m.impl("simam_backward", &simam_backward_cuda);
}

}  // namespace fusedattn
