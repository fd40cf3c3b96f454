// pq.cu: product-quantisation encode and ADC top-k key selection (f32 scores, u8 codes).
// Keys and queries may be f32 or bf16 (_f32 / _bf16 kernels; read as f32); centroids are f32.
//
// Reference: crates/spt-ops/src/pq/{mod.rs (Codebook::encode), select.rs (select_keys)}.
//
// ---------------------------------------------------------------------------------------------
// pq_encode_f32: codes[r, s] = argmin_c ‖x[r, s·dc:(s+1)·dc] − cen[g(r), s, c]‖², ties to the
//   lower c (the CPU's strict `<`). Distances are summed in the CPU's order with explicit
//   round-to-nearest ops (no FMA contraction), so codes match the CPU bit for bit.
//   keys [rows = B·H·L, d] f32, centroids [G, S, C, dc] f32 (G = 1 or H), codes [rows, S] u8.
//   g(r) = 0 when G = 1, else (r / L) % H.
//   Launch: grid (ceil(rows·S / 256)), block 256, one thread per (row, subspace).
//
// ---------------------------------------------------------------------------------------------
// adc_select_f32: for each query row (b, h, i), the k allowed keys with the largest ADC score
//   score(i, j) = Σ_s ⟨q_s, c[g, s, code_s(j)]⟩, exact top-k, ties to the lower key index,
//   written ascending and padded with SENTINEL = 0xFFFFFFFF; counts[row] = number of real keys.
//   Allowed: j ≤ i if causal, and pad[b, j] ≠ 0 if a key-padding mask is given.
//   q [B, H, Lq, d] f32, codes [B, H, Lk, S] u8, centroids [G, S, C, dc] f32,
//   pad [B, Lk] u8 or null, out [B, H, Lq, k] u32, counts [B, H, Lq] u32.
//   Launch: grid (B·H·Lq), block 256 (one block per query row), dynamic shared memory
//   = 4·(S·C + slots·width) bytes for the tables (≤ 48 KiB; checked in Rust).
//
//   Scores: the per-query table T[s][c] = ⟨q_s, c[g, s, c]⟩ lives in shared memory. With C ≤ 16
//   and S ≥ 2 two 4-bit codes share a slot and the table for slot p has 256 entries
//   T[2p][lo] + T[2p+1][hi], exactly as the CPU's `Scorer`; scores add slots four at a time as
//   ((t0 + t1) + (t2 + t3)), then the rest one by one, also as the CPU. The table entries are
//   sequential dot products; the CPU's AVX2 dot sums in another order, so scores can differ in
//   the last bit from the CPU's on arbitrary data (the parity test uses integer-valued data,
//   where every order is exact, and checks random data by score, see cuda_parity.rs).
//
//   Top-k: scores are not stored. A 4-pass MSB radix select (8 bits per pass, a 256-bin shared
//   histogram, integer atomics only) on order-preserving u32 keys finds the k-th largest key
//   `thr` and how many ties at `thr` to take; each pass recomputes the scores (S/2 shared-memory
//   lookups per key). A final pass walks the keys in index order in chunks of blockDim, and a
//   block-wide exclusive scan places every key > thr and the lowest-indexed ties, so the output
//   is ascending without a sort. Rows with ≤ k allowed keys take all of them.
//   Limits: Lk < 2^31, k ≤ Lk, S·C + slots·width ≤ 12288 floats.
#include "common.cuh"

template <typename E>
__device__ __forceinline__ void pq_encode(const E* __restrict__ keys,  // [rows, d]
                                         const float* __restrict__ cen,   // [G, S, C, dc]
                                         uint8_t* __restrict__ codes,     // [rows, S]
                                         int rows, int h, int l, int groups, int s, int c, int dc) {
  const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= (long long)rows * s) return;
  const int r = (int)(t / s), si = (int)(t % s);
  const int g = groups == 1 ? 0 : (r / l) % h;
  const E* x = keys + (size_t)r * s * dc + (size_t)si * dc;
  const float* cw = cen + ((size_t)g * s + si) * c * dc;
  float best = INFINITY;
  int arg = 0;
  for (int ci = 0; ci < c; ++ci) {
    float acc = 0.0f;
    for (int e = 0; e < dc; ++e) {
      const float diff = __fsub_rn(spt_ld(x[e]), cw[(size_t)ci * dc + e]);
      acc = __fadd_rn(acc, __fmul_rn(diff, diff));
    }
    if (acc < best) {
      best = acc;
      arg = ci;
    }
  }
  codes[t] = (uint8_t)arg;
}

