//! `C = A·B` where A's rows are read from, or C's rows added into, token rows picked by an
//! index, in place: the routed FFN's per-block GEMMs without copying rows in and out.
//!
//! Why: around a `gemm` call, a block's token rows are first copied into a dense buffer (x for
//! fc1, dy for u), and its output is copied back with a scatter-add (y after fc2, dx after
//! fc1's input gradient). With blocks of 64 units, each copied row feeds only 128 flops per
//! element, so the copies were ~20 % of the routed FFN's samples (memmove ~10 %, scatter-add
//! ~8 %) beside gemm's own packing (~5 %). This micro-kernel broadcasts A's elements straight
//! from their rows (a broadcast is one load whether or not the rows are adjacent) and adds its
//! tile into C's rows at the end, so neither copy is made. B is read in place where it is
//! compact (the routed FFN lays its weights out by blocks for this), else packed once per pass.
//!
//! f32 with AVX-512F only, and only where it measured faster (see [`run_f32`]);
//! [`crate::util::Float::row_gemm`] says when it ran, and callers fall back to a gather, `gemm`
//! and a scatter otherwise (f64, other CPUs, few rows, rows that are a run, indexed C past one
//! pass).

#[cfg(target_arch = "x86_64")]
use crate::blas::SendPtr;

/// One product `C ← α_i·(A B)_i + (C if accumulate)` for rows `i < m`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct RowGemm<'a, T> {
    pub(crate) m: usize,
    pub(crate) n: usize,
    pub(crate) k: usize,
    /// A `[m, k]`: row i at `a[row·lda..]`, row = `a_idx[i]` or i.
    pub(crate) a: &'a [T],
    pub(crate) lda: usize,
    pub(crate) a_idx: Option<&'a [u32]>,
    /// B `[k, n]`: element (kk, j) at `b[b_off + kk·ldb + j]`.
    pub(crate) b: &'a [T],
    pub(crate) b_off: usize,
    pub(crate) ldb: usize,
    /// C's row i at `c[row·ldc..]`, row = `c_idx.0[i] − c_idx.1` or i. Indexed rows must be
    /// strictly increasing (distinct rows: the parallel split writes each from one task).
    pub(crate) c_idx: Option<(&'a [u32], usize)>,
    pub(crate) ldc: usize,
    /// Per-row factors α (the gates), or 1.
    pub(crate) alpha: Option<&'a [T]>,
    pub(crate) accumulate: bool,
    /// Split the rows over the rayon pool (when the caller's own tasks are too few).
    pub(crate) parallel: bool,
}

