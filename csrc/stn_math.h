// Affine sampling (spatial transformer; fusedattn/ops/stn.py states the contract) -- the
// coordinate math shared by the CPU and CUDA kernels, so the CPU tests execute what the GPU runs.
//
// Output pixel (i, j) of an Ho x Wo output samples input point (ix, iy) (pixel units of the
// H x W input). affine_grid's base grid is xb = u bsx, yb = v bsy with u = j - (Wo-1)/2,
// v = i - (Ho-1)/2 (exact half-integers), and grid_sample unnormalises gx = t00 xb + t01 yb + t02
// to ix = (gx + 1) sx - off; composed, with the scale factors folded into the coefficients:
//   ix = (Ax u + Bx v) + Cx,  Ax = t00 rxw, Bx = t01 rxh, Cx = t02 sx + (W-1)/2
//   iy = (Ay u + By v) + Cy,  Ay = t10 ryw, By = t11 ryh, Cy = t12 sy + (H-1)/2
// align_corners=False: bsx = 2/Wo, sx = W/2, rxw = W/Wo, rxh = W/Ho (ry* with H);
// align_corners=True:  bsx = 2/(Wo-1), sx = (W-1)/2, rxw = (W-1)/(Wo-1), ... (0 for a size 1).
// This form is exact where it matters most: the identity, flips and quarter turns with exact
// 0 / +-1 entries between equal sizes give integer or half-integer coordinates with no rounding
// (so a sample on a pixel line takes the derivative on the side floor() picks, the corner at and
// after it; PyTorch's grid rounds there either way, pixel by pixel).
// Bilinear, zeros padding: x0 = floor(ix), tx = ix - x0 (y0, ty alike); the four corners
// (x0 | x0+1, y0 | y0+1) with weights (1-tx | tx)(1-ty | ty), each counted only when inside the
// image. A coordinate whose floor is not in [-1, W-1] (far outside, inf, NaN) has no corner.
//
// The gradient of x is gathered: input pixel (p, q) receives w dy[i, j] from every output pixel
// whose corners include it. Those lie in the preimage of the square [q-1, q+1] x [p-1, p+1]
// under the affine map (j, i) -> (ix, iy): `rows` bounds its output rows, `cols` each row's
// columns (a superset, widened by `delta` for rounding), and `weight_at` decides each candidate
// with the forward's own arithmetic. Candidates are visited in row-major order, so every backend
// sums a pixel's contributions in the same order.
// A is the accumulation type: float for half/bfloat16/float inputs, double for double.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FA_HD __host__ __device__ __forceinline__
#else
#define FA_HD inline __attribute__((always_inline))
#endif