// Order-preserving map f32 → u32: a > b ⇔ key(a) > key(b) (the CPU's `key`).
__device__ __forceinline__ uint32_t spt_score_key(float v) {
  const uint32_t b = __float_as_uint(v);
  return (b >> 31) ? ~b : (b | 0x80000000u);
}

struct AdcTables {
  const float* tab;     // [slots, width]
  const uint8_t* codes; // [Lk, S] of this (b, h)
  int s, slots, width;
  bool paired;
};

__device__ __forceinline__ int adc_code(const AdcTables& t, int j, int slot) {
  const uint8_t* cj = t.codes + (size_t)j * t.s;
  if (!t.paired) return cj[slot];
  const int lo = cj[2 * slot];
  const int hi = 2 * slot + 1 < t.s ? cj[2 * slot + 1] : 0;
  return lo | (hi << 4);
}

__device__ __forceinline__ float adc_score(const AdcTables& t, int j) {
  float acc = 0.0f;
  int slot = 0;
  for (; slot + 4 <= t.slots; slot += 4) {
    const float a = t.tab[(slot + 0) * t.width + adc_code(t, j, slot + 0)];
    const float b = t.tab[(slot + 1) * t.width + adc_code(t, j, slot + 1)];
    const float c = t.tab[(slot + 2) * t.width + adc_code(t, j, slot + 2)];
    const float d = t.tab[(slot + 3) * t.width + adc_code(t, j, slot + 3)];
    acc = __fadd_rn(acc, __fadd_rn(__fadd_rn(a, b), __fadd_rn(c, d)));
  }
  for (; slot < t.slots; ++slot) acc = __fadd_rn(acc, t.tab[slot * t.width + adc_code(t, j, slot)]);
  return acc;
}

