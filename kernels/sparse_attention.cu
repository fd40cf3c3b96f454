// sparse_attention.cu: fused sparse attention over selected keys, forward and a deterministic
// backward (f32 or bf16 q/k/v/o and gradients, _f32 / _bf16 kernels; f32 accumulation, and
// lse, p and ds are f32 in both).
//
//   o_i = Σ_{j ∈ sel(i)} softmax_j(scale · q_i·k_j) v_j,   lse_i = log Σ_j exp(scale · q_i·k_j)
//
// Reference: crates/spt-ops/src/sparse_attention/cpu.rs (forward; two-phase backward).
//
// Shapes (contiguous): q [BH, Lq, d], k [BH, Lk, d], v [BH, Lk, dv], idx [BH, Lq, kk] u32
// (each row ascending, then SENTINEL padding, never a duplicate), o/do [BH, Lq, dv], lse [BH, Lq].
// Rows with no key: o = 0, lse = −inf, and they contribute nothing to any gradient.
//
// Kernels and launch geometry (SA_WARPS = 4 warps = 128 threads per block; the float kernels
// exist as _f32 and _bf16)
// - sparse_attn_fwd_f32       grid (ceil(BH·Lq / 4)), block 128: one warp per query row. Keys are
//     taken 32 at a time, one per lane: the lane computes its score (q_i in shared memory), the
//     warp updates an online max-subtracted softmax (running max m, running sum l), then every
//     lane accumulates its dv/32 output columns over the 32 keys (v rows read coalesced).
// - sparse_attn_bwd_rows_f32  same geometry: per row, delta = do_i·o_i, and per selected entry
//     p = exp(scale·q_i·k_j − lse_i), ds = p·(do_i·v_j − delta), dq_i = scale Σ ds·k_j (in entry
//     order). p and ds are saved [BH, Lq, kk] (0 on padding) for the key phase.
// - Key→query transpose (CSC per (b, h)), deterministic, no float atomics:
//   csc_hist_u32        grid (BH·nrb), block 256: cnt[bh, rb, j] = #entries j in row block rb
//                       (rb = i / R, R = rows_per_block; integer atomics, order-free).
//   csc_scan_rb_u32     grid (ceil(BH·Lk / 256)), block 256: cnt[bh, rb, j] ← Σ_{rb' < rb} (exclusive,
//                       in place), tot[bh, j] = Σ_rb.
//   csc_scan_keys_u32   grid (BH), block 1024: start[bh, 0..=Lk] = exclusive scan of tot[bh, ·].
//   csc_scatter_u32     grid (BH·nrb), block 256: rows of the block in increasing i; within a row
//                       the keys are distinct, so each entry takes the slot
//                       start[j] + cnt[rb, j]++ without a race; __syncthreads between rows. Every
//                       key's list is therefore sorted by query index, as the CPU's.
// - sparse_attn_bwd_keys_f32  grid (ceil(BH·Lk / 4)), block 128: one warp per key j, walking its
//     list in order: dk_j = scale Σ_i ds_ij q_i, dv_j = Σ_i p_ij do_i (lanes own columns).
//
// vec4 (last argument of the two row kernels): 1 when k and v rows can be read 16 bytes at a time
// (d and dv multiples of 4 for f32, of 8 for bf16, and k, v starting 16-byte aligned); rows are
// then read as float4 (f32) or as 8 bf16 per load.
// Limits (checked in Rust): d ≤ 128, dv ≤ 128 (4 columns per lane in registers); all element
// counts < 2^31. Memory for backward beyond the gradients: p, ds, entries (3·BH·Lq·kk·4 bytes),
// cnt (BH·nrb·Lk·4), tot and start (≈ 2·BH·Lk·4).
// The f32 row kernels (forward, backward rows) are checked without a GPU by
// kernels/emu/sparse_attention_emu_test.cpp; the key→query transpose, the key kernel and the
// bf16 instantiations are left out of that build.
#ifdef SPT_EMU
#include "emu/cuda_emu.hpp"
#else
#include "common.cuh"
#endif

#define SA_WARPS 4
#define SA_MAXD 128
#define SA_PER_LANE (SA_MAXD / SPT_WARP)

