// The heavy passes of HAM (spec/ham.md) on CPU tensors: everything that touches a full-size
// tensor, for forward and backward. Element (n, c, p) of a tensor in a readable layout lies at
// n sN + c sC + p sP (contiguous: sC = P, sP = 1; channels-last: sC = 1, sP = C). Small tensors
// (indexed by (n, c) or (n, g, p)) are contiguous, in the accumulation type A (fp32; fp64 for
// fp64 input). Groups: g(c) in {0 = important, 1 = sub-important}; size[g] channels each.
//
// Every output element is produced by one thread in a fixed order: results are deterministic.
// Argmax indices are int32 (a pixel index < H W, a channel index < C), half the bytes autograd
// keeps of int64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "ham_check.h"
#include "layout.h"

namespace fusedattn {
namespace {

using namespace ham;

template <typename T>
using acc_t = at::opmath_type<T>;

constexpr int64_t kPixelBlock = 256;  // pixels per task of the channel-pooling passes

// The channel pooling's gradient with respect to f = a x at (n, g, p) for channel c:
// d_avg / size_g + [argmax == c] d_max (a group's max of a masked-out 0 matches no channel of g).
template <typename A>
struct PoolGrad {
  const A* avg;
  const A* max;
  const int32_t* arg;
  A inv[2];
  PoolGrad(const at::Tensor& d_avg, const at::Tensor& d_max, const at::Tensor& argmax,
           int64_t size0, int64_t size1)
      : avg(d_avg.const_data_ptr<A>()), max(d_max.const_data_ptr<A>()),
        arg(argmax.const_data_ptr<int32_t>()),
        inv{A(1) / A(std::max<int64_t>(size0, 1)), A(1) / A(std::max<int64_t>(size1, 1))} {}
  A operator()(int64_t so, int g, int64_t c) const {
    return avg[so] * inv[g] + (arg[so] == c ? max[so] : A(0));
  }
};

// max with the first index that attains it; NaN counts as the largest value (as torch.max).
template <typename A>
inline void take_max(A v, int64_t i, A& best, int64_t& arg) {
  if (v > best || (std::isnan(v) && !std::isnan(best))) { best = v; arg = i; }
}

constexpr int64_t kChannelBlock = 256;  // channels per task of the pixel-reducing passes

// f(c, p, offset) over channels [c0, c1) x pixels [p0, p1) of sample n, in memory order:
// channel-major for contiguous tensors, pixel-major for channels-last. Channel (pixel) indices
// rise within each pixel (channel), so "first index" maxima see them in order either way.
template <typename F>
inline void for_each_cp(const Geom& G, int64_t n, int64_t c0, int64_t c1, int64_t p0, int64_t p1,
                        F&& f) {
  const int64_t base = n * G.sN;
  if (G.sC == 1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t c = c0; c < c1; ++c) f(c, p, base + p * G.sP + c);
  } else {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t p = p0; p < p1; ++p) f(c, p, base + c * G.sC + p);
  }
}

// Tasks of (sample, block of channels) or (sample, block of pixels): count and the block range.
struct Blocks {
  int64_t per_sample, size;
  int64_t count(int64_t N) const { return N * per_sample; }
};
inline Blocks blocks(int64_t extent, int64_t size) { return {(extent + size - 1) / size, size}; }

