//! bf16 GEMM on Intel AMX tiles: `c (+)= bf16(a) · Mᵀ` with f32 accumulation, against a
//! weight `M` packed once per op call.
//!
//! Why: on CPUs with AMX-BF16 (Sapphire Rapids and later) a `tdpbf16ps` does 16 × 16 × 32
//! multiply-adds, and one core runs these products 5–7× faster than `gemm`'s AVX-512 f32
//! kernels on the Transformer weight shapes we train (256-row calls, 0.8–1.0 TFLOP/s a core;
//! the ignored `timing` test). The price is bf16 inputs (8 significant bits; denormals flush to
//! zero, as the conversion instruction does); products and sums stay f32.
//!
//! Design (one calling thread; callers split rows over their own rayon tasks):
//! - [`Bf16Matrix`] holds `M [rows, cols]` rounded to bf16 as 1 KiB tiles: tile `(t, k)` covers
//!   M's rows `16t..16t+16` and columns `32k..32k+32` in the VNNI order `tdpbf16ps` wants for its
//!   right operand (line `l` = the pairs `(M[j][32k+2l], M[j][32k+2l+1])` for `j` in the tile).
//!   Rows are padded to whole 32-row blocks and columns to whole tiles with zeros, so a tile load
//!   never reads past the buffer and padding adds nothing.
//! - `a`'s rows are converted (`vcvtne2ps2bf16`, round to nearest even) into a per-thread buffer
//!   of A tiles, a slab of up to 256 rows at a time, zero-padded the same way.
//! - The kernel keeps a 32 × 32 block of `c` in four accumulator tiles (tmm0–3) and streams
//!   two A tiles (tmm4–5) and two M tiles (tmm6–7) per step of 32 along K: four loads feed four
//!   products. M's 32-row blocks are visited in chunks that stay in L2 while every row block of
//!   the slab passes over them.
//! - Without AMX (other CPUs, other architectures, other OSes) [`matmul_t`] computes the same
//!   values in f32 through `gemm` from the bf16 values (only the summation order differs).

use crate::blas::{gemm_into, Mat};
use gemm::Parallelism;
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Rows of an A or M tile (and of an accumulator tile).
const TR: usize = 16;
/// bf16 elements along K in one tile row (64 bytes).
const TK: usize = 32;

/// One 64-byte tile row of 32 bf16 values; 64-byte aligned so that each tile row is one cache
/// line.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([u16; TK]);

/// `M [rows, cols]` as bf16 (round to nearest even), laid out for the AMX kernel (VNNI pairs,
/// padded to whole tiles). Immutable after packing; `Sync`, shared by rayon tasks.
pub(crate) struct Bf16Matrix {
    rows: usize,
    cols: usize,
    /// Tiles along K: `cols.div_ceil(32)`.
    kt: usize,
    /// `[row tile][k tile][16 lines]`, row tiles padded to an even count.
    data: Vec<Line>,
    /// M's bf16 values as f32 `[rows, cols]`, made on first use by the portable path only.
    unpacked: OnceLock<Vec<f32>>,
}

impl Bf16Matrix {
    /// Packs `M [rows, cols]`. `transposed == false`: `src` is M row-major (`[rows, cols]`).
    /// `transposed == true`: `src` is Mᵀ row-major (`[cols, rows]`), i.e. M column-major.
    ///
    /// Parallel over row tiles on rayon's current pool; AVX-512 (BF16, BW) where the CPU has it.
    pub(crate) fn pack(src: &[f32], rows: usize, cols: usize, transposed: bool) -> Self {
        Self::pack_with(src, rows, cols, transposed, simd_convert())
    }