// ⟨a, b⟩ over n floats; `a` in shared memory (16-byte aligned), `b` a global row. With vec4
// (n % 4 == 0 and `b` 16-byte aligned, checked in Rust) the row is read as float4: a quarter of
// the load instructions when every lane of a warp reads a different row.
__device__ __forceinline__ float sa_dot(const float* a, const float* __restrict__ b, int n, int vec4) {
  float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
  if (vec4) {
    const float4* a4 = reinterpret_cast<const float4*>(a);
    const float4* b4 = reinterpret_cast<const float4*>(b);
    for (int c = 0; c < n / 4; ++c) {
      const float4 x = a4[c], y = __ldg(b4 + c);
      s0 += x.x * y.x;
      s1 += x.y * y.y;
      s2 += x.z * y.z;
      s3 += x.w * y.w;
    }
  } else {
    int c = 0;
    for (; c + 2 <= n; c += 2) {
      s0 += a[c] * b[c];
      s1 += a[c + 1] * b[c + 1];
    }
    if (c < n) s0 += a[c] * b[c];
  }
  return (s0 + s1) + (s2 + s3);
}

#ifndef SPT_EMU
// The same over a bf16 row. With vec (n % 8 == 0 and `b` 16-byte aligned, checked in Rust) the
// row is read 8 values per 16-byte load: scalar 2-byte loads made the bf16 kernels slower than
// the f32 ones on an H200 (forward at L = 4096, k = 512: 12.0 ms against 6.0), as the score
// phase is bound by load instructions, one row per lane.
__device__ __forceinline__ float sa_dot(const float* a, const __nv_bfloat16* __restrict__ b, int n, int vec) {
  float s0 = 0.0f, s1 = 0.0f;
  int c = 0;
  if (vec) {
    const uint4* b8 = reinterpret_cast<const uint4*>(b);
    float s2 = 0.0f, s3 = 0.0f;
    for (int c8 = 0; c8 < n / 8; ++c8) {
      const uint4 u = __ldg(b8 + c8);
      const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
      const float4 x0 = reinterpret_cast<const float4*>(a)[2 * c8];
      const float4 x1 = reinterpret_cast<const float4*>(a)[2 * c8 + 1];
      const float2 y0 = __bfloat1622float2(h[0]), y1 = __bfloat1622float2(h[1]);
      const float2 y2 = __bfloat1622float2(h[2]), y3 = __bfloat1622float2(h[3]);
      s0 += x0.x * y0.x + x0.y * y0.y;
      s1 += x0.z * y1.x + x0.w * y1.y;
      s2 += x1.x * y2.x + x1.y * y2.y;
      s3 += x1.z * y3.x + x1.w * y3.y;
    }
    return (s0 + s1) + (s2 + s3);
  }
  for (; c + 2 <= n; c += 2) {
    s0 += a[c] * spt_ld(b[c]);
    s1 += a[c + 1] * spt_ld(b[c + 1]);
  }
  if (c < n) s0 += a[c] * spt_ld(b[c]);
  return s0 + s1;
}

#endif  // SPT_EMU

