// flash_attention.cu: tiled attention on tensor cores (bf16 q/k/v/o and gradients, f32
// accumulation), forward with an online softmax and a deterministic FlashAttention-2-style
// backward; dense (every key block a query may see) or block-sparse (the key blocks a selection
// lists per query tile).
//
//   o_i = Σ_j softmax_j(scale · q_i·k_j) v_j over the keys query i sees,  lse_i = log Σ_j exp(…)
//
// References: crates/spt-ops/src/flash_attention/cpu.rs (dense) and
// crates/spt-ops/src/block_sparse_attention/cpu.rs (block-sparse). Launcher:
// crates/spt-ops/src/flash_attention/cuda.rs. Checked without a GPU by kernels/emu/ (the device
// code run on host threads against an f64 reference).
//
// Shapes (contiguous; bf16 unless said): q, o, do, dq [BH, Lq, D]; k, v, dk, dv [BH, Lk, D];
// lse, delta [BH, Lq] f32; key_ok [B, Lk] u8 or null (nonzero = attend); blocks [BH, nt, width]
// u32 or null (dense): per query tile, ascending block indices then SENTINEL; tiles [BH, nb, nt]
// u32 and ntiles [BH, nb] u32: per key block, the query tiles whose list holds it, ascending.
// Query i sees key j iff j < Lk, j ≤ i when causal, key_ok[b, j] ≠ 0 and, block-sparse, j's block
// is in the list of i's tile. A row that sees no key: o = 0, lse = −inf, and no gradient.
//
// Geometry: query tile = key block = 64 rows (FA_BR, FA_BC; the CPU's default tiling); 4 warps
// per CTA, each owning 16 of the 64 rows and computing with mma.sync.m16n8k16 (bf16 in, f32
// accumulators), operands loaded from shared memory with ldmatrix (.trans for the [k][n] ones).
// The per-element mask runs only on tile pairs that need it (diagonal, ragged or padded). Fragment layouts (PTX ISA), with g = lane / 4, t = lane % 4: an A register holds
// row g or g + 8, columns 2t, 2t + 1 (+ 8); a B register rows 2t, 2t + 1 (+ 8) of column g; an
// accumulator rows g, g + 8, columns 2t, 2t + 1. So a 16 × 16 slice of an S accumulator is,
// element for element, the A fragment of P for the next product (no shared-memory round trip).
// - fa_fwd_d{64,128}       grid (nt, BH), 128 threads: per query tile, loop over key blocks
//                          (dense: all up to the causal cut; sparse: the tile's list): S = Q Kᵀ,
//                          masked online softmax in the exp2 domain, O += P V; saves lse.
// - fa_bwd_delta           grid (ceil(BH·Lq / 4)), 128 threads: delta_i = do_i · o_i (f32).
// - fa_block_tiles         grid (ceil(BH·nb / 128)), 128 threads: the transpose of the block
//                          lists (sparse mode only), one thread per (bh, key block).
// - fa_bwd_dkdv_d{64,128}  grid (nb, BH), 128 threads: per key block, loop over the query tiles
//                          that see it, warps owning 16 keys: Sᵀ = K Qᵀ, Pᵀ, dV += Pᵀ dO,
//                          dPᵀ = V dOᵀ, dSᵀ = Pᵀ ∘ (dPᵀ − delta), dK += dSᵀ Q. One CTA owns each
//                          key block and walks its tiles in a fixed order.
// - fa_bwd_dq_d{64,128}    grid (nt, BH), 128 threads: per query tile, the forward's loop again:
//                          S, P from lse, dP = dO Vᵀ, dS, dQ += dS K. Recomputing S once more
//                          instead of float atomics on dq makes the backward deterministic (same
//                          bits run after run) with no option to choose.
// Global → shared copies are cp.async, two stages: the next key block (fwd, dq) or query tile
// (dkdv) is copied while the current one is computed.
// Shared memory (dynamic), tiles of 64 × (D + 8) bf16 (rows padded by 16 bytes against bank
// conflicts): fwd 5 (Q + 2 stages of K, V), dq 6, dkdv 6 + 1 KB: D = 64: 45 / 54 / 55 KB;
// D = 128: 85 / 102 / 103 KB, above the default 48 KB, so the launcher raises the kernels' limit.
// Limits (checked in Rust): D ∈ {64, 128}, d_v = D; q, k, v, o, do start 16-byte aligned; every
// element count < 2^31.
#ifdef SPT_EMU
#include "emu/cuda_emu.hpp"
#else
#include "common.cuh"
#endif

