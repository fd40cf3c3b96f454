//! Thin wrappers over the `gemm` crate for the CPU kernels: strided operands, accumulate or
//! overwrite, and the choice between gemm's own threads and the caller's rayon tasks.

use crate::util::Float;
use candle_core::{Result, Storage, Tensor};
use gemm::Parallelism;

/// A raw pointer that may cross rayon tasks; every task writes a disjoint set of elements.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

/// A strided matrix operand: element (i, j) is at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<T> {
    pub(crate) ptr: *const T,
    pub(crate) rs: isize,
    pub(crate) cs: isize,
}

impl<T> Mat<T> {
    pub(crate) fn new(s: &[T], offset: usize, rs: usize, cs: usize) -> Self {
        debug_assert!(offset <= s.len());
        Self {
            ptr: s[offset..].as_ptr(),
            rs: rs as isize,
            cs: cs as isize,
        }
    }
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]`, `dst` with row stride `dst_rs` and unit column
/// stride.
///
/// # Safety
/// All operands must be valid for the given sizes and strides, and no other thread may touch
/// the written part of `dst`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *dst.add(i * dst_rs + j) = T::zero();
                }
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        T::one(),
        T::one(),
        false,
        false,
        false,
        par,
    );
}

/// `dst[m, n] = scale · lhs[m, k] · rhs[k, n]` on the caller's thread, `dst` contiguous: the
/// attention kernels' scores, scaled inside the GEMM instead of in a second pass over `dst`.
pub(crate) fn gemm_scaled<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    lhs: Mat<T>,
    rhs: Mat<T>,
    scale: T,
) {
    assert!(dst.len() >= m * n, "gemm_scaled: destination too short");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        dst[..m * n].fill(T::zero());
        return;
    }
    // SAFETY: `dst` is an exclusive slice of at least m·n elements; operands are built by the
    // callers from slices whose sizes the public functions validated.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            T::one(),
            scale,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// Safe wrapper for a contiguous destination slice `[m, n]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_into<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
    par: Parallelism,
) {
    debug_assert!(dst.len() >= m * n);
    // SAFETY: `dst` is an exclusive slice of at least m·n elements; operands are built by the
    // callers from slices whose sizes the public functions validated.
    unsafe { gemm_raw(m, n, k, dst.as_mut_ptr(), n, accumulate, lhs, rhs, par) }
}

