//! Thin wrappers over the `gemm` crate for the CPU kernels: strided operands, accumulate or
//! overwrite, and the choice between gemm's own threads and the caller's rayon tasks.

use crate::util::Float;
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
