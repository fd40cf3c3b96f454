//! Small helpers shared by the CPU kernels: dtype dispatch, slice access and argument checks.

use crate::row_gemm::RowGemm;
use candle_core::{bail, CpuStorage, DType, Layout, Result, Storage, Tensor, Var};

/// Float element types our CPU kernels are generic over (f32 for speed, f64 for gradient checks).
pub(crate) trait Float:
    num_traits::Float + Send + Sync + std::iter::Sum + std::fmt::Debug + 'static
{
    /// Converts an f64 constant.
    fn lit(v: f64) -> Self;

    /// One tile of a transpose: `dst[c·ds + r] = src[r·ss + c]` for `r < m`, `c < n`.
    fn transpose_tile(src: &[Self], ss: usize, dst: &mut [Self], ds: usize, m: usize, n: usize) {
        transpose_elems(src, ss, dst, ds, 0..m, 0..n);
    }

    /// Runs `g` into `c`, or returns false (writing nothing) where no kernel for this type and
    /// CPU exists or the kernel declines the shape (see `row_gemm::run_f32`); the caller then
    /// gathers, multiplies and scatters itself.
    fn row_gemm(g: &RowGemm<'_, Self>, c: &mut [Self]) -> bool {
        let _ = (g, c);
        false
    }

    /// The slice as f32, for kernels that exist only in f32 (the bf16 products of
    /// [`MatmulPrecision::Bf16`](crate::precision::MatmulPrecision)); None for other types.
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        let _ = s;
        None
    }

    /// [`Float::as_f32`], mutable.
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        let _ = s;
        None
    }
}

/// [`Float::transpose_tile`] element by element, over rows `rows` and columns `cols` of `src`.
fn transpose_elems<T: Copy>(
    src: &[T],
    ss: usize,
    dst: &mut [T],
    ds: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) {
    for c in cols {
        for r in rows.clone() {
            dst[c * ds + r] = src[r * ss + c];
        }
    }
}

impl Float for f32 {
    fn lit(v: f64) -> Self {
        v as f32
    }

    fn row_gemm(g: &RowGemm<'_, f32>, c: &mut [f32]) -> bool {
        crate::row_gemm::run_f32(g, c)
    }

    fn as_f32(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }

    fn as_f32_mut(s: &mut [f32]) -> Option<&mut [f32]> {
        Some(s)
    }

    /// 8 × 8 blocks transposed in registers where the CPU has AVX2, element by element at the
    /// edges: the scalar loop's strided reads made the weight transposes ~4 % of a GPT-2 step.
    fn transpose_tile(src: &[f32], ss: usize, dst: &mut [f32], ds: usize, m: usize, n: usize) {
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx2() && m >= 8 && n >= 8 {
            assert!(src.len() >= (m - 1) * ss + n && dst.len() >= (n - 1) * ds + m);
            let (m8, n8) = (m / 8 * 8, n / 8 * 8);
            for r in (0..m8).step_by(8) {
                for c in (0..n8).step_by(8) {
                    // SAFETY: r + 8 ≤ m and c + 8 ≤ n, so every row read and written lies
                    // within the lengths asserted above.
                    unsafe {
                        crate::simd::avx2::transpose8x8(
                            src.as_ptr().add(r * ss + c),
                            ss,
                            dst.as_mut_ptr().add(c * ds + r),
                            ds,
                        )
                    };
                }
            }
            // The edges: the rows below the blocks, then the columns right of them.
            transpose_elems(src, ss, dst, ds, m8..m, 0..n8);
            transpose_elems(src, ss, dst, ds, 0..m, n8..n);
            return;
        }
        transpose_elems(src, ss, dst, ds, 0..m, 0..n);
    }
}

impl Float for f64 {
    fn lit(v: f64) -> Self {
        v
    }
}

/// A softmax row's max. `max` skips NaN, so a row of NaN only (a diverged input) would read as a
/// fully masked row (max −∞, output 0); it gets NaN, which then propagates as it does in candle.
pub(crate) fn row_max<T: Float>(row: &[T]) -> T {
    // Sixteen running maxima, each a compare-and-select that the compiler turns into packed max
    // instructions (`fold(max)` is one serial chain: 7 % of the fused attention's samples). A NaN
    // compares false, so it is skipped, as `max` skips it.
    let pick = |a: T, x: T| if x > a { x } else { a };
    let mut acc = [T::neg_infinity(); 16];
    let chunks = row.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = pick(*a, x);
        }
    }
    let m = acc
        .into_iter()
        .chain(rest.iter().copied())
        .fold(T::neg_infinity(), pick);
    if m == T::neg_infinity() && row.iter().any(|x| x.is_nan()) {
        T::nan()
    } else {
        m
    }
}