impl<'a, T> RowGemm<'a, T> {
    /// `C [m, n] = A [m, k] · B [k, n]` over plain rows: A = `(a, lda)`, B = `(b, b_off, ldb)`,
    /// C's row stride `ldc`; set the index, α and accumulate fields on the result.
    pub(crate) fn new(
        [m, n, k]: [usize; 3],
        (a, lda): (&'a [T], usize),
        (b, b_off, ldb): (&'a [T], usize, usize),
        ldc: usize,
        parallel: bool,
    ) -> Self {
        Self {
            m,
            n,
            k,
            a,
            lda,
            a_idx: None,
            b,
            b_off,
            ldb,
            c_idx: None,
            ldc,
            alpha: None,
            accumulate: false,
            parallel,
        }
    }
}

/// Whether `rows` rows of `width` elements, `ld` apart, fit in `len` (without overflow).
#[cfg(target_arch = "x86_64")]
fn fits(rows: usize, ld: usize, width: usize, len: usize) -> bool {
    rows == 0
        || (rows - 1)
            .checked_mul(ld)
            .and_then(|v| v.checked_add(width))
            .is_some_and(|end| end <= len)
}

/// Why a product cannot run: an operand too short for its indices (a caller's bug).
#[cfg(target_arch = "x86_64")]
fn check<T>(g: &RowGemm<'_, T>, c_len: usize) {
    let (m, n, k) = (g.m, g.n, g.k);
    let a_rows = g.a_idx.map_or(m, |idx| {
        assert_eq!(idx.len(), m, "row_gemm: A index length");
        idx.iter().map(|&t| t as usize + 1).max().unwrap_or(0)
    });
    if k > 0 {
        assert!(fits(a_rows, g.lda, k, g.a.len()), "row_gemm: A too short");
        assert!(
            n == 0 || fits(k, g.ldb, n, g.b.len().saturating_sub(g.b_off)),
            "row_gemm: B too short"
        );
    }
    if let Some(alpha) = g.alpha {
        assert_eq!(alpha.len(), m, "row_gemm: alpha length");
    }
    let c_rows = match g.c_idx {
        Some((idx, base)) => {
            assert_eq!(idx.len(), m, "row_gemm: C index length");
            assert!(
                idx.first().is_none_or(|&t| t as usize >= base) && idx.windows(2).all(|w| w[0] < w[1]),
                "row_gemm: C rows must be distinct, increasing and at or after the base"
            );
            idx.last().map_or(0, |&t| t as usize - base + 1)
        }
        None => m,
    };
    // Rows that overlapped would be written by two tasks of the parallel split.
    assert!(c_rows <= 1 || g.ldc >= n, "row_gemm: C's rows overlap");
    assert!(n == 0 || fits(c_rows, g.ldc, n, c_len), "row_gemm: C too short");
}

/// Rows per call, and per task of the parallel split, below which the kernel declines: packing
/// B (k × n) once costs as much as the product of a few rows. One core, rows × d 768 × block
/// 64: at 4–16 rows 45–100 GFLOP/s against 81–115 gathered, 26–66 against 89–113 scattered; at
/// 64 rows 136 against 116 and 116 against 119; at block 192, 32 rows 99 against 127. Measured
/// with B packed; a compact B, read in place, costs nothing per call (not re-measured).
#[cfg(target_arch = "x86_64")]
const MIN_ROWS: usize = 128;

/// Whether an index names anything but one run of consecutive rows (a run is a plain
/// operand, which gemm reads in place).
#[cfg(target_arch = "x86_64")]
fn scattered(idx: &[u32]) -> bool {
    idx.windows(2).any(|w| w[1] != w[0].wrapping_add(1))
}

/// Where the kernel measured faster than gemm with the copies around it.
#[cfg(target_arch = "x86_64")]
fn worth_it<T>(g: &RowGemm<'_, T>) -> bool {
    let gathers = g.a_idx.is_some_and(scattered);
    let scatters = g.c_idx.is_some_and(|(idx, _)| scattered(idx));
    g.m >= MIN_ROWS && (gathers || scatters) && (g.c_idx.is_none() || g.k <= avx512::KC)
}

/// Runs `g` into `c` with AVX-512F; false (and nothing written) where the CPU lacks it, or
/// where the caller's gather, gemm and scatter-add are as fast or faster: fewer than
/// [`MIN_ROWS`] rows, no index but runs of consecutive rows, or C's rows indexed and k past one
/// pass.
///
/// One core, interleaved rounds, GFLOP/s against gather + gemm or gemm + scatter-add, at the
/// routed FFN's group shapes (128–384 rows, d 384 or 768, blocks of b): gathered A 101–149
/// against 97–143, ahead or level at every b from 64 to 384; indexed C at b 64 97–139 against
/// 88–122, at b 128 140–141 against 136–137, at b 192 and 384 (two or three passes, each a
/// round trip of C's rows) 99–142 against 106–146, behind more often than ahead: there gemm
/// runs. Fewer rows: see [`MIN_ROWS`].
pub(crate) fn run_f32(g: &RowGemm<'_, f32>, c: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::has_avx512f() && worth_it(g) {
        check(g, c.len());
        if g.m == 0 || g.n == 0 {
            return true;
        }
        if g.k == 0 {
            // An empty sum: C keeps its rows, or they become 0.
            if !g.accumulate {
                for i in 0..g.m {
                    let row = g.c_idx.map_or(i, |(idx, base)| idx[i] as usize - base) * g.ldc;
                    c[row..row + g.n].fill(0.0);
                }
            }
            return true;
        }
        let cp = SendPtr(c.as_mut_ptr());
        let run = |rows: std::ops::Range<usize>| {
            // SAFETY: `check` bounded every row and column the kernel reads and writes, and
            // the ranges given to concurrent calls are disjoint, with distinct C rows.
            unsafe { avx512::rows(g, cp, rows) }
        };
        let threads = rayon::current_num_threads();
        if g.parallel && threads > 1 && g.m >= 2 * MIN_ROWS {
            use rayon::prelude::*;
            // Whole row tiles per task, so every row is computed as in one task; each task
            // packs B for itself, so none gets fewer than MIN_ROWS rows.
            let per = g.m.div_ceil(threads).max(MIN_ROWS).div_ceil(ROWS) * ROWS;
            (0..g.m.div_ceil(per))
                .into_par_iter()
                .for_each(|t| run(t * per..((t + 1) * per).min(g.m)));
        } else {
            run(0..g.m);
        }
        return true;
    }
    let _ = (g, c);
    false
}

/// Rows of C per register tile.
#[cfg(target_arch = "x86_64")]
const ROWS: usize = 6;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{RowGemm, ROWS};
    use crate::blas::SendPtr;
    use std::arch::x86_64::*;

