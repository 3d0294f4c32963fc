// Affine sampling of the spatial transformer on CPU tensors (fusedattn/ops/stn.py states the
// contract; csrc/stn_math.h the coordinate math, shared with the CUDA kernels).
//
// Every pass is split into tasks (n, block of rows) fixed by the shape alone, each computing all
// channels of its rows, so every result has one summation order whatever the thread count:
//  * forward, per task of output rows: the four corners' offsets, validity and weights of each
//    pixel are computed once (a table), then applied to every channel (planar: channel by
//    channel, vectorised along the pixels; channels-last: pixel by pixel along the channels).
//  * backward, per task of input rows (a band of one sample): one pass over the output rows that
//    reach the band computes both gradients (see backward_tasks): dx by adding w dy into the
//    band's own accumulators in row-major output order -- the sums, in the order, of a gather per
//    input pixel (the GPU kernels gather) -- and dtheta from the corners the band owns, as six
//    sums per task added in band order per sample. No other task writes the band: no atomics.
// Accumulation in float (double for double). The task functions are compiled as x86-64-v4 / v3 /
// baseline clones (picked at load time); a clone's results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "layout.h"
#include "stn_check.h"
#include "stn_math.h"

namespace fusedattn {
namespace {

using namespace stn;

template <typename T>
using acc_t = at::opmath_type<T>;

constexpr int64_t kBlockPixels = 1024;  // pixels per task (whole rows, at least one)
constexpr int64_t kBandElems = 1 << 16;  // accumulators (pixels x channels) of a backward task
constexpr int kLanes = 16;              // lanes of the channels-last channel sums

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FA_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FA_CLONES
#endif
#define FA_INLINE inline __attribute__((always_inline))

struct Geom {
  int64_t N, C, H, W, Ho, Wo;
  bool cl;  // channels-last (else planar)
  bool align;
};

// Rows per task for rows of `width` pixels, and the number of such tasks over `height` rows.
inline int64_t block_rows(int64_t width) { return std::max<int64_t>(1, kBlockPixels / width); }
inline int64_t row_blocks(int64_t height, int64_t width) {
  const int64_t r = block_rows(width);
  return (height + r - 1) / r;
}

// The bilinear table of one task's output pixels: per corner a valid offset (clamped into the
// plane; `m` says whether the corner is inside the image) and its weight.
template <typename A>
struct Table {
  std::vector<int32_t> off[4];
  std::vector<int32_t> m[4];  // 1: the corner is inside the image
  std::vector<A> w[4];
  std::vector<A> tx, ty;

