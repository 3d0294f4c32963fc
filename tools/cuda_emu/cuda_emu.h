// CUDA C++ kernels executed on the CPU: the device-side API that the kernel sources of csrc/cuda/
// use, for host g++ (C++20). tools/cuda_emu/rewrite.py turns a .cu file into host C++ over this
// header (launches, __shared__ declarations, __global__ entry points); cuda_emu.cpp holds the
// runtime. The CUDA toolkit's own vector_types.h (dim3, uint3, float4, ... with their __align__)
// and cuda_fp16.h / cuda_bf16.h provide the types.
//
// Execution model: a launch runs its blocks one at a time, in linear order; each CUDA thread of a
// block is an OS thread (a pool, reused across blocks and launches), so the threads of a block
// really run concurrently. Warps are 32 consecutive linear thread indices. Semantics:
//
//  * __syncthreads(): a counting barrier of the block. A barrier that some thread of the block
//    never reaches (it exited, or it waits at a different __syncthreads) is an error
//    ("divergent __syncthreads"), as is a deadlock (every live thread waiting on a barrier or a
//    warp collective that cannot complete).
//  * Warp collectives (__shfl*_sync, __ballot_sync, __any_sync, __all_sync, __syncwarp,
//    __reduce_*_sync): every lane named in the mask must arrive at the same collective (the
//    same intrinsic, width and operand size; from any call site, as on sm_70 and later); the
//    results follow PTX's shfl.sync definition exactly (width segments, out-of-range source lanes
//    return the caller's own value, the lane operand taken mod 32, shfl_xor reaching a lower
//    segment). A mask that does not name the caller, names an exited (or nonexistent) lane, a
//    source lane outside the mask, or a width that is not a power of two <= 32 is an error.
//  * Shared memory: every __shared__ variable is its own heap allocation of exactly its size
//    (AddressSanitizer sees overruns), filled with 0xFF bytes (NaN for floating point, -1 for
//    integers, an invalid bool) at each block; dynamic shared memory likewise (NaN-filled). Static
//    shared memory above 48 KiB per block is an error, as on the device.
//  * Memory ordering under ThreadSanitizer: happens-before comes only from what CUDA orders —
//    the launch (host -> every thread), __syncthreads (block), __syncwarp (its lanes), the end of
//    a launch (every thread -> host). Shuffles, votes and the emulator's own locks create none,
//    and blocks are unordered with respect to each other, so missing barriers, warp-synchronous
//    shared-memory code without __syncwarp and overlapping writes of different blocks are
//    reported as data races.
//  * Errors found by the emulator abort the block; the launch throws emu::Error (a
//    std::runtime_error: a RuntimeError in Python when raised inside a torch op).
//
// Not modelled: memory ordering between blocks of one launch beyond "unordered" (no
// __threadfence-based protocols), timing, the device's fast-math instructions (exp2f is the host's
// exp2f, not ex2.approx.ftz; denormals are not flushed), and independent thread scheduling
// corner cases of __activemask (it returns the lanes that have not exited).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <math.h>
#include <new>
#include <source_location>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include <vector_types.h>  // from the CUDA toolkit: dim3, uint3, float4, ...
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// crt/host_defines.h (through vector_types.h) defines the execution-space keywords as empty
// for a host compiler; what the rewriter must have removed becomes a compile error instead.
#undef __forceinline__
#define __forceinline__ inline
#define __launch_bounds__(...)
#undef __global__
#define __global__ EMU_ERROR_global_function_not_rewritten
#undef __shared__
#define __shared__ EMU_ERROR_shared_declaration_not_rewritten
#undef __constant__
#define __constant__
#ifndef __CUDA_EMU__
#define __CUDA_EMU__ 1
#endif

#define EMU_API __attribute__((visibility("default")))

typedef struct CUstream_st* cudaStream_t;

