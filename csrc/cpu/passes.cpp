// The generic attention passes (fusedattn/spec/passes.md) on CPU tensors: everything of SE, ECA,
// CBAM and HAM that touches a full-size tensor, forward and backward (csrc/pass_check.h: layouts,
// small tensors, checks). Groups: G = 1 (no group flags: every channel in group 0) or G = 2 (g(c)
// in {0, 1}, size[g] channels each); the (n, g, p) maps have G rows per sample. Optional parts (the
// spatial maps, the pixel max) are compile-time switches of the loops that read them.
//
// Every loop runs along the unit-stride dimension in fixed-width lanes that the compiler turns
// into vectors (built for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and baseline x86-64,
// picked at load time), with a fixed combining order.
//
// Reproducibility: every output element's arithmetic is a function of the shape (and of the
// clone), never of the thread count (tests/test_determinism.py). Threads take whole tasks, and a
// task's results are its own (no partial sums across tasks). The clones are x86-64-v4 / v3, not
// bare "avx512f" / "avx2": GCC's "avx512f" clone fuses a * b + c into an FMA in 512-bit and
// scalar code but has no FMA for 256-bit vectors, so an element in a vectorised loop's 256-bit
// epilogue rounded differently, and where a thread's range put it decided its bits. In these
// clones every vector width and the scalar code can fuse, and what is fused depends on the code
// and the shape only (the clones' results differ from one another in the last bits). Work shapes:
//
//  * reductions over pixels (pool_pixels, grad_a): contiguous, a task is a run of (n, c) rows,
//    reduced in kLanes lanes (pool_pixels with short rows: a task is an aligned group of kLanes
//    rows, a lane per row, so that which rows share a vector is fixed by the shape);
//    channels-last, a task is (n, block of channels), one accumulator per channel across the
//    pixel rows.
//  * reductions over channels (pool_channels, gate_grad_s): contiguous, a task is (n, block of
//    pixels), one accumulator per pixel across the channel rows; channels-last, a task is
//    (n, kLanes pixels): pool_channels keeps one accumulator per pixel across the channels,
//    gate_grad_s reduces each pixel's contiguous channels in kLanes lanes.
//  * elementwise (gate, grad_x): runs of rows in memory order.
//
// Maxima take the first index attaining them, NaN counting as the largest value (as torch.max):
// lanes keep their first maximum, and lanes combine by value, then by the lower index.
// Argmax indices are int32 (a pixel index < H W, a channel index < C).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "pass_check.h"
#include "layout.h"