  void resize(int64_t n) {
    for (int k = 0; k < 4; ++k) off[k].resize(n), m[k].resize(n), w[k].resize(n);
    tx.resize(n), ty.resize(n);
  }
};

// One output row's samples, corner by corner (branch-free, so that it vectorises); the same
// arithmetic as stn_math.h's sample_at.
template <typename A>
FA_INLINE void fill_row(const Map<A>& mp, int64_t i, int64_t Wo, Table<A>& t, int64_t k0) {
  const int W = mp.W, H = mp.H;
  int32_t* o0 = t.off[0].data() + k0; int32_t* o1 = t.off[1].data() + k0;
  int32_t* o2 = t.off[2].data() + k0; int32_t* o3 = t.off[3].data() + k0;
  int32_t* m0 = t.m[0].data() + k0; int32_t* m1 = t.m[1].data() + k0;
  int32_t* m2 = t.m[2].data() + k0; int32_t* m3 = t.m[3].data() + k0;
  A* w0 = t.w[0].data() + k0; A* w1 = t.w[1].data() + k0;
  A* w2 = t.w[2].data() + k0; A* w3 = t.w[3].data() + k0;
  A* txs = t.tx.data() + k0; A* tys = t.ty.data() + k0;
#pragma omp simd
  for (int64_t j = 0; j < Wo; ++j) {
    A ix, iy;
    coords(mp, int(i), int(j), ix, iy);
    // stn_math.h's corner() and sample_at() in select form: x0 in [0, W-1] / [-1, W-2] for the
    // first / second corner column (false for NaN), the floor clamped before the int conversion
    const A fx = std::floor(ix), fy = std::floor(iy);
    const bool x0in = (fx >= A(0)) & (fx <= A(W - 1)), x1in = (fx >= A(-1)) & (fx <= A(W - 2));
    const bool y0in = (fy >= A(0)) & (fy <= A(H - 1)), y1in = (fy >= A(-1)) & (fy <= A(H - 2));
    const bool a = x0in & y0in, b = x1in & y0in, c = x0in & y1in, d = x1in & y1in;
    const bool any = a | b | c | d;
    const A cx = fx > A(-1) ? (fx < A(W - 1) ? fx : A(W - 1)) : A(-1);
    const A cy = fy > A(-1) ? (fy < A(H - 1) ? fy : A(H - 1)) : A(-1);
    const int32_t base = int32_t(cy) * W + int32_t(cx);
    o0[j] = a ? base : 0, o1[j] = b ? base + 1 : 0;
    o2[j] = c ? base + W : 0, o3[j] = d ? base + W + 1 : 0;
    m0[j] = a, m1[j] = b, m2[j] = c, m3[j] = d;
    // a corner outside: weight 0 (its value reads as 0); no corner inside (far outside, inf,
    // NaN): fractions 0, so nothing reaches dtheta either
    const A tx = any ? ix - fx : A(0), ty = any ? iy - fy : A(0);
    w0[j] = a ? (A(1) - tx) * (A(1) - ty) : A(0), w1[j] = b ? tx * (A(1) - ty) : A(0);
    w2[j] = c ? (A(1) - tx) * ty : A(0), w3[j] = d ? tx * ty : A(0);
    txs[j] = tx, tys[j] = ty;
  }
}

template <typename A>
FA_INLINE void fill_table(const Map<A>& mp, int64_t i0, int64_t i1, int64_t Wo, Table<A>& t) {
  t.resize((i1 - i0) * Wo);
  for (int64_t i = i0; i < i1; ++i) fill_row(mp, i, Wo, t, (i - i0) * Wo);
}

// Raw pointers into a table, for the vectorised loops.
template <typename A>
struct TableView {
  const int32_t *o0, *o1, *o2, *o3, *m0, *m1, *m2, *m3;
  const A *w0, *w1, *w2, *w3, *tx, *ty;
  explicit TableView(const Table<A>& t)
      : o0(t.off[0].data()), o1(t.off[1].data()), o2(t.off[2].data()), o3(t.off[3].data()),
        m0(t.m[0].data()), m1(t.m[1].data()), m2(t.m[2].data()), m3(t.m[3].data()),
        w0(t.w[0].data()), w1(t.w[1].data()), w2(t.w[2].data()), w3(t.w[3].data()),
        tx(t.tx.data()), ty(t.ty.data()) {}
};

// x at a corner (read at a valid offset), 0 outside the image
template <typename T, typename A>
FA_INLINE A at_corner(const T* plane, const int32_t* off, const int32_t* m, int64_t k,
                      int32_t stride = 1) {
  const A v = A(plane[off[k] * stride]);  // 32-bit indices (tensors < 2^31 elements): the
                                          // vector gathers take 16 of them at once
  return m[k] ? v : A(0);
}

// ----------------------------------------------------------------------------- forward

// One channel of a task's output pixels; pixels kS (1: planar) or s (channels-last) apart.
template <typename T, int kS, typename A>
FA_INLINE void forward_channel(const TableView<A>& v, const T* xp, T* yp, int64_t K, int64_t s) {
  const int32_t st = int32_t(kS ? kS : s);
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) {
    A r = v.w0[k] * at_corner<T, A>(xp, v.o0, v.m0, k, st);
    r += v.w1[k] * at_corner<T, A>(xp, v.o1, v.m1, k, st);
    r += v.w2[k] * at_corner<T, A>(xp, v.o2, v.m2, k, st);
    r += v.w3[k] * at_corner<T, A>(xp, v.o3, v.m3, k, st);
    yp[k * st] = T(r);
  }
}

template <typename T>
FA_CLONES void forward_tasks(const Geom& G, const T* x, const acc_t<T>* theta, T* y, int64_t t0,
                             int64_t t1) {
  using A = acc_t<T>;
  const int64_t nb = row_blocks(G.Ho, G.Wo), rb = block_rows(G.Wo);
  const int64_t HW = G.H * G.W, P = G.Ho * G.Wo;
  Table<A> t;
  std::vector<A> acc;
  for (int64_t task = t0; task < t1; ++task) {
    const int64_t n = task / nb, i0 = (task % nb) * rb, i1 = std::min(G.Ho, i0 + rb);
    const Map<A> mp = make_map<A>(theta + 6 * n, int(G.H), int(G.W), int(G.Ho), int(G.Wo), G.align);
    fill_table(mp, i0, i1, G.Wo, t);
    const int64_t K = (i1 - i0) * G.Wo;
    if (!G.cl) {
      for (int64_t c = 0; c < G.C; ++c)
        forward_channel<T, 1>(TableView<A>(t), x + (n * G.C + c) * HW,
                              y + (n * G.C + c) * P + i0 * G.Wo, K, 1);
    } else if (G.C < kLanes) {  // few channels: one at a time, as planar, stride C
      for (int64_t c = 0; c < G.C; ++c)
        forward_channel<T, 0>(TableView<A>(t), x + n * HW * G.C + c,
                              y + (n * P + i0 * G.Wo) * G.C + c, K, G.C);
    } else {
      acc.resize(G.C);
      const T* xn = x + n * HW * G.C;
      for (int64_t k = 0; k < K; ++k) {
        std::fill(acc.begin(), acc.end(), A(0));
        for (int c = 0; c < 4; ++c) {
          if (!t.m[c][k]) continue;
          const T* xp = xn + int64_t(t.off[c][k]) * G.C;
          const A w = t.w[c][k];
#pragma omp simd
          for (int64_t ch = 0; ch < G.C; ++ch) acc[ch] += w * A(xp[ch]);
        }
        T* yp = y + (n * P + i0 * G.Wo + k) * G.C;
#pragma omp simd
        for (int64_t ch = 0; ch < G.C; ++ch) yp[ch] = T(acc[ch]);
      }
    }
  }
}

// ----------------------------------------------------------------------------- backward

// Input rows per backward task (a band): its accumulators, C values per pixel, stay small.
inline int64_t band_rows(const Geom& G) {
  return std::max<int64_t>(1, kBandElems / (G.W * G.C));
}

// One output row's samples as a band's backward needs them: per corner its offset in x's plane
// (a valid one), whether the band owns it (inside the image and in the band's rows), its offset
// among the band's accumulators (a dummy slot, K, when not owned), its weight and the weight's
// derivatives d/dix, d/diy (0 when not owned).
template <typename A>
struct BandRow {
  std::vector<int32_t> xo[4], ao[4], own[4];
  std::vector<A> w[4], wx[4], wy[4];
  void resize(int64_t n) {
    for (int k = 0; k < 4; ++k)
      xo[k].resize(n), ao[k].resize(n), own[k].resize(n), w[k].resize(n), wx[k].resize(n),
          wy[k].resize(n);
  }
};

// Returns the columns [ja, jb) outside which no corner is owned (iy is affine along the row, so
// the owned pixels are one run).
template <typename A>
FA_INLINE void fill_band_row(const Map<A>& mp, int64_t i, int64_t Wo, int64_t p0, int64_t p1,
                             int32_t K, BandRow<A>& r, int64_t& ja, int64_t& jb) {
  const int W = mp.W, H = mp.H;
  int32_t *xo0 = r.xo[0].data(), *xo1 = r.xo[1].data(), *xo2 = r.xo[2].data(), *xo3 = r.xo[3].data();
  int32_t *ao0 = r.ao[0].data(), *ao1 = r.ao[1].data(), *ao2 = r.ao[2].data(), *ao3 = r.ao[3].data();
  int32_t *m0 = r.own[0].data(), *m1 = r.own[1].data(), *m2 = r.own[2].data(), *m3 = r.own[3].data();
  A *w0 = r.w[0].data(), *w1 = r.w[1].data(), *w2 = r.w[2].data(), *w3 = r.w[3].data();
  A *x0 = r.wx[0].data(), *x1 = r.wx[1].data(), *x2 = r.wx[2].data(), *x3 = r.wx[3].data();
  A *y0 = r.wy[0].data(), *y1 = r.wy[1].data(), *y2 = r.wy[2].data(), *y3 = r.wy[3].data();
  const A lo = A(p0), hi = A(p1 - 1);
#pragma omp simd
  for (int64_t j = 0; j < Wo; ++j) {
    A ix, iy;
    coords(mp, int(i), int(j), ix, iy);
    const A fx = std::floor(ix), fy = std::floor(iy);  // as fill_row
    const bool x0in = (fx >= A(0)) & (fx <= A(W - 1)), x1in = (fx >= A(-1)) & (fx <= A(W - 2));
    const bool y0in = (fy >= lo) & (fy <= hi), y1in = (fy >= lo - A(1)) & (fy <= hi - A(1));
    const bool a = x0in & y0in, b = x1in & y0in, c = x0in & y1in, d = x1in & y1in;
    const A cx = fx > A(-1) ? (fx < A(W - 1) ? fx : A(W - 1)) : A(-1);
    const A cy = fy > A(-1) ? (fy < A(H - 1) ? fy : A(H - 1)) : A(-1);
    const int32_t base = int32_t(cy) * W + int32_t(cx), rel = base - int32_t(p0) * W;
    xo0[j] = a ? base : 0, xo1[j] = b ? base + 1 : 0;
    xo2[j] = c ? base + W : 0, xo3[j] = d ? base + W + 1 : 0;
    ao0[j] = a ? rel : K, ao1[j] = b ? rel + 1 : K;
    ao2[j] = c ? rel + W : K, ao3[j] = d ? rel + W + 1 : K;
    m0[j] = a, m1[j] = b, m2[j] = c, m3[j] = d;
    const bool any = a | b | c | d;
    const A tx = any ? ix - fx : A(0), ty = any ? iy - fy : A(0);
    w0[j] = a ? (A(1) - tx) * (A(1) - ty) : A(0), w1[j] = b ? tx * (A(1) - ty) : A(0);
    w2[j] = c ? (A(1) - tx) * ty : A(0), w3[j] = d ? tx * ty : A(0);
    x0[j] = a ? ty - A(1) : A(0), x1[j] = b ? A(1) - ty : A(0);
    x2[j] = c ? -ty : A(0), x3[j] = d ? ty : A(0);
    y0[j] = a ? tx - A(1) : A(0), y1[j] = b ? -tx : A(0);
    y2[j] = c ? A(1) - tx : A(0), y3[j] = d ? tx : A(0);
  }
  ja = 0, jb = Wo;
  while (ja < jb && !(m0[ja] | m1[ja] | m2[ja] | m3[ja])) ++ja;
  while (jb > ja && !(m0[jb - 1] | m1[jb - 1] | m2[jb - 1] | m3[jb - 1])) --jb;
}

// One channel of one output row in a band's backward: w dy into the accumulators `a` (none:
// dx not needed) and dy v dw/dix, dy v dw/diy into gx, gy (none: dtheta not needed). dy, x and
// the accumulators hold pixels kS (1: planar) or s (channels-last) apart.
template <typename T, int kS, typename A>
FA_INLINE void backward_channel(const BandRow<A>& r, int64_t ja, int64_t jb, const T* g, A* a,
                                const T* xp, A* gx, A* gy, int64_t s) {
  const int32_t st = int32_t(kS ? kS : s);
  if (a != nullptr) {
    const int32_t *ao0 = r.ao[0].data(), *ao1 = r.ao[1].data(), *ao2 = r.ao[2].data(),
                  *ao3 = r.ao[3].data();
    const A *w0 = r.w[0].data(), *w1 = r.w[1].data(), *w2 = r.w[2].data(), *w3 = r.w[3].data();
    for (int64_t j = ja; j < jb; ++j) {  // scalar: the corners of neighbours coincide
      const A v = A(g[j * st]);
      a[int64_t(ao0[j]) * st] += w0[j] * v;
      a[int64_t(ao1[j]) * st] += w1[j] * v;
      a[int64_t(ao2[j]) * st] += w2[j] * v;
      a[int64_t(ao3[j]) * st] += w3[j] * v;
    }
  }
  if (gx != nullptr) {
    const int32_t *xo0 = r.xo[0].data(), *xo1 = r.xo[1].data(), *xo2 = r.xo[2].data(),
                  *xo3 = r.xo[3].data(), *m0 = r.own[0].data(), *m1 = r.own[1].data(),
                  *m2 = r.own[2].data(), *m3 = r.own[3].data();
    const A *wx0 = r.wx[0].data(), *wx1 = r.wx[1].data(), *wx2 = r.wx[2].data(),
            *wx3 = r.wx[3].data(), *wy0 = r.wy[0].data(), *wy1 = r.wy[1].data(),
            *wy2 = r.wy[2].data(), *wy3 = r.wy[3].data();
#pragma omp simd
    for (int64_t j = ja; j < jb; ++j) {
      const A v0 = at_corner<T, A>(xp, xo0, m0, j, st), v1 = at_corner<T, A>(xp, xo1, m1, j, st);
      const A v2 = at_corner<T, A>(xp, xo2, m2, j, st), v3 = at_corner<T, A>(xp, xo3, m3, j, st);
      const A gv = A(g[j * st]);
      gx[j] += gv * (((v0 * wx0[j] + v1 * wx1[j]) + v2 * wx2[j]) + v3 * wx3[j]);
      gy[j] += gv * (((v0 * wy0[j] + v1 * wy1[j]) + v2 * wy2[j]) + v3 * wy3[j]);
    }
  }
}

// The backward of one sample's band of input rows [p0, p1), both gradients in one pass over the
// output rows that reach the band, row-major:
//  * dx: w dy added into the band's accumulators: each dx element is the sum of its readers'
//    w dy in row-major output order, as a gather per input pixel sums it (the GPU kernels
//    gather, csrc/stn_math.h), without searching the inverse map; no other task writes the band.
//  * dtheta: the corners the band owns contribute dy v (d w / d ix), dy v (d w / d iy) to the
//    pixel's gix, giy (channels in order, corners nw, ne, sw, se), then [gix sx; giy sy]
//    (xb, yb, 1) to the task's six sums, pixels in row-major order.
template <typename T>
FA_CLONES void backward_tasks(const Geom& G, const T* dy, const T* x, const acc_t<T>* theta,
                              T* dx, acc_t<T>* part, int64_t t0, int64_t t1) {
  using A = acc_t<T>;
  const int64_t rb = band_rows(G), nb = (G.H + rb - 1) / rb;
  const int64_t HW = G.H * G.W, P = G.Ho * G.Wo, C = G.C, Wo = G.Wo;
  const bool need_dx = dx != nullptr, need_dt = part != nullptr;
  BandRow<A> r;
  r.resize(Wo);
  std::vector<A> acc, gx(Wo), gy(Wo);
  for (int64_t task = t0; task < t1; ++task) {
    const int64_t n = task / nb, p0 = (task % nb) * rb, p1 = std::min(G.H, p0 + rb);
    const int32_t K = int32_t((p1 - p0) * G.W);
    const Map<A> mp = make_map<A>(theta + 6 * n, int(G.H), int(G.W), int(G.Ho), int(Wo), G.align);
    if (need_dx) acc.assign((int64_t(K) + 1) * C, A(0));  // + the dummy slot (planar: per channel)
    A s[6] = {};
    const T* xn = x + n * C * HW;
    const T* gn = dy + n * C * P;
    for (int64_t i = 0; i < G.Ho; ++i) {
      // iy is affine along the row: skip rows whose samples cannot reach the band (NaN passes)
      A ixa, iya, ixb, iyb;
      coords(mp, int(i), 0, ixa, iya);
      coords(mp, int(i), int(Wo - 1), ixb, iyb);
      if ((iya < A(p0 - 2) && iyb < A(p0 - 2)) || (iya > A(p1 + 1) && iyb > A(p1 + 1))) continue;
      int64_t ja, jb;
      fill_band_row(mp, i, Wo, p0, p1, K, r, ja, jb);
      if (ja == jb) continue;
      if (need_dt) std::fill(gx.begin(), gx.end(), A(0)), std::fill(gy.begin(), gy.end(), A(0));
      if (!G.cl) {
        for (int64_t c = 0; c < C; ++c)
          backward_channel<T, 1>(r, ja, jb, gn + c * P + i * Wo,
                                 need_dx ? acc.data() + c * (int64_t(K) + 1) : nullptr,
                                 xn + c * HW, need_dt ? gx.data() : nullptr, gy.data(), 1);
      } else if (C < kLanes) {  // few channels: one at a time, as planar, stride C
        for (int64_t c = 0; c < C; ++c)
          backward_channel<T, 0>(r, ja, jb, gn + i * Wo * C + c,
                                 need_dx ? acc.data() + c : nullptr, xn + c,
                                 need_dt ? gx.data() : nullptr, gy.data(), C);
      } else {
        const int64_t full = C / kLanes * kLanes;
        for (int64_t j = ja; j < jb; ++j) {
          const T* g = gn + (i * Wo + j) * C;
          if (need_dx)
            for (int k = 0; k < 4; ++k) {
              if (!r.own[k][j]) continue;
              A* a = acc.data() + int64_t(r.ao[k][j]) * C;
              const A w = r.w[k][j];
#pragma omp simd
              for (int64_t ch = 0; ch < C; ++ch) a[ch] += w * A(g[ch]);
            }
          if (need_dt) {
            const T* v[4];
            A dwx[4], dwy[4];
            for (int k = 0; k < 4; ++k) {
              v[k] = r.own[k][j] ? xn + int64_t(r.xo[k][j]) * C : nullptr;
              dwx[k] = r.wx[k][j], dwy[k] = r.wy[k][j];
            }
            A lx[kLanes] = {}, ly[kLanes] = {};
            auto term = [&](int64_t ch, A& ax, A& ay) __attribute__((always_inline)) {
              const A v0 = v[0] ? A(v[0][ch]) : A(0), v1 = v[1] ? A(v[1][ch]) : A(0);
              const A v2 = v[2] ? A(v[2][ch]) : A(0), v3 = v[3] ? A(v[3][ch]) : A(0);
              const A gv = A(g[ch]);
              ax += gv * (((v0 * dwx[0] + v1 * dwx[1]) + v2 * dwx[2]) + v3 * dwx[3]);
              ay += gv * (((v0 * dwy[0] + v1 * dwy[1]) + v2 * dwy[2]) + v3 * dwy[3]);
            };
            for (int64_t c0 = 0; c0 < full; c0 += kLanes)
#pragma omp simd
              for (int l = 0; l < kLanes; ++l) term(c0 + l, lx[l], ly[l]);
            for (int64_t ch = full; ch < C; ++ch) term(ch, lx[ch - full], ly[ch - full]);
            A sx = A(0), sy = A(0);
            for (int l = 0; l < kLanes; ++l) sx += lx[l], sy += ly[l];
            gx[j] = sx, gy[j] = sy;
          }
        }
      }
      if (need_dt) {
        const A yb = base_y(mp, int(i));
        for (int64_t j = ja; j < jb; ++j) {
          const A xb = base_x(mp, int(j)), a = gx[j] * mp.sx, b = gy[j] * mp.sy;
          s[0] += a * xb, s[1] += a * yb, s[2] += a;
          s[3] += b * xb, s[4] += b * yb, s[5] += b;
        }
      }
    }
    if (need_dt)
      for (int k = 0; k < 6; ++k) part[task * 6 + k] = s[k];
    if (need_dx) {
      if (!G.cl) {  // channels-last accumulators are pixel-major, planar ones channel-major
        for (int64_t c = 0; c < C; ++c) {
          const A* a = acc.data() + c * (int64_t(K) + 1);
          T* d = dx + (n * C + c) * HW + p0 * G.W;
#pragma omp simd
          for (int64_t q = 0; q < K; ++q) d[q] = T(a[q]);
        }
      } else {
        T* d = dx + (n * HW + p0 * G.W) * C;
#pragma omp simd
        for (int64_t q = 0; q < int64_t(K) * C; ++q) d[q] = T(acc[q]);
      }
    }
  }
}

// ----------------------------------------------------------------------------- ops

Geom geom_of(const at::Tensor& x, int64_t Ho, int64_t Wo, bool align) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), Ho, Wo, layout_of(x) != Layout::kPlanar,
          align};
}

