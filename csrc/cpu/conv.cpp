// Small same-padded convolutions on CPU (HAM's 7x7 spatial conv: 2 -> 1 channels, and its input
// gradient 1 -> 2 with the flipped kernel). Stride 1, odd k, zero padding k / 2, no bias:
//
//   y[n, o, r, q]  = sum_{i, u, v} w[o, i, u, v] x[n, i, r + u - k/2, q + v - k/2]
//   dw[o, i, u, v] = sum_{n, r, q} dy[n, o, r, q] x[n, i, r + u - k/2, q + v - k/2]
//
// oneDNN is slow for maps this thin (a few channels). Here the input planes of a sample are
// zero-padded once, and each kLanes-wide chunk of output accumulates every tap in registers
// (vectorised by the compiler, AVX-512/AVX2 clones); a task is a sample. The weight gradient
// keeps one lane accumulator per tap over a sample's plane, then sums samples in double, in a
// fixed order: results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace fusedattn {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FA_CLONES
#endif

struct ConvGeom {
  int64_t N, I, O, H, W, k;
};

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), op, ": expected CPU tensors");
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, op,
              ": expected float32 or float64, got ", a.scalar_type());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": both tensors must share a dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.dim() == 4 && b.dim() == 4, op, ": expected 4-d tensors, got ", a.sizes(), " and ",
              b.sizes());
}

constexpr int64_t kLanes = 16;  // output columns per register accumulator

// kLanes values in registers (GCC vector extension: zmm in the AVX-512 clone, split elsewhere).
template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float type __attribute__((vector_size(kLanes * sizeof(float))));
};
template <>
struct Lanes<double> {
  typedef double type __attribute__((vector_size(kLanes * sizeof(double))));
};

// acc += w * p[0:kLanes] and acc += a[0:kLanes] * b[0:kLanes] (unaligned loads; vectors pass by
// reference, which keeps the ABI the same in every clone).
template <typename T>
inline __attribute__((always_inline)) void madd(typename Lanes<T>::type& acc, T w, const T* p) {
  typename Lanes<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  acc += w * v;
}

template <typename T>
inline __attribute__((always_inline)) void madd(typename Lanes<T>::type& acc, const T* a,
                                                const T* b) {
  typename Lanes<T>::type va, vb;
  std::memcpy(&va, a, sizeof(va));
  std::memcpy(&vb, b, sizeof(vb));
  acc += va * vb;
}

// The I planes of sample n, zero-padded by h = k / 2 on every side and by kLanes columns on the
// right, so that every tap of a kLanes-wide column chunk reads in bounds: row pitch Wp.
struct Padded {
  int64_t Hp, Wp;
  static Padded of(const ConvGeom& G) {
    const int64_t h = G.k / 2;
    return {G.H + 2 * h, G.W + 2 * h + kLanes};
  }
  int64_t plane() const { return Hp * Wp; }
};

template <typename T>
inline void pad_planes(const T* __restrict__ x, int64_t planes, const ConvGeom& G, const Padded& P,
                       T* __restrict__ buf) {
  const int64_t h = G.k / 2;
  std::fill(buf, buf + planes * P.plane(), T(0));
  for (int64_t i = 0; i < planes; ++i)
    for (int64_t r = 0; r < G.H; ++r)
      std::copy(x + (i * G.H + r) * G.W, x + (i * G.H + r + 1) * G.W,
                buf + i * P.plane() + (r + h) * P.Wp + h);
}

// Sample n: y[n, o] for every o, a kLanes-wide chunk of a row at a time, accumulated in
// registers over all taps (one load and one multiply-add per tap and lane).
template <typename T>
inline void conv_sample(const T* x, const T* w, T* y, const ConvGeom& G, int64_t n,
                        T* __restrict__ buf) {
  const Padded P = Padded::of(G);
  const int64_t k = G.k;
  pad_planes(x + n * G.I * G.H * G.W, G.I, G, P, buf);
  for (int64_t o = 0; o < G.O; ++o)
    for (int64_t r = 0; r < G.H; ++r)
      for (int64_t q0 = 0; q0 < G.W; q0 += kLanes) {
        typename Lanes<T>::type acc = {};
        for (int64_t i = 0; i < G.I; ++i)
          for (int64_t u = 0; u < k; ++u) {
            const T* row = buf + i * P.plane() + (r + u) * P.Wp + q0;
            const T* wt = w + ((o * G.I + i) * k + u) * k;
            for (int64_t v = 0; v < k; ++v) madd<T>(acc, wt[v], row + v);
          }
        T lanes[kLanes];
        std::memcpy(lanes, &acc, sizeof(acc));
        std::copy(lanes, lanes + std::min(kLanes, G.W - q0), y + ((n * G.O + o) * G.H + r) * G.W + q0);
      }
}

