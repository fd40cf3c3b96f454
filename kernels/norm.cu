// norm.cu: layer_norm and softmax over the last dimension, forward and backward (f32, bf16; f32
// statistics and partial sums).
//
// Reference: crates/spt-ops/src/norm/{layer_norm.rs, softmax.rs} (the CPU ops; the parity tests
// in crates/spt-ops/tests/cuda_parity.rs compare against them within 1e-4).
//
// Shapes (row-major, contiguous): x, y, dy, dx are [rows, d]; gamma, beta, dgamma, dbeta are [d].
//
// Kernels and launch geometry (each as _f32 and _bf16; the names below drop the suffix)
// - layer_norm_fwd         grid (rows), block 256. One block per row: mean and variance by
//                          block reductions (two passes over the row, as the CPU op), then y.
// - layer_norm_bwd         grid (nblk), block 256. Block b handles rows [b·rpb, (b+1)·rpb): dx
//                          per row, and writes its partial dgamma/dbeta into part_g/part_b
//                          [nblk, d] (thread t owns columns t, t+256, …, so no two threads touch
//                          the same partial: no atomics).
// - layer_norm_bwd_reduce  grid (ceil(d/256)), block 256. dgamma[i] = Σ_b part_g[b, i] in
//                          increasing b: a fixed order, so dgamma/dbeta are deterministic.
// - softmax_fwd            grid (rows), block 256. Max-subtracted softmax of one row.
// - softmax_bwd            grid (rows), block 256. dx = y ⊙ (dy − Σ y·dy).
//
// Limits: rows < 2^31 and d < 2^31 (checked in Rust). Any d works (strided loops); the row is
// re-read from global memory (L1/L2 hits for d up to tens of thousands).
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void layer_norm_fwd(const T* __restrict__ x, const T* __restrict__ gamma,
                                               const T* __restrict__ beta, T* __restrict__ y, int d,
                                               float eps) {
  __shared__ float scratch[32];
  const T* xr = x + (size_t)blockIdx.x * d;
  T* yr = y + (size_t)blockIdx.x * d;
  float s = 0.0f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) s += spt_ld(xr[i]);
  const float mean = spt_block_sum(s, scratch) / (float)d;
  float v = 0.0f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float c = spt_ld(xr[i]) - mean;
    v += c * c;
  }
  const float var = spt_block_sum(v, scratch) / (float)d;
  const float rstd = 1.0f / sqrtf(var + eps);
  for (int i = threadIdx.x; i < d; i += blockDim.x)
    yr[i] = spt_st<T>((spt_ld(xr[i]) - mean) * rstd * spt_ld(gamma[i]) + spt_ld(beta[i]));
}

template <typename T>
__device__ __forceinline__ void layer_norm_bwd(const T* __restrict__ x, const T* __restrict__ gamma,
                                               const T* __restrict__ dy, T* __restrict__ dx,
                                               float* __restrict__ part_g, float* __restrict__ part_b,
                                               int rows, int d, int rows_per_block, float eps) {
  __shared__ float scratch[32];
  const int r0 = blockIdx.x * rows_per_block;
  const int r1 = min(rows, r0 + rows_per_block);
  float* pg = part_g + (size_t)blockIdx.x * d;
  float* pb = part_b + (size_t)blockIdx.x * d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    pg[i] = 0.0f;
    pb[i] = 0.0f;
  }
  for (int r = r0; r < r1; ++r) {
    const T* xr = x + (size_t)r * d;
    const T* gr = dy + (size_t)r * d;
    float s = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += spt_ld(xr[i]);
    const float mean = spt_block_sum(s, scratch) / (float)d;
    float v = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      float c = spt_ld(xr[i]) - mean;
      v += c * c;
    }
    const float rstd = 1.0f / sqrtf(spt_block_sum(v, scratch) / (float)d + eps);
    float sgd = 0.0f, sgdx = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      const float xhat = (spt_ld(xr[i]) - mean) * rstd;
      const float g = spt_ld(gr[i]);
      const float gd = g * spt_ld(gamma[i]);
      sgd += gd;
      sgdx += gd * xhat;
      pg[i] += g * xhat;  // column i is owned by this thread: no race
      pb[i] += g;
    }
    const float m1 = spt_block_sum(sgd, scratch) / (float)d;
    const float m2 = spt_block_sum(sgdx, scratch) / (float)d;
    T* dr = dx + (size_t)r * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      const float xhat = (spt_ld(xr[i]) - mean) * rstd;
      dr[i] = spt_st<T>(rstd * (spt_ld(gr[i]) * spt_ld(gamma[i]) - m1 - xhat * m2));
    }
  }
}