at::Tensor affine_sample(const at::Tensor& x, const at::Tensor& theta, int64_t Ho, int64_t Wo,
                         bool align_corners) {
  check_inputs(x, theta, Ho, Wo, "affine_sample");
  TORCH_CHECK(x.device().is_cpu(), "affine_sample: the CPU kernel got a tensor on ", x.device());
  at::Tensor y = empty_output(x, Ho, Wo);
  if (y.numel() == 0) return y;
  const Geom G = geom_of(x, Ho, Wo, align_corners);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_sample", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const acc_t<scalar_t>* tp = theta.data_ptr<acc_t<scalar_t>>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, G.N * row_blocks(Ho, Wo), 1, [&](int64_t b, int64_t e) {
      forward_tasks<scalar_t>(G, xp, tp, yp, b, e);
    });
  });
  return y;
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> affine_sample_backward(
    const at::Tensor& dy_in, const at::Tensor& x, const at::Tensor& theta, bool align_corners,
    bool need_dx, bool need_dtheta) {
  check_inputs(x, theta, 1, 1, "affine_sample_backward");
  check_grad(dy_in, x, "affine_sample_backward");
  TORCH_CHECK(x.device().is_cpu(), "affine_sample_backward: the CPU kernel got a tensor on ",
              x.device());
  const int64_t Ho = dy_in.size(2), Wo = dy_in.size(3);
  check_inputs(x, theta, Ho, Wo, "affine_sample_backward");
  std::optional<at::Tensor> dx, dtheta;
  if (need_dx) dx = at::empty_like(x);
  if (need_dtheta) dtheta = at::zeros_like(theta);
  if (x.size(0) * x.size(1) == 0 || !(need_dx || need_dtheta)) return {dx, dtheta};
  const at::Tensor dy = in_layout_of(dy_in, empty_output(x, Ho, Wo));
  const Geom G = geom_of(x, Ho, Wo, align_corners);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "affine_sample_backward", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* gp = dy.data_ptr<scalar_t>();
    const A* tp = theta.data_ptr<A>();
    const int64_t rb = band_rows(G), nb = (G.H + rb - 1) / rb;
    std::vector<A> part(need_dtheta ? G.N * nb * 6 : 0);
    scalar_t* dp = need_dx ? dx->data_ptr<scalar_t>() : nullptr;
    A* pp = need_dtheta ? part.data() : nullptr;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, G.N * nb, 1, [&](int64_t b, int64_t e) {
      backward_tasks<scalar_t>(G, gp, xp, tp, dp, pp, b, e);
    });
    if (need_dtheta) {
      A* out = dtheta->data_ptr<A>();
      for (int64_t n = 0; n < G.N; ++n)
        for (int k = 0; k < 6; ++k) {
          A t = A(0);
          for (int64_t b = 0; b < nb; ++b) t += part[(n * nb + b) * 6 + k];
          out[n * 6 + k] = t;
        }
    }
  });
  return {dx, dtheta};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedattn, CPU, m) {
  m.impl("affine_sample", &affine_sample);
  m.impl("affine_sample_backward", &affine_sample_backward);
}

}  // namespace fusedattn