template <typename E>
__device__ __forceinline__ void adc_select(const E* __restrict__ q,      // [B, H, Lq, d]
                                          const uint8_t* __restrict__ codes,// [B, H, Lk, S]
                                          const float* __restrict__ cen,    // [G, S, C, dc]
                                          const uint8_t* __restrict__ pad,  // [B, Lk] or null
                                          uint32_t* __restrict__ out,       // [B, H, Lq, k]
                                          uint32_t* __restrict__ counts,    // [B, H, Lq]
                                          int h, int lq, int lk, int groups, int s, int c, int dc,
                                          int k, int causal) {
  extern __shared__ float smem[];
  __shared__ int hist[256];
  __shared__ int scan_scratch[33];
  __shared__ uint32_t sh_prefix;
  __shared__ int sh_remaining;

  const int row = blockIdx.x;  // = bh·Lq + i
  const int bh = row / lq, i = row % lq;
  const int b = bh / h, hh = bh % h;
  const int g = groups == 1 ? 0 : hh;
  const int d = s * dc;
  const bool paired = c <= 16 && s >= 2;
  const int slots = paired ? (s + 1) / 2 : s;
  const int width = paired ? 256 : c;
  float* table = smem;                     // [S, C]
  float* tab = paired ? smem + s * c : smem;  // [slots, width]

  // 1. Per-query table T[s][c] = ⟨q_s, cen[g, s, c]⟩ (sequential dot), then the pair table.
  const E* qi = q + (size_t)row * d;
  for (int e = threadIdx.x; e < s * c; e += blockDim.x) {
    const int si = e / c, ci = e % c;
    const float* cw = cen + (((size_t)g * s + si) * c + ci) * dc;
    float acc = 0.0f;
    for (int t = 0; t < dc; ++t) acc = __fadd_rn(acc, __fmul_rn(spt_ld(qi[si * dc + t]), cw[t]));
    table[e] = acc;
  }
  __syncthreads();
  if (paired) {
    for (int e = threadIdx.x; e < slots * 256; e += blockDim.x) {
      const int p = e / 256, byte = e % 256, lo = byte & 15, hi = byte >> 4;
      float v;
      if (2 * p + 1 < s) {
        v = (lo < c && hi < c) ? __fadd_rn(table[2 * p * c + lo], table[(2 * p + 1) * c + hi]) : 0.0f;
      } else {
        v = lo < c ? table[2 * p * c + lo] : 0.0f;
      }
      tab[e] = v;
    }
    __syncthreads();
  }
  AdcTables T{tab, codes + (size_t)bh * lk * s, s, slots, width, paired};
  const int end = causal ? min(i + 1, lk) : lk;
  const uint8_t* padb = pad ? pad + (size_t)b * lk : nullptr;
  uint32_t* o = out + (size_t)row * k;

  // 2. How many keys are allowed?
  int n_allowed = 0;
  {
    int cnt = 0;
    for (int j = threadIdx.x; j < end; j += blockDim.x) cnt += (!padb || padb[j]) ? 1 : 0;
    int total;
    spt_block_exclusive_scan(cnt, scan_scratch, &total);
    n_allowed = total;
  }

  // 3. Radix select of the k-th largest key (skipped when every allowed key is kept).
  uint32_t thr = 0;
  int ties = 0;  // how many keys equal to thr to take, lowest index first
  const bool take_all = n_allowed <= k;
  if (!take_all) {
    if (threadIdx.x == 0) {
      sh_prefix = 0;
      sh_remaining = k;
    }
    uint32_t mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int e = threadIdx.x; e < 256; e += blockDim.x) hist[e] = 0;
      __syncthreads();
      const uint32_t prefix = sh_prefix;
      for (int j = threadIdx.x; j < end; j += blockDim.x) {
        if (padb && !padb[j]) continue;
        const uint32_t key = spt_score_key(adc_score(T, j));
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255], 1);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        int rem = sh_remaining, above = 0, bin = 255;
        for (; bin > 0; --bin) {
          if (above + hist[bin] >= rem) break;
          above += hist[bin];
        }
        sh_remaining = rem - above;
        sh_prefix = prefix | ((uint32_t)bin << shift);
      }
      mask |= 255u << shift;
      __syncthreads();
    }
    thr = sh_prefix;
    ties = sh_remaining;
  }

  // 4. Ordered compaction: keys > thr and the first `ties` keys == thr, ascending.
  int written = 0, ties_seen = 0;
  for (int base = 0; base < end; base += blockDim.x) {
    const int j = base + threadIdx.x;
    bool ok = j < end && (!padb || padb[j]);
    bool gt = false, eq = false;
    if (ok) {
      if (take_all) {
        gt = true;
      } else {
        const uint32_t key = spt_score_key(adc_score(T, j));
        gt = key > thr;
        eq = key == thr;
      }
    }
    int eq_total;
    const int eq_rank = spt_block_exclusive_scan(eq ? 1 : 0, scan_scratch, &eq_total);
    const bool take = gt || (eq && ties_seen + eq_rank < ties);
    int take_total;
    const int pos = spt_block_exclusive_scan(take ? 1 : 0, scan_scratch, &take_total);
    if (take) o[written + pos] = (uint32_t)j;
    written += take_total;
    ties_seen += eq_total;
  }
  for (int t = written + threadIdx.x; t < k; t += blockDim.x) o[t] = SPT_SENTINEL;
  if (threadIdx.x == 0) counts[row] = (uint32_t)written;
}

#define SPT_PQ_KERNELS(T, SFX)                                                                  \
  extern "C" __global__ void pq_encode_##SFX(const T* __restrict__ keys,                       \
                                             const float* __restrict__ cen,                    \
                                             uint8_t* __restrict__ codes, int rows, int h,     \
                                             int l, int groups, int s, int c, int dc) {        \
    pq_encode<T>(keys, cen, codes, rows, h, l, groups, s, c, dc);                              \
  }                                                                                            \
  extern "C" __global__ void adc_select_##SFX(                                                 \
      const T* __restrict__ q, const uint8_t* __restrict__ codes,                              \
      const float* __restrict__ cen, const uint8_t* __restrict__ pad,                          \
      uint32_t* __restrict__ out, uint32_t* __restrict__ counts, int h, int lq, int lk,        \
      int groups, int s, int c, int dc, int k, int causal) {                                   \
    adc_select<T>(q, codes, cen, pad, out, counts, h, lq, lk, groups, s, c, dc, k, causal);    \
  }

SPT_PQ_KERNELS(float, f32)
SPT_PQ_KERNELS(__nv_bfloat16, bf16)
