// cuda_emu.hpp: just enough CUDA to run a kernel file's device code on the host, one OS thread
// per CUDA thread, so that kernels can be checked on a machine without a GPU.
//
// What it models: threadIdx / blockIdx / blockDim / gridDim, __syncthreads (a barrier over the
// block's threads), __shfl_xor_sync (a barrier over the warp's 32 threads), dynamic shared memory
// (one zeroed buffer per block), ldmatrix .x4 (plain and .trans), and the warp-collective
// mma.sync.m16n8k16 (bf16 × bf16 + f32) with the fragment layouts of the PTX ISA: with g = lane / 4 and t = lane % 4, A register r holds
// row g + 8·(r & 1), columns 2t, 2t + 1 (+ 8 for r ≥ 2); B register r holds rows 2t, 2t + 1
// (+ 8 for r = 1) of column g; accumulator element e is row g + 8·(e / 2), column 2t + (e & 1).
// The low 16 bits of a packed register hold the lower-indexed element.
//
// What it does not: timing, memory coalescing, bank conflicts, divergence rules (every lane must
// reach every barrier, as the kernels already require), the real tensor cores' summation order
// (here each product is summed in f32 in k order). It checks indexing, masking and algebra, not
// the hardware's fragment layout itself, which it takes from the ISA as the kernel does.
//
// Blocks run one after the other; a block's threads run concurrently.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__

using std::max;
using std::min;

struct EmuDim {
  unsigned x = 1, y = 1, z = 1;
};
struct uint4 {
  unsigned x, y, z, w;
};

// The helpers of common.cuh that kernels use, for f32 data (bf16 kernels are not emulated: their
// instantiation only needs the type).
#define SPT_SENTINEL 0xFFFFFFFFu
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float spt_ld(float v) { return v; }
inline float spt_ld(__nv_bfloat16 v) {
  const uint32_t x = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

template <typename T>
inline T spt_st(float v);
template <>
inline float spt_st<float>(float v) {
  return v;
}
template <>
inline __nv_bfloat16 spt_st<__nv_bfloat16>(float v) {  // round to nearest even (NaN stays NaN)
  uint32_t x;
  std::memcpy(&x, &v, 4);
  if ((x & 0x7F800000u) == 0x7F800000u && (x & 0x007FFFFFu)) return {0x7FC0u};
  return {static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16)};
}

inline thread_local EmuDim threadIdx, blockIdx, blockDim, gridDim;

struct EmuWarp {
  std::barrier<> bar{32};
  float f[32];
  uint32_t u[32];
  uint32_t a[32][4], b[32][2];
  float c[32][4];
  const uint16_t* rows[32];
};

struct EmuBlock {
  explicit EmuBlock(unsigned threads, size_t smem_bytes)
      : bar(threads), warps(threads / 32), smem(smem_bytes + 16, 0) {
    for (auto& w : warps) w = std::make_unique<EmuWarp>();
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<EmuWarp>> warps;
  std::vector<unsigned char> smem;
};

inline thread_local EmuBlock* emu_block = nullptr;

inline void __syncthreads() { emu_block->bar.arrive_and_wait(); }

inline EmuWarp& emu_warp() { return *emu_block->warps[threadIdx.x / 32]; }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  EmuWarp& w = emu_warp();
  const unsigned lane = threadIdx.x % 32;
  w.f[lane] = v;
  w.bar.arrive_and_wait();
  const float r = w.f[lane ^ unsigned(lane_mask)];
  w.bar.arrive_and_wait();
  return r;
}

// The other warp collectives the row kernels of sparse_attention.cu use: a full warp, every
// lane taking part (as those kernels require).
inline void __syncwarp(unsigned = 0xFFFFFFFFu) { emu_warp().bar.arrive_and_wait(); }

// Every lane posts `v` in the warp's `slots`, then reads lane `src`'s.
template <typename T>
inline T emu_shfl(T (&slots)[32], T v, int src) {
  EmuWarp& w = emu_warp();
  slots[threadIdx.x % 32] = v;
  w.bar.arrive_and_wait();
  const T r = slots[unsigned(src) % 32];
  w.bar.arrive_and_wait();
  return r;
}
inline float __shfl_sync(unsigned, float v, int src) { return emu_shfl(emu_warp().f, v, src); }
inline uint32_t __shfl_sync(unsigned, uint32_t v, int src) { return emu_shfl(emu_warp().u, v, src); }

