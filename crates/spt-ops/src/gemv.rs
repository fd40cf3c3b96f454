//! Matrix-vector products on every thread, for decoding one token: `y = W x` with `W [out, in]`
//! row-major, and `y = xᵀ W` with `W [in, out]` row-major (GPT-2's Conv1D layout).
//!
//! Why not gemm: it runs a matrix-vector product on one thread whatever parallelism it is
//! given, at ~15 GB/s of matrix read on this project's Intel Xeon, where two threads of plain
//! FMA loops read ~2× that (PyTorch's MKL: ~50 GB/s in cache). Both sum in an order that does
//! not depend on the thread count.

use crate::simd::Vector;
use rayon::prelude::*;

/// Rows of `W [out, in]` per task: ~128 KiB of f32 at `in` = 768.
const ROWS_PER_TASK: usize = 48;
/// Rows of `W [in, out]` per partial sum: each task streams whole rows, and the partial sums
/// are added in block order.
const K_PER_BLOCK: usize = 128;

/// `y[j] = W[j, :] · x` for a row-major `w [out, in]`, `in = x.len()`.
pub(crate) fn rows_dot<T: Vector>(w: &[T], x: &[T], y: &mut [T]) {
    let d_in = x.len();
    assert_eq!(w.len(), y.len() * d_in, "gemv: W is not [out, in]");
    if d_in == 0 {
        y.fill(T::zero());
        return;
    }
    y.par_chunks_mut(ROWS_PER_TASK)
        .zip(w.par_chunks(ROWS_PER_TASK * d_in))
        .for_each(|(yc, wc)| {
            let mut rows = wc.chunks_exact(d_in);
            let mut j = 0;
            while j + 4 <= yc.len() {
                let r = [(); 4].map(|_| rows.next().expect("four rows"));
                yc[j..j + 4].copy_from_slice(&T::dot4(x, r));
                j += 4;
            }
            for (yj, r) in yc[j..].iter_mut().zip(rows) {
                *yj = T::dot(x, r);
            }
        });
}

/// `y[j] = Σ_k x[k] · W[k, j]` for a row-major `w [in, out]`, `out = y.len()`.
pub(crate) fn cols_axpy<T: Vector>(w: &[T], x: &[T], y: &mut [T]) {
    let out = y.len();
    assert_eq!(w.len(), x.len() * out, "gemv: W is not [in, out]");
    if x.is_empty() || out == 0 {
        y.fill(T::zero());
        return;
    }
    let partials: Vec<Vec<T>> = x
        .par_chunks(K_PER_BLOCK)
        .zip(w.par_chunks(K_PER_BLOCK * out))
        .map(|(xb, wb)| {
            let mut acc = vec![T::zero(); out];
            let mut rows = wb.chunks_exact(out);
            let mut k = 0;
            while k + 4 <= xb.len() {
                let r = [(); 4].map(|_| rows.next().expect("four rows"));
                T::axpy4([xb[k], xb[k + 1], xb[k + 2], xb[k + 3]], r, &mut acc);
                k += 4;
            }
            for (&a, r) in xb[k..].iter().zip(rows) {
                T::axpy(a, r, &mut acc);
            }
            acc
        })
        .collect();
    y.copy_from_slice(&partials[0]);
    for p in &partials[1..] {
        for (yj, &v) in y.iter_mut().zip(p) {
            *yj = *yj + v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both forms against an f64 sum, in f32 and f64, at sizes that leave partial row groups,
    /// task chunks and k blocks.
    #[test]
    fn matrix_vector_products_match_a_plain_sum() {
        fn check<T: Vector + Into<f64>>(from: impl Fn(f64) -> T, tol: f64) {
            let mut seed = 0x2545_F491_4F6C_DD1Du64;
            let mut rand = || {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                from(((seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0)
            };
            for (out, d_in) in [
                (0usize, 4usize),
                (4, 0),
                (1, 1),
                (3, 5),
                (101, 299),
                (1000, 130),
                (50, 1031),
            ] {
                let w: Vec<T> = (0..out * d_in).map(|_| rand()).collect();
                let x: Vec<T> = (0..d_in).map(|_| rand()).collect();
                let mut y = vec![from(f64::NAN); out];
                rows_dot(&w, &x, &mut y);
                for (j, &v) in y.iter().enumerate() {
                    let want: f64 = (0..d_in).map(|k| w[j * d_in + k].into() * x[k].into()).sum();
                    assert!(
                        (v.into() - want).abs() <= tol * (1.0 + want.abs()),
                        "rows {out}x{d_in} [{j}]"
                    );
                }
                // The same numbers read as [in, out] with in = out here and out = d_in.
                let mut y = vec![from(f64::NAN); d_in];
                let xo: Vec<T> = (0..out).map(|_| rand()).collect();
                cols_axpy(&w, &xo, &mut y);
                for (j, &v) in y.iter().enumerate() {
                    let want: f64 = (0..out).map(|k| xo[k].into() * w[k * d_in + j].into()).sum();
                    assert!(
                        (v.into() - want).abs() <= tol * (1.0 + want.abs()),
                        "cols {out}x{d_in} [{j}]"
                    );
                }
            }
        }
        check::<f32>(|v| v as f32, 1e-5);
        check::<f64>(|v| v, 1e-13);
    }
}
