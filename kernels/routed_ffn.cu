// routed_ffn.cu: the non-GEMM parts of the routed FFN on CUDA (f32): token grouping by block
// (deterministic counting sort), row gather, gate scale + combine, and their backward.
// STANDALONE: compiled to PTX by build.rs (so CI checks it), but not yet called from Rust: the
// routed FFN op (crates/spt-ops/src/routed_ffn, another branch) will wire it.
//
// Reference: crates/spt-ops/src/routed_ffn/{router.rs (Routing: counting sort by block),
// ops.rs (gather_matmul / scatter_matmul)} on the routed-FFN branch.
//
// Shapes: T tokens, k kept blocks per token, E = n_blocks. sel [T, k] u32 (distinct blocks per
// token), gate [T, k] f32, x [T, d], y_g [T·k, n] (group-sorted rows), out [T, n].
// Grouping (same scheme as the sparse-attention CSC, so the order is deterministic):
// - route_hist_u32     grid (nch), block 256: cnt[ch, e] = #pairs of chunk ch (R tokens) in block e.
// - route_scan_u32     grid (1), block 1024: per e, exclusive over chunks (in place), then
//                      offsets[0..=E] = exclusive scan of the block totals.
// - route_scatter_u32  grid (nch), block 256: tokens of the chunk in order; a token's k blocks
//                      are distinct, so slot = offsets[e] + cnt[ch, e]++ has one writer.
//                      Writes perm[slot] = t·k + s (group-sorted pair list, by token within a
//                      group) and pos[t·k + s] = slot (its inverse).
// - route_gather_f32   grid (T·k), block 128: x_g[slot] = x[perm[slot] / k] (input of the fc1 GEMM).
// - route_combine_f32  grid (T), block 128: out[t] = Σ_s gate[t, s] · y_g[pos[t, s]], slots in
//                      order: the "scatter-add" as a pull, so no float atomics and a fixed order.
// - route_combine_bwd_f32 grid (T·k), block 128: dy_g[slot] = gate · dout[t], and
//                      dgate[t, s] = ⟨dout[t], y_g[slot]⟩ (block reduction).
// dx of the fc1 input is route_combine_f32 again with gate ≡ 1 (gate = null) over dx_g.
//
// GEMMs: cuBLAS per group, not a custom tiled kernel. After grouping, group e is the contiguous
// row range offsets[e]..offsets[e+1] of x_g, and its weights are read in place: fc1 block e is
// rows [e·b, (e+1)·b) of W1 [d_ff, d] (a contiguous slice), fc2 block e is columns [e·b,
// (e+1)·b) of W2 [d, d_ff] (leading dimension d_ff). At the shapes that matter (T·k/E ≥ a few
// hundred rows, b ≥ 256) each group GEMM is large enough for cuBLAS to run its tensor-core
// kernels at full rate, and cublasGemmGroupedBatchedEx (CUDA ≥ 12.5, cudarc exposes cuBLAS)
// issues all E groups in one call. A custom tiled kernel would only win with many tiny groups,
// and would have to re-implement what cuBLAS already tunes per architecture.
//
// Limits: T·k < 2^31; sel entries < E (checked in Rust when wired).
#include "common.cuh"

extern "C" __global__ void route_hist_u32(const uint32_t* __restrict__ sel,  // [T, k]
                                          uint32_t* __restrict__ cnt,        // [nch, E], zeroed
                                          int t_count, int k, int e_count, int chunk) {
  const int ch = blockIdx.x;
  const int t0 = ch * chunk, t1 = min(t_count, t0 + chunk);
  for (int p = t0 * k + threadIdx.x; p < t1 * k; p += blockDim.x)
    atomicAdd(&cnt[(size_t)ch * e_count + sel[p]], 1u);  // integer counts: deterministic
}

