// routed_ffn.cu: the row moves of the routed FFN on CUDA, around its per-block GEMMs
// (f32, bf16: a copy and a k-term f32 sum).
//
// Launched by crates/spt-ops/src/routed_ffn/cuda.rs for the ops in routed_ffn/rows.rs
// (gather_rows / sum_rows), which the composed routed path (routed_ffn/composed.rs) uses on
// every non-CPU device. The CPU versions of both ops are the reference (same summation order).
//
// Shapes: T tokens, k blocks per token, R = T·k routed rows sorted by block, then by token (the
// host-side `Routing`). row_token [R] u32: token of routed row r. token_rows [T·k] u32: routed
// row of (token t, slot s) at t·k + s (the inverse of the routing's row_src).
// - route_gather_{f32,bf16}  grid (R), block 128: x_g[r] = x[row_token[r]]   ([T, d] → [R, d]).
// - route_sum_{f32,bf16}     grid (T), block 128: out[t] = Σ_s y_g[token_rows[t·k + s]], slots in
//                     order ([R, n] → [T, n]). The scatter-add as a pull: one writer per output,
//                     no float atomics, a fixed order, so the result is deterministic.
// Each is the other's adjoint, so the backward of one is a launch of the other.
//
// Why not candle's index_add for the sum: its CUDA kernel gives one thread per output column and
// loops over all R rows (n threads in all: ~400 for BERT-base widths, R ~ 16k rows), which leaves
// almost the whole GPU idle. route_sum runs T·128 threads.
//
// Why the grouping itself stays on the host: the GEMMs are one cuBLAS call per block (through
// candle's matmul on row ranges), and launching them needs every block's row count on the host,
// so the top-k selection comes to the host anyway (T·k u32); sorting it there costs O(T·k).
// A custom tiled grouped GEMM would only pay off with many tiny groups, and would have to redo
// what cuBLAS tunes per architecture.
//
// Limits: R, T·d and R·n < 2^31 (checked in Rust); indices < T and < R (built by `Routing`).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void route_gather(const T* __restrict__ x, const uint32_t* __restrict__ row_token,
                                             T* __restrict__ x_g, int d) {
  const int r = blockIdx.x;
  const T* src = x + (size_t)row_token[r] * d;
  T* dst = x_g + (size_t)r * d;
  for (int c = threadIdx.x; c < d; c += blockDim.x) dst[c] = src[c];
}

template <typename T>
__device__ __forceinline__ void route_sum(const T* __restrict__ y_g, const uint32_t* __restrict__ token_rows,
                                          T* __restrict__ out, int k, int n) {
  const int t = blockIdx.x;
  for (int c = threadIdx.x; c < n; c += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < k; ++s) acc += spt_ld(y_g[(size_t)token_rows[(size_t)t * k + s] * n + c]);
    out[(size_t)t * n + c] = spt_st<T>(acc);
  }
}

// x [T, d], row_token [R], x_g [R, d]; y_g [R, n], token_rows [T·k], out [T, n].
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
  }

SPT_ROUTE_KERNELS(float, f32)
SPT_ROUTE_KERNELS(__nv_bfloat16, bf16)