inline unsigned __ballot_sync(unsigned, int pred) {
  EmuWarp& w = emu_warp();
  w.u[threadIdx.x % 32] = pred != 0;
  w.bar.arrive_and_wait();
  unsigned m = 0;
  for (unsigned l = 0; l < 32; ++l) m |= w.u[l] << l;
  w.bar.arrive_and_wait();
  return m;
}

inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }

// common.cuh's warp reductions, as written there.
#define SPT_WARP 32
inline float spt_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}
inline float spt_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  return v;
}

// Static shared arrays: blocks run one after the other, so one static array per kernel serves
// every block in turn.
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
struct float4 {
  float x, y, z, w;
};
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}

inline float emu_bf16_bits_to_float(uint32_t h) {
  const uint32_t x = h << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

// d = a·b + c for one warp's m16n8k16 fragments (bf16 inputs, f32 accumulators).
inline void emu_mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  EmuWarp& w = emu_warp();
  const unsigned lane = threadIdx.x % 32;
  for (int r = 0; r < 4; ++r) w.a[lane][r] = a[r];
  w.b[lane][0] = b0;
  w.b[lane][1] = b1;
  w.bar.arrive_and_wait();
  float A[16][16], B[16][8];
  for (unsigned l = 0; l < 32; ++l) {
    const unsigned g = l / 4, t = l % 4;
    for (unsigned r = 0; r < 4; ++r) {
      const unsigned row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
      A[row][col] = emu_bf16_bits_to_float(w.a[l][r] & 0xFFFFu);
      A[row][col + 1] = emu_bf16_bits_to_float(w.a[l][r] >> 16);
    }
    for (unsigned r = 0; r < 2; ++r) {
      const unsigned row = 2 * t + 8 * r;
      B[row][g] = emu_bf16_bits_to_float(w.b[l][r] & 0xFFFFu);
      B[row + 1][g] = emu_bf16_bits_to_float(w.b[l][r] >> 16);
    }
  }
  const unsigned g = lane / 4, t = lane % 4;
  for (unsigned e = 0; e < 4; ++e) {
    const unsigned row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float s = c[e];
    for (int kk = 0; kk < 16; ++kk) s += A[row][kk] * B[kk][col];
    c[e] = s;
  }
  w.bar.arrive_and_wait();
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane L gives the address of row L % 8 of
// matrix L / 8 (8 contiguous b16); register m gets, plain, row g, columns 2t, 2t + 1 of matrix m,
// or, transposed, rows 2t, 2t + 1 of column g (low half = first element).
inline void emu_ldmatrix_x4(uint32_t (&r)[4], const uint16_t* p, bool trans) {
  EmuWarp& w = emu_warp();
  const unsigned lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  w.rows[lane] = p;
  w.bar.arrive_and_wait();
  for (unsigned m = 0; m < 4; ++m) {
    const uint16_t* const* rows = &w.rows[m * 8];
    uint32_t lo, hi;
    if (trans) {
      lo = rows[2 * t][g];
      hi = rows[2 * t + 1][g];
    } else {
      lo = rows[g][2 * t];
      hi = rows[g][2 * t + 1];
    }
    r[m] = lo | (hi << 16);
  }
  w.bar.arrive_and_wait();
}

// Runs `body` as a kernel over grid (gx, gy) with `threads` threads per block and `smem` bytes
// of dynamic shared memory.
inline void emu_launch(unsigned gx, unsigned gy, unsigned threads, size_t smem,
                       const std::function<void()>& body) {
  for (unsigned by = 0; by < gy; ++by) {
    for (unsigned bx = 0; bx < gx; ++bx) {
      EmuBlock block(threads, smem);
      std::vector<std::thread> pool;
      pool.reserve(threads);
      for (unsigned tx = 0; tx < threads; ++tx) {
        pool.emplace_back([&, tx] {
          threadIdx = EmuDim{tx, 0, 0};
          blockIdx = EmuDim{bx, by, 0};
          blockDim = EmuDim{threads, 1, 1};
          gridDim = EmuDim{gx, gy, 1};
          emu_block = &block;
          body();
        });
      }
      for (auto& th : pool) th.join();
    }
  }
}