#define FA_BR 64
#define FA_BC 64
#define FA_THREADS 128
#define FA_PAD 8
#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f
#define FA_SENTINEL 0xFFFFFFFFu

typedef uint16_t fa_u16;
typedef uint32_t fa_u32;

#ifndef SPT_EMU
extern __shared__ __align__(16) unsigned char fa_smem[];
#else
#define fa_smem (emu_block->smem.data())
#endif

// Two f32 values as a bf16x2 register (round to nearest even); `lo` in the low half.
__device__ __forceinline__ fa_u32 fa_pack(float lo, float hi) {
#ifdef SPT_EMU
  auto bf = [](float f) -> fa_u32 {
    fa_u32 x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7F800000u) == 0x7F800000u && (x & 0x007FFFFFu)) return 0x7FC0u;
    return (x + 0x7FFFu + ((x >> 16) & 1u)) >> 16;
  };
  return bf(lo) | (bf(hi) << 16);
#else
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<fa_u32*>(&h);
#endif
}

__device__ __forceinline__ float fa_f32(fa_u16 h) {
#ifdef SPT_EMU
  return emu_bf16_bits_to_float(h);
#else
  return __uint_as_float(static_cast<fa_u32>(h) << 16);
#endif
}

__device__ __forceinline__ fa_u32 fa_pack16(fa_u16 lo, fa_u16 hi) {
  return static_cast<fa_u32>(lo) | (static_cast<fa_u32>(hi) << 16);
}

__device__ __forceinline__ fa_u32 fa_ld32(const fa_u16* p) { return *reinterpret_cast<const fa_u32*>(p); }

// c += a · [b0; b1] over one warp (m16n8k16, bf16 × bf16 → f32).
__device__ __forceinline__ void fa_mma(float (&c)[4], const fa_u32 (&a)[4], fa_u32 b0, fa_u32 b1) {
#ifdef SPT_EMU
  emu_mma_bf16(c, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Four 8 × 8 b16 matrices from shared memory, one register each (ldmatrix .x4): lane L gives the
// address of row L % 8 of matrix L / 8. Plain: register m holds row g, columns 2t, 2t + 1 of
// matrix m; transposed (kTrans, .trans): rows 2t, 2t + 1 of column g.
template <bool kTrans>
__device__ __forceinline__ void fa_ldsm(fa_u32 (&r)[4], const fa_u16* p) {
#ifdef SPT_EMU
  emu_ldmatrix_x4(r, p, kTrans);
#else
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  if constexpr (kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}

__device__ __forceinline__ float fa_quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, 2));
}

__device__ __forceinline__ float fa_quad_sum(float v) {
  v += __shfl_xor_sync(0xFFFFFFFFu, v, 1);
  return v + __shfl_xor_sync(0xFFFFFFFFu, v, 2);
}

template <int N>
__device__ __forceinline__ void fa_zero(float (&x)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; ++j) x[j][0] = x[j][1] = x[j][2] = x[j][3] = 0.0f;
}

// The GEMM tiles below read shared-memory tiles (row-major, row stride S = D + 8 elements, so
// the 8 row addresses of an ldmatrix fall in 8 distinct 16-byte bank groups) with ldmatrix. For
// lane L, mi = L / 8 picks the 8 × 8 matrix and L % 8 its row.

