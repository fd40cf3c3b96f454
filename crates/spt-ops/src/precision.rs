//! The precision of the CPU kernels' products with a layer's weight and of the fused dense
//! attention's: f32 (the default, the dense model's numbers) or bf16 inputs with f32
//! accumulation.
//!
//! Intel CPUs with AMX (Sapphire Rapids and later) multiply bf16 matrices 5–7× faster than f32
//! ones (`amx.rs`'s ignored `timing` test, one thread, our weight shapes); PyTorch uses that
//! under `torch.autocast("cpu", dtype=torch.bfloat16)` (transformers' `bf16=True`). Like
//! PyTorch's `torch.set_float32_matmul_precision` and candle's `set_gemm_reduced_precision_f32`
//! for CUDA, this is one process-wide switch rather than an argument of every op: it is a
//! property of the run, and a model's layers all follow it.
//!
//! Under [`MatmulPrecision::Bf16`] these products take bf16 inputs (round to nearest even) and
//! accumulate in f32:
//! - [`lora_linear`](crate::lora_linear)'s `x (W + s·B A)ᵀ` (from 65 rows on) and its
//!   backward's `dx = g (W + s·B A)`;
//! - the LoRA routed FFN's fc1, fc2 and their input gradients, block by block (and a frozen
//!   routed FFN's fc1 and fc2 where nothing is tracked);
//! - every routed FFN's linear correction, `x C` and `dx = g Cᵀ`;
//! - [`linear_cross_entropy`](crate::linear_cross_entropy)'s logits and `dh`;
//! - every product of [`flash_attention`](fn@crate::flash_attention) (scores, `P V`, and the
//!   backward's four), as PyTorch's attention runs under bf16 autocast;
//! - in inference, a frozen layer's product with its weight packed once
//!   ([`packed_linear`](fn@crate::packed_linear)): a frozen [`LoraLinear`](crate::LoraLinear) and
//!   routed FFN (its blocks and correction), and in spt-models a frozen `Linear` and GPT-2's
//!   decoding head.
//!
//! The adapters' rank-r products, every weight gradient, the sparse attention kernels and every
//! other op stay f32. Where the CPU has no AMX the same rounded products are computed in f32
//! (the last bits may differ; slower than f32 products: see [`bf16_matmul_is_native`]). f64 and
//! non-CPU tensors are not affected.

use crate::amx::{self, Bf16Matrix};
use crate::util::Float;
use std::sync::atomic::{AtomicU8, Ordering};

/// How the CPU kernels multiply by a layer's weight and in attention (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatmulPrecision {
    /// f32 products: the dense model's numbers.
    #[default]
    F32,
    /// bf16 inputs, f32 accumulation (AMX where the CPU has it).
    Bf16,
}

impl std::str::FromStr for MatmulPrecision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            _ => Err(format!("expected f32 or bf16, got `{s}`")),
        }
    }
}

impl std::fmt::Display for MatmulPrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

static PRECISION: AtomicU8 = AtomicU8::new(0);

/// Sets the precision of every later product the module docs list, in every thread.
pub fn set_matmul_precision(p: MatmulPrecision) {
    PRECISION.store(p as u8, Ordering::Relaxed);
}

/// The precision [`set_matmul_precision`] set (f32 until it is called).
pub fn matmul_precision() -> MatmulPrecision {
    match PRECISION.load(Ordering::Relaxed) {
        0 => MatmulPrecision::F32,
        _ => MatmulPrecision::Bf16,
    }
}

/// Whether this CPU runs bf16 products on AMX. Without it [`MatmulPrecision::Bf16`] still gives
/// its values, computed in f32 from the rounded inputs, which is slower than f32 products.
pub fn bf16_matmul_is_native() -> bool {
    crate::amx::amx_available()
}

/// Whether `T`'s products with a weight take bf16 inputs: f32 under [`MatmulPrecision::Bf16`].
pub(crate) fn bf16_products<T: Float>() -> bool {
    matmul_precision() == MatmulPrecision::Bf16 && T::as_f32(&[]).is_some()
}

/// `M [rows, cols]` packed for bf16 products (from `Mᵀ` row-major when `transposed`) where `T`'s
/// products take bf16 inputs; None where the caller multiplies in `T`.
pub(crate) fn bf16_weight<T: Float>(
    m: &[T],
    rows: usize,
    cols: usize,
    transposed: bool,
) -> Option<Bf16Matrix> {
    // An empty product (a zero-width layer) is the f32 path's empty loops.
    if !bf16_products::<T>() || rows == 0 || cols == 0 {
        return None;
    }
    T::as_f32(m).map(|m| Bf16Matrix::pack(m, rows, cols, transposed))
}

/// `c (+)= a Mᵀ` in bf16 for `a [m, M.cols]` on this thread when `packed` holds M; false (c
/// untouched) where the caller multiplies in `T` itself.
pub(crate) fn bf16_matmul_t<T: Float>(
    packed: Option<&Bf16Matrix>,
    a: &[T],
    m: usize,
    c: &mut [T],
    accumulate: bool,
) -> bool {
    packed.is_some_and(|p| bf16_matmul_t_part(Some(p), a, m, (p.rows(), p.cols()), c, accumulate))
}

/// [`bf16_matmul_t`] with the first `n` rows and `k` columns of M only: `c [m, n] (+)= a [m, k] ·
/// M[..n, ..k]ᵀ` (see `amx::matmul_t_part`).
pub(crate) fn bf16_matmul_t_part<T: Float>(
    packed: Option<&Bf16Matrix>,
    a: &[T],
    m: usize,
    part: (usize, usize),
    c: &mut [T],
    accumulate: bool,
) -> bool {
    match (packed, T::as_f32(a), T::as_f32_mut(c)) {
        (Some(p), Some(a), Some(c)) => {
            amx::matmul_t_part(a, m, p, part, c, accumulate);
            true
        }
        _ => false,
    }
}

/// Rows per task of [`bf16_matmul_t_par`]: the AMX kernel's slab.
const ROWS_PER_TASK: usize = 256;

/// [`bf16_matmul_t`] for `c (+)= a Mᵀ` over rayon tasks (slabs of rows × groups of columns, see
/// `amx::matmul_t_grid`: few rows still use every thread), for callers that make one product.
pub(crate) fn bf16_matmul_t_par<T: Float>(
    packed: Option<&Bf16Matrix>,
    a: &[T],
    m: usize,
    c: &mut [T],
    accumulate: bool,
) -> bool {
    let (Some(p), Some(a), Some(c)) = (packed, T::as_f32(a), T::as_f32_mut(c)) else {
        return false;
    };
    amx::matmul_t_grid(a, m, p, c, accumulate, ROWS_PER_TASK);
    true
}