    thread_local! {
        /// A pass of B packed, kept per thread from call to call (up to `[KC, n]` rounded up to
        /// 64 columns; the routed FFN's B is compact and not packed).
        static PACK: std::cell::RefCell<Vec<__m512>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    /// Columns per register tile: four 16-lane vectors.
    const COLS: usize = 64;
    /// Depth per pass: a `[KC, 64]` tile of B (32 KB) stays in L1 while every row tile of the
    /// range streams past it.
    pub(super) const KC: usize = 128;
    /// Vectors per packed row of B.
    const VPR: usize = COLS / 16;

    /// The rows `rows` of the product.
    ///
    /// # Safety
    /// `check` must have passed for `g` and C, and no other thread may touch these C rows.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn rows(g: &RowGemm<'_, f32>, c: SendPtr<f32>, rows: std::ops::Range<usize>) {
        let (n, k) = (g.n, g.k);
        let a_row = |i: usize| g.a_idx.map_or(i, |idx| idx[i] as usize) * g.lda;
        let c_row = |i: usize| g.c_idx.map_or(i, |(idx, base)| idx[i] as usize - base) * g.ldc;
        let tiles = n.div_ceil(COLS);
        let masks_of = |j0: usize| -> [__mmask16; 4] {
            let w = COLS.min(n - j0);
            std::array::from_fn(|v| {
                let lanes = w.saturating_sub(16 * v).min(16);
                ((1u32 << lanes) - 1) as __mmask16
            })
        };
        // A compact B (rows `n` apart, whole 64-column tiles: the routed FFN's weights laid
        // out by blocks) is read in place, its pass being one contiguous `[kc, n]` region.
        // With fc1's and u's B strided and packed, the ffn bench's routed op (d 768, blocks of
        // 64 and 128, interleaved rounds) took 1-4 % longer by median, 1-7 % by first quartile;
        // at d 384 the two were level.
        let in_place = g.ldb == n && n % COLS == 0;
        PACK.with_borrow_mut(|pack| {
            for k0 in (0..k).step_by(KC) {
                let kc = KC.min(k - k0);
                let load_c = g.accumulate || k0 > 0;
                // Otherwise this pass of B packed tile by tile, `[tiles][kc][4]` vectors, zeros
                // past its columns. Read in place, a strided B's rows lie a weight row apart
                // (12 KB for `W1ᵀ [d, d_ff]`): a 128-row tile touched 128 pages, more than the
                // L1 TLB holds.
                pack.clear();
                if !in_place {
                    pack.reserve(tiles * kc * VPR);
                    for j0 in (0..n).step_by(COLS) {
                        let masks = masks_of(j0);
                        let src = g.b.as_ptr().add(g.b_off + k0 * g.ldb + j0);
                        for kk in 0..kc {
                            for (v, &m) in masks.iter().enumerate() {
                                // A vector wholly past B's columns is not even addressed.
                                pack.push(if m == 0 {
                                    _mm512_setzero_ps()
                                } else {
                                    _mm512_maskz_loadu_ps(m, src.add(kk * g.ldb + 16 * v))
                                });
                            }
                        }
                    }
                }
                let run_tile = |i0: usize, jt: usize| {
                    let j0 = jt * COLS;
                    let (w, masks) = (COLS.min(n - j0), masks_of(j0));
                    let r = ROWS.min(rows.end - i0);
                    let mut a = [std::ptr::null::<f32>(); ROWS];
                    let mut cr = [std::ptr::null_mut::<f32>(); ROWS];
                    let mut alpha = [1f32; ROWS];
                    for t in 0..r {
                        a[t] = g.a.as_ptr().add(a_row(i0 + t) + k0);
                        cr[t] = c.0.add(c_row(i0 + t) + j0);
                        if let Some(al) = g.alpha {
                            alpha[t] = al[i0 + t];
                        }
                    }
                    let t = Tile {
                        kc,
                        a,
                        b: if in_place {
                            g.b.as_ptr().add(g.b_off + k0 * g.ldb + j0)
                        } else {
                            pack.as_ptr().add(jt * kc * VPR) as *const f32
                        },
                        b_step: if in_place { g.ldb } else { COLS },
                        c: cr,
                        alpha,
                        masks,
                        load_c,
                    };
                    match (r, w.div_ceil(16)) {
                        (6, 4) => tile::<6, 4>(&t),
                        (6, 3) => tile::<6, 3>(&t),
                        (6, 2) => tile::<6, 2>(&t),
                        (6, 1) => tile::<6, 1>(&t),
                        (5, _) => tile::<5, 4>(&t),
                        (4, _) => tile::<4, 4>(&t),
                        (3, _) => tile::<3, 4>(&t),
                        (2, _) => tile::<2, 4>(&t),
                        _ => tile::<1, 4>(&t),
                    }
                };
                // At k ≤ 64 (fc2 and dx at blocks of 64) each row tile's C rows are finished in
                // one sweep across them: 136–139 GFLOP/s against 125–128 column first, which
                // revisits them 12 times at d 768. At k 128 row first fell to 111 (its packed B,
                // 393 KB at d 768, streams from L2 for every row tile) against 140 column first,
                // which keeps a pass's B tile in L1.
                if k <= 64 {
                    for i0 in rows.clone().step_by(ROWS) {
                        for jt in 0..tiles {
                            run_tile(i0, jt);
                        }
                    }
                } else {
                    for jt in 0..tiles {
                        for i0 in rows.clone().step_by(ROWS) {
                            run_tile(i0, jt);
                        }
                    }
                }
            }
        });
    }