/// gemm's own parallelism when there are too few independent tasks to keep the pool busy.
pub(crate) fn inner_par(tasks: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && tasks < 2 * threads {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// Whether `par` (from [`inner_par`]) lets a kernel split its own work over the pool.
pub(crate) fn splits(par: Parallelism) -> bool {
    !matches!(par, Parallelism::None)
}

/// `src [rows, cols]` transposed into a new `[cols, rows]`, in cache-sized tiles, in parallel
/// over column tiles.
///
/// Why: after gemm turns a row-major product into its column-major form, the right operand
/// becomes the packed left one, and a right operand read down its columns (`Wᵀ` of a row-major
/// weight) is packed one strided scalar at a time, again for every call. A kernel that runs many
/// small GEMMs against one weight transposes it once instead (the routed FFN's grouped GEMMs
/// spent ~15 % of their time in that packing).
pub(crate) fn transpose<T: Float>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    use rayon::prelude::*;
    const TILE: usize = 32;
    assert!(src.len() >= rows * cols, "transpose: source too short");
    let mut dst = vec![T::zero(); rows * cols];
    if rows == 0 || cols == 0 {
        return dst;
    }
    dst.par_chunks_mut(TILE * rows).enumerate().for_each(|(jt, out)| {
        let j0 = jt * TILE;
        let nj = out.len() / rows;
        for i0 in (0..rows).step_by(TILE) {
            let m = TILE.min(rows - i0);
            T::transpose_tile(&src[i0 * cols + j0..], cols, &mut out[i0..], rows, m, nj);
        }
    });
    dst
}

/// [`transpose`] on the calling thread into `dst`, a buffer reused across calls: it is only
/// grown (zero-filled) when too short, never zeroed again. For small transposes inside another
/// op's parallel tasks (the bf16 attention backward's per-tile `Pᵀ` and `dSᵀ`), where a fresh
/// zeroed buffer and rayon's split cost about as much as the transpose.
pub(crate) fn transpose_into<T: Float>(src: &[T], rows: usize, cols: usize, dst: &mut Vec<T>) {
    const TILE: usize = 32;
    assert!(src.len() >= rows * cols, "transpose_into: source too short");
    let n = rows * cols;
    if dst.len() < n {
        dst.resize(n, T::zero());
    } else {
        dst.truncate(n);
    }
    for j0 in (0..cols).step_by(TILE) {
        let nj = TILE.min(cols - j0);
        for i0 in (0..rows).step_by(TILE) {
            let m = TILE.min(rows - i0);
            T::transpose_tile(
                &src[i0 * cols + j0..],
                cols,
                &mut dst[j0 * rows + i0..],
                rows,
                m,
                nj,
            );
        }
    }
}

/// `src [n·block, cols]` as n blocks of `block` rows, each transposed: `[n, cols, block]`, in
/// parallel over blocks. A routed FFN's block of `Wᵀ` is then one compact `[d, block]` matrix
/// whose rows lie `block` apart, not a weight row (12 KB at d_ff 3072) apart.
pub(crate) fn transpose_blocks<T: Float>(src: &[T], rows: usize, cols: usize, block: usize) -> Vec<T> {
    use rayon::prelude::*;
    const TILE: usize = 32;
    assert!(
        block > 0 && rows.is_multiple_of(block),
        "transpose_blocks: {rows} rows in blocks of {block}"
    );
    assert!(src.len() >= rows * cols, "transpose_blocks: source too short");
    let mut dst = vec![T::zero(); rows * cols];
    if rows == 0 || cols == 0 {
        return dst;
    }
    dst.par_chunks_mut(block * cols).enumerate().for_each(|(e, out)| {
        let src = &src[e * block * cols..];
        for j0 in (0..cols).step_by(TILE) {
            let nj = TILE.min(cols - j0);
            for i0 in (0..block).step_by(TILE) {
                let m = TILE.min(block - i0);
                T::transpose_tile(
                    &src[i0 * cols + j0..],
                    cols,
                    &mut out[j0 * block + i0..],
                    block,
                    m,
                    nj,
                );
            }
        }
    });
    dst
}

/// `src [rows, n·block]` as n blocks of `block` columns, each made compact: `[n, rows, block]`,
/// in parallel over blocks (see [`transpose_blocks`]).
pub(crate) fn column_blocks<T: Float>(src: &[T], rows: usize, cols: usize, block: usize) -> Vec<T> {
    use rayon::prelude::*;
    assert!(
        block > 0 && cols.is_multiple_of(block),
        "column_blocks: {cols} columns in blocks of {block}"
    );
    assert!(src.len() >= rows * cols, "column_blocks: source too short");
    let mut dst = vec![T::zero(); rows * cols];
    if rows == 0 || cols == 0 {
        return dst;
    }
    dst.par_chunks_mut(rows * block).enumerate().for_each(|(e, out)| {
        for (i, row) in out.chunks_mut(block).enumerate() {
            row.copy_from_slice(&src[i * cols + e * block..][..block]);
        }
    });
    dst
}

/// A 2-D CPU tensor's elements in row-major order, as a new vector. A transposed view (a
/// weight stored `[in, out]`, as GPT-2's Conv1D layers are, read as `[out, in]`) goes through
/// [`transpose`] in parallel tiles; `Tensor::contiguous` would copy it one strided element at a
/// time on one thread (7 ms per GPT-2 FFN weight, with the other core idle).
pub(crate) fn row_major<T: Float + candle_core::WithDType>(op: &str, t: &Tensor) -> Result<Vec<T>> {
    let (rows, cols) = t.dims2()?;
    let transposed = {
        let (storage, layout) = t.storage_and_layout();
        match &*storage {
            Storage::Cpu(cpu) if layout.is_contiguous() => {
                return Ok(crate::util::contiguous::<T>(op, "weight", cpu, layout)?.to_vec());
            }
            Storage::Cpu(cpu) if layout.stride() == [1, rows] => {
                let start = layout.start_offset();
                let s = cpu.as_slice::<T>()?;
                // The storage holds the [cols, rows] transpose contiguously.
                Some(transpose(&s[start..start + rows * cols], cols, rows))
            }
            _ => None,
        }
    };
    match transposed {
        Some(v) => Ok(v),
        None => t.contiguous()?.flatten_all()?.to_vec1::<T>(),
    }
}

#[cfg(test)]
mod tests {
    use super::{column_blocks, row_major, transpose, transpose_blocks, transpose_into, Tensor};

    #[test]
    fn row_major_reads_contiguous_and_transposed_views() -> candle_core::Result<()> {
        let t = Tensor::arange(0f32, 35., &candle_core::Device::Cpu)?.reshape((5, 7))?;
        for v in [t.clone(), t.t()?, t.t()?.contiguous()?, t.narrow(1, 2, 3)?] {
            let want: Vec<f32> = v.contiguous()?.flatten_all()?.to_vec1()?;
            assert_eq!(
                row_major::<f32>("test", &v)?,
                want,
                "{:?} {:?}",
                v.dims(),
                v.stride()
            );
        }
        Ok(())
    }

    #[test]
    fn transpose_matches_the_definition_on_ragged_tiles() {
        // Sizes around the 32-element tile (below, equal, above, empty), and tiles whose sides
        // are not multiples of the 8 × 8 register blocks (edges on both sides).
        for (rows, cols) in [
            (1, 1),
            (3, 70),
            (32, 32),
            (65, 33),
            (100, 1),
            (0, 5),
            (5, 0),
            (45, 29),
            (20, 100),
            (70, 13),
            (8, 8),
            (9, 15),
        ] {
            // f32 takes the register path (where the CPU has AVX2), f64 the element loop.
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            check(&src, &transpose(&src, rows, cols), rows, cols);
            let src: Vec<f64> = (0..rows * cols).map(|i| i as f64).collect();
            check(&src, &transpose(&src, rows, cols), rows, cols);
        }
    }

    #[test]
    fn transpose_into_matches_the_definition_with_a_reused_buffer() {
        // One buffer through growing and shrinking sizes: stale values past the new size, or
        // left from a larger earlier call, must not show.
        let mut buf: Vec<f32> = Vec::new();
        for (rows, cols) in [(65, 33), (3, 70), (128, 512), (0, 5), (45, 29), (64, 300), (1, 1)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32 - 7.0).collect();
            transpose_into(&src, rows, cols, &mut buf);
            assert_eq!(buf.len(), rows * cols);
            check(&src, &buf, rows, cols);
        }
    }

    #[test]
    fn blocks_match_the_definition() {
        // Blocks narrower and wider than the 32-element tile, one block (a plain transpose),
        // ragged sides.
        for (n, block, other) in [
            (3, 64, 70),
            (2, 5, 33),
            (1, 40, 9),
            (4, 1, 3),
            (6, 32, 32),
            (0, 8, 4),
        ] {
            let src: Vec<f32> = (0..n * block * other).map(|i| i as f32).collect();
            // [n·block, other] → [n, other, block].
            let t = transpose_blocks(&src, n * block, other, block);
            for (e, j, i) in
                (0..n).flat_map(|e| (0..block).flat_map(move |j| (0..other).map(move |i| (e, j, i))))
            {
                assert_eq!(
                    t[(e * other + i) * block + j],
                    src[(e * block + j) * other + i],
                    "({n}, {block}, {other})"
                );
            }
            // [other, n·block] → [n, other, block].
            let c = column_blocks(&src, other, n * block, block);
            for (e, o, j) in
                (0..n).flat_map(|e| (0..other).flat_map(move |o| (0..block).map(move |j| (e, o, j))))
            {
                assert_eq!(
                    c[(e * other + o) * block + j],
                    src[o * n * block + e * block + j],
                    "({n}, {block}, {other})"
                );
            }
        }
        let src: Vec<f64> = (0..45 * 29).map(|i| i as f64).collect();
        assert_eq!(transpose_blocks(&src, 45, 29, 45), transpose(&src, 45, 29));
    }

    fn check<T: PartialEq + std::fmt::Debug>(src: &[T], t: &[T], rows: usize, cols: usize) {
        assert_eq!(t.len(), rows * cols);
        for i in 0..rows {
            for j in 0..cols {
                assert_eq!(
                    t[j * rows + i],
                    src[i * cols + j],
                    "({rows}, {cols}) at ({i}, {j})"
                );
            }
        }
    }
}