// dw[o, i, u, v] over v for one (o, i, u): each tap's lanes run over every row and column chunk of
// every sample (dy's chunks zero beyond W), summed per sample in the element type and across
// samples in double.
template <typename T>
inline void weight_grad_taps(const T* dy, const T* x, double* out, const ConvGeom& G, int64_t o,
                             int64_t i, int64_t u, T* __restrict__ buf, T* __restrict__ dpad) {
  const Padded P = Padded::of(G);
  const int64_t k = G.k, chunks = (G.W + kLanes - 1) / kLanes, pitch = chunks * kLanes;
  for (int64_t v = 0; v < k; ++v) out[v] = 0;
  for (int64_t n = 0; n < G.N; ++n) {
    pad_planes(x + (n * G.I + i) * G.H * G.W, 1, G, P, buf);
    const T* d = dy + (n * G.O + o) * G.H * G.W;
    std::fill(dpad, dpad + G.H * pitch, T(0));
    for (int64_t r = 0; r < G.H; ++r) std::copy(d + r * G.W, d + (r + 1) * G.W, dpad + r * pitch);
    for (int64_t v = 0; v < k; ++v) {
      typename Lanes<T>::type acc = {};
      for (int64_t r = 0; r < G.H; ++r) {
        const T* row = buf + (r + u) * P.Wp + v;
        const T* dr = dpad + r * pitch;
        for (int64_t q0 = 0; q0 < pitch; q0 += kLanes)
          madd<T>(acc, dr + q0, row + q0);
      }
      T sum = 0;
      for (int l = 0; l < kLanes; ++l) sum += acc[l];
      out[v] += double(sum);
    }
  }
}

#define FA_CONV(T)                                                                             \
  FA_CLONES void conv_samples(const T* x, const T* w, T* y, const ConvGeom& G, int64_t t0,     \
                              int64_t t1) {                                                    \
    std::vector<T> buf(G.I * Padded::of(G).plane());                                          \
    for (int64_t n = t0; n < t1; ++n) conv_sample(x, w, y, G, n, buf.data());                  \
  }                                                                                            \
  FA_CLONES void weight_grad_rows(const T* dy, const T* x, double* out, const ConvGeom& G,     \
                                  int64_t t0, int64_t t1) {                                    \
    std::vector<T> buf(Padded::of(G).plane());                                                 \
    std::vector<T> dpad(G.H * ((G.W + kLanes - 1) / kLanes) * kLanes);                         \
    for (int64_t t = t0; t < t1; ++t) {                                                        \
      const int64_t u = t % G.k, i = (t / G.k) % G.I, o = t / (G.k * G.I);                     \
      weight_grad_taps(dy, x, out + t * G.k, G, o, i, u, buf.data(), dpad.data());             \
    }                                                                                          \
  }
FA_CONV(float)
FA_CONV(double)
#undef FA_CONV

at::Tensor same_conv2d(const at::Tensor& x_in, const at::Tensor& w_in) {
  check_pair(x_in, w_in, "same_conv2d");
  TORCH_CHECK(w_in.size(1) == x_in.size(1) && w_in.size(2) == w_in.size(3) && w_in.size(2) % 2 == 1,
              "same_conv2d: expected x (N, I, H, W) and w (O, I, k, k) with odd k, got ",
              x_in.sizes(), " and ", w_in.sizes());
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const ConvGeom G{x.size(0), x.size(1), w.size(0), x.size(2), x.size(3), w.size(2)};
  at::Tensor y = at::empty({G.N, G.O, G.H, G.W}, x.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "same_conv2d", [&] {
    at::parallel_for(0, G.N, 1, [&](int64_t b, int64_t e) {
      conv_samples(x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                   y.mutable_data_ptr<scalar_t>(), G, b, e);
    });
  });
  return y;
}

at::Tensor same_conv2d_weight_grad(const at::Tensor& dy_in, const at::Tensor& x_in, int64_t k) {
  TORCH_CHECK(k > 0 && k % 2 == 1, "same_conv2d_weight_grad: k must be odd and positive, got ", k);
  check_pair(dy_in, x_in, "same_conv2d_weight_grad");
  TORCH_CHECK(dy_in.size(0) == x_in.size(0) && dy_in.size(2) == x_in.size(2) &&
                  dy_in.size(3) == x_in.size(3),
              "same_conv2d_weight_grad: dy (N, O, H, W) and x (N, I, H, W) must agree, got ",
              dy_in.sizes(), " and ", x_in.sizes());
  const at::Tensor dy = dy_in.contiguous(), x = x_in.contiguous();
  const ConvGeom G{x.size(0), x.size(1), dy.size(1), x.size(2), x.size(3), k};
  at::Tensor out = at::zeros({G.O, G.I, k, k}, x.options().dtype(at::kDouble));
  if (x.numel() == 0 || dy.numel() == 0) return out.to(x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "same_conv2d_weight_grad", [&] {
    at::parallel_for(0, G.O * G.I * k, 1, [&](int64_t b, int64_t e) {
      weight_grad_rows(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                       out.mutable_data_ptr<double>(), G, b, e);
    });
  });
  return out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedattn, CPU, m) {
  m.impl("same_conv2d", &same_conv2d);
  m.impl("same_conv2d_weight_grad", &same_conv2d_weight_grad);
}

}  // namespace fusedattn