// ------------------------------------------------------------------------- pass 1: pixel pooling
// mean_c, max_c (first argmax) over the P pixels of every (n, c).
std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_pixels(const at::Tensor& x) {
  check_ham_x(x, "ham_pool_pixels");
  const Geom G = geom(x);
  const auto opts = x.options().dtype(acc_dtype(x));
  at::Tensor mean = at::empty({G.N, G.C}, opts), mx = at::empty({G.N, G.C}, opts);
  at::Tensor arg = at::empty({G.N, G.C}, x.options().dtype(at::kInt));
  if (x.numel() == 0) return {mean.zero_(), mx.zero_(), arg.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ham_pool_pixels", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    A* mp = mean.mutable_data_ptr<A>();
    A* xm = mx.mutable_data_ptr<A>();
    int32_t* ap = arg.mutable_data_ptr<int32_t>();
    const Blocks B = blocks(G.C, kChannelBlock);
    at::parallel_for(0, B.count(G.N), 1, [&](int64_t b, int64_t e) {
      A sum[kChannelBlock], best[kChannelBlock];
      int64_t bi[kChannelBlock];
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / B.per_sample, c0 = (t % B.per_sample) * B.size;
        const int64_t c1 = std::min(G.C, c0 + B.size);
        for (int64_t c = c0; c < c1; ++c) { sum[c - c0] = 0; best[c - c0] = -INFINITY; bi[c - c0] = 0; }
        for_each_cp(G, n, c0, c1, 0, G.P, [&](int64_t c, int64_t p, int64_t o) {
          const A v = A(xp[o]);
          sum[c - c0] += v;
          take_max(v, p, best[c - c0], bi[c - c0]);
        });
        for (int64_t c = c0; c < c1; ++c) {
          mp[n * G.C + c] = sum[c - c0] / A(G.P);
          xm[n * G.C + c] = best[c - c0];
          ap[n * G.C + c] = int32_t(bi[c - c0]);
        }
      }
    });
  });
  return {mean, mx, arg};
}

// ------------------------------------------------------------------------ pass 2: channel pooling
// Per (n, g, p): avg = sum_{c in g} a_c x / size_g; max over all c of (g(c) == g ? a_c x : 0),
// first argmax. Groups with no channels give zeros.
std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_channels(const at::Tensor& x, const at::Tensor& a,
                                                             const at::Tensor& group,
                                                             int64_t size0, int64_t size1) {
  check_ham_x(x, "ham_pool_channels");
  const Geom G = geom(x);
  check_small(a, x, {G.N, G.C}, acc_dtype(x), "ham_pool_channels: a");
  check_small(group, x, {G.N, G.C}, at::kBool, "ham_pool_channels: group");
  const auto opts = x.options().dtype(acc_dtype(x));
  at::Tensor avg = at::zeros({G.N, 2, G.P}, opts), mx = at::zeros({G.N, 2, G.P}, opts);
  at::Tensor arg = at::zeros({G.N, 2, G.P}, x.options().dtype(at::kInt));
  if (x.numel() == 0) return {avg, mx, arg};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ham_pool_channels", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const A* ap = a.const_data_ptr<A>();
    const bool* gp = group.const_data_ptr<bool>();
    A* avp = avg.mutable_data_ptr<A>();
    A* mxp = mx.mutable_data_ptr<A>();
    int32_t* agp = arg.mutable_data_ptr<int32_t>();
    const A inv0 = size0 ? A(1) / A(size0) : A(0), inv1 = size1 ? A(1) / A(size1) : A(0);
    const Blocks B = blocks(G.P, kPixelBlock);
    at::parallel_for(0, B.count(G.N), 1, [&](int64_t b, int64_t e) {
      A sum[2][kPixelBlock], best[2][kPixelBlock];
      int64_t bi[2][kPixelBlock];
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / B.per_sample, p0 = (t % B.per_sample) * B.size;
        const int64_t np = std::min(B.size, G.P - p0);
        for (int g = 0; g < 2; ++g)
          for (int64_t j = 0; j < np; ++j) { sum[g][j] = 0; best[g][j] = -INFINITY; bi[g][j] = 0; }
        for_each_cp(G, n, 0, G.C, p0, p0 + np, [&](int64_t c, int64_t p, int64_t o) {
          const int gc = gp[n * G.C + c] ? 1 : 0;
          const int64_t j = p - p0;
          const A f = ap[n * G.C + c] * A(xp[o]);
          sum[gc][j] += f;
          take_max(f, c, best[gc][j], bi[gc][j]);
          take_max(A(0), c, best[1 - gc][j], bi[1 - gc][j]);  // masked-out channels count as 0
        });
        for (int g = 0; g < 2; ++g) {
          const A invg = g ? inv1 : inv0;
          const bool empty = (g ? size1 : size0) == 0;
          for (int64_t j = 0; j < np; ++j) {
            const int64_t o = (n * 2 + g) * G.P + p0 + j;
            avp[o] = sum[g][j] * invg;
            mxp[o] = empty ? A(0) : best[g][j];
            agp[o] = empty ? 0 : int32_t(bi[g][j]);
          }
        }
      }
    });
  });
  return {avg, mx, arg};
}