namespace fusedattn {
namespace {

using namespace passes;

template <typename T>
using acc_t = at::opmath_type<T>;

constexpr int kLanes = 16;               // lanes of the row reductions
constexpr int64_t kPixelBlock = 256;     // pixels per task of the contiguous channel reductions
constexpr int64_t kChannelBlock = 256;   // channels per task of the channels-last pixel reductions
constexpr int64_t kTaskElems = 1 << 15;  // least work handed to one thread
constexpr int64_t kShortRow = 256;       // contiguous rows up to this length: a lane per row

#define FA_INLINE inline __attribute__((always_inline))
#define FA_INLINE_LAMBDA __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// x86-64-v4 / v3 rather than bare "avx512f" / "avx2": see the note on reproducibility above.
#define FA_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FA_CLONES
#endif

// Channels-last work shapes (also for 1x1 maps, where both layouts are the same memory).
FA_INLINE bool is_cl(const Geom& G) { return G.sC == 1; }

// ------------------------------------------------------------------------- element steps

// v replaces the running maximum: larger, or NaN over a number; ties keep the earlier index.
template <typename A>
FA_INLINE bool beats(A v, A best) {
  return v > best || (v != v && best == best);
}

template <typename A>
FA_INLINE void take(A v, int32_t i, A& best, int32_t& arg) {
  const bool u = beats(v, best);
  best = u ? v : best;
  arg = u ? i : arg;
}

// (b, j) replaces (best, arg): a larger value (NaN largest), or the same one at a lower index.
template <typename A>
FA_INLINE bool better(A b, int32_t j, A best, int32_t arg) {
  const bool same = b == best || (b != b && best != best);
  return beats(b, best) || (same && j < arg);
}

// Lane combines (fixed order, halving).
template <typename A>
FA_INLINE A tree_sum(A* acc) {
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// A's bits as an unsigned integer, and back: masks select v or +0 exactly (v may be inf or NaN,
// which a multiplication by 0 or 1 would not keep out of the other group's sum).
template <typename A>
using bits_t = std::conditional_t<sizeof(A) == 8, uint64_t, uint32_t>;

template <typename A>
FA_INLINE bits_t<A> bits_of(A v) {
  bits_t<A> b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}

template <typename A>
FA_INLINE A from_bits(bits_t<A> b) {
  A v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
}

// The best lane, in lane order (branch-free: cheaper than a tree for one row).
template <typename A>
FA_INLINE void best_lane(const A* mx, const int32_t* ix, A& best, int32_t& arg) {
  best = mx[0];
  arg = ix[0];
  for (int l = 1; l < kLanes; ++l) {
    const bool u = better(mx[l], ix[l], best, arg);
    best = u ? mx[l] : best;
    arg = u ? ix[l] : arg;
  }
}

// Lane l of a row reduction starts at (-inf, l): a lane that sees only -inf (or nothing) keeps
// its own first index, so an all -inf row gives index 0.
template <typename A>
FA_INLINE void lanes_init(A* mx, int32_t* ix) {
  for (int l = 0; l < kLanes; ++l) { mx[l] = -INFINITY; ix[l] = l; }
}

// The channel pooling's gradient with respect to f = a x at (n, g, p), for channel c of g:
// d_avg / size_g + [argmax == c] d_max (a group's max of a masked-out 0 matches no channel of g).
template <typename A>
FA_INLINE A pool_grad(A d_avg_scaled, int32_t arg, A d_max, int32_t c) {
  return d_avg_scaled + (arg == c ? d_max : A(0));
}

// Row (n, h) of an (N, G, P) map.
template <typename A>
FA_INLINE const A* map_of(const A* m, int64_t n, int h, int G, int64_t P) {
  return m + (n * G + h) * P;
}

// What every pass knows of x and the small tensors. Unused fields stay null.
template <typename T>
struct Pass {
  using A = acc_t<T>;
  Geom G;
  const T* x = nullptr;
  const T* dy = nullptr;
  T* out = nullptr;               // y or dx
  const A* a = nullptr;           // (N, C)
  int groups = 1;                 // channel groups G
  const uint8_t* group = nullptr;  // (N, C), bool as bytes (vectorises; bool loads do not); G = 2
  const A* s = nullptr;           // (N, G, P)
  const A* d_avg = nullptr;       // (N, G, P)
  const A* d_max = nullptr;       // (N, G, P)
  const int32_t* argmax = nullptr;  // (N, G, P)
  const A* d_mean_c = nullptr;    // (N, C)
  const A* d_max_c = nullptr;     // (N, C)
  const int32_t* argmax_c = nullptr;  // (N, C)
  bool with_max = true;           // pool_pixels: also the max
  A inv[2] = {A(0), A(0)};        // 1 / size_g (0 for an empty group)
  bool empty[2] = {false, false};
  A* r0 = nullptr;                // reduction outputs
  A* r1 = nullptr;
  int32_t* ri = nullptr;
};

struct Tile {
  int64_t n, p0, np;
};

enum class Op { kPoolPixels, kPoolChannels, kGate, kGateGradS, kGradA, kGradX };

// ------------------------------------------------------------------- pass 1: pixel pooling
// mean_c and (MAX) max_c with its first argmax over the P pixels of every (n, c).
// r0 = mean, r1 = max, ri = arg.

// Contiguous. Rows up to kShortRow pixels: tasks [t0, t1) are groups of kLanes rows (group t is
// rows [t kLanes, t kLanes + kLanes)), a lane per row, each row summed in pixel order; the last,
// partial group runs the same sequential sums one row at a time. Longer rows: tasks are rows,
// each reduced in kLanes lanes. Which arithmetic a row gets thus depends on P alone.
template <typename T, bool MAX>
FA_INLINE void pool_pixels_rows(const Pass<T>& k, int64_t t0, int64_t t1) {
  using A = acc_t<T>;
  const int64_t P = k.G.P, rows = k.G.N * k.G.C;
  if (P <= kShortRow) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t * kLanes;
      const T* __restrict__ x = k.x + r * P;
      if (r + kLanes <= rows) {  // kLanes rows at once, a lane per row: no combine across lanes
        alignas(64) A s[kLanes] = {}, m[kLanes];
        alignas(64) int32_t ix[kLanes] = {};
        for (int l = 0; l < kLanes; ++l) m[l] = -INFINITY;
        for (int64_t i = 0; i < P; ++i)
          for (int l = 0; l < kLanes; ++l) {
            const A v = A(x[l * P + i]);
            s[l] += v;
            if constexpr (MAX) take(v, int32_t(i), m[l], ix[l]);
          }
        for (int l = 0; l < kLanes; ++l) {
          k.r0[r + l] = s[l] / A(P);
          if constexpr (MAX) {
            k.r1[r + l] = m[l];
            k.ri[r + l] = ix[l];
          }
        }
      } else {  // the partial last group: the same sums, a row at a time
        for (int64_t l = 0; r + l < rows; ++l) {
          A s = 0, m = -INFINITY;
          int32_t ix = 0;
          for (int64_t i = 0; i < P; ++i) {
            const A v = A(x[l * P + i]);
            s += v;
            if constexpr (MAX) take(v, int32_t(i), m, ix);
          }
          k.r0[r + l] = s / A(P);
          if constexpr (MAX) {
            k.r1[r + l] = m;
            k.ri[r + l] = ix;
          }
        }
      }
    }
    return;
  }
  for (int64_t r = t0; r < t1; ++r) {  // a row in kLanes lanes
    const T* __restrict__ x = k.x + r * P;
    alignas(64) A s[kLanes] = {}, m[kLanes];
    alignas(64) int32_t ix[kLanes];
    lanes_init(m, ix);
    auto step = [&](int64_t i, int l) FA_INLINE_LAMBDA {
      const A v = A(x[i]);
      s[l] += v;
      if constexpr (MAX) take(v, int32_t(i), m[l], ix[l]);
    };
    int64_t i = 0;
    for (; i + kLanes <= P; i += kLanes)
      for (int l = 0; l < kLanes; ++l) step(i + l, l);
    for (int l = 0; i + l < P; ++l) step(i + l, l);
    if constexpr (MAX) best_lane(m, ix, k.r1[r], k.ri[r]);
    k.r0[r] = tree_sum(s) / A(P);
  }
}

template <typename T, bool MAX>
FA_INLINE void pool_pixels_blocks(const Pass<T>& k, int64_t t0, int64_t t1) {  // channels-last
  using A = acc_t<T>;
  const Geom& G = k.G;
  const int64_t blocks = (G.C + kChannelBlock - 1) / kChannelBlock;
  alignas(64) A s[kChannelBlock], m[kChannelBlock];
  alignas(64) int32_t ix[kChannelBlock];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / blocks, c0 = (t % blocks) * kChannelBlock;
    const int64_t nc = std::min(kChannelBlock, G.C - c0);
    for (int64_t j = 0; j < nc; ++j) { s[j] = 0; m[j] = -INFINITY; ix[j] = 0; }
    for (int64_t p = 0; p < G.P; ++p) {
      const T* __restrict__ x = k.x + n * G.sN + p * G.C + c0;
      for (int64_t j = 0; j < nc; ++j) {
        const A v = A(x[j]);
        s[j] += v;
        if constexpr (MAX) take(v, int32_t(p), m[j], ix[j]);
      }
    }
    for (int64_t j = 0; j < nc; ++j) {
      const int64_t q = n * G.C + c0 + j;
      k.r0[q] = s[j] / A(G.P);
      if constexpr (MAX) {
        k.r1[q] = m[j];
        k.ri[q] = ix[j];
      }
    }
  }
}

