// Affine sampling of the spatial transformer on CUDA tensors (fusedattn/ops/stn.py states the
// contract, csrc/stn_check.h the checks; the coordinate math is csrc/stn_math.h, shared with the
// CPU kernels of csrc/cpu/stn.cpp). Element (n, c, pixel) of an (N, C, M-pixel) tensor lies at
// (n C + c) M + pixel ("planar", contiguous: CL = false) or (n M + pixel) C + c (dense
// channels-last: CL = true); y and dy follow x's layout (dy is copied into y's strides when it
// differs), dx has x's strides.
//
// Blocks are L x R threads (kStnBlock = 256): R rows, a pixel per row, and L lanes along the
// channels (L = 1 planar; channels-last L = the power of two >= C, 32 at most), each lane taking
// the channels c = lane, lane + L, ...:
//  * forward: a row per output pixel (n, i, j); its sample (corners, weights) once, then the
//    channels (the corners inside the image, nw ne sw se).
//  * dx, gathered (no atomics): a row per input pixel (n, p, q); the candidate output pixels of
//    stn_math.h's window, row-major (rows(), then each row's cols()), each decided by weight_at()
//    with the forward's arithmetic; sum w dy in that order, stn_tile() channels per lane (8
//    planar, 4 channels-last) per walk.
//  * dtheta: (1) per block, a chunk of `iters` x R output pixels of one sample (at most
//    kStnMaxSplits blocks per sample, `iters` the fewest that allows it): gix, giy per pixel over
//    the channels (lane partials combined by an xor butterfly of the L lanes), the six sums
//    [gix sx; giy sy] (xb, yb, 1) per row over its pixels in order, then over the rows by a fixed
//    shared-memory tree; (2) per (n, k) the blocks' partials summed in block order (the first
//    kernel writes dtheta itself when a sample has one block).
// The chunking depends on the shape alone, so every sum has one order: results are bitwise the
// same from run to run. 32-bit indexing (stn_check.h keeps every tensor below 2^31 elements).
// Launched on the current stream under a CUDAGuard of x's device; N = 0 or C = 0 launch nothing.
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

#include "layout.h"
#include "stn_check.h"
#include "stn_math.h"

namespace fusedattn {
namespace {

template <typename T>
using acc_t = at::opmath_type<T>;

// (Names carry "stn": tools/cuda_emu compiles every .cu of csrc/cuda/ into one translation unit.)
constexpr int kStnBlock = 256;      // threads per block (L lanes x R rows)
constexpr int kStnMaxSplits = 128;  // most dtheta blocks per sample

// Channels per lane per walk of the dx gather.
template <bool CL>
constexpr int stn_tile() { return CL ? 4 : 8; }

// Offsets of an (N, C, M) tensor: element (n, c, pixel) at base(n, pixel) + c * cstride.
template <bool CL>
struct StnPlanes {
  int C, M;
  __device__ __forceinline__ int base(int n, int pixel) const {
    return CL ? (n * M + pixel) * C : n * C * M + pixel;
  }
  __device__ __forceinline__ int cstride() const { return CL ? 1 : M; }
  __device__ __forceinline__ int pstride() const { return CL ? C : 1; }  // pixel to pixel
};

// The flat row (pixel) index of this thread, and whether it is below `total`.
__device__ __forceinline__ bool stn_row(int total, int& g) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.y + threadIdx.y;
  g = int(r);
  return r < total;
}

// ------------------------------------------------------------------------------------ forward

template <typename T, bool CL>
__global__ void __launch_bounds__(kStnBlock) stn_forward(
    const T* __restrict__ x, const acc_t<T>* __restrict__ theta, T* __restrict__ y, int N, int C,
    int H, int W, int Ho, int Wo, bool align) {
  using A = acc_t<T>;
  const int P = Ho * Wo;
  int g;
  if (!stn_row(N * P, g)) return;
  const int n = int(unsigned(g) / unsigned(P)), pix = g - n * P;
  const int i = int(unsigned(pix) / unsigned(Wo)), j = pix - i * Wo;
  const stn::Map<A> m = stn::make_map<A>(theta + 6 * n, H, W, Ho, Wo, align);
  const stn::Sample<A> s = stn::sample_at(m, i, j);
  const StnPlanes<CL> xs{C, H * W}, ys{C, P};
  T* yp = y + ys.base(n, pix);
  if (s.valid == 0) {  // no corner inside the image (or a non-finite coordinate): zeros
    for (int c = threadIdx.x; c < C; c += blockDim.x) yp[c * ys.cstride()] = T(A(0));
    return;
  }
  const A wx0 = A(1) - s.tx, wx1 = s.tx, wy0 = A(1) - s.ty, wy1 = s.ty;
  const A w[4] = {wx0 * wy0, wx1 * wy0, wx0 * wy1, wx1 * wy1};
  // corner pixel offsets (only those inside the image are read)
  const int c00 = s.y0 * W + s.x0;
  const int off[4] = {c00, c00 + 1, c00 + W, c00 + W + 1};
  const T* xp = x + xs.base(n, 0);
  const int ps = xs.pstride(), cs = xs.cstride();
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    const T* xc = xp + c * cs;
    A v = A(0);
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if ((s.valid >> k) & 1u) v += w[k] * A(xc[off[k] * ps]);
    yp[c * ys.cstride()] = T(v);
  }
}