// x[16 × 8·NJ] = A[16 × D] · Bᵀ with A rows r0.. of `a_m` ([row][k]) and B rows of `b_m`
// ([n][k]): the Q Kᵀ shape. One ldmatrix gives A's 16 × 16 fragment; one gives B for two n-tiles.
template <int D, int NJ = 8>
__device__ __forceinline__ void fa_mm_abt(float (&x)[NJ][4], const fa_u16* a_m, int r0, const fa_u16* b_m) {
  constexpr int S = D + FA_PAD;
  const int lane = threadIdx.x % 32, mi = lane / 8, lr = lane % 8;
  fa_zero(x);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    fa_u32 a[4];
    fa_ldsm<false>(a, a_m + (r0 + (mi & 1) * 8 + lr) * S + kk * 16 + (mi >> 1) * 8);
#pragma unroll
    for (int jp = 0; jp < NJ / 2; ++jp) {
      fa_u32 b[4];
      fa_ldsm<false>(b, b_m + (jp * 16 + (mi >> 1) * 8 + lr) * S + kk * 16 + (mi & 1) * 8);
      fa_mma(x[2 * jp], a, b[0], b[1]);
      fa_mma(x[2 * jp + 1], a, b[2], b[3]);
    }
  }
}

// The A fragment of columns 16·kk.. of a 16 × 8·NJ accumulator tile x (rounded to bf16).
template <int NJ>
__device__ __forceinline__ void fa_acc_to_a(fa_u32 (&a)[4], const float (&x)[NJ][4], int kk) {
  a[0] = fa_pack(x[2 * kk][0], x[2 * kk][1]);
  a[1] = fa_pack(x[2 * kk][2], x[2 * kk][3]);
  a[2] = fa_pack(x[2 * kk + 1][0], x[2 * kk + 1][1]);
  a[3] = fa_pack(x[2 * kk + 1][2], x[2 * kk + 1][3]);
}

