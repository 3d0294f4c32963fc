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

#include "layout.h"

namespace fusedattn {
namespace {

template <typename T>
using acc_t = at::opmath_type<T>;

constexpr int64_t kPixelBlock = 256;  // pixels per task of the channel-pooling passes

struct Geom {
  int64_t N, C, P, sN, sC, sP;
};

Geom geom(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  if (layout_of(x) == Layout::kChannelsLast) return {N, C, P, P * C, 1, C};
  return {N, C, P, C * P, P, 1};
}

void check_ham_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() != 4 || (x.size(1) < INT32_MAX && x.size(2) * x.size(3) < INT32_MAX), op,
              ": C and H W must fit int32 argmax indices, got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": expected a floating-point tensor, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 4, op, ": expected (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(layout_of(x) != Layout::kOther, op,
              ": expected a contiguous or channels_last tensor (the Python op makes it so)");
}

void check_small(const at::Tensor& t, const at::Tensor& x, std::initializer_list<int64_t> shape,
                 at::ScalarType dtype, const char* what) {
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape) && t.scalar_type() == dtype && t.is_contiguous()
                  && t.device() == x.device(),
              what, ": expected a contiguous ", dtype, " tensor of shape ", at::IntArrayRef(shape),
              ", got ", t.scalar_type(), " ", t.sizes());
}