/// A new `Vec` of `len` values written by `f(chunk index, chunk)` over parallel chunks of `chunk`
/// values, each chunk filled with `zero` by its own task just before `f` runs: a serial
/// `vec![0; len]` first was 3–7 % of a bf16 inference forward (a memset on one thread, then the
/// parallel writes over it).
pub(crate) fn par_vec<T: Copy + Send + Sync>(
    len: usize,
    chunk: usize,
    zero: T,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) -> Vec<T> {
    use rayon::prelude::*;
    let mut v: Vec<T> = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, c)| {
            for x in c.iter_mut() {
                x.write(zero);
            }
            // SAFETY: every element of `c` was written just above; `MaybeUninit<T>` has `T`'s
            // layout.
            let c = unsafe { &mut *(c as *mut [std::mem::MaybeUninit<T>] as *mut [T]) };
            f(i, c);
        });
    // SAFETY: the chunks cover all `len` slots, each initialised by its task.
    unsafe { v.set_len(len) };
    v
}

/// The contiguous slice a layout describes, or a named error.
pub(crate) fn contiguous<'a, T: candle_core::WithDType>(
    op: &str,
    arg: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!(
            "{op}: {arg} must be contiguous, got shape {:?} with strides {:?}",
            layout.dims(),
            layout.stride()
        )
    };
    let s = storage.as_slice::<T>()?;
    Ok(&s[start..end])
}

/// Runs `f` over the contiguous CPU data of `t` (made contiguous first if needed).
pub(crate) fn with_cpu<T: candle_core::WithDType, R>(
    op: &str,
    t: &Tensor,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    with_slices(op, &[t], |s| f(s[0]))
}

/// Runs `f` over the CPU data of `ts` (each made contiguous first if needed), borrowed from
/// their storage rather than copied: what a backward pass reads its saved tensors through.
pub(crate) fn with_slices<T: candle_core::WithDType, R>(
    op: &str,
    ts: &[&Tensor],
    f: impl FnOnce(&[&[T]]) -> Result<R>,
) -> Result<R> {
    let ts = ts.iter().map(|t| t.contiguous()).collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let slices = guards
        .iter()
        .map(|(storage, layout)| match &**storage {
            Storage::Cpu(cpu) => contiguous::<T>(op, "tensor", cpu, layout),
            _ => bail!("{op}: the backward pass for this device is not available; use the CPU or build with --features cuda"),
        })
        .collect::<Result<Vec<&[T]>>>()?;
    f(&slices)
}

/// Checks that `t` has a float dtype its device's kernels support: f32 or f64 on the CPU, and
/// also bf16 on CUDA (whose kernels take f32 and bf16).
pub(crate) fn check_float(op: &str, arg: &str, t: &Tensor) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F64 => Ok(()),
        DType::BF16 if t.device().is_cuda() => Ok(()),
        other => bail!("{op}: {arg} has dtype {other:?}, expected f32 or f64 (or bf16 on CUDA)"),
    }
}

/// Checks that all tensors share one dtype and one device.
pub(crate) fn check_same(op: &str, named: &[(&str, &Tensor)]) -> Result<()> {
    let (n0, t0) = named[0];
    for (n, t) in &named[1..] {
        if t.dtype() != t0.dtype() {
            bail!(
                "{op}: {n} has dtype {:?} but {n0} has {:?}",
                t.dtype(),
                t0.dtype()
            );
        }
        if !t.device().same_device(t0.device()) {
            bail!(
                "{op}: {n} is on {:?} but {n0} is on {:?}",
                t.device().location(),
                t0.device().location()
            );
        }
    }
    Ok(())
}

