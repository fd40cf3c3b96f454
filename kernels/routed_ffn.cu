// routed_ffn.cu: the routed FFN on CUDA around its GEMMs: the routing itself (top-k blocks per
// token, the counting sort by block, the row maps) and the row moves (f32, bf16: a copy and a
// short f32 sum).
//
// Launched by crates/spt-ops/src/routed_ffn/cuda.rs. The routing is built by router.rs
// (Routing::top_k_on_device) and is, row for row, the routing the host builds from the same
// scores (Routing::top_k); the row moves are the ops of routed_ffn/rows.rs, which the composed
// routed path (routed_ffn/composed.rs) uses on every non-CPU device. The CPU versions are the
// reference (same tie rules, same row order, same summation order).
//
// Routing (T tokens, n ≤ 64 blocks, k of them per token, tokens in chunks of C = CHUNK_TOKENS;
// group g = e·n_chunks + chunk; R = T·k routed rows, sorted by group, then by token):
// - route_topk_{f32,bf16}  grid-stride over T, block 128: scores [T, n] → blocks [T·k], the k
//                     best in descending order, ties to the lower block, NaN as −∞, +0 above −0
//                     (the order of f64::total_cmp that the host uses).
// - route_rank        grid (n_chunks), block C, shared 4·C bytes: one thread per token of the
//                     chunk. Per block e, a shared-memory inclusive scan (Hillis–Steele) of "this
//                     token picked e" gives each (token, slot) pair its rank inside its group and
//                     the group's count, with no atomics: the order is the token order.
//   The host reads the n·n_chunks group counts (the one device → host copy: the GEMM launches
//   need the per-block row counts on the host) and uploads their prefix sums.
// - route_place       grid-stride over the T·k pairs: row = group start + rank; writes row_token,
//                     row_src (the pair t·k + j of each row) and its inverse token_rows.
// - route_pad         grid-stride over max(R, n·R_max): the padded layout's maps (block e's rows
//                     at e·R_max.., sentinel rows after them), as pulls: no fill pass, no atomics.
//
// Row moves. A row map links a source space of S rows and a destination space of D rows.
// src [D] u32: the source row each destination row copies, or the sentinel 0xFFFFFFFF (a zero
// row). copies [S·per] u32: the destination rows that copy each source row, in slot order,
// sentinel-padded. Maps in use: tokens → routed rows (sorted by block; per = k), tokens → rows
// padded per block (per = k), padded → routed rows (per = 1), (token, slot) pairs → routed rows
// (per = 1; the gates).
// - route_gather_{f32,bf16}  grid (D), block 128: out[i] = x[src[i]], or 0.
// - route_sum_{f32,bf16}     grid (S), block 128: out[j] = Σ_s y[copies[j·per + s]], slots in
//                     order. The scatter-add as a pull: one writer per output, no float atomics,
//                     a fixed order, so the result is deterministic.
// Each is the other's adjoint, so the backward of one is a launch of the other.
//
// Why not candle's index_add for the sum: its CUDA kernel gives one thread per output column and
// loops over all rows (n threads in all: ~400 for BERT-base widths, R ~ 16k rows), which leaves
// almost the whole GPU idle. route_sum runs S·128 threads.
//
// Limits (checked in Rust): D·width, S·width, T·n < 2^31; n ≤ 64; C ≤ 1024 and a multiple of 32.
// Checked without a GPU by kernels/emu/route_emu_test.cpp (the routing kernels).
#ifdef SPT_EMU
#include "emu/cuda_emu.hpp"
#define RT_SMEM reinterpret_cast<uint32_t*>(emu_block->smem.data())
#else
#include "common.cuh"
extern __shared__ uint32_t rt_smem[];
#define RT_SMEM rt_smem
#endif