// ------------------------------------------------------------------ pass 2: channel pooling
// Per (n, g, p): avg = sum_{c in g} a_c x / size_g; max over all c of (g(c) == g ? a_c x : 0),
// first argmax (G = 1: over all channels, no zeros). Groups with no channels give zeros.
// r0 = avg, r1 = max, ri = arg.

// A tile is np pixels [p0, p0 + np) of sample n, one accumulator per pixel, reduced over the
// channels in order: contiguous tiles are up to kPixelBlock pixels (rows of a channel are
// contiguous); channels-last tiles are kLanes pixels read at stride C (the tile stays in L1).
template <bool CL>
FA_INLINE int64_t tile_pixels() { return CL ? kLanes : kPixelBlock; }

template <bool CL>
FA_INLINE Tile tile_of(const Geom& G, int64_t t) {
  const int64_t per = (G.P + tile_pixels<CL>() - 1) / tile_pixels<CL>();
  const int64_t n = t / per, p0 = (t % per) * tile_pixels<CL>();
  return {n, p0, std::min(tile_pixels<CL>(), G.P - p0)};
}

// The first channel of each group of sample n: where a masked-out 0 first enters the other
// group's max (later zeros never beat it). None (-1) without group flags.
FA_INLINE void first_channels(const uint8_t* g, int64_t C, int64_t first[2]) {
  first[0] = first[1] = -1;
  if (!g) return;
  for (int64_t c = 0; c < C && (first[0] < 0 || first[1] < 0); ++c)
    if (first[g[c]] < 0) first[g[c]] = c;
}

// The group of channel c of a sample's flags (0 without flags).
FA_INLINE int group_of(const uint8_t* g, int64_t c) { return g ? g[c] : 0; }

// One channel of a tile into its group's sums and maxima (x at stride `step` along pixels).
template <typename T, typename A>
FA_INLINE void pool_step(const T* __restrict__ x, int64_t step, A ac, int32_t c, int64_t np,
                         A* __restrict__ s, A* __restrict__ m, int32_t* __restrict__ ix) {
  for (int64_t j = 0; j < np; ++j) {
    const A f = ac * A(x[j * step]);
    s[j] += f;
    take(f, c, m[j], ix[j]);
  }
}

template <typename T, bool CL>
FA_INLINE void pool_channels_tiles(const Pass<T>& k, int64_t t0, int64_t t1) {
  using A = acc_t<T>;
  const Geom& G = k.G;
  alignas(64) A s[2][kPixelBlock], m[2][kPixelBlock];
  alignas(64) int32_t ix[2][kPixelBlock];
  for (int64_t t = t0; t < t1; ++t) {
    const Tile tl = tile_of<CL>(G, t);
    const int64_t np = CL ? kLanes : tl.np;  // full channels-last tiles: a constant width
    const uint8_t* g = k.group ? k.group + tl.n * G.C : nullptr;
    const A* a = k.a + tl.n * G.C;
    int64_t first[2];
    first_channels(g, G.C, first);
    for (int h = 0; h < k.groups; ++h)
      for (int64_t j = 0; j < tile_pixels<CL>(); ++j) { s[h][j] = 0; m[h][j] = -INFINITY; ix[h][j] = 0; }
    const T* x = k.x + tl.n * G.sN + tl.p0 * G.sP;
    for (int64_t c = 0; c < G.C; ++c) {
      const int h = group_of(g, c);
      if (CL && tl.np == kLanes)
        pool_step(x + c, G.C, a[c], int32_t(c), kLanes, s[h], m[h], ix[h]);
      else
        pool_step(x + c * G.sC, G.sP, a[c], int32_t(c), tl.np, s[h], m[h], ix[h]);
      if (c == first[h])
        for (int64_t j = 0; j < np; ++j) take(A(0), int32_t(c), m[1 - h][j], ix[1 - h][j]);
    }
    for (int h = 0; h < k.groups; ++h) {
      const int64_t o = (tl.n * k.groups + h) * G.P + tl.p0;
      for (int64_t j = 0; j < tl.np; ++j) {
        k.r0[o + j] = s[h][j] * k.inv[h];
        k.r1[o + j] = k.empty[h] ? A(0) : m[h][j];
        k.ri[o + j] = k.empty[h] ? 0 : ix[h][j];
      }
    }
  }
}