at::ScalarType acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// max with the first index that attains it; NaN counts as the largest value (as torch.max).
template <typename A>
inline void take_max(A v, int64_t i, A& best, int64_t& arg) {
  if (v > best || (std::isnan(v) && !std::isnan(best))) { best = v; arg = i; }
}

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
    at::parallel_for(0, G.N * G.C, std::max<int64_t>(1, 16384 / G.P), [&](int64_t b, int64_t e) {
      for (int64_t q = b; q < e; ++q) {
        const scalar_t* pl = xp + (q / G.C) * G.sN + (q % G.C) * G.sC;
        A s = 0, best = A(pl[0]);
        int64_t bi = 0;
        for (int64_t p = 0; p < G.P; ++p) {
          const A v = A(pl[p * G.sP]);
          s += v;
          take_max(v, p, best, bi);
        }
        mp[q] = s / A(G.P);
        xm[q] = best;
        ap[q] = int32_t(bi);
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
    const int64_t blocks = (G.P + kPixelBlock - 1) / kPixelBlock;
    at::parallel_for(0, G.N * blocks, 1, [&](int64_t b, int64_t e) {
      A sum[2][kPixelBlock], best[2][kPixelBlock];
      int64_t bi[2][kPixelBlock];
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / blocks, p0 = (t % blocks) * kPixelBlock;
        const int64_t np = std::min(kPixelBlock, G.P - p0);
        for (int g = 0; g < 2; ++g)
          for (int64_t j = 0; j < np; ++j) { sum[g][j] = 0; best[g][j] = -INFINITY; bi[g][j] = 0; }
        for (int64_t c = 0; c < G.C; ++c) {  // channel order: first argmax wins ties
          const A ac = ap[n * G.C + c];
          const int gc = gp[n * G.C + c] ? 1 : 0;
          const scalar_t* row = xp + n * G.sN + c * G.sC + p0 * G.sP;
          for (int64_t j = 0; j < np; ++j) {
            const A f = ac * A(row[j * G.sP]);
            sum[gc][j] += f;
            take_max(f, c, best[gc][j], bi[gc][j]);
            take_max(A(0), c, best[1 - gc][j], bi[1 - gc][j]);
          }
        }
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
    at::parallel_for(0, G.N * G.C, std::max<int64_t>(1, 16384 / G.P), [&](int64_t b, int64_t e) {
      for (int64_t q = b; q < e; ++q) {
        const int64_t n = q / G.C, c = q % G.C, o = n * G.sN + c * G.sC;
        const A ac = ap[q];
        const A* sg = sp + (n * 2 + (gp[q] ? 1 : 0)) * G.P;
        for (int64_t p = 0; p < G.P; ++p)
          yp[o + p * G.sP] = scalar_t(sg[p] * ac * A(xp[o + p * G.sP]));
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
  TORCH_CHECK(dy.strides() == x.strides() && dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(),
              "ham_gate_grad_s: dy must have x's shape, dtype and strides");
  at::Tensor ds = at::zeros({G.N, 2, G.P}, x.options().dtype(acc_dtype(x)));
  if (x.numel() == 0) return ds;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ham_gate_grad_s", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dp = dy.const_data_ptr<scalar_t>();
    const A* ap = a.const_data_ptr<A>();
    const bool* gp = group.const_data_ptr<bool>();
    A* out = ds.mutable_data_ptr<A>();
    const int64_t blocks = (G.P + kPixelBlock - 1) / kPixelBlock;
    at::parallel_for(0, G.N * blocks, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t n = t / blocks, p0 = (t % blocks) * kPixelBlock;
        const int64_t np = std::min(kPixelBlock, G.P - p0);
        A* o0 = out + (n * 2) * G.P + p0;
        A* o1 = out + (n * 2 + 1) * G.P + p0;
        for (int64_t c = 0; c < G.C; ++c) {
          const A ac = ap[n * G.C + c];
          A* o = gp[n * G.C + c] ? o1 : o0;
          const int64_t base = n * G.sN + c * G.sC + p0 * G.sP;
          for (int64_t j = 0; j < np; ++j)
            o[j] += A(dp[base + j * G.sP]) * ac * A(xp[base + j * G.sP]);
        }
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
  at::Tensor da = at::zeros({G.N, G.C}, x.options().dtype(acc_dtype(x)));
  if (x.numel() == 0) return da;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ham_grad_a", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* dp = dy.const_data_ptr<scalar_t>();
    const A* sp = s.const_data_ptr<A>();
    const bool* gp = group.const_data_ptr<bool>();
    const A* avp = d_avg.const_data_ptr<A>();
    const A* mxp = d_max.const_data_ptr<A>();
    const int32_t* agp = argmax.const_data_ptr<int32_t>();
    A* out = da.mutable_data_ptr<A>();
    at::parallel_for(0, G.N * G.C, std::max<int64_t>(1, 8192 / G.P), [&](int64_t b, int64_t e) {
      for (int64_t q = b; q < e; ++q) {
        const int64_t n = q / G.C, c = q % G.C, o = n * G.sN + c * G.sC;
        const int g = gp[q] ? 1 : 0;
        const A invg = A(1) / A(std::max<int64_t>(g ? size1 : size0, 1));
        const int64_t so = (n * 2 + g) * G.P;
        A acc = 0;
        for (int64_t p = 0; p < G.P; ++p) {
          const A pool = avp[so + p] * invg + (agp[so + p] == c ? mxp[so + p] : A(0));
          acc += A(xp[o + p * G.sP]) * (A(dp[o + p * G.sP]) * sp[so + p] + pool);
        }
        out[q] = acc;
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
  TORCH_CHECK(dy.dim() == 4 && layout_of(dy) != Layout::kOther, "ham_grad_x: dy must be readable");
  const Geom G = geom(dy);
  at::Tensor dx = at::empty_like(dy);
  if (dy.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "ham_grad_x", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* dp = dy.const_data_ptr<scalar_t>();
    scalar_t* xp = dx.mutable_data_ptr<scalar_t>();
    const A* ap = a.const_data_ptr<A>();
    const A* sp = s.const_data_ptr<A>();
    const bool* gp = group.const_data_ptr<bool>();
    const A* avp = d_avg.const_data_ptr<A>();
    const A* mxp = d_max.const_data_ptr<A>();
    const int32_t* agp = argmax.const_data_ptr<int32_t>();
    const A* dmc = d_mean_c.const_data_ptr<A>();
    const A* dxc = d_max_c.const_data_ptr<A>();
    const int32_t* axc = argmax_c.const_data_ptr<int32_t>();
    at::parallel_for(0, G.N * G.C, std::max<int64_t>(1, 16384 / G.P), [&](int64_t b, int64_t e) {
      for (int64_t q = b; q < e; ++q) {
        const int64_t n = q / G.C, c = q % G.C, o = n * G.sN + c * G.sC;
        const int g = gp[q] ? 1 : 0;
        const A ac = ap[q], invg = A(1) / A(std::max<int64_t>(g ? size1 : size0, 1));
        const A base = dmc[q] / A(G.P);
        const int64_t so = (n * 2 + g) * G.P;
        for (int64_t p = 0; p < G.P; ++p) {
          const A pool = avp[so + p] * invg + (agp[so + p] == c ? mxp[so + p] : A(0));
          A v = A(dp[o + p * G.sP]) * sp[so + p] * ac + ac * pool + base;
          if (p == axc[q]) v += dxc[q];
          xp[o + p * G.sP] = scalar_t(v);
        }
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