    /// One register tile: up to `ROWS` rows of A against `[kc, 64]` of B.
    struct Tile {
        kc: usize,
        a: [*const f32; ROWS],
        /// B's `[kc, 64]` for this tile: packed, or in place.
        b: *const f32,
        /// Elements from one of B's rows to the next: 64 packed, `ldb` in place.
        b_step: usize,
        c: [*mut f32; ROWS],
        alpha: [f32; ROWS],
        /// Lanes of each 16-column vector inside C (a vector with none is skipped).
        masks: [__mmask16; 4],
        load_c: bool,
    }

    /// `C[r] ← α_r · Σ_kk A[r][kk] · B[kk] + (C[r] if load_c)` for `r < R` and the first `V`
    /// vectors of the tile; vectors beyond the masks' lanes are computed on zeros and not
    /// stored (only the last, partial columns of C take `V` = 4 with masks short of it).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const R: usize, const V: usize>(t: &Tile) {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        for kk in 0..t.kc {
            let bp = t.b.add(kk * t.b_step);
            let bv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(bp.add(16 * v)));
            for (acc_r, a_r) in acc.iter_mut().zip(t.a) {
                let av = _mm512_set1_ps(*a_r.add(kk));
                for (acc_rv, b) in acc_r.iter_mut().zip(bv) {
                    *acc_rv = _mm512_fmadd_ps(av, b, *acc_rv);
                }
            }
        }
        // Indexed by the constant bounds so that `acc` stays in registers (iterating it with
        // `enumerate` put it on the stack: the tiles ran ~15 % slower).
        #[allow(clippy::needless_range_loop)]
        for r in 0..R {
            let al = _mm512_set1_ps(t.alpha[r]);
            for v in 0..V {
                let m = t.masks[v];
                if m == 0 {
                    continue;
                }
                let p = t.c[r].add(16 * v);
                let out = if t.load_c {
                    _mm512_fmadd_ps(al, acc[r][v], _mm512_maskz_loadu_ps(m, p))
                } else {
                    _mm512_mul_ps(al, acc[r][v])
                };
                _mm512_mask_storeu_ps(p, m, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// The product element by element in f64, then rounded: the reference.
    fn naive(g: &RowGemm<'_, f32>, c: &mut [f32]) {
        for i in 0..g.m {
            let ar = g.a_idx.map_or(i, |idx| idx[i] as usize) * g.lda;
            let cr = g.c_idx.map_or(i, |(idx, base)| idx[i] as usize - base) * g.ldc;
            let al = g.alpha.map_or(1.0, |a| a[i]) as f64;
            for j in 0..g.n {
                let dot: f64 = (0..g.k)
                    .map(|kk| g.a[ar + kk] as f64 * g.b[g.b_off + kk * g.ldb + j] as f64)
                    .sum();
                let old = if g.accumulate { c[cr + j] as f64 } else { 0.0 };
                c[cr + j] = (old + al * dot) as f32;
            }
        }
    }

    /// Distinct increasing rows out of `0..of`, `m` of them, at or after `base`.
    fn pick_rows(rng: &mut StdRng, m: usize, base: usize, of: usize) -> Vec<u32> {
        let mut all: Vec<u32> = (base as u32..(base + of) as u32).collect();
        for i in 0..m {
            let j = rng.random_range(i..all.len());
            all.swap(i, j);
        }
        let mut rows = all[..m].to_vec();
        rows.sort_unstable();
        rows
    }

    /// Whether this machine has the kernel.
    fn kernel_here() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            crate::simd::has_avx512f()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Whether an index is anything but one run of consecutive rows.
    fn spread(idx: &[u32]) -> bool {
        idx.windows(2).any(|w| w[1] != w[0] + 1)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Every shape the kernel tiles differently: rows past a 6-row tile (and past two
        /// tasks' worth, for the split), columns past a 16-lane vector and a 64-column tile,
        /// depth past a 128-deep pass (and 0); indexed or plain A and C, with and without α,
        /// overwrite or accumulate, split over threads or not, B packed or read in place. The kernel runs exactly where
        /// it measured faster (128 rows or more, an index that is not one run, indexed C within
        /// one pass) and otherwise declines and writes nothing.
        #[test]
        fn row_gemm_matches_the_naive_product(
            m in prop_oneof![0usize..20, 128usize..140, 256usize..280],
            n in prop_oneof![1usize..70, Just(128usize), Just(130usize), Just(192usize)],
            k in prop_oneof![Just(0usize), 1usize..20, 126usize..131, Just(300usize)],
            gather in any::<bool>(),
            scatter in any::<bool>(),
            scaled in any::<bool>(),
            accumulate in any::<bool>(),
            parallel in any::<bool>(),
            compact in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut rand = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0..1.0)).collect() };
            // Operands inside larger buffers: strides wider than the product, an offset into B;
            // or B compact (read in place at whole 64-column tiles).
            let (lda, ldb, ldc, b_off) = (k + 3, if compact { n } else { n + 5 }, n + 2, 7);
            let a_rows = if gather { m + 9 } else { m };
            let a = rand(a_rows * lda);
            let b = rand(b_off + k * ldb);
            let alpha = rand(m);
            let c_base = 4;
            let c_rows = if scatter { m + 6 } else { m };
            let c0 = rand(c_rows * ldc);
            let mut rng = StdRng::seed_from_u64(seed ^ 1);
            let a_idx = pick_rows(&mut rng, m, 0, a_rows);
            let c_idx = pick_rows(&mut rng, m, c_base, c_rows);
            let g = RowGemm {
                a_idx: gather.then_some(&a_idx[..]),
                c_idx: scatter.then_some((&c_idx[..], c_base)),
                alpha: scaled.then_some(&alpha[..]),
                accumulate,
                ..RowGemm::new([m, n, k], (&a, lda), (&b, b_off, ldb), ldc, parallel)
            };
            let indexed = (gather && spread(&a_idx)) || (scatter && spread(&c_idx));
            let expect = kernel_here() && m >= 128 && indexed && !(scatter && k > 128);
            let (mut got, mut want) = (c0.clone(), c0.clone());
            let ran = run_f32(&g, &mut got);
            prop_assert_eq!(ran, expect, "m {} n {} k {}", m, n, k);
            if !ran {
                prop_assert_eq!(got, c0);
                return Ok(());
            }
            naive(&g, &mut want);
            for (i, (x, y)) in got.iter().zip(&want).enumerate() {
                // f32 sums of k products of |v| ≤ 1 (plus C) against exact ones.
                let tol = 1e-6 * (k as f32 + 2.0);
                prop_assert!((x - y).abs() <= tol, "element {i}: {x} against {y}");
            }
        }
    }

    /// Split over threads or not, every row is computed in the same order: the same bits,
    /// for a gathered A over several passes and for an indexed C with α in one pass.
    #[test]
    fn row_gemm_gives_the_same_bits_on_any_thread_count() {
        if !kernel_here() {
            return;
        }
        let m = 400;
        let mut rng = StdRng::seed_from_u64(3);
        let mut rand = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let idx: Vec<u32> = (0..m as u32).map(|i| 2 * i + 1).collect();
        for (n, k, gather) in [(96, 300, true), (200, 64, false)] {
            let rows = 2 * m + 1;
            let (a, b, c0, alpha) = (rand(rows * k), rand(k * n), rand(rows * n), rand(m));
            let run = |threads: usize, parallel: bool| {
                let mut c = c0.clone();
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("pool");
                pool.install(|| {
                    let g = if gather {
                        RowGemm {
                            a_idx: Some(&idx[..]),
                            accumulate: true,
                            ..RowGemm::new([m, n, k], (&a, k), (&b, 0, n), n, parallel)
                        }
                    } else {
                        RowGemm {
                            c_idx: Some((&idx[..], 0)),
                            alpha: Some(&alpha[..]),
                            accumulate: true,
                            ..RowGemm::new([m, n, k], (&a, k), (&b, 0, n), n, parallel)
                        }
                    };
                    assert!(run_f32(&g, &mut c));
                });
                c.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let one = run(1, false);
            for threads in [2, 3, 7] {
                assert_eq!(run(threads, true), one, "{threads} threads, n {n} k {k}");
            }
        }
    }

    /// A compact B, read in place, and the same values in a wider buffer, packed, give the
    /// same bits: each element is the same FMA chain either way.
    #[test]
    fn row_gemm_reads_b_in_place_or_packed_to_the_same_bits() {
        if !kernel_here() {
            return;
        }
        let m = 300;
        let mut rng = StdRng::seed_from_u64(5);
        let mut rand = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let idx: Vec<u32> = (0..m as u32).map(|i| 2 * i + 1).collect();
        for (n, k, gather) in [(128, 300, true), (192, 64, false), (64, 128, false)] {
            let rows = 2 * m + 1;
            let (a, b, c0, alpha) = (rand(rows * k), rand(k * n), rand(rows * n), rand(m));
            let wide: Vec<f32> = b
                .chunks(n)
                .flat_map(|r| r.iter().copied().chain([9.0; 5]))
                .collect();
            let run = |b: &[f32], ldb: usize| {
                let mut c = c0.clone();
                let g = if gather {
                    RowGemm {
                        a_idx: Some(&idx[..]),
                        ..RowGemm::new([m, n, k], (&a, k), (b, 0, ldb), n, false)
                    }
                } else {
                    RowGemm {
                        c_idx: Some((&idx[..], 0)),
                        alpha: Some(&alpha[..]),
                        accumulate: true,
                        ..RowGemm::new([m, n, k], (&a, k), (b, 0, ldb), n, false)
                    }
                };
                assert!(run_f32(&g, &mut c));
                c.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(run(&b, n), run(&wide, n + 5), "n {n} k {k}");
        }
    }
}