// ------------------------------------------------------------------------- pass 3: the gate
// y = s[n, g(c), p] a_c x (HAS_S), y = a_c x (no spatial factor).

template <typename T, bool HAS_S>
FA_INLINE void gate_rows(const Pass<T>& k, int64_t t0, int64_t t1) {
  using A = acc_t<T>;
  const Geom& G = k.G;
  if (!is_cl(G)) {  // contiguous: row (n, c)
    for (int64_t r = t0; r < t1; ++r) {
      const T* __restrict__ x = k.x + r * G.P;
      T* __restrict__ y = k.out + r * G.P;
      const A ac = k.a[r];
      if constexpr (HAS_S) {
        const A* __restrict__ s = map_of(k.s, r / G.C, group_of(k.group, r), k.groups, G.P);
        for (int64_t p = 0; p < G.P; ++p) y[p] = T(s[p] * ac * A(x[p]));
      } else {
        for (int64_t p = 0; p < G.P; ++p) y[p] = T(ac * A(x[p]));
      }
    }
  } else {  // channels-last: row (n, p)
    for (int64_t r = t0; r < t1; ++r) {
      const int64_t n = r / G.P, p = r % G.P;
      const A* __restrict__ a = k.a + n * G.C;
      const T* __restrict__ x = k.x + r * G.C;
      T* __restrict__ y = k.out + r * G.C;
      if constexpr (HAS_S) {
        const A s0 = map_of(k.s, n, 0, k.groups, G.P)[p];
        if (k.group) {
          const A s1 = map_of(k.s, n, 1, k.groups, G.P)[p];
          const uint8_t* __restrict__ g = k.group + n * G.C;
          for (int64_t c = 0; c < G.C; ++c) y[c] = T((g[c] ? s1 : s0) * a[c] * A(x[c]));
        } else {
          for (int64_t c = 0; c < G.C; ++c) y[c] = T(s0 * a[c] * A(x[c]));
        }
      } else {
        for (int64_t c = 0; c < G.C; ++c) y[c] = T(a[c] * A(x[c]));
      }
    }
  }
}

// --------------------------------------------------------------------------- backward passes
// ds[n, g, p] = sum_{c in g} dy a_c x. r0 = ds.

template <typename T, typename A>
FA_INLINE void gate_grad_step(const T* __restrict__ x, const T* __restrict__ dy, int64_t step,
                              A ac, int64_t np, A* __restrict__ s) {
  for (int64_t j = 0; j < np; ++j) s[j] += A(dy[j * step]) * ac * A(x[j * step]);
}

template <typename T, bool CL>
FA_INLINE void gate_grad_s_tiles(const Pass<T>& k, int64_t t0, int64_t t1) {
  using A = acc_t<T>;
  using Bits = bits_t<A>;
  const Geom& G = k.G;
  alignas(64) A acc[2][kPixelBlock];
  std::vector<Bits> mask(CL && k.group ? G.C : 0);  // channels-last with groups
  int64_t mask_n = -1;
  for (int64_t t = t0; t < t1; ++t) {
    const Tile tl = tile_of<CL>(G, t);
    const uint8_t* g = k.group ? k.group + tl.n * G.C : nullptr;
    const A* a = k.a + tl.n * G.C;
    for (int h = 0; h < k.groups; ++h)
      for (int64_t j = 0; j < tile_pixels<CL>(); ++j) acc[h][j] = 0;
    const int64_t o = tl.n * G.sN + tl.p0 * G.sP;
    if (CL) {  // a pixel's channels are contiguous: one reduction per pixel in kLanes lanes
      if (g && tl.n != mask_n) {  // the sample's group flags as bit masks of A
        for (int64_t c = 0; c < G.C; ++c) mask[c] = g[c] ? ~Bits(0) : Bits(0);
        mask_n = tl.n;
      }
      for (int64_t j = 0; j < tl.np; ++j) {
        const T* __restrict__ x = k.x + o + j * G.C;
        const T* __restrict__ dy = k.dy + o + j * G.C;
        const Bits* __restrict__ mk = mask.data();
        alignas(64) A s0[kLanes] = {}, s1[kLanes] = {};
        auto run = [&](auto&& step) FA_INLINE_LAMBDA {
          int64_t c = 0;
          for (; c + kLanes <= G.C; c += kLanes)
            for (int l = 0; l < kLanes; ++l) step(c + l, l);
          for (int l = 0; c + l < G.C; ++l) step(c + l, l);
        };
        if (g) {  // v into its group's sum, +0 into the other's (a select the compiler vectorises)
          run([&](int64_t c, int l) FA_INLINE_LAMBDA {
            const Bits v = bits_of(A(dy[c]) * a[c] * A(x[c]));
            s0[l] += from_bits<A>(v & ~mk[c]);
            s1[l] += from_bits<A>(v & mk[c]);
          });
          acc[1][j] = tree_sum(s1);
        } else {
          run([&](int64_t c, int l) FA_INLINE_LAMBDA { s0[l] += A(dy[c]) * a[c] * A(x[c]); });
        }
        acc[0][j] = tree_sum(s0);
      }
    } else {
      for (int64_t c = 0; c < G.C; ++c) {
        const int64_t oc = o + c * G.sC;
        gate_grad_step(k.x + oc, k.dy + oc, int64_t(1), a[c], tl.np, acc[group_of(g, c)]);
      }
    }
    for (int h = 0; h < k.groups; ++h)
      for (int64_t j = 0; j < tl.np; ++j) k.r0[(tl.n * k.groups + h) * G.P + tl.p0 + j] = acc[h][j];
  }
}

