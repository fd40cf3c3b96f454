// block_select.cu: block selection for block-sparse attention on the device: per query tile, the
// key blocks to attend to, scored from the keys' PQ codes (no host copy of scores or lists).
//
// Reference: crates/spt-ops/src/pq/blocks.rs (select_blocks), whose rules this follows exactly:
// the tile's table T[s][c] = ⟨Σ_{i in tile} q_i[s], codeword(g, s, c)⟩; a block's score is
// Mean = Σ_s Σ_c T[s][c]·n[s][c] / n_keys (n the codeword counts over its allowed keys) or
// UpperBound = Σ_s max_{c: n[s][c] > 0} T[s][c]; under a causal mask the diagonal blocks (those
// overlapping the tile's query positions) are always kept and blocks after the tile's last query
// never; blocks with no allowed key are never kept; the best `room = width − kept diagonals`
// of the rest by score, ties to the lower block index; the list ascending, then SENTINEL.
//
// Shapes: q [BH, Lq, d] f32 or bf16 (_f32 / _bf16, read as f32), codes [BH, Lk, S] u8,
// centroids [G, S, C, dc] f32 (G = 1 or H), pad [B, Lk] u8 or null (nonzero = allowed),
// hist [BH, nb, S, C] u32, nkeys [BH, nb] u32, blocks [BH, nt, width] u32, counts [BH, nt] u32.
//
// Kernels and launch geometry
// - block_hist_u8     grid (nb, BH), block 128: one thread per (s, c) entry counts the block's
//                     allowed keys with that code (no atomics); thread 0 counts allowed keys.
// - block_select_f32  grid (nt, BH), block 128, dynamic shared memory 4·(d + S·C + 3·nb) bytes
//                     (≤ 48 KB, checked in Rust): the tile's summed query, its table, the block
//                     scores, then a rank per candidate block (how many candidates beat it; ties
//                     to the lower index) so that the kept set is exact without a sort; thread 0
//                     writes the list in block order. The rank pass is O(nb²) per tile: 65 536
//                     comparisons at L = 16384 with 64-key blocks.
// Limits (checked in Rust): every element count < 2^31, C ≤ 256.
// Checked without a GPU by kernels/emu/block_select_emu_test.cpp.
#ifdef SPT_EMU
#include "emu/cuda_emu.hpp"
#define BS_SMEM reinterpret_cast<float*>(emu_block->smem.data())
#else
#include "common.cuh"
extern __shared__ float bs_smem[];
#define BS_SMEM bs_smem
#endif

extern "C" __global__ void block_hist_u8(const uint8_t* __restrict__ codes, const uint8_t* __restrict__ pad,
                                         uint32_t* __restrict__ hist, uint32_t* __restrict__ nkeys, int h, int lk,
                                         int s, int c, int kb) {
  const int blk = blockIdx.x, bh = blockIdx.y, nb = gridDim.x;
  const int j0 = blk * kb, j1 = min(j0 + kb, lk);
  const uint8_t* cd = codes + static_cast<size_t>(bh) * lk * s;
  const uint8_t* ok = pad ? pad + static_cast<size_t>(bh / h) * lk : nullptr;
  uint32_t* out = hist + (static_cast<size_t>(bh) * nb + blk) * s * c;
  for (int e = threadIdx.x; e < s * c; e += blockDim.x) {
    const int si = e / c, ci = e % c;
    uint32_t n = 0;
    for (int j = j0; j < j1; ++j) n += (ok == nullptr || ok[j] != 0) && cd[static_cast<size_t>(j) * s + si] == ci;
    out[e] = n;
  }
  if (threadIdx.x == 0) {
    uint32_t n = 0;
    for (int j = j0; j < j1; ++j) n += ok == nullptr || ok[j] != 0;
    nkeys[static_cast<size_t>(bh) * nb + blk] = n;
  }
}