// ----------------------------------------------------------------------------- pass 3: the gate
// y = s[n, g(c), p] a_c x.
at::Tensor gate(const at::Tensor& x, const at::Tensor& a, const at::Tensor& s, const at::Tensor& group) {
  check_ham_x(x, "ham_gate");
  const Geom G = geom(x);
  check_small(a, x, {G.N, G.C}, acc_dtype(x), "ham_gate: a");
  check_small(s, x, {G.N, 2, G.P}, acc_dtype(x), "ham_gate: s");
  check_small(group, x, {G.N, G.C}, at::kBool, "ham_gate: group");
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ham_gate", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const A* ap = a.const_data_ptr<A>();
    const A* sp = s.const_data_ptr<A>();
    const bool* gp = group.const_data_ptr<bool>();
    const Blocks B = blocks(G.C, kChannelBlock);
    at::parallel_for(0, B.count(G.N), 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / B.per_sample, c0 = (t % B.per_sample) * B.size;
        const A* s0 = sp + n * 2 * G.P;
        for_each_cp(G, n, c0, std::min(G.C, c0 + B.size), 0, G.P, [&](int64_t c, int64_t p, int64_t o) {
          const int64_t q = n * G.C + c;
          yp[o] = scalar_t(s0[(gp[q] ? G.P : 0) + p] * ap[q] * A(xp[o]));
        });
      }
    });
  });
  return y;
}

// ------------------------------------------------------------------------------- backward passes
// ds[n, g, p] = sum_{c in g} dy a_c x.
at::Tensor gate_grad_s(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& a,
                       const at::Tensor& group) {
  check_ham_x(x, "ham_gate_grad_s");
  const Geom G = geom(x);
  check_like_x(dy, x, "ham_gate_grad_s");
  check_small(a, x, {G.N, G.C}, acc_dtype(x), "ham_gate_grad_s: a");
  check_small(group, x, {G.N, G.C}, at::kBool, "ham_gate_grad_s: group");
  at::Tensor ds = at::zeros({G.N, 2, G.P}, x.options().dtype(acc_dtype(x)));
  if (x.numel() == 0) return ds;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ham_gate_grad_s", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dp = dy.const_data_ptr<scalar_t>();
    const A* ap = a.const_data_ptr<A>();
    const bool* gp = group.const_data_ptr<bool>();
    A* out = ds.mutable_data_ptr<A>();
    const Blocks B = blocks(G.P, kPixelBlock);
    at::parallel_for(0, B.count(G.N), 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / B.per_sample, p0 = (t % B.per_sample) * B.size;
        const int64_t p1 = std::min(G.P, p0 + B.size);
        A* o0 = out + n * 2 * G.P;  // zero-initialised; this task owns pixels [p0, p1)
        for_each_cp(G, n, 0, G.C, p0, p1, [&](int64_t c, int64_t p, int64_t o) {
          const int64_t q = n * G.C + c;
          o0[(gp[q] ? G.P : 0) + p] += A(dp[o]) * ap[q] * A(xp[o]);
        });
      }
    });
  });
  return ds;
}

// da[n, c] = sum_p x (dy s_{g(c)} + d_avg_{g(c)} / size + [argmax_{g(c)} == c] d_max_{g(c)}):
// the gate's and the channel pooling's gradient with respect to a, in one pass over x and dy.
at::Tensor grad_a(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& s,
                  const at::Tensor& group, const at::Tensor& d_avg, const at::Tensor& d_max,
                  const at::Tensor& argmax, int64_t size0, int64_t size1) {
  check_ham_x(x, "ham_grad_a");
  const Geom G = geom(x);
  check_like_x(dy, x, "ham_grad_a");
  check_small(s, x, {G.N, 2, G.P}, acc_dtype(x), "ham_grad_a: s");
  check_pool_grads(x, group, d_avg, d_max, argmax, "ham_grad_a");
  at::Tensor da = at::zeros({G.N, G.C}, x.options().dtype(acc_dtype(x)));
  if (x.numel() == 0) return da;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ham_grad_a", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dp = dy.const_data_ptr<scalar_t>();
    const A* sp = s.const_data_ptr<A>();
    const bool* gp = group.const_data_ptr<bool>();
    const PoolGrad<A> pool(d_avg, d_max, argmax, size0, size1);
    A* out = da.mutable_data_ptr<A>();
    const Blocks B = blocks(G.C, kChannelBlock);
    at::parallel_for(0, B.count(G.N), 1, [&](int64_t b, int64_t e) {
      A acc[kChannelBlock];
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / B.per_sample, c0 = (t % B.per_sample) * B.size;
        const int64_t c1 = std::min(G.C, c0 + B.size);
        for (int64_t c = c0; c < c1; ++c) acc[c - c0] = 0;
        for_each_cp(G, n, c0, c1, 0, G.P, [&](int64_t c, int64_t p, int64_t o) {
          const int g = gp[n * G.C + c] ? 1 : 0;
          const int64_t so = (n * 2 + g) * G.P + p;
          acc[c - c0] += A(xp[o]) * (A(dp[o]) * sp[so] + pool(so, g, c));
        });
        for (int64_t c = c0; c < c1; ++c) out[n * G.C + c] = acc[c - c0];
      }
    });
  });
  return da;
}