// acc[16 × D] += X[16 × 8·NJ] · m[8·NJ × D], X an accumulator tile, m read as [k][n]: the P V
// shape. A transposing ldmatrix gives B for two n-tiles of 8.
template <int D, int NJ = 8>
__device__ __forceinline__ void fa_mm_acc_b(float (&acc)[D / 8][4], const float (&x)[NJ][4], const fa_u16* m) {
  constexpr int S = D + FA_PAD;
  const int lane = threadIdx.x % 32, mi = lane / 8, lr = lane % 8;
#pragma unroll
  for (int kk = 0; kk < NJ / 2; ++kk) {
    fa_u32 a[4];
    fa_acc_to_a<NJ>(a, x, kk);
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      fa_u32 b[4];
      fa_ldsm<true>(b, m + (kk * 16 + (mi & 1) * 8 + lr) * S + dp * 16 + (mi >> 1) * 8);
      fa_mma(acc[2 * dp], a, b[0], b[1]);
      fa_mma(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// Starts copying rows row0 .. row0 + 64 of a [n, D] bf16 matrix into a padded tile with cp.async
// (16 bytes per thread per step, bypassing L1); rows ≥ n are zero-filled (source size 0, the
// address kept in bounds). Completion: fa_commit() closes the group, fa_wait<N>() waits until at
// most N groups are pending, then a __syncthreads makes every thread's copies visible.
template <int D>
__device__ __forceinline__ void fa_load_tile(fa_u16* dst, const fa_u16* __restrict__ src, int row0, int n) {
  constexpr int CH = D / 8;  // 16-byte chunks per row
  for (int e = threadIdx.x; e < 64 * CH; e += FA_THREADS) {
    const int r = e / CH, c = (e % CH) * 8;
    const bool in = row0 + r < n;
    const fa_u16* from = src + static_cast<size_t>(in ? row0 + r : 0) * D + c;
    fa_u16* to = dst + r * (D + FA_PAD) + c;
#ifdef SPT_EMU
    uint4 val = {0u, 0u, 0u, 0u};
    if (in) val = *reinterpret_cast<const uint4*>(from);
    *reinterpret_cast<uint4*>(to) = val;
#else
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(to));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(a), "l"(from), "r"(in ? 16 : 0));
#endif
  }
}

// Starts copying key block kb's K and V (nothing when kb < 0) into stage st of the two-stage
// buffer kv ([2][K, V] tiles), and closes the copy group.
template <int D>
__device__ __forceinline__ void fa_stage_kv(fa_u16* kv, int st, const fa_u16* __restrict__ k,
                                            const fa_u16* __restrict__ v, int kb, int lk);

__device__ __forceinline__ void fa_commit() {
#ifndef SPT_EMU
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void fa_wait() {
#ifndef SPT_EMU
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

template <int D>
__device__ __forceinline__ void fa_stage_kv(fa_u16* kv, int st, const fa_u16* __restrict__ k,
                                            const fa_u16* __restrict__ v, int kb, int lk) {
  constexpr int S = D + FA_PAD;
  if (kb >= 0) {
    fa_u16* dst = kv + st * 2 * FA_BC * S;
    fa_load_tile<D>(dst, k, kb * FA_BC, lk);
    fa_load_tile<D>(dst + FA_BC * S, v, kb * FA_BC, lk);
  }
  fa_commit();
}

__device__ __forceinline__ bool fa_sees(int i, int j, int lq, int lk, int causal, const uint8_t* __restrict__ kok) {
  return i < lq && j < lk && (!causal || j <= i) && (kok == nullptr || kok[j] != 0);
}

// Whether every (query, key) of the 64 × 64 tile pair at (i0, j0) is visible, so the per-element
// mask can be skipped: no padding mask, no ragged edge, and under causality the whole key block
// at or before the tile's first query.
__device__ __forceinline__ bool fa_full(int i0, int j0, int lq, int lk, int causal, const uint8_t* kok) {
  return kok == nullptr && j0 + FA_BC <= lk && i0 + FA_BR <= lq && (!causal || j0 + FA_BC - 1 <= i0);
}

// The it-th key block of a query tile, or −1 past the end: the tile's list (sparse; an entry ≥ nb
// ends it like SENTINEL, so a corrupt list cannot read another head) or 0 .. n_dense.
__device__ __forceinline__ int fa_key_block(const fa_u32* __restrict__ list, int width, int it, int n_dense, int nb) {
  if (list == nullptr) return it < n_dense ? it : -1;
  if (it >= width) return -1;
  const fa_u32 x = list[it];
  return x < static_cast<fa_u32>(nb) ? static_cast<int>(x) : -1;
}

// Key blocks a dense tile starting at query i0 may see.
__device__ __forceinline__ int fa_dense_blocks(int i0, int lq, int lk, int causal) {
  const int nb = (lk + FA_BC - 1) / FA_BC;
  if (!causal) return nb;
  const int last = min(i0 + FA_BR, lq) - 1;
  return min(nb, last / FA_BC + 1);
}

template <int D>
__device__ __forceinline__ void fa_fwd(const fa_u16* __restrict__ q, const fa_u16* __restrict__ k,
                                       const fa_u16* __restrict__ v, fa_u16* __restrict__ o, float* __restrict__ lse,
                                       const uint8_t* __restrict__ key_ok, const fa_u32* __restrict__ blocks,
                                       int width, int h, int lq, int lk, int causal, float scale) {
  constexpr int S = D + FA_PAD;
  // Last tiles first: under a causal mask they have the most key blocks, so the long CTAs start
  // early and the short ones fill the tail.
  const int tile = gridDim.x - 1 - blockIdx.x, bh = blockIdx.y, nt = gridDim.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int i0 = tile * FA_BR, r0 = warp * 16;
  const int nb = (lk + FA_BC - 1) / FA_BC;
  const float sl2 = scale * FA_LOG2E;
  fa_u16* qs = reinterpret_cast<fa_u16*>(fa_smem);
  fa_u16* kv = qs + FA_BR * S;  // two stages of K then V
  q += static_cast<size_t>(bh) * lq * D;
  k += static_cast<size_t>(bh) * lk * D;
  v += static_cast<size_t>(bh) * lk * D;
  o += static_cast<size_t>(bh) * lq * D;
  lse += static_cast<size_t>(bh) * lq;
  if (key_ok) key_ok += static_cast<size_t>(bh / h) * lk;
  const fa_u32* list = blocks ? blocks + (static_cast<size_t>(bh) * nt + tile) * width : nullptr;
  const int n_dense = fa_dense_blocks(i0, lq, lk, causal);

  float acc[D / 8][4];
  fa_zero(acc);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  // Two-stage pipeline: block it + 1's K, V are copied while block it is computed.
  fa_load_tile<D>(qs, q, i0, lq);
  int kb = fa_key_block(list, width, 0, n_dense, nb);
  fa_stage_kv<D>(kv, 0, k, v, kb, lk);
  for (int it = 0; kb >= 0; ++it) {
    const int next = fa_key_block(list, width, it + 1, n_dense, nb);
    const fa_u16* ks = kv + (it & 1) * 2 * FA_BC * S;
    const fa_u16* vs = ks + FA_BC * S;
    fa_stage_kv<D>(kv, (it + 1) & 1, k, v, next, lk);
    fa_wait<1>();  // this block's group (and Q) have landed
    __syncthreads();
    const int j0 = kb * FA_BC;
    float s[8][4];
    fa_mm_abt<D>(s, qs, r0, ks);
    float mx[2] = {-INFINITY, -INFINITY};
    const bool full = fa_full(i0, j0, lq, lk, causal, key_ok);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = i0 + r0 + g + 8 * (e >> 1), jj = j0 + j * 8 + 2 * t + (e & 1);
        const float x = full || fa_sees(i, jj, lq, lk, causal, key_ok) ? s[j][e] * sl2 : -INFINITY;
        s[j][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float base[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const float mn = fmaxf(m[rr], fa_quad_max(mx[rr]));
      base[rr] = mn == -INFINITY ? 0.0f : mn;  // a row with no key so far: p = 0, nothing to rescale
      const float alpha = exp2f(m[rr] - base[rr]);
      m[rr] = mn;
      l[rr] *= alpha;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        acc[dn][2 * rr] *= alpha;
        acc[dn][2 * rr + 1] *= alpha;
      }
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2f(s[j][e] - base[e >> 1]);
        s[j][e] = p;
        l[e >> 1] += p;
      }
    }
    fa_mm_acc_b<D>(acc, s, vs);
    __syncthreads();  // this stage is refilled by the next iteration's copies
    kb = next;
  }
  fa_wait<0>();
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const float lt = fa_quad_sum(l[rr]);
    const int i = i0 + r0 + g + 8 * rr;
    if (i >= lq) continue;
    const float inv = lt > 0.0f ? 1.0f / lt : 0.0f;
    fa_u16* orow = o + static_cast<size_t>(i) * D + 2 * t;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
      *reinterpret_cast<fa_u32*>(orow + dn * 8) = fa_pack(acc[dn][2 * rr] * inv, acc[dn][2 * rr + 1] * inv);
    // A row that saw no key has lt = 0: lse = -inf marks it for the backward. A NaN score
    // (a NaN in q or k) gives lt = NaN, and lse must stay NaN, as on the CPU: read as -inf, the
    // backward would drop the row and then spread 0 · NaN into keys the row cannot see.
    if (t == 0) lse[i] = lt != lt ? lt : lt > 0.0f ? m[rr] * FA_LN2 + logf(lt) : -INFINITY;
  }
}

template <int D>
__device__ __forceinline__ void fa_bwd_dq(const fa_u16* __restrict__ q, const fa_u16* __restrict__ k,
                                          const fa_u16* __restrict__ v, const fa_u16* __restrict__ dout,
                                          const float* __restrict__ lse, const float* __restrict__ delta,
                                          fa_u16* __restrict__ dq, const uint8_t* __restrict__ key_ok,
                                          const fa_u32* __restrict__ blocks, int width, int h, int lq, int lk,
                                          int causal, float scale) {
  constexpr int S = D + FA_PAD;
  // Last tiles first: under a causal mask they have the most key blocks, so the long CTAs start
  // early and the short ones fill the tail.
  const int tile = gridDim.x - 1 - blockIdx.x, bh = blockIdx.y, nt = gridDim.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int i0 = tile * FA_BR, r0 = warp * 16;
  const int nb = (lk + FA_BC - 1) / FA_BC;
  const float sl2 = scale * FA_LOG2E;
  fa_u16* qs = reinterpret_cast<fa_u16*>(fa_smem);
  fa_u16* dos = qs + FA_BR * S;
  fa_u16* kv = dos + FA_BR * S;  // two stages of K then V
  q += static_cast<size_t>(bh) * lq * D;
  dout += static_cast<size_t>(bh) * lq * D;
  dq += static_cast<size_t>(bh) * lq * D;
  k += static_cast<size_t>(bh) * lk * D;
  v += static_cast<size_t>(bh) * lk * D;
  lse += static_cast<size_t>(bh) * lq;
  delta += static_cast<size_t>(bh) * lq;
  if (key_ok) key_ok += static_cast<size_t>(bh / h) * lk;
  const fa_u32* list = blocks ? blocks + (static_cast<size_t>(bh) * nt + tile) * width : nullptr;
  const int n_dense = fa_dense_blocks(i0, lq, lk, causal);

  float lse2[2], dl[2];
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int i = i0 + r0 + g + 8 * rr;
    lse2[rr] = i < lq ? lse[i] * FA_LOG2E : -INFINITY;
    dl[rr] = i < lq ? delta[i] : 0.0f;
  }
  float acc[D / 8][4];
  fa_zero(acc);
  fa_load_tile<D>(qs, q, i0, lq);
  fa_load_tile<D>(dos, dout, i0, lq);
  int kb = fa_key_block(list, width, 0, n_dense, nb);
  fa_stage_kv<D>(kv, 0, k, v, kb, lk);
  for (int it = 0; kb >= 0; ++it) {
    const int next = fa_key_block(list, width, it + 1, n_dense, nb);
    const fa_u16* ks = kv + (it & 1) * 2 * FA_BC * S;
    const fa_u16* vs = ks + FA_BC * S;
    fa_stage_kv<D>(kv, (it + 1) & 1, k, v, next, lk);
    fa_wait<1>();
    __syncthreads();
    const int j0 = kb * FA_BC;
    float p[8][4], dp[8][4];
    fa_mm_abt<D>(p, qs, r0, ks);
    fa_mm_abt<D>(dp, dos, r0, vs);
    const bool full = fa_full(i0, j0, lq, lk, causal, key_ok);  // then every row has a finite lse
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int rr = e >> 1;
        const int i = i0 + r0 + g + 8 * rr, jj = j0 + j * 8 + 2 * t + (e & 1);
        const bool ok = full || (lse2[rr] != -INFINITY && fa_sees(i, jj, lq, lk, causal, key_ok));
        const float pv = ok ? exp2f(p[j][e] * sl2 - lse2[rr]) : 0.0f;
        dp[j][e] = ok ? pv * (dp[j][e] - dl[rr]) : 0.0f;  // dS (dl is NaN in a NaN row)
      }
    }
    fa_mm_acc_b<D>(acc, dp, ks);
    __syncthreads();
    kb = next;
  }
  fa_wait<0>();
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int i = i0 + r0 + g + 8 * rr;
    if (i >= lq) continue;
    fa_u16* row = dq + static_cast<size_t>(i) * D + 2 * t;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn)
      *reinterpret_cast<fa_u32*>(row + dn * 8) = fa_pack(acc[dn][2 * rr] * scale, acc[dn][2 * rr + 1] * scale);
  }
}