// ------------------------------------------------------------------------------------ dx

template <typename T, bool CL>
__global__ void __launch_bounds__(kStnBlock) stn_grad_x(
    const T* __restrict__ dy, const acc_t<T>* __restrict__ theta, T* __restrict__ dx, int N, int C,
    int H, int W, int Ho, int Wo, bool align) {
  using A = acc_t<T>;
  constexpr int kTile = stn_tile<CL>();
  const int M = H * W;
  int g;
  if (!stn_row(N * M, g)) return;
  const int n = int(unsigned(g) / unsigned(M)), pix = g - n * M;
  const int p = int(unsigned(pix) / unsigned(W)), q = pix - p * W;
  const stn::Map<A> m = stn::make_map<A>(theta + 6 * n, H, W, Ho, Wo, align);
  const stn::Window<A> win = stn::make_window(m, Ho, Wo);
  const StnPlanes<CL> xs{C, M}, ys{C, Ho * Wo};
  const T* dyn = dy + ys.base(n, 0);
  const int yps = ys.pstride(), ycs = ys.cstride();
  T* dp = dx + xs.base(n, pix);
  const int L = blockDim.x;
  int i_lo = 0, i_hi = -1;
  if (!stn::rows(win, p, q, i_lo, i_hi)) i_hi = i_lo - 1;
  for (int c0 = threadIdx.x; c0 < C; c0 += L * kTile) {
    A acc[kTile];
#pragma unroll
    for (int k = 0; k < kTile; ++k) acc[k] = A(0);
    for (int i = i_lo; i <= i_hi; ++i) {
      int j_lo, j_hi;
      if (!stn::cols(win, p, q, i, j_lo, j_hi)) continue;
      for (int j = j_lo; j <= j_hi; ++j) {
        A w;
        if (!stn::weight_at(m, i, j, p, q, w)) continue;
        const T* d = dyn + (i * Wo + j) * yps + c0 * ycs;
#pragma unroll
        for (int k = 0; k < kTile; ++k)
          if (c0 + k * L < C) acc[k] += w * A(d[k * L * ycs]);
      }
    }
#pragma unroll
    for (int k = 0; k < kTile; ++k)
      if (c0 + k * L < C) dp[(c0 + k * L) * xs.cstride()] = T(acc[k]);
  }
}

// ------------------------------------------------------------------------------------ dtheta