// Thread and block coordinates of the calling emulated thread (CUDA's built-in variables).
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace emu {

using Loc = std::source_location;

// A launch that failed: the emulator's finding, with the kernel, block and thread.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Thrown inside emulated threads to unwind them once their block has failed.
struct Abort {};

enum Collective : int {
  kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncWarp,
  kReduceAddU, kReduceMinU, kReduceMaxU, kReduceAddI, kReduceMinI, kReduceMaxI,
  kReduceAnd, kReduceOr, kReduceXor,
};

// ---- runtime entry points (cuda_emu.cpp)
[[noreturn]] void fail(const std::string& msg);  // from a kernel thread: the block fails
int syncthreads(int kind, int pred, Loc loc);    // kind 0: plain, 1: count, 2: and, 3: or
uint64_t warp_collective(int kind, uint32_t mask, uint64_t bits, int size, int b, int width,
                         Loc loc);
uint32_t active_mask();
void* shared_static(const void* site, size_t size, size_t align, const char* name);
void* shared_dynamic(size_t align);
void kernel_entry(const char* pretty, long bounds);
void run_grid(const char* file, int line, dim3 grid, dim3 block, size_t shmem,
              const std::function<void()>& body);

// ---- shared memory (what the rewriter turns __shared__ declarations into)
struct SharedSite {
  char unused;
};
template <typename T>
using id = T;

template <typename T>
T& shared_var(const SharedSite& site, const char* name) {
  static_assert(std::is_trivially_destructible_v<T>, "__shared__ of a non-trivial type");
  constexpr size_t align = alignof(T) < 16 ? 16 : alignof(T);
  return *std::launder(reinterpret_cast<T*>(shared_static(&site, sizeof(T), align, name)));
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(shared_dynamic(alignof(T)));
}

// ---- launches: `kernel<<<g, b, s, st>>>(args)` becomes `emu::launch(kernel, file, line, g, b,
// s, st)(args)`. Grid and block extents given as integers are range-checked before the
// conversion to dim3 (a negative or > 2^32 - 1 extent is an error, as on the device).
template <typename V>
dim3 to_dim3(const V& v, const char* what, const char* file, int line) {
  if constexpr (std::is_integral_v<V>) {
    if (v <= 0 || static_cast<unsigned long long>(v) > 0xffffffffull)
      throw Error(std::string(file) + ":" + std::to_string(line) + ": kernel launch with " + what +
                  " extent " + std::to_string(v) + " (cudaErrorInvalidConfiguration)");
    return dim3(static_cast<unsigned>(v));
  } else {
    return dim3(v);
  }
}

template <typename... P>
struct Launcher {
  void (*fn)(P...);
  dim3 grid, block;
  size_t shmem;
  const char* file;
  int line;

  template <typename... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launch: wrong number of arguments");
    // The kernel's parameters, converted once as the launch does; every thread gets a copy.
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(a)...);
    auto* f = fn;
    run_grid(file, line, grid, block, shmem, [&params, f]() { std::apply(f, params); });
  }
};

template <typename... P, typename G, typename B>
Launcher<P...> launch(void (*fn)(P...), const char* file, int line, const G& g, const B& b,
                      size_t shmem = 0, cudaStream_t = nullptr) {
  return Launcher<P...>{fn, to_dim3(g, "grid", file, line), to_dim3(b, "block", file, line),
                        shmem, file, line};
}

template <typename T>
uint64_t to_bits(const T& v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "warp shuffle of a type wider than 8 bytes");
  uint64_t r = 0;
  std::memcpy(&r, &v, sizeof(T));
  return r;
}

template <typename T>
T from_bits(uint64_t r) {
  T v;
  std::memcpy(&v, &r, sizeof(T));
  return v;
}

}  // namespace emu

#define EMU_KERNEL_ENTRY(bounds) ::emu::kernel_entry(__PRETTY_FUNCTION__, (bounds))

// ------------------------------------------------------------------ barriers and warp intrinsics

inline void __syncthreads(emu::Loc loc = emu::Loc::current()) { emu::syncthreads(0, 0, loc); }
inline int __syncthreads_count(int p, emu::Loc loc = emu::Loc::current()) {
  return emu::syncthreads(1, p, loc);
}
inline int __syncthreads_and(int p, emu::Loc loc = emu::Loc::current()) {
  return emu::syncthreads(2, p, loc);
}
inline int __syncthreads_or(int p, emu::Loc loc = emu::Loc::current()) {
  return emu::syncthreads(3, p, loc);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, emu::Loc loc = emu::Loc::current()) {
  emu::warp_collective(emu::kSyncWarp, mask, 0, 0, 0, 32, loc);
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize,
              emu::Loc loc = emu::Loc::current()) {
  return emu::from_bits<T>(emu::warp_collective(emu::kShflIdx, mask, emu::to_bits(var),
                                                int(sizeof(T)), srcLane, width, loc));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 emu::Loc loc = emu::Loc::current()) {
  return emu::from_bits<T>(emu::warp_collective(emu::kShflUp, mask, emu::to_bits(var),
                                                int(sizeof(T)), int(delta), width, loc));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   emu::Loc loc = emu::Loc::current()) {
  return emu::from_bits<T>(emu::warp_collective(emu::kShflDown, mask, emu::to_bits(var),
                                                int(sizeof(T)), int(delta), width, loc));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize,
                  emu::Loc loc = emu::Loc::current()) {
  return emu::from_bits<T>(emu::warp_collective(emu::kShflXor, mask, emu::to_bits(var),
                                                int(sizeof(T)), laneMask, width, loc));
}

inline unsigned __ballot_sync(unsigned mask, int pred, emu::Loc loc = emu::Loc::current()) {
  return unsigned(emu::warp_collective(emu::kBallot, mask, pred != 0, 4, 0, 32, loc));
}
inline int __any_sync(unsigned mask, int pred, emu::Loc loc = emu::Loc::current()) {
  return int(emu::warp_collective(emu::kAny, mask, pred != 0, 4, 0, 32, loc));
}
inline int __all_sync(unsigned mask, int pred, emu::Loc loc = emu::Loc::current()) {
  return int(emu::warp_collective(emu::kAll, mask, pred != 0, 4, 0, 32, loc));
}
inline unsigned __activemask() { return emu::active_mask(); }