template <typename T>
__device__ __forceinline__ void sparse_attn_fwd(const T* __restrict__ q,          // [BH, Lq, d]
                                                const T* __restrict__ k,          // [BH, Lk, d]
                                                const T* __restrict__ v,          // [BH, Lk, dv]
                                                const uint32_t* __restrict__ idx, // [BH, Lq, kk]
                                                T* __restrict__ o,                // [BH, Lq, dv]
                                                float* __restrict__ lse,          // [BH, Lq]
                                                int rows, int lq, int lk, int d, int dv, int kk,
                                                float scale, int vec4) {
  __shared__ __align__(16) float sq[SA_WARPS][SA_MAXD];
  const int warp = threadIdx.x / SPT_WARP, lane = threadIdx.x % SPT_WARP;
  const int row = blockIdx.x * SA_WARPS + warp;
  if (row >= rows) return;  // whole warp leaves; no block-wide barrier below
  const int bh = row / lq;
  const T* qi = q + (size_t)row * d;
  const T* kb = k + (size_t)bh * lk * d;
  const T* vb = v + (size_t)bh * lk * dv;
  const uint32_t* ids = idx + (size_t)row * kk;
  for (int c = lane; c < d; c += SPT_WARP) sq[warp][c] = spt_ld(qi[c]);
  __syncwarp();

  float acc[SA_PER_LANE];
#pragma unroll
  for (int r = 0; r < SA_PER_LANE; ++r) acc[r] = 0.0f;
  float m_run = -INFINITY, l_run = 0.0f;
  // A NaN score makes the whole row NaN, as on the CPU (a diverged run must not read as a masked
  // row). fmaxf skips NaN, so the warp max cannot carry it: a flag does.
  bool nan = false;
  for (int t0 = 0; t0 < kk; t0 += SPT_WARP) {
    const int t = t0 + lane;
    const uint32_t j = t < kk ? ids[t] : SPT_SENTINEL;
    const bool valid = j != SPT_SENTINEL;
    // Only padding from here on (rows are sentinel-padded at the end).
    if (__ballot_sync(0xFFFFFFFFu, valid) == 0u) break;
    float s = -INFINITY;
    if (valid) s = scale * sa_dot(sq[warp], kb + (size_t)j * d, d, vec4);
    nan |= __any_sync(0xFFFFFFFFu, s != s);
    const float cm = spt_warp_max(s);
    if (cm == -INFINITY) continue;  // every score in this chunk is -inf: no weight
    const float m_new = fmaxf(m_run, cm);
    const float corr = expf(m_run - m_new);  // 0 on the first chunk
    const float p = valid ? expf(s - m_new) : 0.0f;
    l_run = l_run * corr + spt_warp_sum(p);
#pragma unroll
    for (int r = 0; r < SA_PER_LANE; ++r) acc[r] *= corr;
    const int n = min(SPT_WARP, kk - t0);
    for (int src = 0; src < n; ++src) {
      const float pj = __shfl_sync(0xFFFFFFFFu, p, src);
      const uint32_t jj = __shfl_sync(0xFFFFFFFFu, j, src);
      if (jj == SPT_SENTINEL) break;
      const T* vj = vb + (size_t)jj * dv;
#pragma unroll
      for (int r = 0; r < SA_PER_LANE; ++r) {
        const int c = lane + r * SPT_WARP;
        if (c < dv) acc[r] += pj * spt_ld(vj[c]);
      }
    }
    m_run = m_new;
  }
  T* oi = o + (size_t)row * dv;
  const float qnan = __int_as_float(0x7fc00000);
  const float inv = nan ? qnan : l_run > 0.0f ? 1.0f / l_run : 0.0f;
#pragma unroll
  for (int r = 0; r < SA_PER_LANE; ++r) {
    const int c = lane + r * SPT_WARP;
    if (c < dv) oi[c] = spt_st<T>(acc[r] * inv);
  }
  // A NaN lse makes the backward's weights, and so every gradient of the row, NaN.
  if (lane == 0) lse[row] = nan ? qnan : l_run > 0.0f ? m_run + logf(l_run) : -INFINITY;
}