// Block (split b of sample n) -> its six sums at part[(n B + b) 6 + k]; row r takes the pixels
// (b iters + t) R + r, t < iters.
template <typename T, bool CL>
__global__ void __launch_bounds__(kStnBlock) stn_grad_theta_partial(
    const T* __restrict__ dy, const T* __restrict__ x, const acc_t<T>* __restrict__ theta,
    acc_t<T>* __restrict__ part, int C, int H, int W, int Ho, int Wo, bool align, int B,
    int iters) {
  using A = acc_t<T>;
  __shared__ A sh[6][kStnBlock];
  const int L = blockDim.x, R = blockDim.y, r = threadIdx.y, lane = threadIdx.x;
  const int n = int(blockIdx.x / unsigned(B)), b = int(blockIdx.x - unsigned(n) * unsigned(B));
  const int P = Ho * Wo;
  const stn::Map<A> m = stn::make_map<A>(theta + 6 * n, H, W, Ho, Wo, align);
  const StnPlanes<CL> xs{C, H * W}, ys{C, P};
  const T* xn = x + xs.base(n, 0);
  const int xps = xs.pstride(), xcs = xs.cstride(), ycs = ys.cstride();
  A s[6] = {A(0), A(0), A(0), A(0), A(0), A(0)};
  for (int t = 0; t < iters; ++t) {
    const int pix = (b * iters + t) * R + r;  // < P + iters R: no overflow
    const bool ok = pix < P;
    const int i = ok ? int(unsigned(pix) / unsigned(Wo)) : 0, j = ok ? pix - i * Wo : 0;
    A gx = A(0), gy = A(0);
    stn::Sample<A> sm{};
    if (ok) {
      sm = stn::sample_at(m, i, j);
      const int c00 = sm.y0 * W + sm.x0;
      const int off[4] = {c00, c00 + 1, c00 + W, c00 + W + 1};
      const T* g = dy + ys.base(n, pix);
      const A tx = sm.tx, ty = sm.ty;
      for (int c = lane; c < C; c += L) {
        const T* xc = xn + c * xcs;
        A v[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) v[k] = ((sm.valid >> k) & 1u) ? A(xc[off[k] * xps]) : A(0);
        const A gk = A(g[c * ycs]);
        gx += gk * ((v[1] - v[0]) * (A(1) - ty) + (v[3] - v[2]) * ty);
        gy += gk * ((v[2] - v[0]) * (A(1) - tx) + (v[3] - v[1]) * tx);
      }
    }
    // the row's L lanes (aligned, a power of two within a warp): every lane gets the same sum
    for (int o = L >> 1; o > 0; o >>= 1) {
      gx += __shfl_xor_sync(0xffffffffu, gx, o, L);
      gy += __shfl_xor_sync(0xffffffffu, gy, o, L);
    }
    if (ok) {
      const A xb = stn::base_x(m, j), yb = stn::base_y(m, i);
      const A ga = gx * m.sx, gb = gy * m.sy;  // gix, giy of the contract
      s[0] += ga * xb, s[1] += ga * yb, s[2] += ga;
      s[3] += gb * xb, s[4] += gb * yb, s[5] += gb;
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < 6; ++k) sh[k][r] = s[k];
  }
  __syncthreads();
  for (int h = R >> 1; h > 0; h >>= 1) {  // rows r and r + h, r < h: a fixed tree
    if (lane == 0 && r < h) {
#pragma unroll
      for (int k = 0; k < 6; ++k) sh[k][r] += sh[k][r + h];
    }
    __syncthreads();
  }
  const int t = r * L + lane;
  if (t < 6) part[(n * B + b) * 6 + t] = sh[t][0];
}

// dtheta[n, k] = sum over b < B of part[(n B + b) 6 + k], in b order.
template <typename A>
__global__ void __launch_bounds__(kStnBlock) stn_grad_theta_finish(
    const A* __restrict__ part, A* __restrict__ dtheta, int N, int B) {
  const int t = int(blockIdx.x) * kStnBlock + int(threadIdx.x);
  if (t >= N * 6) return;
  const int n = t / 6, k = t - n * 6;
  const A* pp = part + n * B * 6 + k;
  A s = A(0);
  for (int b = 0; b < B; ++b) s += pp[b * 6];
  dtheta[t] = s;
}

// ------------------------------------------------------------------------------------ host side

struct StnGeom {
  int N, C, H, W, Ho, Wo;
  bool cl;
  int L, R;  // lanes along the channels, rows per block
};

inline StnGeom stn_geom(const at::Tensor& x, int64_t Ho, int64_t Wo) {
  StnGeom G{int(x.size(0)), int(x.size(1)), int(x.size(2)), int(x.size(3)), int(Ho), int(Wo),
            layout_of(x) == Layout::kChannelsLast, 1, kStnBlock};
  if (G.cl) {
    while (G.L < 32 && G.L < G.C) G.L *= 2;
    G.R = kStnBlock / G.L;
  }
  return G;
}