// The spatial maps of both groups at one pixel of sample n (channels-last loops): the gate, the
// scaled d_avg, d_max and argmax; group 1's copy is group 0's when G = 1.
template <typename A>
struct PixelMaps {
  A s[2], v[2], m[2];
  int32_t i[2];

  template <typename T>
  FA_INLINE PixelMaps(const Pass<T>& k, int64_t n, int64_t p) {
    for (int h = 0; h < 2; ++h) {
      const int64_t o = (n * k.groups + (h < k.groups ? h : 0)) * k.G.P + p;
      s[h] = k.s[o];
      v[h] = k.d_avg[o] * k.inv[h < k.groups ? h : 0];
      m[h] = k.d_max[o];
      i[h] = k.argmax[o];
    }
  }
  // The pooling gradient of channel c of group h.
  FA_INLINE A pool(uint8_t h, int32_t c) const { return pool_grad(h ? v[1] : v[0], h ? i[1] : i[0], h ? m[1] : m[0], c); }
  FA_INLINE A gate(uint8_t h) const { return h ? s[1] : s[0]; }
};

// da[n, c] = sum_p x (dy s_{g(c)} + d_avg_{g(c)} / size + [argmax_{g(c)} == c] d_max_{g(c)}):
// the gate's and the channel pooling's gradient with respect to a (MAPS); sum_p x dy without
// the spatial maps. r0 = da.

template <typename T, bool MAPS>
FA_INLINE void grad_a_rows(const Pass<T>& k, int64_t t0, int64_t t1) {  // contiguous
  using A = acc_t<T>;
  const Geom& G = k.G;
  for (int64_t r = t0; r < t1; ++r) {
    const int64_t n = r / G.C;
    const int32_t c = int32_t(r % G.C);
    const int h = group_of(k.group, r);
    const T* __restrict__ x = k.x + r * G.P;
    const T* __restrict__ dy = k.dy + r * G.P;
    alignas(64) A acc[kLanes] = {};
    auto run = [&](auto&& step) FA_INLINE_LAMBDA {
      int64_t p = 0;
      for (; p + kLanes <= G.P; p += kLanes)
        for (int l = 0; l < kLanes; ++l) step(p + l, l);
      for (int l = 0; p + l < G.P; ++l) step(p + l, l);
    };
    if constexpr (MAPS) {
      const A* __restrict__ s = map_of(k.s, n, h, k.groups, G.P);
      const A* __restrict__ dav = map_of(k.d_avg, n, h, k.groups, G.P);
      const A* __restrict__ dmx = map_of(k.d_max, n, h, k.groups, G.P);
      const int32_t* __restrict__ arg = map_of(k.argmax, n, h, k.groups, G.P);
      const A inv = k.inv[h];
      run([&](int64_t p, int l) FA_INLINE_LAMBDA {
        acc[l] += A(x[p]) * (A(dy[p]) * s[p] + pool_grad(dav[p] * inv, arg[p], dmx[p], c));
      });
    } else {
      run([&](int64_t p, int l) FA_INLINE_LAMBDA { acc[l] += A(x[p]) * A(dy[p]); });
    }
    k.r0[r] = tree_sum(acc);
  }
}

template <typename T, bool MAPS>
FA_INLINE void grad_a_blocks(const Pass<T>& k, int64_t t0, int64_t t1) {  // channels-last
  using A = acc_t<T>;
  const Geom& G = k.G;
  const int64_t blocks = (G.C + kChannelBlock - 1) / kChannelBlock;
  alignas(64) A acc[kChannelBlock];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / blocks, c0 = (t % blocks) * kChannelBlock;
    const int64_t nc = std::min(kChannelBlock, G.C - c0);
    for (int64_t j = 0; j < nc; ++j) acc[j] = 0;
    for (int64_t p = 0; p < G.P; ++p) {
      const T* __restrict__ x = k.x + n * G.sN + p * G.C + c0;
      const T* __restrict__ dy = k.dy + n * G.sN + p * G.C + c0;
      if constexpr (MAPS) {
        const PixelMaps<A> pm(k, n, p);
        if (k.group) {
          const uint8_t* __restrict__ g = k.group + n * G.C + c0;
          for (int64_t j = 0; j < nc; ++j) {
            const uint8_t h = g[j];
            acc[j] += A(x[j]) * (A(dy[j]) * pm.gate(h) + pm.pool(h, int32_t(c0 + j)));
          }
        } else {
          for (int64_t j = 0; j < nc; ++j)
            acc[j] += A(x[j]) * (A(dy[j]) * pm.s[0] + pm.pool(0, int32_t(c0 + j)));
        }
      } else {
        for (int64_t j = 0; j < nc; ++j) acc[j] += A(x[j]) * A(dy[j]);
      }
    }
    for (int64_t j = 0; j < nc; ++j) k.r0[n * G.C + c0 + j] = acc[j];
  }
}

// dx = dy s a + a (d_avg / size + [argmax_g == c] d_max) + d_mean_c / P + [p == argmax_c] d_max_c
// (without the maps the first two terms are dy a; without the pixel max the last is 0).