template <typename T>
__device__ __forceinline__ void sparse_attn_bwd_rows(const T* __restrict__ q,          // [BH, Lq, d]
                                                    const T* __restrict__ k,          // [BH, Lk, d]
                                                    const T* __restrict__ v,          // [BH, Lk, dv]
                                                    const T* __restrict__ o,          // [BH, Lq, dv]
                                                    const float* __restrict__ lse,    // [BH, Lq]
                                                    const T* __restrict__ g,          // [BH, Lq, dv]
                                                    const uint32_t* __restrict__ idx, // [BH, Lq, kk]
                                                    T* __restrict__ dq,               // [BH, Lq, d]
                                                    float* __restrict__ p_out,        // [BH, Lq, kk]
                                                    float* __restrict__ ds_out,       // [BH, Lq, kk]
                                                    int rows, int lq, int lk, int d, int dv, int kk,
                                                    float scale, int vec4) {
  __shared__ __align__(16) float sq[SA_WARPS][SA_MAXD];
  __shared__ __align__(16) float sg[SA_WARPS][SA_MAXD];
  const int warp = threadIdx.x / SPT_WARP, lane = threadIdx.x % SPT_WARP;
  const int row = blockIdx.x * SA_WARPS + warp;
  if (row >= rows) return;
  const int bh = row / lq;
  const T* kb = k + (size_t)bh * lk * d;
  const T* vb = v + (size_t)bh * lk * dv;
  const uint32_t* ids = idx + (size_t)row * kk;
  float* pr = p_out + (size_t)row * kk;
  float* dsr = ds_out + (size_t)row * kk;
  for (int c = lane; c < d; c += SPT_WARP) sq[warp][c] = spt_ld(q[(size_t)row * d + c]);
  float dl = 0.0f;
  for (int c = lane; c < dv; c += SPT_WARP) {
    const float gc = spt_ld(g[(size_t)row * dv + c]);
    sg[warp][c] = gc;
    dl += gc * spt_ld(o[(size_t)row * dv + c]);
  }
  const float delta = spt_warp_sum(dl);  // Σ_j p_ij dp_ij = do_i · o_i
  __syncwarp();
  const float lse_i = lse[row];

  float acc[SA_PER_LANE];
#pragma unroll
  for (int r = 0; r < SA_PER_LANE; ++r) acc[r] = 0.0f;
  for (int t0 = 0; t0 < kk; t0 += SPT_WARP) {
    const int t = t0 + lane;
    const uint32_t j = t < kk ? ids[t] : SPT_SENTINEL;
    const bool valid = j != SPT_SENTINEL && lse_i != -INFINITY;
    float pv = 0.0f, dsv = 0.0f;
    if (valid) {
      const float a = sa_dot(sq[warp], kb + (size_t)j * d, d, vec4);
      const float bsum = sa_dot(sg[warp], vb + (size_t)j * dv, dv, vec4);
      pv = expf(scale * a - lse_i);
      dsv = pv * (bsum - delta);
    }
    if (t < kk) {
      pr[t] = pv;
      dsr[t] = dsv;
    }
    const int n = min(SPT_WARP, kk - t0);
    for (int src = 0; src < n; ++src) {
      const float dsj = __shfl_sync(0xFFFFFFFFu, dsv, src);
      const uint32_t jj = __shfl_sync(0xFFFFFFFFu, valid ? j : SPT_SENTINEL, src);
      if (jj == SPT_SENTINEL) continue;
      const T* kj = kb + (size_t)jj * d;
      const float a = scale * dsj;
#pragma unroll
      for (int r = 0; r < SA_PER_LANE; ++r) {
        const int c = lane + r * SPT_WARP;
        if (c < d) acc[r] += a * spt_ld(kj[c]);
      }
    }
  }
  T* dqi = dq + (size_t)row * d;
#pragma unroll
  for (int r = 0; r < SA_PER_LANE; ++r) {
    const int c = lane + r * SPT_WARP;
    if (c < d) dqi[c] = spt_st<T>(acc[r]);
  }
}

#ifndef SPT_EMU
extern "C" __global__ void csc_hist_u32(const uint32_t* __restrict__ idx,  // [BH, Lq, kk]
                                        uint32_t* __restrict__ cnt,        // [BH, nrb, Lk], zeroed
                                        int lq, int lk, int kk, int nrb, int rows_per_block) {
  const int bh = blockIdx.x / nrb, rb = blockIdx.x % nrb;
  const int r0 = rb * rows_per_block, r1 = min(lq, r0 + rows_per_block);
  const uint32_t* ids = idx + ((size_t)bh * lq + r0) * kk;
  uint32_t* c = cnt + ((size_t)bh * nrb + rb) * lk;
  const long long n = (long long)(r1 - r0) * kk;
  for (long long e = threadIdx.x; e < n; e += blockDim.x) {
    const uint32_t j = ids[e];
    if (j != SPT_SENTINEL) atomicAdd(&c[j], 1u);  // integer counts: order-free, deterministic
  }
}