template <typename T>
__device__ __forceinline__ void block_select(const T* __restrict__ q, const float* __restrict__ cen,
                                             const uint32_t* __restrict__ hist, const uint32_t* __restrict__ nkeys,
                                             uint32_t* __restrict__ blocks, uint32_t* __restrict__ counts, int h,
                                             int lq, int lk, int d, int groups, int s, int c, int dc, int qt, int kb,
                                             int width, int causal, int upper_bound) {
  const int tile = blockIdx.x, bh = blockIdx.y, nt = gridDim.x;
  const int nb = (lk + kb - 1) / kb;
  float* qbar = BS_SMEM;
  float* table = qbar + d;
  float* score = table + s * c;
  int* flag = reinterpret_cast<int*>(score + nb);  // 0 never, 1 candidate, 2 diagonal (kept)
  int* keep = flag + nb;
  const int t0 = tile * qt, t1 = min(t0 + qt, lq);
  const T* qb = q + static_cast<size_t>(bh) * lq * d;
  for (int e = threadIdx.x; e < d; e += blockDim.x) {
    float a = 0.0f;
    for (int i = t0; i < t1; ++i) a += spt_ld(qb[static_cast<size_t>(i) * d + e]);
    qbar[e] = a;
  }
  __syncthreads();
  const int g = groups == 1 ? 0 : bh % h;
  for (int e = threadIdx.x; e < s * c; e += blockDim.x) {
    const int si = e / c, ci = e % c;
    const float* cw = cen + ((static_cast<size_t>(g) * s + si) * c + ci) * dc;
    float a = 0.0f;
    for (int x = 0; x < dc; ++x) a += qbar[si * dc + x] * cw[x];
    table[e] = a;
  }
  __syncthreads();
  const int reach = causal ? min(nb, (t1 - 1) / kb + 1) : nb;
  int dlo = 0, dhi = 0;  // diagonal blocks [dlo, dhi)
  if (causal) {
    const int end = min(t1, lk);
    if (t0 < end) {
      dlo = t0 / kb;
      dhi = (end - 1) / kb + 1;
    }
  }
  const uint32_t* nk = nkeys + static_cast<size_t>(bh) * nb;
  const uint32_t* hb = hist + static_cast<size_t>(bh) * nb * s * c;
  int ndiag = 0;
  for (int blk = dlo; blk < dhi; ++blk) ndiag += nk[blk] > 0;
  const int room = width - ndiag;
  for (int blk = threadIdx.x; blk < nb; blk += blockDim.x) {
    const bool diag = blk >= dlo && blk < dhi, has = nk[blk] > 0;
    const bool cand = blk < reach && has && !diag;
    flag[blk] = diag && has ? 2 : (cand ? 1 : 0);
    float sc = 0.0f;
    if (cand) {
      const uint32_t* n = hb + static_cast<size_t>(blk) * s * c;
      if (upper_bound) {
        for (int si = 0; si < s; ++si) {
          float m = -INFINITY;
          for (int ci = 0; ci < c; ++ci)
            if (n[si * c + ci] > 0) m = fmaxf(m, table[si * c + ci]);
          sc += m;
        }
      } else {
        float tot = 0.0f;
        for (int si = 0; si < s; ++si) {
          float r = 0.0f;
          for (int ci = 0; ci < c; ++ci) r += table[si * c + ci] * static_cast<float>(n[si * c + ci]);
          tot += r;
        }
        sc = tot / static_cast<float>(nk[blk]);
      }
    }
    score[blk] = sc;
  }
  __syncthreads();
  for (int blk = threadIdx.x; blk < nb; blk += blockDim.x) {
    int rank = 0;
    if (flag[blk] == 1) {
      const float mine = score[blk];
      for (int j = 0; j < nb; ++j)
        rank += flag[j] == 1 && (score[j] > mine || (score[j] == mine && j < blk));
    }
    keep[blk] = flag[blk] == 2 || (flag[blk] == 1 && rank < room);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t* out = blocks + (static_cast<size_t>(bh) * nt + tile) * width;
    int n = 0;
    for (int blk = 0; blk < nb && n < width; ++blk)
      if (keep[blk]) out[n++] = blk;
    counts[static_cast<size_t>(bh) * nt + tile] = n;
    for (int x = n; x < width; ++x) out[x] = SPT_SENTINEL;
  }
}

#define SPT_BS_KERNELS(T, SFX)                                                                                   \
  extern "C" __global__ void block_select_##SFX(                                                                \
      const T* q, const float* cen, const uint32_t* hist, const uint32_t* nkeys, uint32_t* blocks,               \
      uint32_t* counts, int h, int lq, int lk, int d, int groups, int s, int c, int dc, int qt, int kb,         \
      int width, int causal, int upper_bound) {                                                                  \
    block_select<T>(q, cen, hist, nkeys, blocks, counts, h, lq, lk, d, groups, s, c, dc, qt, kb, width, causal, \
                    upper_bound);                                                                                \
  }

SPT_BS_KERNELS(float, f32)
SPT_BS_KERNELS(__nv_bfloat16, bf16)
