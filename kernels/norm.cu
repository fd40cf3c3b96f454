// norm.cu: layer_norm and softmax over the last dimension, forward and backward (f32).
//
// Reference: crates/spt-ops/src/norm/{layer_norm.rs, softmax.rs} (the CPU ops; the parity tests
// in crates/spt-ops/tests/cuda_parity.rs compare against them within 1e-4).
//
// Shapes (row-major, contiguous): x, y, dy, dx are [rows, d]; gamma, beta, dgamma, dbeta are [d].
//
// Kernels and launch geometry
// - layer_norm_fwd_f32     grid (rows), block 256. One block per row: mean and variance by
//                          block reductions (two passes over the row, as the CPU op), then y.
// - layer_norm_bwd_f32     grid (nblk), block 256. Block b handles rows [b·rpb, (b+1)·rpb): dx
//                          per row, and writes its partial dgamma/dbeta into part_g/part_b
//                          [nblk, d] (thread t owns columns t, t+256, …, so no two threads touch
//                          the same partial: no atomics).
// - layer_norm_bwd_reduce_f32  grid (ceil(d/256)), block 256. dgamma[i] = Σ_b part_g[b, i] in
//                          increasing b: a fixed order, so dgamma/dbeta are deterministic.
// - softmax_fwd_f32        grid (rows), block 256. Max-subtracted softmax of one row.
// - softmax_bwd_f32        grid (rows), block 256. dx = y ⊙ (dy − Σ y·dy).
//
// Limits: rows < 2^31 and d < 2^31 (checked in Rust). Any d works (strided loops); the row is
// re-read from global memory (L1/L2 hits for d up to tens of thousands).
#include "common.cuh"

extern "C" __global__ void layer_norm_fwd_f32(const float* __restrict__ x,      // [rows, d]
                                              const float* __restrict__ gamma,  // [d]
                                              const float* __restrict__ beta,   // [d]
                                              float* __restrict__ y,            // [rows, d]
                                              int d, float eps) {
  __shared__ float scratch[32];
  const float* xr = x + (size_t)blockIdx.x * d;
  float* yr = y + (size_t)blockIdx.x * d;
  float s = 0.0f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) s += xr[i];
  const float mean = spt_block_sum(s, scratch) / (float)d;
  float v = 0.0f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float c = xr[i] - mean;
    v += c * c;
  }
  const float var = spt_block_sum(v, scratch) / (float)d;
  const float rstd = 1.0f / sqrtf(var + eps);
  for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = (xr[i] - mean) * rstd * gamma[i] + beta[i];
}

extern "C" __global__ void layer_norm_bwd_f32(const float* __restrict__ x,      // [rows, d]
                                              const float* __restrict__ gamma,  // [d]
                                              const float* __restrict__ dy,     // [rows, d]
                                              float* __restrict__ dx,           // [rows, d]
                                              float* __restrict__ part_g,       // [nblk, d]
                                              float* __restrict__ part_b,       // [nblk, d]
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
    const float* xr = x + (size_t)r * d;
    const float* gr = dy + (size_t)r * d;
    float s = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += xr[i];
    const float mean = spt_block_sum(s, scratch) / (float)d;
    float v = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      float c = xr[i] - mean;
      v += c * c;
    }
    const float rstd = 1.0f / sqrtf(spt_block_sum(v, scratch) / (float)d + eps);
    float sgd = 0.0f, sgdx = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      const float xhat = (xr[i] - mean) * rstd;
      const float gd = gr[i] * gamma[i];
      sgd += gd;
      sgdx += gd * xhat;
      pg[i] += gr[i] * xhat;  // column i is owned by this thread: no race
      pb[i] += gr[i];
    }
    const float m1 = spt_block_sum(sgd, scratch) / (float)d;
    const float m2 = spt_block_sum(sgdx, scratch) / (float)d;
    float* dr = dx + (size_t)r * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
      const float xhat = (xr[i] - mean) * rstd;
      dr[i] = rstd * (gr[i] * gamma[i] - m1 - xhat * m2);
    }
  }
}

extern "C" __global__ void layer_norm_bwd_reduce_f32(const float* __restrict__ part_g,  // [nblk, d]
                                                     const float* __restrict__ part_b,  // [nblk, d]
                                                     float* __restrict__ dgamma,        // [d]
                                                     float* __restrict__ dbeta,         // [d]
                                                     int nblk, int d) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= d) return;
  float g = 0.0f, b = 0.0f;
  for (int k = 0; k < nblk; ++k) {  // fixed order: deterministic
    g += part_g[(size_t)k * d + i];
    b += part_b[(size_t)k * d + i];
  }
  dgamma[i] = g;
  dbeta[i] = b;
}

extern "C" __global__ void softmax_fwd_f32(const float* __restrict__ x,  // [rows, d]
                                           float* __restrict__ y,        // [rows, d]
                                           int d) {
  __shared__ float scratch[32];
  const float* xr = x + (size_t)blockIdx.x * d;
  float* yr = y + (size_t)blockIdx.x * d;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < d; i += blockDim.x) m = fmaxf(m, xr[i]);
  m = spt_block_max(m, scratch);
  float s = 0.0f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float e = expf(xr[i] - m);
    yr[i] = e;
    s += e;
  }
  const float inv = 1.0f / spt_block_sum(s, scratch);
  for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] *= inv;
}

extern "C" __global__ void softmax_bwd_f32(const float* __restrict__ y,   // [rows, d]
                                           const float* __restrict__ dy,  // [rows, d]
                                           float* __restrict__ dx,        // [rows, d]
                                           int d) {
  __shared__ float scratch[32];
  const size_t off = (size_t)blockIdx.x * d;
  float s = 0.0f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) s += y[off + i] * dy[off + i];
  const float dot = spt_block_sum(s, scratch);
  for (int i = threadIdx.x; i < d; i += blockDim.x) dx[off + i] = y[off + i] * (dy[off + i] - dot);
}