template <typename T>
__device__ __forceinline__ void layer_norm_bwd_reduce(const float* __restrict__ part_g,
                                                      const float* __restrict__ part_b,
                                                      T* __restrict__ dgamma, T* __restrict__ dbeta,
                                                      int nblk, int d) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= d) return;
  float g = 0.0f, b = 0.0f;
  for (int k = 0; k < nblk; ++k) {  // fixed order: deterministic
    g += part_g[(size_t)k * d + i];
    b += part_b[(size_t)k * d + i];
  }
  dgamma[i] = spt_st<T>(g);
  dbeta[i] = spt_st<T>(b);
}

template <typename T>
__device__ __forceinline__ void softmax_fwd(const T* __restrict__ x, T* __restrict__ y, int d) {
  __shared__ float scratch[32];
  const T* xr = x + (size_t)blockIdx.x * d;
  T* yr = y + (size_t)blockIdx.x * d;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < d; i += blockDim.x) m = fmaxf(m, spt_ld(xr[i]));
  m = spt_block_max(m, scratch);
  float s = 0.0f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) s += expf(spt_ld(xr[i]) - m);
  const float inv = 1.0f / spt_block_sum(s, scratch);
  // exp again rather than re-reading a stored value: a bf16 y is rounded once, not twice.
  for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = spt_st<T>(expf(spt_ld(xr[i]) - m) * inv);
}

template <typename T>
__device__ __forceinline__ void softmax_bwd(const T* __restrict__ y, const T* __restrict__ dy,
                                            T* __restrict__ dx, int d) {
  __shared__ float scratch[32];
  const size_t off = (size_t)blockIdx.x * d;
  float s = 0.0f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) s += spt_ld(y[off + i]) * spt_ld(dy[off + i]);
  const float dot = spt_block_sum(s, scratch);
  for (int i = threadIdx.x; i < d; i += blockDim.x)
    dx[off + i] = spt_st<T>(spt_ld(y[off + i]) * (spt_ld(dy[off + i]) - dot));
}

// x, y, dy, dx [rows, d]; gamma, beta, dgamma, dbeta [d]; part_g, part_b [nblk, d] f32.
#define SPT_NORM_KERNELS(T, SFX)                                                                  \
  extern "C" __global__ void layer_norm_fwd_##SFX(const T* __restrict__ x,                       \
                                                  const T* __restrict__ gamma,                   \
                                                  const T* __restrict__ beta, T* __restrict__ y, \
                                                  int d, float eps) {                            \
    layer_norm_fwd<T>(x, gamma, beta, y, d, eps);                                                \
  }                                                                                              \
  extern "C" __global__ void layer_norm_bwd_##SFX(                                               \
      const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ dy,            \
      T* __restrict__ dx, float* __restrict__ part_g, float* __restrict__ part_b, int rows,      \
      int d, int rows_per_block, float eps) {                                                    \
    layer_norm_bwd<T>(x, gamma, dy, dx, part_g, part_b, rows, d, rows_per_block, eps);           \
  }                                                                                              \
  extern "C" __global__ void layer_norm_bwd_reduce_##SFX(                                        \
      const float* __restrict__ part_g, const float* __restrict__ part_b,                        \
      T* __restrict__ dgamma, T* __restrict__ dbeta, int nblk, int d) {                          \
    layer_norm_bwd_reduce<T>(part_g, part_b, dgamma, dbeta, nblk, d);                            \
  }                                                                                              \
  extern "C" __global__ void softmax_fwd_##SFX(const T* __restrict__ x, T* __restrict__ y,       \
                                               int d) {                                          \
    softmax_fwd<T>(x, y, d);                                                                     \
  }                                                                                              \
  extern "C" __global__ void softmax_bwd_##SFX(const T* __restrict__ y, const T* __restrict__ dy,\
                                               T* __restrict__ dx, int d) {                      \
    softmax_bwd<T>(y, dy, dx, d);                                                                \
  }

SPT_NORM_KERNELS(float, f32)
SPT_NORM_KERNELS(__nv_bfloat16, bf16)