/// Attention inputs: q `[B, H, L_q, d]`, k `[B, H, L_k, d]`, v `[B, H, L_k, d_v]` of one float
/// dtype on one device. Returns `[B, H, L_q, L_k, d, d_v]`; the error names all three shapes.
pub(crate) fn check_qkv(op: &str, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<[usize; 6]> {
    check_float(op, "q", q)?;
    check_same(op, &[("q", q), ("k", k), ("v", v)])?;
    let shape_err = || {
        candle_core::Error::Msg(format!(
            "{op}: expected q [B, H, L_q, d], k [B, H, L_k, d], v [B, H, L_k, d_v]; got q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        ))
    };
    let (b, h, lq, d) = q.dims4().map_err(|_| shape_err())?;
    let (kb, kh, lk, kd) = k.dims4().map_err(|_| shape_err())?;
    let (vb, vh, vl, dv) = v.dims4().map_err(|_| shape_err())?;
    if (kb, kh, kd) != (b, h, d) || (vb, vh, vl) != (b, h, lk) || d == 0 || dv == 0 {
        return Err(shape_err());
    }
    Ok([b, h, lq, lk, d, dv])
}

/// The max (or, with `max` false, the min) of every entry of `t`, as a scalar tensor on its device:
/// per row of the last dimension first, then over rows, as a flat reduction would run as one CUDA
/// block over every entry. For checks that read one value back instead of copying `t` to the host.
pub(crate) fn reduce_all(t: &Tensor, max: bool) -> Result<Tensor> {
    let last = t.rank().saturating_sub(1);
    let rows = if max { t.max(last)? } else { t.min(last)? }.flatten_all()?;
    if max {
        rows.max(0)
    } else {
        rows.min(0)
    }
}

/// Deterministic parallel sum of per-chunk partial vectors: chunks are summed in index order.
pub(crate) fn sum_partials<T: Float, P: AsRef<[T]>>(
    partials: impl IntoIterator<Item = P>,
    n: usize,
) -> Vec<T> {
    let mut out = vec![T::zero(); n];
    for p in partials {
        for (o, &v) in out.iter_mut().zip(p.as_ref()) {
            *o = *o + v;
        }
    }
    out
}

/// A layer's own `Var` as its forward reads it: detached once the layer is frozen for inference,
/// and inside [`crate::no_grad`] (candle has none; an op records whenever an input is a `Var`).
pub(crate) fn read_var(v: &Var, frozen: bool) -> Tensor {
    read_tensor(v.as_tensor(), frozen)
}

/// A layer's weight tensor (a `Var`'s when it trains) as its forward reads it: detached when
/// `frozen` or inside [`crate::no_grad`].
pub(crate) fn read_tensor(t: &Tensor, frozen: bool) -> Tensor {
    if frozen || !crate::grad_enabled() {
        t.detach()
    } else {
        t.clone()
    }
}

/// Refuses a tracked tensor (a `Var`, or one an op recorded) among `named`: an op that
/// computes no gradient for these inputs would otherwise drop theirs silently.
pub(crate) fn check_frozen(op: &str, named: &[(&str, &Tensor)]) -> Result<()> {
    match named.iter().find(|(_, t)| t.track_op()) {
        Some((name, _)) => bail!("{op}: {name} must be frozen (it is tracked); train the adapters instead"),
        None => Ok(()),
    }
}

/// `Some(grad)` only if `input` needs a gradient: candle keeps every returned gradient until the
/// end of backward, so frozen inputs get `None`.
pub(crate) fn if_tracked(input: &Tensor, grad: Tensor) -> Option<Tensor> {
    input.track_op().then_some(grad)
}

/// Who made an op's index input (key codes, block lists): a caller, whose values are checked
/// (on a device that reads a value back), or spt-ops itself just before, in the same codebook or
/// selection ([`crate::pq_attention`]), valid by construction, so that path adds no device sync.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum MadeBy {
    Caller,
    SptOps,
}

#[cfg(test)]
mod tests {
    use super::row_max;

    /// The sixteen-lane max equals a serial `fold(max)` on rows of every length around the lane
    /// count, with NaN or −∞ among numbers, NaN among −∞ only and +∞ among numbers; a row with
    /// no number but NaN (and −∞) gives NaN.
    #[test]
    fn row_max_equals_the_serial_max_and_skips_nan() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as f32 / (1u64 << 31) as f32 * 200.0 - 100.0
        };
        for len in 0..70 {
            for case in 0..6 {
                let row: Vec<f32> = (0..len)
                    .map(|i| match (case, i % 5) {
                        (1, 0) => f32::NAN,
                        (2, _) => f32::NEG_INFINITY,
                        (3, 3) => f32::NEG_INFINITY,
                        // A fully masked row with a NaN score, and +∞ among numbers.
                        (4, 0) => f32::NAN,
                        (4, _) => f32::NEG_INFINITY,
                        (5, 2) => f32::INFINITY,
                        _ => next(),
                    })
                    .collect();
                let want = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let got = row_max(&row);
                if want == f32::NEG_INFINITY && row.iter().any(|x| x.is_nan()) {
                    assert!(got.is_nan(), "len {len}, case {case}: {row:?} gave {got}");
                } else {
                    assert_eq!(got, want, "len {len}, case {case}: {row:?}");
                }
            }
            if len > 0 {
                assert!(row_max(&vec![f32::NAN; len]).is_nan(), "len {len}");
            }
        }
    }
}