extern "C" __global__ void csc_scan_rb_u32(uint32_t* __restrict__ cnt,  // [BH, nrb, Lk]
                                           uint32_t* __restrict__ tot,  // [BH, Lk]
                                           int bh_count, int lk, int nrb) {
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= (long long)bh_count * lk) return;
  const int bh = (int)(t / lk), j = (int)(t % lk);
  uint32_t run = 0;
  for (int rb = 0; rb < nrb; ++rb) {
    uint32_t* c = cnt + ((size_t)bh * nrb + rb) * lk + j;
    const uint32_t x = *c;
    *c = run;
    run += x;
  }
  tot[t] = run;
}

extern "C" __global__ void csc_scan_keys_u32(const uint32_t* __restrict__ tot,  // [BH, Lk]
                                             uint32_t* __restrict__ start,      // [BH, Lk + 1]
                                             int lk) {
  __shared__ int scratch[33];
  const int bh = blockIdx.x;
  const uint32_t* tb = tot + (size_t)bh * lk;
  uint32_t* sb = start + (size_t)bh * (lk + 1);
  int carry = 0;
  for (int base = 0; base < lk; base += blockDim.x) {
    const int j = base + threadIdx.x;
    const int x = j < lk ? (int)tb[j] : 0;
    int total;
    const int ex = spt_block_exclusive_scan(x, scratch, &total);
    if (j < lk) sb[j] = (uint32_t)(carry + ex);
    carry += total;
  }
  if (threadIdx.x == 0) sb[lk] = (uint32_t)carry;
}

extern "C" __global__ void csc_scatter_u32(const uint32_t* __restrict__ idx,    // [BH, Lq, kk]
                                           const uint32_t* __restrict__ start,  // [BH, Lk + 1]
                                           uint32_t* __restrict__ cnt,          // [BH, nrb, Lk]
                                           uint32_t* __restrict__ entries,      // [BH, Lq·kk]
                                           int lq, int lk, int kk, int nrb, int rows_per_block) {
  const int bh = blockIdx.x / nrb, rb = blockIdx.x % nrb;
  const int r0 = rb * rows_per_block, r1 = min(lq, r0 + rows_per_block);
  uint32_t* c = cnt + ((size_t)bh * nrb + rb) * lk;
  const uint32_t* sb = start + (size_t)bh * (lk + 1);
  uint32_t* eb = entries + (size_t)bh * lq * kk;
  for (int r = r0; r < r1; ++r) {  // uniform loop: every thread reaches every barrier
    const uint32_t* ids = idx + ((size_t)bh * lq + r) * kk;
    for (int t = threadIdx.x; t < kk; t += blockDim.x) {
      const uint32_t j = ids[t];
      if (j == SPT_SENTINEL) continue;
      const uint32_t slot = sb[j] + c[j];  // keys in a row are distinct: c[j] has one writer
      c[j] += 1;
      eb[slot] = (uint32_t)r * (uint32_t)kk + (uint32_t)t;
    }
    __syncthreads();
  }
}