template <int D>
__device__ __forceinline__ void fa_bwd_dkdv(const fa_u16* __restrict__ q, const fa_u16* __restrict__ k,
                                            const fa_u16* __restrict__ v, const fa_u16* __restrict__ dout,
                                            const float* __restrict__ lse, const float* __restrict__ delta,
                                            fa_u16* __restrict__ dk, fa_u16* __restrict__ dv,
                                            const uint8_t* __restrict__ key_ok, const fa_u32* __restrict__ tiles,
                                            const fa_u32* __restrict__ ntiles, int h, int lq, int lk, int causal,
                                            float scale) {
  constexpr int S = D + FA_PAD;
  const int kb = blockIdx.x, bh = blockIdx.y, nb = gridDim.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int j0 = kb * FA_BC, r0 = warp * 16;
  const int nt = (lq + FA_BR - 1) / FA_BR;
  const float sl2 = scale * FA_LOG2E;
  fa_u16* ks = reinterpret_cast<fa_u16*>(fa_smem);
  fa_u16* vs = ks + FA_BC * S;
  fa_u16* qd = vs + FA_BC * S;                                // two stages of Q then dO
  float* stats = reinterpret_cast<float*>(qd + 4 * FA_BR * S);  // two stages of lse (log2), delta
  q += static_cast<size_t>(bh) * lq * D;
  dout += static_cast<size_t>(bh) * lq * D;
  k += static_cast<size_t>(bh) * lk * D;
  v += static_cast<size_t>(bh) * lk * D;
  dk += static_cast<size_t>(bh) * lk * D;
  dv += static_cast<size_t>(bh) * lk * D;
  lse += static_cast<size_t>(bh) * lq;
  delta += static_cast<size_t>(bh) * lq;
  if (key_ok) key_ok += static_cast<size_t>(bh / h) * lk;
  // The query tiles that see this key block: the transpose's list, or every tile from the first
  // whose rows reach the block (causal) on.
  const fa_u32* list = tiles ? tiles + (static_cast<size_t>(bh) * nb + kb) * nt : nullptr;
  const int first = causal ? kb * FA_BC / FA_BR : 0;
  const int count = tiles ? static_cast<int>(ntiles[static_cast<size_t>(bh) * nb + kb]) : max(nt - first, 0);

  float dka[D / 8][4], dva[D / 8][4];
  fa_zero(dka);
  fa_zero(dva);
  // Two-stage pipeline over the query tiles: tile it + 1's Q, dO (cp.async) and lse, delta (plain
  // loads) go to the other stage while tile it is computed.
  constexpr int NJ = D <= 64 ? 8 : 4;
  auto stage_in = [&](int it, int st) {
    const int i0 = (list ? static_cast<int>(list[it]) : first + it) * FA_BR;
    fa_u16* qn = qd + st * 2 * FA_BR * S;
    fa_load_tile<D>(qn, q, i0, lq);
    fa_load_tile<D>(qn + FA_BR * S, dout, i0, lq);
    float* sn = stats + st * 2 * FA_BR;
    for (int x = threadIdx.x; x < FA_BR; x += FA_THREADS) {
      const int i = i0 + x;
      sn[x] = i < lq ? lse[i] * FA_LOG2E : -INFINITY;
      sn[FA_BR + x] = i < lq ? delta[i] : 0.0f;
    }
  };
  fa_load_tile<D>(ks, k, j0, lk);
  fa_load_tile<D>(vs, v, j0, lk);
  if (count > 0) stage_in(0, 0);
  fa_commit();
  for (int it = 0; it < count; ++it) {
    const int i0 = (list ? static_cast<int>(list[it]) : first + it) * FA_BR;
    const int cur = it & 1;
    const fa_u16* qs = qd + cur * 2 * FA_BR * S;
    const fa_u16* dos = qs + FA_BR * S;
    const float* lse_s = stats + cur * 2 * FA_BR;
    const float* dl_s = lse_s + FA_BR;
    if (it + 1 < count) stage_in(it + 1, (it + 1) & 1);
    fa_commit();
    fa_wait<1>();
    __syncthreads();
    const bool full = fa_full(i0, j0, lq, lk, causal, key_ok);
    // The tile's 64 queries in chunks of 8·NJ (D = 128: two halves, so that Sᵀ and dPᵀ fit in
    // registers beside the dK, dV accumulators).
#pragma unroll 1
    for (int c0 = 0; c0 < FA_BR; c0 += 8 * NJ) {
      float p[NJ][4], dp[NJ][4];
      fa_mm_abt<D, NJ>(p, ks, r0, qs + c0 * S);    // Sᵀ: rows keys, columns queries
      fa_mm_abt<D, NJ>(dp, vs, r0, dos + c0 * S);  // dPᵀ
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = c0 + j * 8 + 2 * t + (e & 1);
          const int jj = j0 + r0 + g + 8 * (e >> 1), i = i0 + c;
          const bool ok = full || (lse_s[c] != -INFINITY && fa_sees(i, jj, lq, lk, causal, key_ok));
          const float pv = ok ? exp2f(p[j][e] * sl2 - lse_s[c]) : 0.0f;
          p[j][e] = pv;
          dp[j][e] = ok ? pv * (dp[j][e] - dl_s[c]) : 0.0f;  // dSᵀ
        }
      }
      fa_mm_acc_b<D, NJ>(dva, p, dos + c0 * S);
      fa_mm_acc_b<D, NJ>(dka, dp, qs + c0 * S);
    }
    __syncthreads();  // this stage is refilled by the next iteration
  }
  fa_wait<0>();
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const int jj = j0 + r0 + g + 8 * rr;
    if (jj >= lk) continue;
    fa_u16* krow = dk + static_cast<size_t>(jj) * D + 2 * t;
    fa_u16* vrow = dv + static_cast<size_t>(jj) * D + 2 * t;
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      *reinterpret_cast<fa_u32*>(krow + dn * 8) = fa_pack(dka[dn][2 * rr] * scale, dka[dn][2 * rr + 1] * scale);
      *reinterpret_cast<fa_u32*>(vrow + dn * 8) = fa_pack(dva[dn][2 * rr], dva[dn][2 * rr + 1]);
    }
  }
}

