// routed_ffn.cu: the row moves of the routed FFN on CUDA, around its GEMMs (f32, bf16: a copy
// and a short f32 sum).
//
// Launched by crates/spt-ops/src/routed_ffn/cuda.rs for the ops in routed_ffn/rows.rs, which the
// composed routed path (routed_ffn/composed.rs) uses on every non-CPU device. The CPU versions
// of both ops are the reference (same summation order).
//
// A row map (built on the host from the `Routing`) links a source space of S rows and a
// destination space of D rows. src [D] u32: the source row each destination row copies, or the
// sentinel 0xFFFFFFFF (a zero row). copies [S·per] u32: the destination rows that copy each source
// row, in slot order, sentinel-padded. Maps in use: tokens → routed rows (sorted by block; per =
// k), tokens → rows padded per block (per = k), padded → routed rows (per = 1).
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
// Why the grouping itself stays on the host: the GEMM launches (one batched cuBLAS call over the
// padded blocks, or one per block) need the block row counts on the host, so the top-k selection
// comes to the host anyway (T·k u32); sorting it there costs O(T·k).
//
// Limits: D·width, S·width < 2^31 (checked in Rust); indices < S and < D (built by `Routing`).
#include "common.cuh"

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
  }

SPT_ROUTE_KERNELS(float, f32)
SPT_ROUTE_KERNELS(__nv_bfloat16, bf16)