// A key whose unsigned order is f64::total_cmp's order of the score, NaN mapped to −∞.
__device__ __forceinline__ uint32_t route_key(float v) {
  if (v != v) v = -INFINITY;
#ifdef SPT_EMU
  uint32_t b;
  std::memcpy(&b, &v, 4);
#else
  const uint32_t b = __float_as_uint(v);
#endif
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

template <typename T>
__device__ __forceinline__ void route_topk(const T* __restrict__ scores, uint32_t* __restrict__ blocks, int t_n,
                                           int n, int k) {
  // 64-bit grid stride (see activation.cu); t itself fits an int.
  for (long long t_ = (long long)blockIdx.x * blockDim.x + threadIdx.x; t_ < t_n;
       t_ += (long long)gridDim.x * blockDim.x) {
    const int t = static_cast<int>(t_);
    const T* row = scores + static_cast<size_t>(t) * n;
    unsigned long long taken = 0;
    for (int j = 0; j < k; ++j) {
      int best = -1;
      uint32_t best_key = 0;
      for (int e = 0; e < n; ++e) {
        if ((taken >> e) & 1ull) continue;
        const uint32_t key = route_key(spt_ld(row[e]));
        if (best < 0 || key > best_key) {  // strict: ties stay with the lower block
          best = e;
          best_key = key;
        }
      }
      taken |= 1ull << best;
      blocks[static_cast<size_t>(t) * k + j] = static_cast<uint32_t>(best);
    }
  }
}

extern "C" __global__ void route_rank(const uint32_t* __restrict__ blocks, uint32_t* __restrict__ pair_rank,
                                      uint32_t* __restrict__ group_counts, int t_n, int n, int k) {
  uint32_t* scan = RT_SMEM;
  const int c = blockIdx.x, nc = gridDim.x, i = threadIdx.x, len = blockDim.x;
  const int t = c * len + i;
  unsigned long long picked = 0;
  if (t < t_n)
    for (int j = 0; j < k; ++j) picked |= 1ull << blocks[static_cast<size_t>(t) * k + j];
  for (int e = 0; e < n; ++e) {
    const uint32_t mine = (picked >> e) & 1ull;
    scan[i] = mine;
    __syncthreads();
    for (int off = 1; off < len; off <<= 1) {
      const uint32_t add = i >= off ? scan[i - off] : 0u;
      __syncthreads();
      scan[i] += add;
      __syncthreads();
    }
    if (mine)
      for (int j = 0; j < k; ++j)
        if (blocks[static_cast<size_t>(t) * k + j] == static_cast<uint32_t>(e))
          pair_rank[static_cast<size_t>(t) * k + j] = scan[i] - 1;
    if (i == len - 1) group_counts[static_cast<size_t>(e) * nc + c] = scan[i];
    __syncthreads();  // the next block's scan overwrites `scan`
  }
}

extern "C" __global__ void route_place(const uint32_t* __restrict__ blocks, const uint32_t* __restrict__ pair_rank,
                                       const uint32_t* __restrict__ group_starts, uint32_t* __restrict__ row_token,
                                       uint32_t* __restrict__ row_src, uint32_t* __restrict__ token_rows, int pairs,
                                       int k, int chunk, int nc) {
  for (long long p_ = (long long)blockIdx.x * blockDim.x + threadIdx.x; p_ < pairs;
       p_ += (long long)gridDim.x * blockDim.x) {
    const int p = static_cast<int>(p_);
    const int t = p / k;
    const uint32_t g = blocks[p] * static_cast<uint32_t>(nc) + static_cast<uint32_t>(t / chunk);
    const uint32_t r = group_starts[g] + pair_rank[p];
    row_token[r] = static_cast<uint32_t>(t);
    row_src[r] = static_cast<uint32_t>(p);
    token_rows[p] = r;
  }
}

// block_starts [n + 1]: first routed row of each block. padded_src, unpad_copies [n·rmax];
// padded_copies [T·k], unpad_src [R].
extern "C" __global__ void route_pad(const uint32_t* __restrict__ blocks, const uint32_t* __restrict__ row_src,
                                     const uint32_t* __restrict__ row_token, const uint32_t* __restrict__ token_rows,
                                     const uint32_t* __restrict__ block_starts, uint32_t* __restrict__ padded_src,
                                     uint32_t* __restrict__ padded_copies, uint32_t* __restrict__ unpad_src,
                                     uint32_t* __restrict__ unpad_copies, int rows, int n, int rmax) {
  const int slots = n * rmax, all = rows > slots ? rows : slots;
  for (long long x_ = (long long)blockIdx.x * blockDim.x + threadIdx.x; x_ < all;
       x_ += (long long)gridDim.x * blockDim.x) {
    const int x = static_cast<int>(x_);
    if (x < slots) {  // padded slot x: the i-th row of block e, or padding
      const int e = x / rmax, i = x % rmax;
      const uint32_t r = block_starts[e] + static_cast<uint32_t>(i);
      const bool live = r < block_starts[e + 1];
      padded_src[x] = live ? row_token[r] : SPT_SENTINEL;
      unpad_copies[x] = live ? r : SPT_SENTINEL;
    }
    if (x < rows) {  // routed row x, and (token, slot) pair x (there are as many)
      const uint32_t e = blocks[row_src[x]];
      unpad_src[x] = e * static_cast<uint32_t>(rmax) + static_cast<uint32_t>(x) - block_starts[e];
      const uint32_t r = token_rows[x], f = blocks[x];
      padded_copies[x] = f * static_cast<uint32_t>(rmax) + r - block_starts[f];
    }
  }
}


template <typename T>
__device__ __forceinline__ void route_gather(const T* __restrict__ x, const uint32_t* __restrict__ row_token,
                                             T* __restrict__ x_g, int d) {
  const int r = blockIdx.x;
  const uint32_t s = row_token[r];
  T* dst = x_g + (size_t)r * d;
  if (s == SPT_SENTINEL) {
    for (int c = threadIdx.x; c < d; c += blockDim.x) dst[c] = spt_st<T>(0.0f);
    return;
  }
  const T* src = x + (size_t)s * d;
  for (int c = threadIdx.x; c < d; c += blockDim.x) dst[c] = src[c];
}

template <typename T>
__device__ __forceinline__ void route_sum(const T* __restrict__ y_g, const uint32_t* __restrict__ token_rows,
                                          T* __restrict__ out, int k, int n) {
  const int t = blockIdx.x;
  for (int c = threadIdx.x; c < n; c += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < k; ++s) {
      const uint32_t r = token_rows[(size_t)t * k + s];
      if (r != SPT_SENTINEL) acc += spt_ld(y_g[(size_t)r * n + c]);
    }
    out[(size_t)t * n + c] = spt_st<T>(acc);
  }
}

// x [S, d], src (row_token) [D], x_g [D, d]; y_g [D, n], copies (token_rows) [S·per], out [S, n].
#define SPT_ROUTE_KERNELS(T, SFX)                                                                \
  extern "C" __global__ void route_gather_##SFX(const T* __restrict__ x,                        \
                                                const uint32_t* __restrict__ row_token,         \
                                                T* __restrict__ x_g, int d) {                   \
    route_gather<T>(x, row_token, x_g, d);                                                      \
  }                                                                                             \
  extern "C" __global__ void route_sum_##SFX(const T* __restrict__ y_g,                         \
                                             const uint32_t* __restrict__ token_rows,           \
                                             T* __restrict__ out, int k, int n) {               \
    route_sum<T>(y_g, token_rows, out, k, n);                                                   \
  }                                                                                             \
  extern "C" __global__ void route_topk_##SFX(const T* __restrict__ scores,                     \
                                              uint32_t* __restrict__ blocks, int t_n, int n,    \
                                              int k) {                                          \
    route_topk<T>(scores, blocks, t_n, n, k);                                                   \
  }

SPT_ROUTE_KERNELS(float, f32)
SPT_ROUTE_KERNELS(__nv_bfloat16, bf16)