extern "C" __global__ void route_scan_u32(uint32_t* __restrict__ cnt,      // [nch, E]
                                          uint32_t* __restrict__ offsets,  // [E + 1]
                                          int nch, int e_count) {
  __shared__ int scratch[33];
  int carry = 0;
  for (int base = 0; base < e_count; base += blockDim.x) {
    const int e = base + threadIdx.x;
    int run = 0;
    if (e < e_count) {
      for (int ch = 0; ch < nch; ++ch) {
        uint32_t* c = cnt + (size_t)ch * e_count + e;
        const int x = (int)*c;
        *c = (uint32_t)run;
        run += x;
      }
    }
    int total;
    const int ex = spt_block_exclusive_scan(run, scratch, &total);
    if (e < e_count) offsets[e] = (uint32_t)(carry + ex);
    carry += total;
  }
  if (threadIdx.x == 0) offsets[e_count] = (uint32_t)carry;
}

extern "C" __global__ void route_scatter_u32(const uint32_t* __restrict__ sel,      // [T, k]
                                             const uint32_t* __restrict__ offsets,  // [E + 1]
                                             uint32_t* __restrict__ cnt,            // [nch, E]
                                             uint32_t* __restrict__ perm,           // [T·k]
                                             uint32_t* __restrict__ pos,            // [T·k]
                                             int t_count, int k, int e_count, int chunk) {
  const int ch = blockIdx.x;
  const int t0 = ch * chunk, t1 = min(t_count, t0 + chunk);
  uint32_t* c = cnt + (size_t)ch * e_count;
  for (int t = t0; t < t1; ++t) {  // uniform loop: every thread reaches every barrier
    for (int s = threadIdx.x; s < k; s += blockDim.x) {
      const uint32_t p = (uint32_t)t * (uint32_t)k + (uint32_t)s;
      const uint32_t e = sel[p];
      const uint32_t slot = offsets[e] + c[e];
      c[e] += 1;
      perm[slot] = p;
      pos[p] = slot;
    }
    __syncthreads();
  }
}

extern "C" __global__ void route_gather_f32(const float* __restrict__ x,        // [T, d]
                                            const uint32_t* __restrict__ perm,  // [T·k]
                                            float* __restrict__ x_g,            // [T·k, d]
                                            int k, int d) {
  const int slot = blockIdx.x;
  const float* src = x + (size_t)(perm[slot] / (uint32_t)k) * d;
  float* dst = x_g + (size_t)slot * d;
  for (int c = threadIdx.x; c < d; c += blockDim.x) dst[c] = src[c];
}

extern "C" __global__ void route_combine_f32(const float* __restrict__ y_g,      // [T·k, n]
                                             const uint32_t* __restrict__ pos,   // [T·k]
                                             const float* __restrict__ gate,     // [T, k] or null (≡ 1)
                                             float* __restrict__ out,            // [T, n]
                                             int k, int n) {
  const int t = blockIdx.x;
  for (int c = threadIdx.x; c < n; c += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < k; ++s) {  // slots in order: fixed summation order
      const size_t p = (size_t)t * k + s;
      const float g = gate ? gate[p] : 1.0f;
      acc += g * y_g[(size_t)pos[p] * n + c];
    }
    out[(size_t)t * n + c] = acc;
  }
}

extern "C" __global__ void route_combine_bwd_f32(const float* __restrict__ dout,    // [T, n]
                                                 const float* __restrict__ y_g,     // [T·k, n]
                                                 const uint32_t* __restrict__ perm, // [T·k]
                                                 const float* __restrict__ gate,    // [T, k]
                                                 float* __restrict__ dy_g,          // [T·k, n]
                                                 float* __restrict__ dgate,         // [T, k]
                                                 int k, int n) {
  __shared__ float scratch[32];
  const int slot = blockIdx.x;
  const uint32_t p = perm[slot];
  const float* dr = dout + (size_t)(p / (uint32_t)k) * n;
  const float* yr = y_g + (size_t)slot * n;
  float* dyr = dy_g + (size_t)slot * n;
  const float g = gate[p];
  float dot = 0.0f;
  for (int c = threadIdx.x; c < n; c += blockDim.x) {
    dyr[c] = g * dr[c];
    dot += dr[c] * yr[c];
  }
  dot = spt_block_sum(dot, scratch);
  if (threadIdx.x == 0) dgate[p] = dot;
}