template <typename T, bool MAPS>
FA_INLINE void grad_x_rows(const Pass<T>& k, int64_t t0, int64_t t1) {
  using A = acc_t<T>;
  const Geom& G = k.G;
  const A invP = A(1) / A(G.P);
  if (!is_cl(G)) {  // contiguous: row (n, c)
    for (int64_t r = t0; r < t1; ++r) {
      const int64_t n = r / G.C;
      const int32_t c = int32_t(r % G.C);
      const int h = group_of(k.group, r);
      const T* __restrict__ dy = k.dy + r * G.P;
      T* __restrict__ dx = k.out + r * G.P;
      const A ac = k.a[r], base = k.d_mean_c[r] * invP;
      auto rows = [&](auto&& value) FA_INLINE_LAMBDA {
        for (int64_t p = 0; p < G.P; ++p) dx[p] = T(value(p));
        if (k.argmax_c) {  // the pixel max's gradient: one element per row
          const int64_t pm = k.argmax_c[r];
          if (pm >= 0 && pm < G.P) dx[pm] = T(value(pm) + k.d_max_c[r]);
        }
      };
      if constexpr (MAPS) {
        const A* __restrict__ s = map_of(k.s, n, h, k.groups, G.P);
        const A* __restrict__ dav = map_of(k.d_avg, n, h, k.groups, G.P);
        const A* __restrict__ dmx = map_of(k.d_max, n, h, k.groups, G.P);
        const int32_t* __restrict__ arg = map_of(k.argmax, n, h, k.groups, G.P);
        const A inv = k.inv[h];
        rows([&](int64_t p) FA_INLINE_LAMBDA {
          return A(dy[p]) * s[p] * ac + ac * pool_grad(dav[p] * inv, arg[p], dmx[p], c) + base;
        });
      } else {
        rows([&](int64_t p) FA_INLINE_LAMBDA { return A(dy[p]) * ac + base; });
      }
    }
  } else {  // channels-last: row (n, p)
    for (int64_t r = t0; r < t1; ++r) {
      const int64_t n = r / G.P;
      const int32_t p = int32_t(r % G.P);
      const uint8_t* __restrict__ g = k.group ? k.group + n * G.C : nullptr;
      const A* __restrict__ a = k.a + n * G.C;
      const A* __restrict__ dmc = k.d_mean_c + n * G.C;
      const T* __restrict__ dy = k.dy + r * G.C;
      T* __restrict__ dx = k.out + r * G.C;
      auto cols = [&](auto&& value) FA_INLINE_LAMBDA {
        if (k.argmax_c) {
          const A* __restrict__ dxc = k.d_max_c + n * G.C;
          const int32_t* __restrict__ axc = k.argmax_c + n * G.C;
          for (int64_t c = 0; c < G.C; ++c) {
            const A v = value(c);
            dx[c] = T(axc[c] == p ? v + dxc[c] : v);
          }
        } else {
          for (int64_t c = 0; c < G.C; ++c) dx[c] = T(value(c));
        }
      };
      if constexpr (MAPS) {
        const PixelMaps<A> pm(k, n, p);
        cols([&](int64_t c) FA_INLINE_LAMBDA {
          const uint8_t h = g ? g[c] : 0;
          const A ac = a[c];
          return A(dy[c]) * pm.gate(h) * ac + ac * pm.pool(h, int32_t(c)) + dmc[c] * invP;
        });
      } else {
        cols([&](int64_t c) FA_INLINE_LAMBDA { return A(dy[c]) * a[c] + dmc[c] * invP; });
      }
    }
  }
}

// ------------------------------------------------------------- multi-versioned entry points

template <typename T>
FA_INLINE void run_impl(Op op, const Pass<T>& k, int64_t t0, int64_t t1) {
  const bool cl = is_cl(k.G), maps = k.s != nullptr;
  switch (op) {
    case Op::kPoolPixels:
      if (k.with_max) return cl ? pool_pixels_blocks<T, true>(k, t0, t1) : pool_pixels_rows<T, true>(k, t0, t1);
      return cl ? pool_pixels_blocks<T, false>(k, t0, t1) : pool_pixels_rows<T, false>(k, t0, t1);
    case Op::kPoolChannels:
      return cl ? pool_channels_tiles<T, true>(k, t0, t1) : pool_channels_tiles<T, false>(k, t0, t1);
    case Op::kGate: return maps ? gate_rows<T, true>(k, t0, t1) : gate_rows<T, false>(k, t0, t1);
    case Op::kGateGradS:
      return cl ? gate_grad_s_tiles<T, true>(k, t0, t1) : gate_grad_s_tiles<T, false>(k, t0, t1);
    case Op::kGradA:
      if (maps) return cl ? grad_a_blocks<T, true>(k, t0, t1) : grad_a_rows<T, true>(k, t0, t1);
      return cl ? grad_a_blocks<T, false>(k, t0, t1) : grad_a_rows<T, false>(k, t0, t1);
    case Op::kGradX: return maps ? grad_x_rows<T, true>(k, t0, t1) : grad_x_rows<T, false>(k, t0, t1);
  }
}

#define FA_RUN(T) \
  FA_CLONES void run(Op op, const Pass<T>& k, int64_t t0, int64_t t1) { run_impl(op, k, t0, t1); }
FA_RUN(float)
FA_RUN(double)
FA_RUN(at::Half)
FA_RUN(at::BFloat16)
#undef FA_RUN

// Tasks of a pass and how many make up one thread's least share.
struct Tasks {
  int64_t count, grain;
};