extern "C" __global__ void fa_bwd_delta(const fa_u16* __restrict__ o, const fa_u16* __restrict__ dout,
                                        float* __restrict__ delta, int rows, int d) {
  const int row = blockIdx.x * (FA_THREADS / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps only
  const size_t base = static_cast<size_t>(row) * d;
  float s = 0.0f;
  for (int c = lane; c < d; c += 32) s += fa_f32(o[base + c]) * fa_f32(dout[base + c]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, off);
  if (lane == 0) delta[row] = s;
}

extern "C" __global__ void fa_block_tiles(const fa_u32* __restrict__ blocks, fa_u32* __restrict__ tiles,
                                          fa_u32* __restrict__ ntiles, int bhn, int nt, int nb, int width) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  if (x >= bhn * nb) return;
  const int bh = x / nb, kb = x % nb;
  const fa_u32* lists = blocks + static_cast<size_t>(bh) * nt * width;
  fa_u32* out = tiles + static_cast<size_t>(x) * nt;
  int c = 0;
  for (int tile = 0; tile < nt; ++tile) {
    for (int w = 0; w < width; ++w) {
      const fa_u32 b = lists[tile * width + w];
      if (b == FA_SENTINEL || b > static_cast<fa_u32>(kb)) break;  // lists are ascending
      if (b == static_cast<fa_u32>(kb)) {
        out[c++] = tile;
        break;
      }
    }
  }
  ntiles[x] = c;
}