inline unsigned __reduce_add_sync(unsigned mask, unsigned v, emu::Loc loc = emu::Loc::current()) {
  return unsigned(emu::warp_collective(emu::kReduceAddU, mask, v, 4, 0, 32, loc));
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v, emu::Loc loc = emu::Loc::current()) {
  return unsigned(emu::warp_collective(emu::kReduceMinU, mask, v, 4, 0, 32, loc));
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v, emu::Loc loc = emu::Loc::current()) {
  return unsigned(emu::warp_collective(emu::kReduceMaxU, mask, v, 4, 0, 32, loc));
}
inline int __reduce_add_sync(unsigned mask, int v, emu::Loc loc = emu::Loc::current()) {
  return int(emu::warp_collective(emu::kReduceAddI, mask, uint32_t(v), 4, 0, 32, loc));
}
inline int __reduce_min_sync(unsigned mask, int v, emu::Loc loc = emu::Loc::current()) {
  return int(emu::warp_collective(emu::kReduceMinI, mask, uint32_t(v), 4, 0, 32, loc));
}
inline int __reduce_max_sync(unsigned mask, int v, emu::Loc loc = emu::Loc::current()) {
  return int(emu::warp_collective(emu::kReduceMaxI, mask, uint32_t(v), 4, 0, 32, loc));
}
inline unsigned __reduce_and_sync(unsigned mask, unsigned v, emu::Loc loc = emu::Loc::current()) {
  return unsigned(emu::warp_collective(emu::kReduceAnd, mask, v, 4, 0, 32, loc));
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned v, emu::Loc loc = emu::Loc::current()) {
  return unsigned(emu::warp_collective(emu::kReduceOr, mask, v, 4, 0, 32, loc));
}
inline unsigned __reduce_xor_sync(unsigned mask, unsigned v, emu::Loc loc = emu::Loc::current()) {
  return unsigned(emu::warp_collective(emu::kReduceXor, mask, v, 4, 0, 32, loc));
}

// ----------------------------------------------------------------------------------- memory

// Read-only cached load: an explicit alignment check (a misaligned vector load faults on the
// device), then the load.
template <typename T>
T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0)
    emu::fail("__ldg: misaligned load of " + std::to_string(sizeof(T)) + " bytes at address " +
              std::to_string(reinterpret_cast<uintptr_t>(p)) + " (needs " +
              std::to_string(alignof(T)) + "-byte alignment)");
  return *p;
}

// Atomics: relaxed, as the device's (atomicAdd and friends order nothing).
template <typename T>
T atomicAdd(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v, std::memory_order_relaxed);
}
template <typename T>
T atomicSub(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_sub(v, std::memory_order_relaxed);
}
template <typename T>
T atomicExch(T* p, T v) {
  return std::atomic_ref<T>(*p).exchange(v, std::memory_order_relaxed);
}
template <typename T>
T atomicCAS(T* p, T compare, T v) {
  std::atomic_ref<T>(*p).compare_exchange_strong(compare, v, std::memory_order_relaxed);
  return compare;
}
template <typename T>
T atomicMax(T* p, T v) {
  std::atomic_ref<T> r(*p);
  T old = r.load(std::memory_order_relaxed);
  while (old < v && !r.compare_exchange_weak(old, v, std::memory_order_relaxed)) {
  }
  return old;
}
template <typename T>
T atomicMin(T* p, T v) {
  std::atomic_ref<T> r(*p);
  T old = r.load(std::memory_order_relaxed);
  while (v < old && !r.compare_exchange_weak(old, v, std::memory_order_relaxed)) {
  }
  return old;
}
template <typename T>
T atomicAnd(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_and(v, std::memory_order_relaxed);
}
template <typename T>
T atomicOr(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_or(v, std::memory_order_relaxed);
}
template <typename T>
T atomicXor(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_xor(v, std::memory_order_relaxed);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ------------------------------------------------------------------------- math intrinsics
// Correctly rounded ones are exact on the host too; the approximate ones (fast math) are the
// host's accurate functions.

using std::isfinite;
using std::isinf;
using std::isnan;

inline double __drcp_rn(double a) { return 1.0 / a; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __expf(float a) { return std::exp(a); }
inline float __exp2f(float a) { return std::exp2(a); }
inline float __logf(float a) { return std::log(a); }
inline float __log2f(float a) { return std::log2(a); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __sinf(float a) { return std::sin(a); }
inline float __cosf(float a) { return std::cos(a); }
inline float __saturatef(float a) { return a != a ? 0.0f : a < 0.0f ? 0.0f : a > 1.0f ? 1.0f : a; }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }
inline float __frsqrt_rn(float a) { return 1.0f / std::sqrt(a); }

inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }
inline int __mulhi(int a, int b) { return int((int64_t(a) * b) >> 32); }
