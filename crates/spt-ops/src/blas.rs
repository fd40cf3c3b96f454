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

impl<T> SendPtr<T> {
    /// The pointer (a method, so that a closure captures the whole `SendPtr`, not its field).
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// A strided matrix operand: element (i, j) is at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<T> {
    pub(crate) ptr: *const T,
    pub(crate) rs: isize,
    pub(crate) cs: isize,
}

// SAFETY: a read-only view; whoever builds one keeps its data alive and unwritten while any
// thread reads through it (gemm_raw's split reads one from every task).
unsafe impl<T: Sync> Send for Mat<T> {}
unsafe impl<T: Sync> Sync for Mat<T> {}

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
    if let Some(chunk) = vector_chunk(m, n, k) {
        // A matrix-vector product: gemm runs it on one thread whatever `par` says, and it is
        // bound by reading the matrix, which one core of some CPUs does at a third of what two
        // do (GPT-2's head, one row: 14.7 GB/s on one core of this project's Intel Xeon, 41 on
        // two). So the long side is cut into blocks of a fixed length, one gemm call each, run
        // on the pool when `par` allows and in order when not: the blocks, and so every sum,
        // do not depend on the thread count.
        let dst = SendPtr(dst);
        let (len, rows) = if n == 1 { (m, true) } else { (n, false) };
        let block = |c: usize| {
            let (start, size) = (c * chunk, chunk.min(len - c * chunk));
            // SAFETY: each block writes its own rows (n = 1) or columns (m = 1) of `dst`, and
            // reads the matching rows of `lhs` or columns of `rhs`, all inside the caller's sizes.
            unsafe {
                if rows {
                    let lhs = Mat {
                        ptr: lhs.ptr.offset(start as isize * lhs.rs),
                        ..lhs
                    };
                    let d = dst.get().add(start * dst_rs);
                    gemm_call(size, 1, k, d, dst_rs, accumulate, lhs, rhs, Parallelism::None);
                } else {
                    let rhs = Mat {
                        ptr: rhs.ptr.offset(start as isize * rhs.cs),
                        ..rhs
                    };
                    let d = dst.get().add(start);
                    gemm_call(1, size, k, d, dst_rs, accumulate, lhs, rhs, Parallelism::None);
                }
            }
        };
        let blocks = len.div_ceil(chunk);
        if matches!(par, Parallelism::Rayon(t) if t != 1) && rayon::current_num_threads() > 1 {
            use rayon::prelude::*;
            (0..blocks).into_par_iter().for_each(block);
        } else {
            (0..blocks).for_each(block);
        }
        return;
    }
    gemm_call(m, n, k, dst, dst_rs, accumulate, lhs, rhs, par);
}

/// The block length a matrix-vector product (`m` or `n` is 1) is cut into, or `None` for a
/// product gemm should run as it is: not a vector, or under ~256 KiB of matrix or 256 long
/// (where blocks cost more than they gain). Fixed, so that results do not depend on the pool.
fn vector_chunk(m: usize, n: usize, k: usize) -> Option<usize> {
    const BLOCK: usize = 128;
    let len = match (m, n) {
        (len, 1) | (1, len) => len,
        _ => return None,
    };
    (len >= 2 * BLOCK && len * k >= 1 << 16).then_some(BLOCK)
}

/// # Safety
/// As [`gemm_raw`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_call<T: Float>(
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
    use super::{gemm_into, row_major, transpose, Mat, Parallelism, Tensor};

    /// A matrix-vector product cut into blocks gives the same bits on the pool and on one
    /// thread, equals an f64 sum to rounding, and writes nothing else: both sides (n = 1 and
    /// m = 1), overwrite and accumulate, f32 and f64, lengths that do not divide into the
    /// blocks, and a destination with a row stride.
    #[test]
    fn split_matrix_vector_products_are_exact_and_pool_independent() {
        fn check<T: crate::util::Float + std::fmt::Debug + Into<f64>>(from: impl Fn(f64) -> T, tol: f64) {
            let mut seed = 0x9E37_79B9_7F4A_7C15u64;
            let mut rand = move || {
                seed = seed
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                from(((seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0)
            };
            for &(len, k) in &[(1000usize, 300usize), (4099, 96), (257, 257)] {
                let mat: Vec<T> = (0..len * k).map(|_| rand()).collect();
                let vec: Vec<T> = (0..k).map(|_| rand()).collect();
                let start: Vec<T> = (0..len * 2).map(|_| rand()).collect();
                let dot = |i: usize| -> f64 { (0..k).map(|j| mat[i * k + j].into() * vec[j].into()).sum() };
                for accumulate in [false, true] {
                    for column in [true, false] {
                        let (m, n) = if column { (len, 1) } else { (1, len) };
                        assert!(super::vector_chunk(m, n, k).is_some());
                        let run = |par: Parallelism| {
                            let mut dst = start.clone();
                            // SAFETY: dst holds len rows of stride 2 (n = 1) or one row of 2·len
                            // (m = 1); the operands are len × k and k long.
                            unsafe {
                                if column {
                                    let (l, r) = (Mat::new(&mat, 0, k, 1), Mat::new(&vec, 0, 1, 1));
                                    super::gemm_raw(len, 1, k, dst.as_mut_ptr(), 2, accumulate, l, r, par);
                                } else {
                                    let (l, r) = (Mat::new(&vec, 0, k, 1), Mat::new(&mat, 0, 1, k));
                                    super::gemm_raw(
                                        1,
                                        len,
                                        k,
                                        dst.as_mut_ptr(),
                                        2 * len,
                                        accumulate,
                                        l,
                                        r,
                                        par,
                                    );
                                }
                            }
                            dst
                        };
                        let (one, split) = (run(Parallelism::None), run(Parallelism::Rayon(2)));
                        // The blocks do not depend on the pool: the same bits on one thread.
                        let bits = |v: &[T]| {
                            v.iter()
                                .map(|&x| Into::<f64>::into(x).to_bits())
                                .collect::<Vec<_>>()
                        };
                        assert_eq!(
                            bits(&one),
                            bits(&split),
                            "len {len} k {k}: the pool changed the sums"
                        );
                        for (at, ((&a, &b), &s0)) in one.iter().zip(&split).zip(&start).enumerate() {
                            let out = if column {
                                (at % 2 == 0).then_some(at / 2)
                            } else {
                                (at < len).then_some(at)
                            };
                            let (a, b, s0): (f64, f64, f64) = (a.into(), b.into(), s0.into());
                            match out {
                                None => assert!(a == s0 && b == s0, "element {at} written"),
                                Some(i) => {
                                    let want = dot(i) + if accumulate { s0 } else { 0.0 };
                                    for got in [a, b] {
                                        assert!((got - want).abs() <= tol * (1.0 + want.abs()), "len {len} k {k} acc {accumulate} column {column} out {i}: {got} vs {want}");
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        check::<f32>(|v| v as f32, 1e-5);
        check::<f64>(|v| v, 1e-13);
        // Small products and true matrices are left to gemm as they are.
        assert!(super::vector_chunk(1000, 1, 16).is_none());
        assert!(super::vector_chunk(1000, 2, 768).is_none());
        assert!(super::vector_chunk(200, 1, 768).is_none());
        let mut y = vec![0f32; 3];
        gemm_into(
            3,
            1,
            2,
            &mut y,
            false,
            Mat::new(&[1f32, 2., 3., 4., 5., 6.], 0, 2, 1),
            Mat::new(&[1f32, 1.], 0, 1, 1),
            Parallelism::Rayon(2),
        );
        assert_eq!(y, [3., 7., 11.]);
    }

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