    fn pack_with(src: &[f32], rows: usize, cols: usize, transposed: bool, simd: bool) -> Self {
        assert!(
            rows >= 1 && cols >= 1,
            "Bf16Matrix::pack: empty matrix {rows} x {cols}"
        );
        assert!(
            src.len() >= rows * cols,
            "Bf16Matrix::pack: source of {} elements for {rows} x {cols}",
            src.len()
        );
        let kt = cols.div_ceil(TK);
        let row_tiles = rows.div_ceil(2 * TR) * 2;
        let per_tile_row = kt * TR;
        let len = row_tiles * per_tile_row;
        // Every line is written below, in parallel: a zero-filled `vec!` would first write all
        // of it (77 MB for a GPT-2 embedding) on one thread, faulting its pages in.
        let mut data: Vec<Line> = Vec::with_capacity(len);
        let group = if transposed && simd {
            // Mᵀ's rows are read a group's width at a time (16 row tiles: 1 KiB contiguous);
            // at least 4 tasks a thread.
            (row_tiles / (4 * rayon::current_num_threads())).clamp(1, 16)
        } else {
            // Tasks of ≥ 64 KiB of output, so small matrices do not pay for many rayon tasks.
            (1024 / per_tile_row).max(1)
        };
        data.spare_capacity_mut()[..len]
            .par_chunks_mut(group * per_tile_row)
            .enumerate()
            .for_each(|(g, out)| {
                #[cfg(target_arch = "x86_64")]
                if transposed && simd {
                    // SAFETY: `simd` is true only where the CPU has AVX-512F/BW/BF16; the
                    // callee reads `src` within `rows · cols` and writes only `out`.
                    unsafe { x86::pack_transposed(src, rows, cols, g * group * TR, out) };
                    return;
                }
                for (q, tiles) in out.chunks_mut(per_tile_row).enumerate() {
                    let j0 = (g * group + q) * TR;
                    if j0 >= rows {
                        // Padding row tile.
                        tiles.fill(MaybeUninit::new(Line::default()));
                        continue;
                    }
                    #[cfg(target_arch = "x86_64")]
                    if simd {
                        // SAFETY: `simd` is true only where the CPU has AVX-512F/BW/BF16; the
                        // callee reads `src` within `rows · cols` and writes only `tiles`.
                        unsafe { x86::pack_tile_row(src, rows, cols, j0, tiles) };
                        continue;
                    }
                    let _ = simd;
                    pack_tile_row_scalar(src, rows, cols, transposed, j0, tiles);
                }
            });
        // SAFETY: the chunks above cover all `len` lines, and every line of every chunk was
        // written (padding row tiles with zeros, the others by the pack functions).
        unsafe { data.set_len(len) };
        let packed = Self {
            rows,
            cols,
            kt,
            data,
            unpacked: OnceLock::new(),
        };
        if !amx_available() {
            // The portable path's f32 copy, made here, outside the callers' parallel tasks:
            // made on first use inside them, a rayon worker waiting in `get_or_init` for its
            // parallel unpacking could steal another task of the same matrix and re-enter the
            // lock (rayon-rs/rayon#1251).
            packed.unpacked();
        }
        packed
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Element `(j, p)` as bf16 bits.
    fn get(&self, j: usize, p: usize) -> u16 {
        let tile = (j / TR) * self.kt + p / TK;
        self.data[tile * TR + (p % TK) / 2].0[(j % TR) * 2 + p % 2]
    }

    /// M's bf16 values as f32 `[rows, cols]` (cached).
    fn unpacked(&self) -> &[f32] {
        self.unpacked.get_or_init(|| {
            let mut out = vec![0f32; self.rows * self.cols];
            out.par_chunks_mut(self.cols).enumerate().for_each(|(j, row)| {
                for (p, v) in row.iter_mut().enumerate() {
                    *v = bf16_to_f32(self.get(j, p));
                }
            });
            out
        })
    }
}

/// Whether the AVX-512 conversions (pack, A tiles) can run.
fn simd_convert() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// f32 → bf16 bits as `vcvtne2ps2bf16` does it: round to nearest even, NaN kept NaN (quieted,
/// so a NaN whose payload sits in the dropped bits cannot become infinity), and denormal
/// inputs taken as zero of the same sign (the instruction ignores MXCSR and flushes them), so
/// the portable path and the packed data agree bit for bit.
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x0040;
    }
    if b & 0x7f80_0000 == 0 {
        return ((b >> 16) & 0x8000) as u16;
    }
    // Adding 0x7fff (+1 when the kept part is odd) carries into the kept bits exactly when the
    // dropped bits are above half (or at half with an odd kept part). No finite input
    // overflows u32: the largest is 0xff7f_ffff.
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `x` rounded to the nearest bf16 value, as f32.
fn round_bf16(x: f32) -> f32 {
    bf16_to_f32(bf16_bits(x))
}

/// One row tile (M's rows `j0..j0+16`, all K tiles, every line written) without SIMD.
fn pack_tile_row_scalar(
    src: &[f32],
    rows: usize,
    cols: usize,
    transposed: bool,
    j0: usize,
    tiles: &mut [MaybeUninit<Line>],
) {
    let m = |j: usize, p: usize| -> u16 {
        if j >= rows || p >= cols {
            0
        } else if transposed {
            bf16_bits(src[p * rows + j])
        } else {
            bf16_bits(src[j * cols + p])
        }
    };
    for (k, tile) in tiles.chunks_exact_mut(TR).enumerate() {
        for (l, line) in tile.iter_mut().enumerate() {
            let p = k * TK + 2 * l;
            let mut out = Line::default();
            for jj in 0..TR {
                out.0[2 * jj] = m(j0 + jj, p);
                out.0[2 * jj + 1] = m(j0 + jj, p + 1);
            }
            line.write(out);
        }
    }
}

/// `c [m, M.rows]` (row-major, leading dimension `M.rows`) `= bf16(a) · Mᵀ`, or `+=` when
/// `accumulate`; `a` is `[m, M.cols]` row-major f32, rounded to bf16 (nearest even) on the fly;
/// products accumulate in f32. Runs on the calling thread only; loads the tile configuration
/// itself and releases the tiles on return. Without AMX: [`matmul_t_portable`].
#[cfg(test)]
pub(crate) fn matmul_t(a: &[f32], m: usize, mat: &Bf16Matrix, c: &mut [f32], accumulate: bool) {
    matmul_t_part(a, m, mat, (mat.rows, mat.cols), c, accumulate);
}