Tasks tasks_of(Op op, const Geom& G) {
  const bool cl = is_cl(G);
  auto make = [](int64_t count, int64_t elems_per_task) {
    return Tasks{count, std::max<int64_t>(1, kTaskElems / std::max<int64_t>(1, elems_per_task))};
  };
  const int64_t pixel_blocks = (G.P + kPixelBlock - 1) / kPixelBlock;
  const int64_t channel_blocks = (G.C + kChannelBlock - 1) / kChannelBlock;
  switch (op) {
    case Op::kPoolPixels:
      if (!cl && G.P <= kShortRow)  // groups of kLanes rows (pool_pixels_rows)
        return make((G.N * G.C + kLanes - 1) / kLanes, G.P * kLanes);
      return cl ? make(G.N * channel_blocks, G.P * kChannelBlock) : make(G.N * G.C, G.P);
    case Op::kGradA:
      return cl ? make(G.N * channel_blocks, G.P * kChannelBlock) : make(G.N * G.C, G.P);
    case Op::kPoolChannels:
    case Op::kGateGradS:
      return cl ? make(G.N * ((G.P + kLanes - 1) / kLanes), G.C * kLanes)
                : make(G.N * pixel_blocks, G.C * kPixelBlock);
    case Op::kGate:
    case Op::kGradX:
      return cl ? make(G.N * G.P, G.C) : make(G.N * G.C, G.P);
  }
  return {0, 1};
}

template <typename T>
void launch(Op op, const Pass<T>& k) {
  const Tasks t = tasks_of(op, k.G);
  at::parallel_for(0, t.count, t.grain, [&](int64_t b, int64_t e) { run(op, k, b, e); });
}

template <typename T>
void set_sizes(Pass<T>& k, int64_t size0, int64_t size1) {
  using A = acc_t<T>;
  const int64_t sizes[2] = {size0, size1};
  for (int h = 0; h < 2; ++h) {
    k.inv[h] = sizes[h] > 0 ? A(1) / A(sizes[h]) : A(0);
    k.empty[h] = sizes[h] == 0;
  }
}

// ------------------------------------------------------------------------------- host ops

// The (N, C) group flags as bytes (bool is one byte holding 0 or 1); null without flags.
const uint8_t* group_bytes(const std::optional<at::Tensor>& group) {
  return group ? reinterpret_cast<const uint8_t*>(group->const_data_ptr<bool>()) : nullptr;
}

template <typename A>
const A* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr<A>() : nullptr;
}

#define FA_DISPATCH(x, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), name, __VA_ARGS__)

