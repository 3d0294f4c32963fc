// Self-tests of the CUDA emulation (tools/cuda_emu/cuda_emu.h), written as CUDA: they go through
// the same rewriter and runtime as csrc/cuda/*.cu. Each host entry point (C ABI, called with
// ctypes by tools/cuda_emu/run_cases.py) launches one small kernel on host buffers and returns 0
// when the launch completed, 1 when the emulator refused it (its message in `err`).
//
//  * semantics, checked against hand-computed tables by tests/test_cuda_emulated.py: shuffles of
//    every mode and width, votes, warp reductions, barrier predicates, atomics, the NaN fill of
//    shared memory;
//  * errors the emulator itself reports: divergent barriers, masks naming exited lanes, a source
//    lane outside the mask, deadlocks, a bad width, launch bounds and launch configuration, too
//    much static shared memory;
//  * errors the sanitizers report (the test expects each report in the kernel's own segment of
//    the run's output): shared and global overruns (ASan), a misaligned float4 / __half2 load and
//    an out-of-bounds index of a 2-D shared array (UBSan), a missing __syncthreads, a
//    warp-synchronous reduction without __syncwarp, memory passed through a shuffle, and two
//    blocks writing one element (TSan); each next to its correct twin, which must stay silent.
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#ifndef EMU_API  // compiled by nvcc (the kernels are plain CUDA)
#define EMU_API __attribute__((visibility("default")))
#endif