// dx = dy s a + a (d_avg / size + [argmax_g == c] d_max) + d_mean_c / P + [p == argmax_c] d_max_c.
at::Tensor grad_x(const at::Tensor& dy, const at::Tensor& a, const at::Tensor& s,
                  const at::Tensor& group, const at::Tensor& d_avg, const at::Tensor& d_max,
                  const at::Tensor& argmax, int64_t size0, int64_t size1,
                  const at::Tensor& d_mean_c, const at::Tensor& d_max_c, const at::Tensor& argmax_c) {
  check_ham_x(dy, "ham_grad_x");
  const Geom G = geom(dy);
  check_small(a, dy, {G.N, G.C}, acc_dtype(dy), "ham_grad_x: a");
  check_small(s, dy, {G.N, 2, G.P}, acc_dtype(dy), "ham_grad_x: s");
  check_pool_grads(dy, group, d_avg, d_max, argmax, "ham_grad_x");
  check_small(d_mean_c, dy, {G.N, G.C}, acc_dtype(dy), "ham_grad_x: d_mean_c");
  check_small(d_max_c, dy, {G.N, G.C}, acc_dtype(dy), "ham_grad_x: d_max_c");
  check_small(argmax_c, dy, {G.N, G.C}, at::kInt, "ham_grad_x: argmax_c");
  at::Tensor dx = at::empty_like(dy);
  if (dy.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "ham_grad_x", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* dp = dy.const_data_ptr<scalar_t>();
    scalar_t* xp = dx.mutable_data_ptr<scalar_t>();
    const A* ap = a.const_data_ptr<A>();
    const A* sp = s.const_data_ptr<A>();
    const bool* gp = group.const_data_ptr<bool>();
    const PoolGrad<A> pool(d_avg, d_max, argmax, size0, size1);
    const A* dmc = d_mean_c.const_data_ptr<A>();
    const A* dxc = d_max_c.const_data_ptr<A>();
    const int32_t* axc = argmax_c.const_data_ptr<int32_t>();
    const A invP = A(1) / A(G.P);
    const Blocks B = blocks(G.C, kChannelBlock);
    at::parallel_for(0, B.count(G.N), 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / B.per_sample, c0 = (t % B.per_sample) * B.size;
        for_each_cp(G, n, c0, std::min(G.C, c0 + B.size), 0, G.P, [&](int64_t c, int64_t p, int64_t o) {
          const int64_t q = n * G.C + c;
          const int g = gp[q] ? 1 : 0;
          const int64_t so = (n * 2 + g) * G.P + p;
          const A ac = ap[q];
          A v = A(dp[o]) * sp[so] * ac + ac * pool(so, g, c) + dmc[q] * invP;
          if (p == axc[q]) v += dxc[q];
          xp[o] = scalar_t(v);
        });
      }
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedattn, CPU, m) {
  m.impl("ham_pool_pixels", &pool_pixels);
  m.impl("ham_pool_channels", &pool_channels);
  m.impl("ham_gate", &gate);
  m.impl("ham_gate_grad_s", &gate_grad_s);
  m.impl("ham_grad_a", &grad_a);
  m.impl("ham_grad_x", &grad_x);
}

}  // namespace fusedattn