namespace fusedattn {
namespace stn {

template <typename A>
struct Map {
  A Ax, Bx, Cx, Ay, By, Cy;  // ix = (Ax u + Bx v) + Cx, iy = (Ay u + By v) + Cy
  A u0, v0;                  // u = j - u0, v = i - v0
  A bsx, bsy;                // base grid: xb = u bsx, yb = v bsy (for dtheta)
  A sx, sy;                  // d ix / d gx, d iy / d gy
  int H, W;                  // input size
};

// a / b rounded to nearest also on a GPU (the CUDA build uses --use_fast_math, whose float
// division is approximate: W / Wo must be exactly 1 for equal sizes).
FA_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
FA_HD double div_rn(double a, double b) { return a / b; }

// a / b, or 0 for b = 0 (a size-1 output with align_corners, whose base grid is 0)
template <typename A>
FA_HD A ratio(A a, A b) { return b == A(0) ? A(0) : div_rn(a, b); }

// theta: the sample's 6 numbers, row-major (2, 3).
template <typename A>
FA_HD Map<A> make_map(const A* th, int H, int W, int Ho, int Wo, bool align) {
  Map<A> m;
  const A a = align ? A(1) : A(0);  // sizes count pixels (False) or pixel gaps (True)
  const A w = A(W) - a, h = A(H) - a, wo = A(Wo) - a, ho = A(Ho) - a;
  m.sx = w * A(0.5), m.sy = h * A(0.5);
  m.bsx = ratio(A(2), wo), m.bsy = ratio(A(2), ho);
  m.Ax = th[0] * ratio(w, wo), m.Bx = th[1] * ratio(w, ho);
  m.Ay = th[3] * ratio(h, wo), m.By = th[4] * ratio(h, ho);
  m.Cx = th[2] * m.sx + A(W - 1) * A(0.5);
  m.Cy = th[5] * m.sy + A(H - 1) * A(0.5);
  m.u0 = A(Wo - 1) * A(0.5), m.v0 = A(Ho - 1) * A(0.5);
  m.H = H, m.W = W;
  return m;
}

template <typename A>
FA_HD A base_x(const Map<A>& m, int j) { return (A(j) - m.u0) * m.bsx; }
template <typename A>
FA_HD A base_y(const Map<A>& m, int i) { return (A(i) - m.v0) * m.bsy; }

template <typename A>
FA_HD void coords(const Map<A>& m, int i, int j, A& ix, A& iy) {
  const A u = A(j) - m.u0, v = A(i) - m.v0;
  ix = (m.Ax * u + m.Bx * v) + m.Cx;
  iy = (m.Ay * u + m.By * v) + m.Cy;
}

// floor(c) as an int and the fraction c - floor(c); -2 (no corner inside 0..n-1) when the floor
// is not in [-1, n-1], NaN included.
template <typename A>
FA_HD int corner(A c, int n, A& t) {
  const A f = std::floor(c);
  t = c - f;
  return (f >= A(-1) && f <= A(n - 1)) ? int(f) : -2;
}

// The bilinear sample at one output pixel: the corners' flat offsets (y W + x) and weights, and a
// bit per corner inside the image (bit 0 nw, 1 ne, 2 sw, 3 se).
template <typename A>
struct Sample {
  int x0, y0;
  A tx, ty;
  unsigned valid;
};

template <typename A>
FA_HD Sample<A> sample_at(const Map<A>& m, int i, int j) {
  A ix, iy;
  coords(m, i, j, ix, iy);
  Sample<A> s;
  s.x0 = corner(ix, m.W, s.tx);
  s.y0 = corner(iy, m.H, s.ty);
  const bool x0in = s.x0 >= 0, x1in = s.x0 != -2 && s.x0 + 1 <= m.W - 1;
  const bool y0in = s.y0 >= 0, y1in = s.y0 != -2 && s.y0 + 1 <= m.H - 1;
  s.valid = unsigned(x0in && y0in) | unsigned(x1in && y0in) << 1 | unsigned(x0in && y1in) << 2 |
            unsigned(x1in && y1in) << 3;
  if (!s.valid) s.tx = A(0), s.ty = A(0);  // no corner (far outside, inf, NaN): nothing for dtheta
  return s;
}

// The weight with which output pixel (i, j) reads input pixel (p, q); false if it does not.
template <typename A>
FA_HD bool weight_at(const Map<A>& m, int i, int j, int p, int q, A& w) {
  A ix, iy, tx, ty;
  coords(m, i, j, ix, iy);
  const int x0 = corner(ix, m.W, tx), y0 = corner(iy, m.H, ty);
  const bool inx = x0 == q || x0 + 1 == q, iny = y0 == p || y0 + 1 == p;
  if (!(inx && iny) || x0 == -2 || y0 == -2) return false;
  w = (x0 == q ? A(1) - tx : tx) * (y0 == p ? A(1) - ty : ty);
  return true;
}

// The affine map (j, i) -> (ix, iy) and what the gather needs of it, per sample.
template <typename A>
struct Window {
  A Ax, Bx, Cx, Ay, By, Cy;
  A delta;       // slack of the square's sides: rounding of the forward's coordinates
  A det, i_half; // i_half: half the preimage's height in rows; < 0: all rows
  int Ho, Wo;
};

template <typename A>
FA_HD Window<A> make_window(const Map<A>& m, int Ho, int Wo) {
  Window<A> w;
  w.Ax = m.Ax, w.Bx = m.Bx, w.Ay = m.Ay, w.By = m.By;
  w.Cx = m.Cx - m.Ax * m.u0 - m.Bx * m.v0;
  w.Cy = m.Cy - m.Ay * m.u0 - m.By * m.v0;
  const A eps = sizeof(A) == 8 ? A(2.220446049250313e-16) : A(1.1920929e-07);
  const A mag = (std::fabs(m.Ax) + std::fabs(m.Ay)) * A(Wo) +
                (std::fabs(m.Bx) + std::fabs(m.By)) * A(Ho) + std::fabs(m.Cx) + std::fabs(m.Cy) +
                A(1);
  w.delta = A(1) / A(256) + A(16) * eps * mag;
  w.det = w.Ax * w.By - w.Bx * w.Ay;
  const A h = (std::fabs(w.Ax) + std::fabs(w.Ay)) * (A(1) + w.delta) / std::fabs(w.det);
  w.i_half = (h < A(Ho)) ? h : A(-1);  // also for det = 0, inf, NaN
  w.Ho = Ho, w.Wo = Wo;
  return w;
}

// Clamp [lo, hi] to [0, n-1] and round inwards; false if empty (or NaN).
template <typename A>
FA_HD bool int_range(A lo, A hi, int n, int& a, int& b) {
  lo = std::ceil(lo), hi = std::floor(hi);
  lo = lo > A(0) ? lo : A(0);
  hi = hi < A(n - 1) ? hi : A(n - 1);
  if (!(lo <= hi)) return false;
  a = int(lo), b = int(hi);
  return true;
}

// Output rows that may read input pixel (p, q).
template <typename A>
FA_HD bool rows(const Window<A>& w, int p, int q, int& i_lo, int& i_hi) {
  if (w.i_half < A(0)) {
    i_lo = 0, i_hi = w.Ho - 1;
    return true;
  }
  const A ic = (w.Ax * (A(p) - w.Cy) - w.Ay * (A(q) - w.Cx)) / w.det;
  return int_range(ic - w.i_half, ic + w.i_half, w.Ho, i_lo, i_hi);
}

// Columns j of output row i with |a j + r - c| <= 1 + delta, intersected into [lo, hi].
template <typename A>
FA_HD bool slab(A a, A r, A c, A delta, A& lo, A& hi) {
  const A d = A(1) + delta;
  if (a != A(0)) {
    A u = (c - d - r) / a, v = (c + d - r) / a;
    if (u > v) {
      const A t = u;
      u = v, v = t;
    }
    lo = u > lo ? u : lo;
    hi = v < hi ? v : hi;
    return true;
  }
  return std::fabs(r - c) <= d;
}

// Columns of output row i that may read input pixel (p, q).
template <typename A>
FA_HD bool cols(const Window<A>& w, int p, int q, int i, int& j_lo, int& j_hi) {
  A lo = A(0), hi = A(w.Wo - 1);
  if (!slab(w.Ax, w.Bx * A(i) + w.Cx, A(q), w.delta, lo, hi)) return false;
  if (!slab(w.Ay, w.By * A(i) + w.Cy, A(p), w.delta, lo, hi)) return false;
  return int_range(lo, hi, w.Wo, j_lo, j_hi);
}

// dtheta (grid_sample's and affine_grid's backward; each kernel writes it out): per output pixel
// gix = sum_c dy_c [(v_ne - v_nw)(1 - ty) + (v_se - v_sw) ty], giy = sum_c dy_c [(v_sw - v_nw)
// (1 - tx) + (v_se - v_ne) tx] (corners outside the image count as 0), then
// dtheta = sum over the output pixels of [gix sx; giy sy] (base_x, base_y, 1).

}  // namespace stn
}  // namespace fusedattn