inline unsigned stn_blocks(int64_t rows, int R) { return unsigned((rows + R - 1) / R); }

template <typename F>
void stn_with_layout(bool cl, F&& f) {
  if (cl) f(std::true_type{});
  else f(std::false_type{});
}

at::Tensor affine_sample_cuda(const at::Tensor& x, const at::Tensor& theta, int64_t Ho, int64_t Wo,
                              bool align_corners) {
  stn::check_inputs(x, theta, Ho, Wo, "affine_sample");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = stn::empty_output(x, Ho, Wo);
  if (y.numel() == 0) return y;
  const StnGeom G = stn_geom(x, Ho, Wo);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_sample_cuda",
                                  [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const A* tp = theta.const_data_ptr<A>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const unsigned blocks = stn_blocks(int64_t(G.N) * G.Ho * G.Wo, G.R);
    stn_with_layout(G.cl, [&](auto cl) {
      stn_forward<scalar_t, decltype(cl)::value><<<blocks, dim3(G.L, G.R), 0, stream>>>(
          xp, tp, yp, G.N, G.C, G.H, G.W, G.Ho, G.Wo, align_corners);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> affine_sample_backward_cuda(
    const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& theta, bool align_corners,
    bool need_dx, bool need_dtheta) {
  stn::check_inputs(x, theta, 1, 1, "affine_sample_backward");
  stn::check_grad(dy_in, x, "affine_sample_backward");
  const int64_t Ho = dy_in.size(2), Wo = dy_in.size(3);
  stn::check_inputs(x, theta, Ho, Wo, "affine_sample_backward");
  const c10::cuda::CUDAGuard guard(x.device());
  const bool empty = x.size(0) * x.size(1) == 0;
  std::optional<at::Tensor> dx, dtheta;
  if (need_dx) dx = at::empty_like(x);
  if (need_dtheta) dtheta = empty ? at::zeros_like(theta) : at::empty_like(theta);
  if (empty || !(need_dx || need_dtheta)) return {dx, dtheta};
  const at::Tensor dy = in_layout_of(dy_in, stn::empty_output(x, Ho, Wo));
  const StnGeom G = stn_geom(x, Ho, Wo);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // dtheta: groups of R output pixels (a pixel per row), iters groups per block, at most
  // kStnMaxSplits blocks per sample; a function of the shape alone (the sums' order)
  const int64_t groups = (int64_t(G.Ho) * G.Wo + G.R - 1) / G.R;
  const int iters = int((groups + kStnMaxSplits - 1) / kStnMaxSplits);
  const int B = int((groups + iters - 1) / iters);
  at::Tensor part;
  if (need_dtheta && B > 1) part = at::empty({int64_t(G.N) * B * 6}, theta.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "affine_sample_backward_cuda", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const A* tp = theta.const_data_ptr<A>();
    stn_with_layout(G.cl, [&](auto cl) {
      constexpr bool CL = decltype(cl)::value;
      if (need_dx) {
        stn_grad_x<scalar_t, CL><<<stn_blocks(int64_t(G.N) * G.H * G.W, G.R), dim3(G.L, G.R), 0,
                                   stream>>>(gp, tp, dx->mutable_data_ptr<scalar_t>(), G.N, G.C,
                                             G.H, G.W, G.Ho, G.Wo, align_corners);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (need_dtheta) {
        A* out = dtheta->mutable_data_ptr<A>();
        A* pp = B > 1 ? part.mutable_data_ptr<A>() : out;
        stn_grad_theta_partial<scalar_t, CL><<<unsigned(G.N) * unsigned(B), dim3(G.L, G.R), 0,
                                               stream>>>(gp, xp, tp, pp, G.C, G.H, G.W, G.Ho,
                                                         G.Wo, align_corners, B, iters);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (B > 1) {
          stn_grad_theta_finish<A><<<stn_blocks(int64_t(G.N) * 6, kStnBlock), kStnBlock, 0,
                                     stream>>>(pp, out, G.N, B);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
    });
  });
  return {dx, dtheta};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedattn, CUDA, m) {
  m.impl("affine_sample", &affine_sample_cuda);
  m.impl("affine_sample_backward", &affine_sample_backward_cuda);
}

}  // namespace fusedattn
