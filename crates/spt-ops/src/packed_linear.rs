//! A frozen linear layer's weight rounded to bf16 and packed once, for inference with bf16
//! products (`MatmulPrecision::Bf16`).
//!
//! Why: the training ops pack their weight on every call, since it changes every step. A frozen
//! weight does not change, and packing it costs about as much as multiplying it by a batch of a
//! few hundred rows (one pass over the f32 weight, reading more bytes than the product does at
//! AMX's rate), so inference keeps the packed copy (half the f32 weight's bytes) and pays only
//! the product. The grid of tasks (rows × column groups) keeps one text of a few dozen tokens on
//! every thread.

use crate::amx::Bf16Matrix;
use crate::util::with_slices;
use candle_core::{bail, DType, Result, Tensor};
use std::sync::Arc;

/// Rows per task of the product: the AMX kernel's slab.
const ROWS_PER_TASK: usize = 256;

/// A weight `W [out, in]` rounded to bf16 (nearest even) and packed for the CPU's bf16 kernel
/// (AMX tiles where the CPU has them), for [`packed_linear`]. Cheap to clone (shared).
#[derive(Clone)]
pub struct PackedWeight {
    packed: Arc<Bf16Matrix>,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedWeight")
            .field("out", &self.packed.rows())
            .field("in", &self.packed.cols())
            .finish()
    }
}

impl PackedWeight {
    /// Packs `w [out, in]`, an f32 CPU tensor: row-major, or the transposed view of a row-major
    /// `[in, out]` (GPT-2's Conv1D weight read as `[out, in]`) without a copy; other strides are
    /// made contiguous first. Its values are copied: later changes to `w` are not seen.
    pub fn new(w: &Tensor) -> Result<Self> {
        let op = "PackedWeight::new";
        let (out, d_in) = match w.dims() {
            &[o, i] if o > 0 && i > 0 => (o, i),
            d => bail!("{op}: w is {d:?}, expected [out, in] with out, in ≥ 1"),
        };
        if !w.device().is_cpu() || w.dtype() != DType::F32 {
            bail!(
                "{op}: w is {:?} on {:?}, expected f32 on the CPU",
                w.dtype(),
                w.device().location()
            );
        }
        // Read as Wᵀ row-major where w is the transposed view of one (no copy of the f32 data).
        let wt = w.t()?;
        let (src, transposed) = if !w.is_contiguous() && wt.is_contiguous() {
            (wt, true)
        } else {
            (w.clone(), false)
        };
        let packed =
            with_slices::<f32, _>(op, &[&src], |s| Ok(Bf16Matrix::pack(s[0], out, d_in, transposed)))?;
        Ok(Self {
            packed: Arc::new(packed),
        })
    }

    /// `out`: the rows of W.
    pub fn out_features(&self) -> usize {
        self.packed.rows()
    }

    /// `in`: the columns of W.
    pub fn in_features(&self) -> usize {
        self.packed.cols()
    }
}

/// A layer's [`PackedWeight`] kept across calls, by the id of the tensor it was packed from (a
/// new weight tensor is packed again): what a frozen layer holds for its inference forward.
#[derive(Debug, Default)]
pub struct PackedCache(std::sync::Mutex<Option<(candle_core::TensorId, PackedWeight)>>);

impl PackedCache {
    /// `w`'s packed form ([`PackedWeight::new`]), packed on first use. Packed with the lock
    /// released: packing runs rayon tasks, and a thread waiting on them may run another forward
    /// of the same layer (rayon-rs/rayon#1251).
    pub fn get_or_pack(&self, w: &Tensor) -> Result<PackedWeight> {
        self.get_or_pack_as(w.id(), || Ok(w.clone()))
    }

    /// [`get_or_pack`](Self::get_or_pack) of the weight `w()` makes (a view of another tensor),
    /// kept by `key`, the id of the tensor it is made from.
    pub fn get_or_pack_as(
        &self,
        key: candle_core::TensorId,
        w: impl FnOnce() -> Result<Tensor>,
    ) -> Result<PackedWeight> {
        let lock = || self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, p)) = lock().as_ref().filter(|(id, _)| *id == key) {
            return Ok(p.clone());
        }
        let p = PackedWeight::new(&w()?)?;
        *lock() = Some((key, p.clone()));
        Ok(p)
    }
}

/// `x Wᵀ + b` for `x [.., in]` (f32, CPU) with the packed `W [out, in]` and `b [out]`: bf16
/// inputs (x rounded to nearest even on the fly), f32 products and sums, the bias the sums'
/// starting value. For inference: it has no backward, so a tracked `x` or `b` is refused
/// (train through [`lora::linear`](crate::lora::linear) or candle's matmul). Each output is the
/// same bits on any thread count.
pub fn packed_linear(x: &Tensor, w: &PackedWeight, b: Option<&Tensor>) -> Result<Tensor> {
    let op = "packed_linear";
    let (out, d_in) = (w.out_features(), w.in_features());
    let dims = x.dims().to_vec();
    let Some((&last, lead)) = dims.split_last() else {
        bail!("{op}: x is a scalar, expected [.., {d_in}]")
    };
    if last != d_in {
        bail!("{op}: x is {dims:?}, expected [.., {d_in}] to match the packed weight [{out}, {d_in}]");
    }
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        bail!(
            "{op}: x is {:?} on {:?}, expected f32 on the CPU",
            x.dtype(),
            x.device().location()
        );
    }
    if x.track_op() {
        bail!("{op}: x is tracked, but this op has no backward (inference only)");
    }
    if let Some(b) = b {
        if b.dims() != [out] || b.dtype() != DType::F32 || !b.device().is_cpu() {
            bail!(
                "{op}: b is {:?} {:?} on {:?}, expected [{out}] f32 on the CPU",
                b.dims(),
                b.dtype(),
                b.device().location()
            );
        }
        if b.track_op() {
            bail!("{op}: b is tracked, but this op has no backward (inference only)");
        }
    }
    let rows: usize = lead.iter().product();
    let ins: Vec<&Tensor> = std::iter::once(x).chain(b).collect();
    let y = with_slices::<f32, _>(op, &ins, |s| {
        let mut y = match s.get(1) {
            Some(bias) => crate::bias::bias_rows(bias, rows),
            None => vec![0f32; rows * out],
        };
        crate::amx::matmul_t_grid(s[0], rows, &w.packed, &mut y, b.is_some(), ROWS_PER_TASK);
        Ok(y)
    })?;
    let mut out_dims = lead.to_vec();
    out_dims.push(out);
    Tensor::from_vec(y, out_dims, x.device())
}

/// [`packed_linear`]'s values from plain candle ops: x and w rounded to bf16 (candle's
/// conversion, nearest even), then an f32 matmul and the bias: the oracle of the tests.
pub fn packed_linear_reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let round = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
    let (rows, d_in) = (x.elem_count() / w.dim(1)?, w.dim(1)?);
    let mut y = round(&x.reshape((rows, d_in))?)?.matmul(&round(w)?.t()?)?;
    if let Some(b) = b {
        y = y.broadcast_add(b)?;
    }
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = w.dim(0)?;
    }
    y.reshape(dims)
}
