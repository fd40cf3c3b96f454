// common.cuh: helpers shared by the spt kernels (kernels/*.cu).
//
// Every kernel file is compiled on its own to PTX by crates/spt-ops/build.rs (nvcc -ptx,
// -std=c++17, -O3, -arch=sm_$CUDA_COMPUTE_CAP, -Werror all-warnings) and loaded by the driver
// JIT through candle's `get_or_load_custom_func`. No host code lives in these files: launches,
// argument checks and launch-error checks are on the Rust side (crates/spt-ops/src/cuda/).
//
// Conventions
// - f32 and bf16 data (kernel names end in _f32 / _bf16), f32 accumulation: values are read
//   with spt_ld (bf16 → f32) and written with spt_st<T> (f32 → T, round to nearest even), so a
//   bf16 kernel rounds once per stored element; saved statistics (lse, p, ds, partial sums)
//   stay f32. Each file writes its kernels once as templates over the element type T and
//   instantiates both with a macro. Integer sizes are passed as `int` (the Rust side checks that
//   every size and every product used as an index fits in i32 before launching).
// - Reductions are in a fixed order (warp shuffles, then per-warp partials summed by warp 0), so
//   every kernel here is deterministic: same inputs, same bits, run after run.
// - Blocks are 1-D and their size is a multiple of 32, at most 1024.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#define SPT_SENTINEL 0xFFFFFFFFu
#define SPT_WARP 32

__device__ __forceinline__ float spt_ld(float v) { return v; }
__device__ __forceinline__ float spt_ld(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T spt_st(float v);
template <>
__device__ __forceinline__ float spt_st<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 spt_st<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float spt_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

__device__ __forceinline__ float spt_warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}

// Block-wide sum, broadcast to every thread. `scratch` holds at least 32 floats. Contains
// __syncthreads: call from every thread of the block.
__device__ __forceinline__ float spt_block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % SPT_WARP, warp = threadIdx.x / SPT_WARP;
  const int nwarps = blockDim.x / SPT_WARP;
  v = spt_warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < nwarps ? scratch[lane] : 0.0f;
  return spt_warp_sum(t);
}

// Block-wide max, broadcast to every thread (same contract as spt_block_sum).
__device__ __forceinline__ float spt_block_max(float v, float* scratch) {
  const int lane = threadIdx.x % SPT_WARP, warp = threadIdx.x / SPT_WARP;
  const int nwarps = blockDim.x / SPT_WARP;
  v = spt_warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < nwarps ? scratch[lane] : -INFINITY;
  return spt_warp_max(t);
}

// Block-wide exclusive prefix sum of `v` in thread order; `*total` gets the block total.
// `scratch` holds at least 33 ints. Contains __syncthreads.
__device__ __forceinline__ int spt_block_exclusive_scan(int v, int* scratch, int* total) {
  const int lane = threadIdx.x % SPT_WARP, warp = threadIdx.x / SPT_WARP;
  const int nwarps = blockDim.x / SPT_WARP;
  int x = v;  // inclusive scan within the warp
#pragma unroll
  for (int o = 1; o < SPT_WARP; o <<= 1) {
    int y = __shfl_up_sync(0xFFFFFFFFu, x, o);
    if (lane >= o) x += y;
  }
  __syncthreads();
  if (lane == SPT_WARP - 1) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int w = lane < nwarps ? scratch[lane] : 0;
    int s = w;
#pragma unroll
    for (int o = 1; o < SPT_WARP; o <<= 1) {
      int y = __shfl_up_sync(0xFFFFFFFFu, s, o);
      if (lane >= o) s += y;
    }
    if (lane < nwarps) scratch[lane] = s - w;  // exclusive warp offsets
    if (lane == SPT_WARP - 1) scratch[32] = s;
  }
  __syncthreads();
  int r = scratch[warp] + x - v;
  *total = scratch[32];
  return r;
}