/// [`matmul_t`] with the first `n` rows and `k` columns of M only: `c [m, n] (+)= bf16(a) ·
/// M[..n, ..k]ᵀ` for `a [m, k]`, both row-major. Attention multiplies by the keys a query tile
/// may see, a prefix of the head's keys packed once. M's values in columns `k..` of the last
/// 32-column step meet zeros (a's padding): finite ones add nothing.
pub(crate) fn matmul_t_part(
    a: &[f32],
    m: usize,
    mat: &Bf16Matrix,
    (n, k): (usize, usize),
    c: &mut [f32],
    accumulate: bool,
) {
    check_sizes(a, m, mat, (n, k), c);
    if empty_product(m, n, k, c, accumulate) {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if amx_available() {
        // SAFETY: AMX-BF16 with the OS's permission, and AVX-512F/BW/BF16, are present
        // (`amx_available`); the sizes of `a` and `c` and the part of M were checked above.
        unsafe {
            x86::matmul_t(
                a,
                m,
                mat,
                (n, k),
                (c.as_mut_ptr(), n),
                0..n.div_ceil(2 * TR),
                accumulate,
            )
        };
        return;
    }
    matmul_t_portable(a, m, mat, (n, k), c, accumulate);
}

/// An empty product's result (nothing for no rows or columns of c; c = 0, or c unchanged when
/// accumulating, for k = 0); true when the product was empty.
fn empty_product(m: usize, n: usize, k: usize, c: &mut [f32], accumulate: bool) -> bool {
    if k == 0 && m > 0 && n > 0 && !accumulate {
        c[..m * n].fill(0.0);
    }
    m == 0 || n == 0 || k == 0
}

/// `c (+)= bf16(a) · Mᵀ` for `c [m, M.rows]` (leading dimension M.rows) over a grid of rayon
/// tasks: slabs of `rows_per_task` rows × groups of 32-column blocks of c, so that a product of
/// few rows (one text in inference) still runs on every thread. Each element is computed as
/// [`matmul_t`] computes it, whatever the grid (the same bits on any thread count). Without
/// AMX: [`matmul_t_portable`] over the rows only.
pub(crate) fn matmul_t_grid(
    a: &[f32],
    m: usize,
    mat: &Bf16Matrix,
    c: &mut [f32],
    accumulate: bool,
    rows_per_task: usize,
) {
    let (n, k) = (mat.rows, mat.cols);
    check_sizes(a, m, mat, (n, k), c);
    if empty_product(m, n, k, c, accumulate) {
        return;
    }
    let rows_per_task = rows_per_task.max(1);
    #[cfg(target_arch = "x86_64")]
    if amx_available() {
        let row_tasks = m.div_ceil(rows_per_task);
        let blocks = n.div_ceil(2 * TR);
        // At least two tasks a thread in all; a group keeps ≥ 2 blocks (64 columns), so that
        // each task's converted A tiles feed a few products.
        let want = (2 * rayon::current_num_threads()).div_ceil(row_tasks);
        let groups = want.min(blocks.div_ceil(2)).max(1);
        let per_group = blocks.div_ceil(groups);
        let groups = blocks.div_ceil(per_group);
        let dst = crate::blas::SendPtr(c.as_mut_ptr());
        (0..row_tasks * groups).into_par_iter().for_each(|task| {
            let (rt, g) = (task / groups, task % groups);
            let r0 = rt * rows_per_task;
            let rows = rows_per_task.min(m - r0);
            let cols = g * per_group..((g + 1) * per_group).min(blocks);
            let dst = &dst;
            // SAFETY: AMX and the conversions are available (`amx_available`); sizes were
            // checked above; each task writes only its rows `r0..r0 + rows` and its 32-column
            // blocks `cols` of c, disjoint from every other task's.
            unsafe {
                x86::matmul_t(
                    &a[r0 * k..],
                    rows,
                    mat,
                    (n, k),
                    (dst.0.add(r0 * n), n),
                    cols,
                    accumulate,
                )
            };
        });
        return;
    }
    c[..m * n]
        .par_chunks_mut(rows_per_task * n)
        .zip(a[..m * k].par_chunks(rows_per_task * k))
        .for_each(|(c, a)| matmul_t_portable(a, a.len() / k, mat, (n, k), c, accumulate));
}

/// [`matmul_t_part`] in f32 through `gemm`: the same values up to the order of the f32 sums
/// (a's rows rounded to bf16 first, M's bf16 values unpacked once and cached).
pub(crate) fn matmul_t_portable(
    a: &[f32],
    m: usize,
    mat: &Bf16Matrix,
    (n, k): (usize, usize),
    c: &mut [f32],
    accumulate: bool,
) {
    check_sizes(a, m, mat, (n, k), c);
    if m == 0 {
        return;
    }
    let ab: Vec<f32> = a[..m * k].iter().map(|&x| round_bf16(x)).collect();
    let w = mat.unpacked();
    gemm_into(
        m,
        n,
        k,
        &mut c[..m * n],
        accumulate,
        Mat::new(&ab, 0, k, 1),
        // M[..n, ..k]ᵀ [k, n]: element (p, j) is M[j][p].
        Mat::new(w, 0, 1, mat.cols),
        Parallelism::None,
    );
}

fn check_sizes(a: &[f32], m: usize, mat: &Bf16Matrix, (n, k): (usize, usize), c: &[f32]) {
    assert!(
        n <= mat.rows && k <= mat.cols,
        "amx::matmul_t: part {n} x {k} of a {} x {} matrix",
        mat.rows,
        mat.cols
    );
    assert!(
        a.len() >= m * k,
        "amx::matmul_t: a has {} elements for {m} x {k}",
        a.len()
    );
    assert!(
        c.len() >= m * n,
        "amx::matmul_t: c has {} elements for {m} x {n}",
        c.len()
    );
}

/// Whether this CPU and OS run AMX-BF16: CPUID leaf 7 EDX bits 22 (AMX-BF16) and 24
/// (AMX-TILE), XCR0 bits 17/18 (tile state enabled by the OS), AVX-512F/BW/BF16 (the
/// conversions), and Linux's `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)` permission,
/// requested once per process. false on other OSes and architectures.
pub(crate) fn amx_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            x86::detect_and_request()
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Bf16Matrix, Line, TK, TR};
    use std::arch::asm;
    use std::arch::x86_64::*;
    use std::cell::Cell;
    use std::mem::MaybeUninit;

    /// Rows of `a` converted at a time, at most: the slab's A tiles (1.5 MiB at K = 3072) and a
    /// chunk of M share the 2 MiB L2, and a 256-row call is one slab.
    const SLAB: usize = 256;
    /// Bytes of A tiles a slab may take: at larger K (the output layer's `dh`, K = 50257) the
    /// slab shrinks, down to one 32-row block.
    const A_BYTES: usize = 3 << 19;
    /// Bytes of packed M per chunk (at least one 32-row block) that every row block of the slab
    /// passes over while it stays in L2 (256 KiB and 1 MiB measured no better).
    const CHUNK_BYTES: usize = 512 * 1024;

    #[cfg(target_os = "linux")]
    pub(super) fn detect_and_request() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        let leaf7 = __cpuid_count(7, 0);
        let amx_bf16 = leaf7.edx & (1 << 22) != 0;
        let amx_tile = leaf7.edx & (1 << 24) != 0;
        if !(amx_bf16 && amx_tile && super::simd_convert() && is_x86_feature_detected!("xsave")) {
            return false;
        }
        // SAFETY: XSAVE (and so XGETBV) is present (checked above; OSXSAVE is implied by std's
        // detection of any AVX-512 feature).
        let xcr0 = unsafe { _xgetbv(0) };
        if xcr0 & (0b11 << 17) != (0b11 << 17) {
            return false;
        }
        // Linux ≥ 5.16 keeps the 8 KiB tile state off until a process asks for it; without
        // the permission the first tile instruction kills the process (SIGILL).
        // SAFETY: this arch_prctl only sets a per-process permission flag; no memory is passed.
        let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
        r == 0
    }

    /// Up to 32 f32 at `p` (`n` of them valid, the rest zero) as 32 bf16, in order.
    ///
    /// # Safety
    /// `p..p + n` must be readable; `n ≤ 32`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn load32(p: *const f32, n: usize) -> __m512i {
        let (lo, hi) = if n >= 32 {
            (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
        } else if n > 16 {
            let mask = ((1u32 << (n - 16)) - 1) as __mmask16;
            (_mm512_loadu_ps(p), _mm512_maskz_loadu_ps(mask, p.add(16)))
        } else {
            // `p.add(16)` could lie past the allocation: not formed at all.
            let mask = ((1u32 << n) - 1) as __mmask16;
            (_mm512_maskz_loadu_ps(mask, p), _mm512_setzero_ps())
        };
        // The first argument becomes the upper 16 bf16.
        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
    }

    /// Up to 16 f32 at `p` (`n` valid, the rest zero).
    ///
    /// # Safety
    /// `p..p + n` must be readable; `n ≤ 16`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f32, n: usize) -> __m512 {
        if n >= 16 {
            _mm512_loadu_ps(p)
        } else {
            _mm512_maskz_loadu_ps(((1u32 << n) - 1) as __mmask16, p)
        }
    }

    /// Row tiles of M from Mᵀ row-major (`src [cols, rows]`), starting at M's row `j0`, into
    /// `out` (whole row tiles of `kt · 16` lines, every one written; tiles past `rows` are
    /// zero). Line l of tile (t, k) pairs Mᵀ's rows p = 32k + 2l and p + 1 (16 contiguous
    /// values each): both are converted and interleaved. Each Mᵀ row is read the group's width
    /// at a time, so the reads run along memory.
    ///
    /// # Safety
    /// The CPU must have AVX-512F/BW/BF16; `src` holds `rows · cols` elements.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pack_transposed(
        src: &[f32],
        rows: usize,
        cols: usize,
        j0: usize,
        out: &mut [MaybeUninit<Line>],
    ) {
        let kt = cols.div_ceil(TK);
        let per_tile_row = kt * TR;
        let tile_rows = out.len() / per_tile_row;
        let s = src.as_ptr();
        let idx = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3,
            18, 2, 17, 1, 16, 0,
        );
        for p in (0..cols).step_by(2) {
            let line = (p / TK) * TR + (p % TK) / 2;
            for t in 0..tile_rows {
                let j = j0 + t * TR;
                let v = if j < rows {
                    let nj = (rows - j).min(TR);
                    let lo = load16(s.add(p * rows + j), nj);
                    let hi = if p + 1 < cols {
                        load16(s.add((p + 1) * rows + j), nj)
                    } else {
                        _mm512_setzero_ps()
                    };
                    let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
                    _mm512_permutexvar_epi16(idx, v)
                } else {
                    _mm512_setzero_si512()
                };
                _mm512_store_si512(out[t * per_tile_row + line].as_mut_ptr().cast(), v);
            }
        }
        // The K padding of the last tile: pairs past `cols`.
        for l in cols.div_ceil(2)..kt * TK / 2 {
            let line = (l * 2 / TK) * TR + l % (TK / 2);
            for t in 0..tile_rows {
                out[t * per_tile_row + line].write(Line::default());
            }
        }
    }

    /// One row tile of M (rows `j0..j0+16`, all K tiles) from M row-major into `tiles`
    /// (`kt · 16` lines, every one written).
    ///
    /// # Safety
    /// The CPU must have AVX-512F/BW/BF16; `src` holds `rows · cols` elements; `j0 < rows`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pack_tile_row(
        src: &[f32],
        rows: usize,
        cols: usize,
        j0: usize,
        tiles: &mut [MaybeUninit<Line>],
    ) {
        let nj = (rows - j0).min(TR);
        let s = src.as_ptr();
        {
            // Convert the 16 rows' 32 values (one u32 pair per line), then transpose the
            // 16 × 16 pairs through an L1-resident buffer.
            let mut buf = [[0u32; TR]; TR];
            for (k, tile) in tiles.chunks_exact_mut(TR).enumerate() {
                let p0 = k * TK;
                let np = (cols - p0).min(TK);
                for (jj, row) in buf.iter_mut().enumerate() {
                    let v = if jj < nj {
                        load32(s.add((j0 + jj) * cols + p0), np)
                    } else {
                        _mm512_setzero_si512()
                    };
                    _mm512_storeu_si512(row.as_mut_ptr().cast(), v);
                }
                for (l, line) in tile.iter_mut().enumerate() {
                    let mut out = [0u32; TR];
                    for (jj, o) in out.iter_mut().enumerate() {
                        *o = buf[jj][l];
                    }
                    _mm512_store_si512(line.as_mut_ptr().cast(), _mm512_loadu_si512(out.as_ptr().cast()));
                }
            }
        }
    }

    /// Rows `i0..i0 + nrows` of `a [_, k]` (row-major) as A tiles `[row tile][k tile]` at `dst`, padded with
    /// zero rows to `2 · blocks` row tiles and with zeros along K to whole tiles.
    ///
    /// # Safety
    /// AVX-512F/BW/BF16; `a` holds rows up to `i0 + nrows`; `dst` has `2 · blocks · kt · 16`
    /// lines where `blocks = nrows.div_ceil(32)`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn convert_a(a: &[f32], k: usize, kt: usize, i0: usize, nrows: usize, dst: &mut [Line]) {
        let s = a.as_ptr();
        // Tile by tile, so the writes are sequential; each source row is read 128 bytes at
        // a time (16 rows in flight).
        for (t, tile) in dst.chunks_exact_mut(TR).enumerate() {
            let (rt, kk) = (t / kt, t % kt);
            let p0 = kk * TK;
            let np = (k - p0).min(TK);
            for (r, line) in tile.iter_mut().enumerate() {
                let i = rt * TR + r;
                let v = if i < nrows {
                    load32(s.add((i0 + i) * k + p0), np)
                } else {
                    _mm512_setzero_si512()
                };
                _mm512_store_si512(line.0.as_mut_ptr().cast(), v);
            }
        }
    }

    /// Palette 1 with all eight tiles 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    /// The tile configuration while it lives; releases the tiles (and so the 8 KiB of tile
    /// state the OS would otherwise save on every context switch) when dropped.
    struct Tiles;

    impl Tiles {
        /// # Safety
        /// AMX with the OS's permission must be available.
        unsafe fn configure() -> Self {
            let mut cfg = TileConfig([0; 64]);
            cfg.0[0] = 1;
            for t in 0..8 {
                cfg.0[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
                cfg.0[48 + t] = TR as u8; // rows
            }
            asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly, preserves_flags));
            Tiles
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            // SAFETY: a `Tiles` exists only after `configure` succeeded on this thread.
            unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
        }
    }

    /// tmm0–3 += Σ over `kt` tile steps of A (tmm4: rows 0–15, tmm5: rows 16–31) × M (tmm6:
    /// columns 0–15, tmm7: 16–31); every pointer advances one 1 KiB tile a step.
    ///
    /// # Safety
    /// Tiles configured; `kt ≥ 1`; each pointer valid for `kt` KiB.
    #[inline(always)]
    unsafe fn kloop(a0: *const Line, a1: *const Line, b0: *const Line, b1: *const Line, kt: usize) {
        asm!(
            "2:",
            "tileloadd tmm4, [{a0} + {s}*1]",
            "tileloadd tmm6, [{b0} + {s}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {s}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {s}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, 1024",
            "add {a1}, 1024",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {n}",
            "jnz 2b",
            a0 = inout(reg) a0 => _,
            a1 = inout(reg) a1 => _,
            b0 = inout(reg) b0 => _,
            b1 = inout(reg) b1 => _,
            n = inout(reg) kt => _,
            s = in(reg) 64usize,
            options(nostack, readonly),
        );
    }

    /// Loads (`load`) or stores the 32 × 32 f32 block at `p` (row stride `stride` bytes) into
    /// or from tmm0–3.
    ///
    /// # Safety
    /// Tiles configured; `p` valid for 32 rows of 32 f32 at that stride.
    #[inline(always)]
    unsafe fn acc_io(p: *mut f32, stride: usize, load: bool) {
        let (c00, c01) = (p, p.add(16));
        let (c10, c11) = (p.byte_add(16 * stride), p.byte_add(16 * stride).add(16));
        if load {
            asm!(
                "tileloadd tmm0, [{c00} + {s}*1]",
                "tileloadd tmm1, [{c01} + {s}*1]",
                "tileloadd tmm2, [{c10} + {s}*1]",
                "tileloadd tmm3, [{c11} + {s}*1]",
                c00 = in(reg) c00, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11,
                s = in(reg) stride,
                options(nostack, readonly, preserves_flags),
            );
        } else {
            asm!(
                "tilestored [{c00} + {s}*1], tmm0",
                "tilestored [{c01} + {s}*1], tmm1",
                "tilestored [{c10} + {s}*1], tmm2",
                "tilestored [{c11} + {s}*1], tmm3",
                c00 = in(reg) c00, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11,
                s = in(reg) stride,
                options(nostack, preserves_flags),
            );
        }
    }

    #[inline(always)]
    unsafe fn zero_acc() {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem, preserves_flags)
        );
    }

    thread_local! {
        /// This thread's A tiles, kept between calls (a 256-row slab at K = 3072 is 1.5 MiB:
        /// a fresh allocation each call would fault its pages in again).
        static A_TILES: Cell<Vec<Line>> = const { Cell::new(Vec::new()) };
    }

    /// See [`super::matmul_t_part`]: `c [m, n]` with leading dimension `ldc`, of which only the
    /// 32-column blocks `blocks` (of the `n.div_ceil(32)`) are computed.
    ///
    /// # Safety
    /// AMX-BF16 with the OS's permission and AVX-512F/BW/BF16 must be available; `1 ≤ k ≤
    /// mat.cols`, `n ≤ mat.rows`, `n ≤ ldc`, `a.len() ≥ m · k`, `c` valid for reads and writes
    /// of rows `0..m` (stride `ldc`) in the columns of `blocks` below n, which nothing else
    /// accesses meanwhile.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn matmul_t(
        a: &[f32],
        m: usize,
        mat: &Bf16Matrix,
        (n, k): (usize, usize),
        (cp, ldc): (*mut f32, usize),
        blocks: std::ops::Range<usize>,
        accumulate: bool,
    ) {
        // K steps used, and M's tiles per row tile (its stride).
        let (kt, mat_kt) = (k.div_ceil(TK), mat.kt);
        let chunk = (CHUNK_BYTES / (2 * kt * 1024)).max(1);
        // A slab of `s` rows takes `s · kt · 64` bytes of A tiles.
        let slab = (A_BYTES / (64 * kt) / 32 * 32).clamp(32, SLAB);
        let mut buf = A_TILES.with(Cell::take);
        let tiles = Tiles::configure();
        let stride = ldc * 4;
        let bp = mat.data.as_ptr();
        // Edge blocks (the last rows or columns of c) go through this block.
        let mut edge = EdgeBlock([0f32; 1024]);
        for i0 in (0..m).step_by(slab) {
            let nrows = (m - i0).min(slab);
            let row_blocks = nrows.div_ceil(2 * TR);
            let lines = 2 * row_blocks * kt * TR;
            if buf.len() < lines {
                buf.resize(lines, Line::default());
            }
            convert_a(a, k, kt, i0, nrows, &mut buf[..lines]);
            let ap = buf.as_ptr();
            for c0 in blocks.clone().step_by(chunk) {
                for rb in 0..row_blocks {
                    let a0 = ap.add(2 * rb * kt * TR);
                    let a1 = a0.add(kt * TR);
                    let r0 = i0 + 32 * rb;
                    let nr = (m - r0).min(32);
                    for cb in c0..(c0 + chunk).min(blocks.end) {
                        let b0 = bp.add(2 * cb * mat_kt * TR);
                        let b1 = b0.add(mat_kt * TR);
                        let j0 = 32 * cb;
                        let nc = (n - j0).min(32);
                        let dst = cp.add(r0 * ldc + j0);
                        if nr == 32 && nc == 32 {
                            if accumulate {
                                acc_io(dst, stride, true);
                            } else {
                                zero_acc();
                            }
                            kloop(a0, a1, b0, b1, kt);
                            acc_io(dst, stride, false);
                        } else {
                            let e = edge.0.as_mut_ptr();
                            if accumulate {
                                edge.0.fill(0.0);
                                for r in 0..nr {
                                    for j in 0..nc {
                                        *e.add(EdgeBlock::at(r, j)) = *dst.add(r * ldc + j);
                                    }
                                }
                                acc_io(e, 128, true);
                            } else {
                                zero_acc();
                            }
                            kloop(a0, a1, b0, b1, kt);
                            acc_io(e, 128, false);
                            for r in 0..nr {
                                for j in 0..nc {
                                    *dst.add(r * ldc + j) = *e.add(EdgeBlock::at(r, j));
                                }
                            }
                        }
                    }
                }
            }
        }
        drop(tiles);
        // Kept for the next call up to a full slab's size: a thread that once multiplied at a
        // huge K should not hold that much for the rest of the process.
        if buf.len() * 64 <= A_BYTES {
            A_TILES.with(|cell| cell.set(buf));
        }
    }

    /// A 32 × 32 f32 block, row-major (row stride 128 bytes), for the blocks at c's edges.
    #[repr(C, align(64))]
    struct EdgeBlock([f32; 1024]);

    impl EdgeBlock {
        #[inline(always)]
        fn at(r: usize, j: usize) -> usize {
            r * 32 + j
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blas::transpose;

    /// Deterministic values in [-1, 1).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x >> 12;
                x ^= x << 25;
                x ^= x >> 27;
                ((x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    type MatmulFn = fn(&[f32], usize, &Bf16Matrix, (usize, usize), &mut [f32], bool);

    /// Every (m, rows, cols) against an f64 reference from the bf16-rounded inputs, both
    /// packings, overwrite and accumulate, the whole of M and a part of it (its first rows and
    /// columns; for most shapes ending inside a 32-row block and inside a 32-column step).
    fn check_shapes(f: MatmulFn, path: &str) {
        for (m, rows, cols) in [
            (1, 1, 1),
            (37, 19, 70),
            (256, 384, 384),
            (255, 1536, 384),
            (3, 2304, 768),
            (300, 17, 1000),
            (33, 31, 65),
            (64, 64, 32),
            (513, 40, 33),
            // K past 3072: slabs of fewer than 256 rows (96 here), several per call.
            (300, 17, 7000),
        ] {
            let w: Vec<f32> = values(rows * cols, 7 + rows as u64)
                .iter()
                .map(|v| v * 0.05)
                .collect();
            let wb: Vec<f64> = w.iter().map(|&x| round_bf16(x) as f64).collect();
            let wt = transpose(&w, rows, cols);
            let part = ((rows * 2 / 3).max(1), (cols * 2 / 3).max(1));
            for (n, k) in [(rows, cols), part] {
                let a = values(m * k, 1 + m as u64);
                let prior = values(m * n, 3);
                let ab: Vec<f64> = a.iter().map(|&x| round_bf16(x) as f64).collect();
                // Σ a·m and Σ |a|·|m| per element of c.
                let mut want = vec![0f64; m * n];
                let mut scale = vec![0f64; m * n];
                for i in 0..m {
                    for j in 0..n {
                        let (ar, wr) = (&ab[i * k..][..k], &wb[j * cols..][..k]);
                        want[i * n + j] = ar.iter().zip(wr).map(|(x, y)| x * y).sum();
                        scale[i * n + j] = ar.iter().zip(wr).map(|(x, y)| (x * y).abs()).sum();
                    }
                }
                for transposed in [false, true] {
                    let mat = if transposed {
                        Bf16Matrix::pack(&wt, rows, cols, true)
                    } else {
                        Bf16Matrix::pack(&w, rows, cols, false)
                    };
                    assert_eq!((mat.rows(), mat.cols()), (rows, cols));
                    for accumulate in [false, true] {
                        // Overwrite must not read c: start from NaN.
                        let mut c = if accumulate {
                            prior.clone()
                        } else {
                            vec![f32::NAN; m * n]
                        };
                        f(&a, m, &mat, (n, k), &mut c, accumulate);
                        for (e, &got) in c.iter().enumerate() {
                            let (want, scale) = if accumulate {
                                (want[e] + prior[e] as f64, scale[e] + (prior[e] as f64).abs())
                            } else {
                                (want[e], scale[e])
                            };
                            let err = (got as f64 - want).abs();
                            assert!(
                                err <= 1e-5 * scale + 1e-30,
                                "{path}: (m, rows, cols) = ({m}, {rows}, {cols}), part {n} x {k}, \
                                 transposed {transposed} accumulate {accumulate}: c[{}, {}] = \
                                 {got}, want {want} (scale {scale})",
                                e / n,
                                e % n
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn amx_matches_the_bf16_reference() {
        if !amx_available() {
            eprintln!("AMX-BF16 not available: AMX path not tested");
            return;
        }
        check_shapes(matmul_t_part, "amx");
    }

    #[test]
    fn portable_matches_the_bf16_reference() {
        check_shapes(matmul_t_portable, "portable");
    }

    /// The grid (rows × column groups over rayon tasks) gives every element the bits of the
    /// one-thread call, whatever the rows per task and the thread count, overwriting and
    /// accumulating; k = 0 and m = 0 as `matmul_t_part`.
    #[test]
    fn grid_gives_the_one_thread_bits() {
        for (m, rows, cols) in [
            (1, 384, 384),
            (26, 1536, 384),
            (26, 70, 33),
            (64, 2304, 768),
            (300, 100, 65),
            (513, 40, 33),
        ] {
            let w = values(rows * cols, 11 + rows as u64);
            let mat = Bf16Matrix::pack(&w, rows, cols, false);
            let a = values(m * cols, 2 + m as u64);
            let prior = values(m * rows, 4);
            for accumulate in [false, true] {
                let start = if accumulate {
                    prior.clone()
                } else {
                    vec![f32::NAN; m * rows]
                };
                let mut want = start.clone();
                matmul_t_part(&a, m, &mat, (rows, cols), &mut want, accumulate);
                for (threads, per_task) in [(1, 256), (2, 256), (2, 16), (3, 7), (2, 1000)] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut c = start.clone();
                    pool.install(|| matmul_t_grid(&a, m, &mat, &mut c, accumulate, per_task));
                    assert!(
                        c.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "m {m} rows {rows} cols {cols} accumulate {accumulate} threads {threads} \
                         rows per task {per_task}"
                    );
                }
            }
        }
        let mat = Bf16Matrix::pack(&[1.0; 6], 2, 3, false);
        let mut c = vec![5f32; 4];
        matmul_t_grid(&[], 0, &mat, &mut c, false, 256);
        assert_eq!(c, [5.0; 4]);
    }

    #[test]
    fn empty_products() {
        let mat = Bf16Matrix::pack(&[1.0; 6], 2, 3, false);
        for f in [matmul_t_part as MatmulFn, matmul_t_portable] {
            let mut c: Vec<f32> = vec![];
            f(&[], 0, &mat, (2, 3), &mut c, false);
            f(&[], 0, &mat, (2, 3), &mut c, true);
        }
        // No columns of M: c = 0, or c unchanged when accumulating.
        let mut c = vec![5f32; 4];
        matmul_t_part(&[], 2, &mat, (2, 0), &mut c, true);
        assert_eq!(c, [5.0; 4]);
        matmul_t_part(&[], 2, &mat, (2, 0), &mut c, false);
        assert_eq!(c, [0.0; 4]);
    }

    #[test]
    fn nan_and_infinity_propagate() {
        let (m, rows, cols) = (40, 35, 70);
        let mut a = values(m * cols, 5);
        let mut w = values(rows * cols, 6);
        a[3 * cols + 9] = f32::NAN; // row 3 of c: all NaN
        a[5 * cols + 2] = f32::INFINITY; // row 5: ±inf where M[j][2] ≠ 0
        w[7 * cols + 69] = f32::NAN; // column 7 of c: all NaN
        let mat = Bf16Matrix::pack(&w, rows, cols, false);
        for f in [matmul_t_part as MatmulFn, matmul_t_portable] {
            let mut c = vec![0f32; m * rows];
            f(&a, m, &mat, (rows, cols), &mut c, false);
            for i in 0..m {
                for j in 0..rows {
                    let v = c[i * rows + j];
                    if i == 3 || j == 7 {
                        assert!(v.is_nan(), "c[{i}, {j}] = {v}");
                    } else if i == 5 {
                        assert!(v.is_infinite() || w[j * cols + 2] == 0.0, "c[{i}, {j}] = {v}");
                    } else {
                        assert!(v.is_finite(), "c[{i}, {j}] = {v}");
                    }
                }
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        let e = |k: i32| 2f32.powi(k);
        for (x, want) in [
            (1.0 + e(-8), 1.0),                     // tie, 1.0 is even
            (1.0 + 3.0 * e(-8), 1.0 + e(-6)),       // tie, 1 + 2^-7 is odd: up
            (1.0 + e(-8) + e(-20), 1.0 + e(-7)),    // above the tie: up
            (1.0 + e(-7) - e(-20), 1.0 + e(-7)),    // below the next: nearest
            (-(1.0 + 3.0 * e(-8)), -(1.0 + e(-6))), // symmetric
            (3.0 * e(-9), 3.0 * e(-9)),             // exact
            (f32::MAX, f32::INFINITY),              // overflows
            (f32::INFINITY, f32::INFINITY),
            (f32::NEG_INFINITY, f32::NEG_INFINITY),
            (f32::MIN_POSITIVE, f32::MIN_POSITIVE),
            (f32::from_bits(1), 0.0), // denormals flush, as the hardware does
            (-f32::from_bits(0x007f_ffff), -0.0),
        ] {
            let got = round_bf16(x);
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "round_bf16({x:e}) = {got:e}, want {want:e}"
            );
        }
        // NaNs stay NaN, including one whose payload lies only in the dropped bits.
        for bits in [0x7fc0_0000u32, 0x7f80_0001, 0xff80_0001, 0x7fff_ffff] {
            assert!(round_bf16(f32::from_bits(bits)).is_nan(), "{bits:#x}");
        }
    }

    /// Special and random bit patterns: pack (AVX-512 where present, both layouts) and the
    /// scalar packing give the same bits, and both are `bf16_bits` of the source.
    #[test]
    fn packings_agree_bit_for_bit() {
        // Odd sizes; (300, 45): several row tiles per task of the transposed packing, the last
        // one all padding.
        for (rows, cols) in [(37, 70), (300, 45), (1, 1), (16, 32)] {
            let mut src: Vec<f32> = values(rows * cols, 9).iter().map(|v| v * 3.0).collect();
            let specials = [
                f32::NAN,
                f32::from_bits(0x7f80_0001),
                f32::from_bits(0xffc0_1234),
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::MAX,
                -f32::MAX,
                f32::from_bits(1),
                -f32::from_bits(0x0040_0000),
                f32::MIN_POSITIVE,
                0.0,
                -0.0,
                1.0 + 2f32.powi(-8),
                1.0 + 3.0 * 2f32.powi(-8),
            ];
            for (i, s) in specials.iter().enumerate() {
                src[i * 97 % (rows * cols)] = *s;
            }
            let mut x = 12345u64;
            for v in src.iter_mut().skip(1).step_by(5) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *v = f32::from_bits((x >> 32) as u32);
            }
            let st = transpose(&src, rows, cols);
            let reference = Bf16Matrix::pack_with(&src, rows, cols, false, false);
            for j in 0..rows {
                for p in 0..cols {
                    assert_eq!(reference.get(j, p), bf16_bits(src[j * cols + p]), "({j}, {p})");
                }
            }
            let bits = |m: &Bf16Matrix| m.data.iter().flat_map(|l| l.0).collect::<Vec<u16>>();
            let want = bits(&reference);
            assert_eq!(bits(&Bf16Matrix::pack_with(&st, rows, cols, true, false)), want);
            if simd_convert() {
                assert_eq!(
                    bits(&Bf16Matrix::pack_with(&src, rows, cols, false, true)),
                    want,
                    "{rows} x {cols}"
                );
                assert_eq!(
                    bits(&Bf16Matrix::pack_with(&st, rows, cols, true, true)),
                    want,
                    "{rows} x {cols}ᵀ"
                );
            } else {
                eprintln!("no AVX-512 BF16: vector packing not tested");
            }
            // The padding is zero: as many nonzero bf16 values as the source has.
            assert_eq!(want.len(), rows.div_ceil(32) * 32 * cols.div_ceil(32) * 32);
            assert_eq!(
                want.iter().filter(|&&b| b != 0).count(),
                src.iter().filter(|v| bf16_bits(**v) != 0).count()
            );
        }
    }

    /// `cargo test -p spt-ops --release --lib amx::tests::timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn timing() {
        use std::time::Instant;
        fn best_ms(reps: usize, mut f: impl FnMut()) -> f64 {
            f();
            let mut v: Vec<f64> = (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        }
        println!("amx_available: {}", amx_available());
        let m = 256;
        println!("| M (rows, cols) | AMX ms | AMX GFLOP/s | gemm f32 [K,N] GFLOP/s | gemm f32 Mᵀ view GFLOP/s | AMX / f32 | AMX 2 threads GFLOP/s |");
        println!("|---|---|---|---|---|---|---|");
        for (rows, cols) in [
            (384, 384),
            (1536, 384),
            (384, 1536),
            (2304, 768),
            (768, 2304),
            (3072, 768),
            (768, 3072),
        ] {
            let a = values(m * cols, 1);
            let w = values(rows * cols, 2);
            let wt = transpose(&w, rows, cols);
            let mat = Bf16Matrix::pack(&w, rows, cols, false);
            let mut c = vec![0f32; m * rows];
            let flop = 2.0 * (m * rows * cols) as f64;
            let t_amx = best_ms(21, || matmul_t(&a, m, &mat, &mut c, false));
            // gemm f32 with M's transpose as `[cols, rows]`, and with M read in place as a view.
            let mut t_gemm = |rhs: Mat<f32>| {
                best_ms(11, || {
                    let lhs = Mat::new(&a, 0, cols, 1);
                    gemm_into(m, rows, cols, &mut c, false, lhs, rhs, Parallelism::None)
                })
            };
            let t_f32 = t_gemm(Mat::new(&wt, 0, rows, 1));
            let t_view = t_gemm(Mat::new(&w, 0, 1, cols));
            // Two threads, each running its own calls (as the callers' rayon tasks do).
            let mut c2 = vec![0f32; m * rows];
            let a2 = values(m * cols, 3);
            let reps = 16;
            let t_two = best_ms(5, || {
                rayon::join(
                    || (0..reps).for_each(|_| matmul_t(&a, m, &mat, &mut c, false)),
                    || (0..reps).for_each(|_| matmul_t(&a2, m, &mat, &mut c2, false)),
                );
            });
            let gf = |ms: f64| flop / (ms * 1e-3) / 1e9;
            println!(
                "| ({rows}, {cols}) | {t_amx:.3} | {:.0} | {:.0} | {:.0} | {:.1}x | {:.0} |",
                gf(t_amx),
                gf(t_f32),
                gf(t_view),
                t_f32 / t_amx,
                2.0 * reps as f64 * flop / (t_two * 1e-3) / 1e9
            );
        }
        let w = values(50257 * 768, 4);
        {
            // Memory-bandwidth floor for the big packing: read all of `w` and write half its
            // size into fresh memory, on the same pool.
            let t = best_ms(7, || {
                let sum: u32 = w
                    .par_chunks(1 << 16)
                    .map(|c| c.iter().fold(0u32, |s, x| s.wrapping_add(x.to_bits())))
                    .reduce(|| 0, u32::wrapping_add);
                let mut out: Vec<u16> = Vec::with_capacity(w.len());
                out.spare_capacity_mut()
                    .par_chunks_mut(1 << 16)
                    .for_each(|c| c.fill(MaybeUninit::new(1)));
                std::hint::black_box((sum, out));
            });
            println!("floor: read 154 MB + write 77 MB fresh: {t:.2} ms");
        }
        for (rows, cols, transposed) in [
            (3072, 768, false),
            (3072, 768, true),
            (768, 3072, true),
            (50257, 768, false),
            (50257, 768, true),
            (768, 50257, true),
        ] {
            let w = &w[..rows * cols];
            {
                let t = best_ms(7, || {
                    std::hint::black_box(Bf16Matrix::pack(w, rows, cols, transposed));
                });
                let gbs = (rows * cols * 6) as f64 / (t * 1e-3) / 1e9;
                println!(
                    "pack {rows} x {cols} transposed {transposed}: {t:.2} ms ({gbs:.1} GB/s read + write), {} threads",
                    rayon::current_num_threads()
                );
            }
        }
    }
}
