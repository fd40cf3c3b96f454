// activation.cu: GELU (erf), GELU (tanh, GPT-2's "gelu_new") and ReLU, forward and backward (f32, bf16).
//
// Reference: crates/spt-ops/src/activation.rs (same formulas; the CPU erf is candle's erf_f32,
// here it is CUDA's erff: both are within a few ulp, far inside the 1e-4 parity tolerance).
//
// Shapes: x, y, g, dx are flat [n] (any contiguous tensor).
// Kind: 0 = GeluErf, 1 = GeluTanh, 2 = Relu (the order of spt_ops::Activation).
// Launch: grid (ceil(n/256)) capped at 65535·8 blocks, block 256, grid-stride loop.
// Limits: n < 2^31 (checked in Rust).
#include "common.cuh"

#define SPT_SQRT_2_OVER_PI 0.7978845608028654f
#define SPT_GELU_C 0.044715f
#define SPT_FRAC_1_SQRT_2 0.7071067811865476f
#define SPT_FRAC_1_SQRT_2PI 0.3989422804014327f

__device__ __forceinline__ float spt_act(int kind, float x) {
  if (kind == 0) return 0.5f * x * (1.0f + erff(x * SPT_FRAC_1_SQRT_2));
  if (kind == 1) {
    const float u = SPT_SQRT_2_OVER_PI * (x + SPT_GELU_C * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
  }
  return x > 0.0f ? x : 0.0f;
}

__device__ __forceinline__ float spt_act_grad(int kind, float x) {
  if (kind == 0) {
    const float cdf = 0.5f * (1.0f + erff(x * SPT_FRAC_1_SQRT_2));
    const float pdf = expf(-0.5f * x * x) * SPT_FRAC_1_SQRT_2PI;
    return cdf + x * pdf;
  }
  if (kind == 1) {
    const float x2 = x * x;
    const float u = SPT_SQRT_2_OVER_PI * (x + SPT_GELU_C * x2 * x);
    const float t = tanhf(u);
    const float du = SPT_SQRT_2_OVER_PI * (1.0f + 3.0f * SPT_GELU_C * x2);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
  }
  return x > 0.0f ? 1.0f : 0.0f;
}

template <typename T>
__device__ __forceinline__ void act_fwd(const T* __restrict__ x, T* __restrict__ y, int n, int kind) {
  // A 64-bit index: `i + stride` in int wraps negative for n near 2^31 (a 4 GB bf16 tensor).
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    y[i] = spt_st<T>(spt_act(kind, spt_ld(x[i])));
}

template <typename T>
__device__ __forceinline__ void act_bwd(const T* __restrict__ x, const T* __restrict__ g,
                                        T* __restrict__ dx, int n, int kind) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    dx[i] = spt_st<T>(spt_ld(g[i]) * spt_act_grad(kind, spt_ld(x[i])));
}

// x, y, g (upstream gradient), dx: [n].
#define SPT_ACT_KERNELS(T, SFX)                                                                 \
  extern "C" __global__ void act_fwd_##SFX(const T* __restrict__ x, T* __restrict__ y, int n,  \
                                           int kind) {                                         \
    act_fwd<T>(x, y, n, kind);                                                                 \
  }                                                                                            \
  extern "C" __global__ void act_bwd_##SFX(const T* __restrict__ x, const T* __restrict__ g,   \
                                           T* __restrict__ dx, int n, int kind) {              \
    act_bwd<T>(x, g, dx, n, kind);                                                             \
  }

SPT_ACT_KERNELS(float, f32)
SPT_ACT_KERNELS(__nv_bfloat16, bf16)