template <typename T>
__device__ __forceinline__ void sparse_attn_bwd_keys(const T* __restrict__ q,               // [BH, Lq, d]
                                                    const T* __restrict__ g,               // [BH, Lq, dv]
                                                    const float* __restrict__ p,           // [BH, Lq, kk]
                                                    const float* __restrict__ ds,          // [BH, Lq, kk]
                                                    const uint32_t* __restrict__ start,    // [BH, Lk + 1]
                                                    const uint32_t* __restrict__ entries,  // [BH, Lq·kk]
                                                    T* __restrict__ dk,                    // [BH, Lk, d]
                                                    T* __restrict__ dv_out,                // [BH, Lk, dv]
                                                    int bh_count, int lq, int lk, int d, int dv,
                                                    int kk, float scale) {
  const int warp = threadIdx.x / SPT_WARP, lane = threadIdx.x % SPT_WARP;
  const long long key = (long long)blockIdx.x * SA_WARPS + warp;
  if (key >= (long long)bh_count * lk) return;
  const int bh = (int)(key / lk), j = (int)(key % lk);
  const uint32_t* sb = start + (size_t)bh * (lk + 1);
  const uint32_t* eb = entries + (size_t)bh * lq * kk;
  const size_t base = (size_t)bh * lq * kk;
  const int e0 = (int)sb[j], e1 = (int)sb[j + 1];
  float ak[SA_PER_LANE], av[SA_PER_LANE];
#pragma unroll
  for (int r = 0; r < SA_PER_LANE; ++r) ak[r] = av[r] = 0.0f;
  for (int c0 = e0; c0 < e1; c0 += SPT_WARP) {
    // Lane l fetches entry c0 + l; the warp then walks the 32 entries in list order.
    const int n = min(SPT_WARP, e1 - c0);
    uint32_t e = 0;
    float ck = 0.0f, cv = 0.0f;
    if (lane < n) {
      e = eb[c0 + lane];
      ck = scale * ds[base + e];
      cv = p[base + e];
    }
    for (int src = 0; src < n; ++src) {
      const uint32_t ee = __shfl_sync(0xFFFFFFFFu, e, src);
      const float a = __shfl_sync(0xFFFFFFFFu, ck, src);
      const float b = __shfl_sync(0xFFFFFFFFu, cv, src);
      const size_t qrow = (size_t)bh * lq + ee / (uint32_t)kk;
      const T* qi = q + qrow * d;
      const T* gi = g + qrow * dv;
#pragma unroll
      for (int r = 0; r < SA_PER_LANE; ++r) {
        const int c = lane + r * SPT_WARP;
        if (c < d) ak[r] += a * spt_ld(qi[c]);
        if (c < dv) av[r] += b * spt_ld(gi[c]);
      }
    }
  }
  T* dkj = dk + (size_t)key * d;
  T* dvj = dv_out + (size_t)key * dv;
#pragma unroll
  for (int r = 0; r < SA_PER_LANE; ++r) {
    const int c = lane + r * SPT_WARP;
    if (c < d) dkj[c] = spt_st<T>(ak[r]);
    if (c < dv) dvj[c] = spt_st<T>(av[r]);
  }
}

#endif  // SPT_EMU

#define SPT_SA_KERNELS(T, SFX)                                                                   \
  extern "C" __global__ void sparse_attn_fwd_##SFX(                                             \
      const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,                \
      const uint32_t* __restrict__ idx, T* __restrict__ o, float* __restrict__ lse, int rows,   \
      int lq, int lk, int d, int dv, int kk, float scale, int vec4) {                           \
    sparse_attn_fwd<T>(q, k, v, idx, o, lse, rows, lq, lk, d, dv, kk, scale, vec4);             \
  }                                                                                             \
  extern "C" __global__ void sparse_attn_bwd_rows_##SFX(                                        \
      const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,                \
      const T* __restrict__ o, const float* __restrict__ lse, const T* __restrict__ g,          \
      const uint32_t* __restrict__ idx, T* __restrict__ dq, float* __restrict__ p_out,          \
      float* __restrict__ ds_out, int rows, int lq, int lk, int d, int dv, int kk, float scale, \
      int vec4) {                                                                               \
    sparse_attn_bwd_rows<T>(q, k, v, o, lse, g, idx, dq, p_out, ds_out, rows, lq, lk, d, dv,    \
                            kk, scale, vec4);                                                   \
  }                                                                                             \
  SPT_SA_KEYS_KERNEL(T, SFX)

#ifdef SPT_EMU
#define SPT_SA_KEYS_KERNEL(T, SFX)
#else
#define SPT_SA_KEYS_KERNEL(T, SFX)                                                               \
  extern "C" __global__ void sparse_attn_bwd_keys_##SFX(                                        \
      const T* __restrict__ q, const T* __restrict__ g, const float* __restrict__ p,            \
      const float* __restrict__ ds, const uint32_t* __restrict__ start,                         \
      const uint32_t* __restrict__ entries, T* __restrict__ dk, T* __restrict__ dv_out,         \
      int bh_count, int lq, int lk, int d, int dv, int kk, float scale) {                       \
    sparse_attn_bwd_keys<T>(q, g, p, ds, start, entries, dk, dv_out, bh_count, lq, lk, d, dv,   \
                            kk, scale);                                                         \
  }
#endif  // SPT_EMU

SPT_SA_KERNELS(float, f32)
#ifndef SPT_EMU
SPT_SA_KERNELS(__nv_bfloat16, bf16)
#endif