#define FA_KERNELS(D)                                                                                             \
  extern "C" __global__ void fa_fwd_d##D(const fa_u16* q, const fa_u16* k, const fa_u16* v, fa_u16* o,           \
                                         float* lse, const uint8_t* key_ok, const fa_u32* blocks, int width,    \
                                         int h, int lq, int lk, int causal, float scale) {                       \
    fa_fwd<D>(q, k, v, o, lse, key_ok, blocks, width, h, lq, lk, causal, scale);                                 \
  }                                                                                                              \
  extern "C" __global__ void fa_bwd_dq_d##D(const fa_u16* q, const fa_u16* k, const fa_u16* v,                  \
                                            const fa_u16* dout, const float* lse, const float* delta, fa_u16* dq, \
                                            const uint8_t* key_ok, const fa_u32* blocks, int width, int h,       \
                                            int lq, int lk, int causal, float scale) {                           \
    fa_bwd_dq<D>(q, k, v, dout, lse, delta, dq, key_ok, blocks, width, h, lq, lk, causal, scale);                \
  }                                                                                                              \
  extern "C" __global__ void fa_bwd_dkdv_d##D(const fa_u16* q, const fa_u16* k, const fa_u16* v,                \
                                              const fa_u16* dout, const float* lse, const float* delta,          \
                                              fa_u16* dk, fa_u16* dv, const uint8_t* key_ok,                      \
                                              const fa_u32* tiles, const fa_u32* ntiles, int h, int lq, int lk,  \
                                              int causal, float scale) {                                         \
    fa_bwd_dkdv<D>(q, k, v, dout, lse, delta, dk, dv, key_ok, tiles, ntiles, h, lq, lk, causal, scale);          \
  }

FA_KERNELS(64)
FA_KERNELS(128)