namespace emu_selftest {

constexpr unsigned kFull = 0xffffffffu;

// --------------------------------------------------------------------------- semantics tables

// out[lane] = the mode's shuffle of 100 + lane (mode 0 idx, 1 up, 2 down, 3 xor).
__global__ void shfl_table(int* out, int mode, int arg, int width) {
  const int lane = threadIdx.x;
  const int v = 100 + lane;
  int r = 0;
  switch (mode) {
    case 0: r = __shfl_sync(kFull, v, arg, width); break;
    case 1: r = __shfl_up_sync(kFull, v, unsigned(arg), width); break;
    case 2: r = __shfl_down_sync(kFull, v, unsigned(arg), width); break;
    default: r = __shfl_xor_sync(kFull, v, arg, width); break;
  }
  out[lane] = r;
}

// 64-bit values move whole: out[lane] = 1 if the double from lane ^ 1 arrived bit for bit.
__global__ void shfl_double(int* out) {
  const int lane = threadIdx.x;
  const double v = 1.0 + lane * 0.1 + 1e-13 * lane;
  const double w = __shfl_xor_sync(kFull, v, 1);
  const double want = 1.0 + (lane ^ 1) * 0.1 + 1e-13 * (lane ^ 1);
  out[lane] = w == want;
}

// Votes and reductions over 64 threads (two warps): out = ballot, any, all, count, and, or, add,
// min, max per warp; pred = lane % 3 == 0 (all-true for warp 1's all/and).
__global__ void votes(unsigned* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int pred = lane % 3 == 0;
  const unsigned b = __ballot_sync(kFull, pred);
  const int any = __any_sync(kFull, pred), all = __all_sync(kFull, warp ? 1 : pred);
  const unsigned add = __reduce_add_sync(kFull, unsigned(lane));
  const int mn = __reduce_min_sync(kFull, 5 - lane), mx = __reduce_max_sync(kFull, 5 - lane);
  const int cnt = __syncthreads_count(pred), andv = __syncthreads_and(warp ? 1 : pred);
  const int orv = __syncthreads_or(threadIdx.x == 63);
  if (lane == 0) {
    unsigned* o = out + warp * 9;
    o[0] = b; o[1] = any; o[2] = all; o[3] = cnt; o[4] = andv; o[5] = orv; o[6] = add;
    o[7] = unsigned(mn); o[8] = unsigned(mx);
  }
}

// A partial mask: lanes 0..15 shuffle among themselves (xor 8), the rest exit first.
__global__ void partial_mask(int* out) {
  const int lane = threadIdx.x;
  if (lane >= 16) return;
  out[lane] = __shfl_xor_sync(0x0000ffffu, 100 + lane, 8);
}

// Block sum through shared memory with barriers, and atomics: out[0] = sum of 0..255 through
// shared memory, out[1] by atomicAdd, out[2] by a float atomicAdd (exact), out[3] atomicMax.
__global__ void block_sum(int* out, float* fout) {
  __shared__ int s[256];
  s[threadIdx.x] = int(threadIdx.x);
  __syncthreads();
  for (int w = 128; w > 0; w >>= 1) {
    if (int(threadIdx.x) < w) s[threadIdx.x] += s[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = s[0];
  atomicAdd(&out[1], int(threadIdx.x));
  atomicAdd(fout, float(threadIdx.x));
  atomicMax(&out[3], int(threadIdx.x) * 7 % 251);
}

// Shared memory before it is written: out = isnan(static float), isnan(dynamic float), the
// static int (-1); then the values written behind a barrier.
__global__ void shared_fill(float* out) {
  __shared__ float sf[64];
  __shared__ int si[64];
  extern __shared__ float dyn[];
  if (threadIdx.x == 0) {
    out[0] = isnan(sf[5]) ? 1.0f : 0.0f;
    out[1] = isnan(dyn[7]) ? 1.0f : 0.0f;
    out[2] = float(si[3]);
  }
  __syncthreads();
  sf[threadIdx.x] = float(threadIdx.x);
  dyn[threadIdx.x] = 2.0f * threadIdx.x;
  __syncthreads();
  if (threadIdx.x == 0) {
    out[3] = sf[63];
    out[4] = dyn[63];
  }
}

// ---------------------------------------------------------------- errors the emulator reports

__global__ void divergent_exit(int* out) {  // half the block exits, half waits
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void divergent_sites(int* out) {  // two different barriers
  if (threadIdx.x & 1) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void mask_names_exited(int* out) {  // lanes 16..31 exited, the mask names them
  const int lane = threadIdx.x;
  if (lane >= 16) return;
  out[lane] = __shfl_xor_sync(kFull, lane, 1);
}

__global__ void mask_without_caller(int* out) {
  out[threadIdx.x] = __shfl_sync(0x1u, int(threadIdx.x), 0);
}

__global__ void source_outside_mask(int* out) {  // lanes 0..15 read lane 20
  const int lane = threadIdx.x;
  if (lane >= 16) return;
  out[lane] = __shfl_sync(0x0000ffffu, lane, 20, 32);
}

__global__ void bad_width(int* out) {
  out[threadIdx.x] = __shfl_down_sync(kFull, int(threadIdx.x), 1, 12);
}

__global__ void deadlock(int* out) {  // lanes 0..15 in a full-warp shuffle, 16..31 at a barrier
  const int lane = threadIdx.x;
  int v = lane;
  if (lane < 16) v = __shfl_xor_sync(kFull, v, 1);
  else __syncthreads();
  out[lane] = v;
}

__global__ void __launch_bounds__(64) bounded(int* out) { out[threadIdx.x] = 1; }

#if !defined(__CUDACC__)  // nvcc refuses it at compile time: "uses too much shared data
                          // (0x10000 bytes, 0xc000 max)", what the emulator says at run time
__global__ void too_much_shared(int* out) {
  __shared__ double big[4096];
  __shared__ double more[4096];
  big[threadIdx.x] = 1;
  more[threadIdx.x] = 2;
  out[threadIdx.x] = int(big[threadIdx.x] + more[threadIdx.x]);
}
#endif

// ------------------------------------------------------------- errors the sanitizers report

// ASan: thread 31 reads one element past a __shared__ array (through a pointer, so that only
// AddressSanitizer can see it); twin: reads inside.
__global__ void shared_overrun(float* out, int past) {
  __shared__ float s[32];
  s[threadIdx.x] = 1.0f;
  __syncthreads();
  const float* p = s;
  out[threadIdx.x] = p[threadIdx.x + (past ? 1 : 0)];
}

// ASan: the last thread writes one element past a global buffer of n; twin: n threads write n.
__global__ void global_overrun(float* out, int n) { out[threadIdx.x] = float(n); }

// UBSan: a float4 load from a pointer 4 bytes past a 16-byte boundary; twin: aligned.
__global__ void misaligned_float4(const float* in, float* out, int offset) {
  const float4 v = *reinterpret_cast<const float4*>(in + offset + 4 * threadIdx.x);
  out[threadIdx.x] = v.x + v.y + v.z + v.w;
}

// UBSan: a __half2 load 2 bytes off its 4-byte alignment; twin: aligned.
__global__ void misaligned_half2(const __half* in, float* out, int offset) {
  const __half2 v = *reinterpret_cast<const __half2*>(in + offset + 2 * threadIdx.x);
  out[threadIdx.x] = __half2float(v.x) + __half2float(v.y);
}

// UBSan (bounds): row index 8 of a [8][33] shared array; twin: row 7.
__global__ void shared_2d_bounds(float* out, int row) {
  __shared__ float s[8][33];
  s[threadIdx.x % 8][threadIdx.x % 33] = 1.0f;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = s[row][0];
}

// TSan: every thread reads an element another thread wrote, without a barrier; twin: with one.
__global__ void missing_barrier(float* out, int barrier) {
  __shared__ float s[64];
  s[threadIdx.x] = float(threadIdx.x);
  if (barrier) __syncthreads();
  out[threadIdx.x] = s[63 - threadIdx.x];
}

// TSan: the last warp of a shared-memory reduction relying on lockstep execution (no
// __syncwarp), the pre-Volta idiom; twin: __syncwarp between reading and writing each step.
__global__ void warp_sync_reduction(float* out, int syncwarp) {
  __shared__ float s[64];
  s[threadIdx.x] = float(threadIdx.x);
  __syncthreads();
  const int t = threadIdx.x;
  if (t < 32) {
    for (int w = 32; w > 0; w >>= 1) {
      float v = 0.0f;
      if (t < w) v = s[t] + s[t + w];
      if (syncwarp) __syncwarp();
      if (t < w) s[t] = v;
      if (syncwarp) __syncwarp();
    }
    if (t == 0) out[0] = s[0];
  }
}

// TSan: lane 0 writes shared memory, a shuffle, lane 1 reads it (a shuffle orders no memory);
// twin: __syncwarp instead of relying on the shuffle.
__global__ void shuffle_is_no_fence(float* out, int syncwarp) {
  __shared__ float s[1];
  const int lane = threadIdx.x;
  if (lane == 0) s[0] = 42.0f;
  const int v = __shfl_sync(kFull, lane, 0);
  if (syncwarp) __syncwarp();
  if (lane == 1) out[0] = s[0] + float(v);
}

// TSan: every block writes out[threadIdx.x] (the block index forgotten); twin: indexed.
__global__ void blocks_overlap(float* out, int indexed) {
  const unsigned i = indexed ? blockIdx.x * blockDim.x + threadIdx.x : threadIdx.x;
  out[i] = float(blockIdx.x);
}

// ------------------------------------------------------------------------------- host side

template <typename F>
int guarded(char* err, int errlen, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    if (err && errlen > 0) {
      std::strncpy(err, e.what(), size_t(errlen) - 1);
      err[errlen - 1] = 0;
    }
    return 1;
  }
}

}  // namespace emu_selftest

using namespace emu_selftest;

extern "C" {

EMU_API int emu_st_shfl(int mode, int arg, int width, int* out, char* err, int errlen) {
  return guarded(err, errlen, [&] { shfl_table<<<1, 32>>>(out, mode, arg, width); });
}

EMU_API int emu_st_shfl_double(int* out, char* err, int errlen) {
  return guarded(err, errlen, [&] { shfl_double<<<1, 32>>>(out); });
}

EMU_API int emu_st_votes(unsigned* out, char* err, int errlen) {
  return guarded(err, errlen, [&] { votes<<<1, 64>>>(out); });
}

EMU_API int emu_st_partial_mask(int* out, char* err, int errlen) {
  return guarded(err, errlen, [&] { partial_mask<<<1, 32>>>(out); });
}

EMU_API int emu_st_block_sum(int* out, float* fout, char* err, int errlen) {
  return guarded(err, errlen, [&] { block_sum<<<1, 256>>>(out, fout); });
}

EMU_API int emu_st_shared_fill(float* out, char* err, int errlen) {
  return guarded(err, errlen, [&] { shared_fill<<<1, 64, 64 * sizeof(float)>>>(out); });
}

// The emulator's own findings: `which` picks the kernel; the launch must fail.
EMU_API int emu_st_error(int which, char* err, int errlen) {
  int out[1024] = {};
  return guarded(err, errlen, [&] {
    switch (which) {
      case 0: divergent_exit<<<1, 64>>>(out); break;
      case 1: divergent_sites<<<1, 64>>>(out); break;
      case 2: mask_names_exited<<<1, 32>>>(out); break;
      case 3: mask_without_caller<<<1, 32>>>(out); break;
      case 4: source_outside_mask<<<1, 32>>>(out); break;
      case 5: bad_width<<<1, 32>>>(out); break;
      case 6: deadlock<<<1, 32>>>(out); break;
      case 7: bounded<<<1, 128>>>(out); break;
      case 8: bounded<<<0, 32>>>(out); break;
      case 9: bounded<<<1, 2048>>>(out); break;
#if !defined(__CUDACC__)
      case 10: too_much_shared<<<1, 32>>>(out); break;
#endif
      default: break;
    }
  });
}

// The sanitizers' findings: `bad` selects the faulty twin. Buffers are heap allocations of
// exactly the size the correct twin needs.
EMU_API int emu_st_sanitize(int which, int bad, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    switch (which) {
      case 0: {
        float* out = new float[32];
        shared_overrun<<<1, 32>>>(out, bad);
        delete[] out;
        break;
      }
      case 1: {
        float* out = new float[32];
        global_overrun<<<1, bad ? 33 : 32>>>(out, 32);
        delete[] out;
        break;
      }
      case 2: {
        float* in = static_cast<float*>(std::aligned_alloc(16, 16 * 33));
        float out[32];
        for (int i = 0; i < 4 * 33; ++i) in[i] = 1.0f;
        misaligned_float4<<<1, 32>>>(in, out, bad ? 1 : 0);
        std::free(in);
        break;
      }
      case 3: {
        __half* in = static_cast<__half*>(std::aligned_alloc(16, 2 * 80));
        float out[32];
        for (int i = 0; i < 80; ++i) in[i] = __float2half(1.0f);
        misaligned_half2<<<1, 32>>>(in, out, bad ? 1 : 0);
        std::free(in);
        break;
      }
      case 4: {
        float out[1];
        shared_2d_bounds<<<1, 64>>>(out, bad ? 8 : 7);
        break;
      }
      case 5: {
        float* out = new float[64];
        missing_barrier<<<1, 64>>>(out, !bad);
        delete[] out;
        break;
      }
      case 6: {
        float out[1];
        warp_sync_reduction<<<1, 64>>>(out, !bad);
        break;
      }
      case 7: {
        float out[1];
        shuffle_is_no_fence<<<1, 32>>>(out, !bad);
        break;
      }
      case 8: {
        float* out = new float[4 * 32];
        blocks_overlap<<<4, 32>>>(out, !bad);
        delete[] out;
        break;
      }
      default: break;
    }
  });
}

}  // extern "C"