using OptT = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_pixels(const at::Tensor& x, bool with_max) {
  check_x(x, "pool_pixels");
  const Geom G = geom(x);
  const auto opts = x.options().dtype(acc_dtype(x));
  const auto iopts = x.options().dtype(at::kInt);
  at::Tensor mean = at::empty({G.N, G.C}, opts);  // without the max: empty max and argmax
  at::Tensor mx = with_max ? at::empty({G.N, G.C}, opts) : at::empty({0}, opts);
  at::Tensor arg = with_max ? at::empty({G.N, G.C}, iopts) : at::empty({0}, iopts);
  if (x.numel() == 0) return {mean.zero_(), mx.zero_(), arg.zero_()};
  FA_DISPATCH(x, "pool_pixels", [&] {
    using A = acc_t<scalar_t>;
    Pass<scalar_t> k;
    k.G = G;
    k.x = x.const_data_ptr<scalar_t>();
    k.with_max = with_max;
    k.r0 = mean.mutable_data_ptr<A>();
    k.r1 = with_max ? mx.mutable_data_ptr<A>() : nullptr;
    k.ri = with_max ? arg.mutable_data_ptr<int32_t>() : nullptr;
    launch(Op::kPoolPixels, k);
  });
  return {mean, mx, arg};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_channels(const at::Tensor& x, const at::Tensor& a,
                                                             const OptT& group, int64_t size0,
                                                             int64_t size1) {
  check_x(x, "pool_channels");
  const Geom G = geom(x);
  const int64_t ng = groups(x, group, size0, size1, "pool_channels: group");
  check_small(a, x, {G.N, G.C}, acc_dtype(x), "pool_channels: a");
  const auto opts = x.options().dtype(acc_dtype(x));
  at::Tensor avg = at::empty({G.N, ng, G.P}, opts), mx = at::empty({G.N, ng, G.P}, opts);
  at::Tensor arg = at::empty({G.N, ng, G.P}, x.options().dtype(at::kInt));
  if (x.numel() == 0) return {avg.zero_(), mx.zero_(), arg.zero_()};
  FA_DISPATCH(x, "pool_channels", [&] {
    using A = acc_t<scalar_t>;
    Pass<scalar_t> k;
    k.G = G;
    k.groups = int(ng);
    k.x = x.const_data_ptr<scalar_t>();
    k.a = a.const_data_ptr<A>();
    k.group = group_bytes(group);
    set_sizes(k, size0, size1);
    k.r0 = avg.mutable_data_ptr<A>();
    k.r1 = mx.mutable_data_ptr<A>();
    k.ri = arg.mutable_data_ptr<int32_t>();
    launch(Op::kPoolChannels, k);
  });
  return {avg, mx, arg};
}

at::Tensor gate(const at::Tensor& x, const at::Tensor& a, const OptT& s, const OptT& group) {
  check_x(x, "gate");
  const Geom G = geom(x);
  const int64_t ng = groups(x, group, "gate: group");
  check_small(a, x, {G.N, G.C}, acc_dtype(x), "gate: a");
  if (s) check_small(*s, x, {G.N, ng, G.P}, acc_dtype(x), "gate: s");
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  FA_DISPATCH(x, "gate", [&] {
    using A = acc_t<scalar_t>;
    Pass<scalar_t> k;
    k.G = G;
    k.groups = int(ng);
    k.x = x.const_data_ptr<scalar_t>();
    k.out = y.mutable_data_ptr<scalar_t>();
    k.a = a.const_data_ptr<A>();
    k.s = ptr_or_null<A>(s);
    k.group = group_bytes(group);
    launch(Op::kGate, k);
  });
  return y;
}

at::Tensor gate_grad_s(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& a,
                       const OptT& group) {
  check_x(x, "gate_grad_s");
  const Geom G = geom(x);
  check_like_x(dy, x, "gate_grad_s");
  const int64_t ng = groups(x, group, "gate_grad_s: group");
  check_small(a, x, {G.N, G.C}, acc_dtype(x), "gate_grad_s: a");
  at::Tensor ds = at::empty({G.N, ng, G.P}, x.options().dtype(acc_dtype(x)));
  if (x.numel() == 0) return ds.zero_();
  FA_DISPATCH(x, "gate_grad_s", [&] {
    using A = acc_t<scalar_t>;
    Pass<scalar_t> k;
    k.G = G;
    k.groups = int(ng);
    k.x = x.const_data_ptr<scalar_t>();
    k.dy = dy.const_data_ptr<scalar_t>();
    k.a = a.const_data_ptr<A>();
    k.group = group_bytes(group);
    k.r0 = ds.mutable_data_ptr<A>();
    launch(Op::kGateGradS, k);
  });
  return ds;
}

// The (n, g, p) maps of the backward (s, d_avg, d_max, argmax), when given.
template <typename T>
void set_maps(Pass<T>& k, const OptT& s, const OptT& d_avg, const OptT& d_max, const OptT& argmax,
              int64_t size0, int64_t size1) {
  using A = acc_t<T>;
  k.s = ptr_or_null<A>(s);
  k.d_avg = ptr_or_null<A>(d_avg);
  k.d_max = ptr_or_null<A>(d_max);
  k.argmax = ptr_or_null<int32_t>(argmax);
  set_sizes(k, size0, size1);
}

at::Tensor grad_a(const at::Tensor& x, const at::Tensor& dy, const OptT& s, const OptT& group,
                  const OptT& d_avg, const OptT& d_max, const OptT& argmax, int64_t size0,
                  int64_t size1) {
  check_x(x, "grad_a");
  const Geom G = geom(x);
  check_like_x(dy, x, "grad_a");
  const int64_t ng = groups(x, group, size0, size1, "grad_a: group");
  check_maps(x, ng, s, d_avg, d_max, argmax, "grad_a");
  at::Tensor da = at::empty({G.N, G.C}, x.options().dtype(acc_dtype(x)));
  if (x.numel() == 0) return da.zero_();
  FA_DISPATCH(x, "grad_a", [&] {
    using A = acc_t<scalar_t>;
    Pass<scalar_t> k;
    k.G = G;
    k.groups = int(ng);
    k.x = x.const_data_ptr<scalar_t>();
    k.dy = dy.const_data_ptr<scalar_t>();
    k.group = group_bytes(group);
    set_maps(k, s, d_avg, d_max, argmax, size0, size1);
    k.r0 = da.mutable_data_ptr<A>();
    launch(Op::kGradA, k);
  });
  return da;
}

at::Tensor grad_x(const at::Tensor& dy, const at::Tensor& a, const OptT& s, const OptT& group,
                  const OptT& d_avg, const OptT& d_max, const OptT& argmax, int64_t size0,
                  int64_t size1, const at::Tensor& d_mean_c, const OptT& d_max_c,
                  const OptT& argmax_c) {
  check_x(dy, "grad_x");
  const Geom G = geom(dy);
  const int64_t ng = groups(dy, group, size0, size1, "grad_x: group");
  check_small(a, dy, {G.N, G.C}, acc_dtype(dy), "grad_x: a");
  check_maps(dy, ng, s, d_avg, d_max, argmax, "grad_x");
  check_small(d_mean_c, dy, {G.N, G.C}, acc_dtype(dy), "grad_x: d_mean_c");
  check_pixel_max(dy, d_max_c, argmax_c, "grad_x");
  at::Tensor dx = at::empty_like(dy);
  if (dy.numel() == 0) return dx;
  FA_DISPATCH(dy, "grad_x", [&] {
    using A = acc_t<scalar_t>;
    Pass<scalar_t> k;
    k.G = G;
    k.groups = int(ng);
    k.dy = dy.const_data_ptr<scalar_t>();
    k.out = dx.mutable_data_ptr<scalar_t>();
    k.a = a.const_data_ptr<A>();
    k.group = group_bytes(group);
    set_maps(k, s, d_avg, d_max, argmax, size0, size1);
    k.d_mean_c = d_mean_c.const_data_ptr<A>();
    k.d_max_c = ptr_or_null<A>(d_max_c);
    k.argmax_c = ptr_or_null<int32_t>(argmax_c);
    launch(Op::kGradX, k);
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedattn, CPU, m) {
  m.impl("pool_pixels", &pool_pixels);
  m.impl("pool_channels", &pool_channels);
  m.impl("gate", &gate);
  m.impl("gate_grad_s", &gate_grad_s);
  m.impl("grad_a", &grad_a);
  m.impl("grad_x", &grad_x);
}

}  // namespace fusedattn
