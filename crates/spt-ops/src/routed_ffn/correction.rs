//! The linear correction for the skipped blocks: `y += [x, 1] C` with a constant `C [d+1, d]`,
//! added when a token skips blocks.
//!
//! What a token's skipped blocks would have added is a nonlinear function of `x`, but a good
//! part of it is linear: on MiniLM at 4 of 8 blocks the routed output's cosine to the dense one,
//! averaged over tokens, rises from 0.80–0.83 to 0.85–0.90 (layers 0–4) with `C` fitted on 2,000
//! tokens. It costs one `[T, d] × [d, d]` GEMM per layer (about a quarter of the routed fc1 +
//! fc2 GEMMs at `d_ff = 4d` and half the blocks) and no weight-gradient work: like the frozen
//! weights it stands in for, `C` is a constant, fitted with the router.
//!
//! It is fitted by [`RoutedFfn::fit_correction`] (`calibrate.rs`).
//!
//! [`add_linear_correction`] adds it as one op. Composed (`y + x C_x + c_b`, candle's matmul),
//! the backward also forms `dC = xᵀ g`, a third `[T, d] × [d, d]` GEMM that is thrown away
//! since C is a constant: on GPT-2 small (B 4 × L 512, 2 of 8 blocks) the correction cost
//! 0.3–0.5 s of a 2.5 s step with bf16 products elsewhere. The op forms only `x C_x` and
//! `dx = g C_xᵀ`, and both take bf16 inputs under `MatmulPrecision::Bf16` (C is a weight).

use super::RoutedFfn;
use crate::blas::{gemm_into, inner_par, Mat};
use crate::precision::{bf16_matmul_t_par, bf16_weight};
use crate::util::{check_float, check_same, contiguous, if_tracked, with_slices, Float};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// `y + [x, 1] C` for `y, x [T, d]` and a constant `C [d+1, d]` (input rows, then the bias row),
/// differentiable in `y` and `x` (C gets no gradient: a tracked C is an error). On the CPU in
/// f32 and f64 one op (bf16 products under `MatmulPrecision::Bf16`); elsewhere the composed form
/// [`linear_correction_reference`].
pub fn add_linear_correction(y: &Tensor, x: &Tensor, c: &Tensor) -> Result<Tensor> {
    let op = "add_linear_correction";
    check_float(op, "x", x)?;
    check_same(op, &[("y", y), ("x", x), ("c", c)])?;
    crate::util::check_frozen(op, &[("c", c)])?;
    let d = match x.dims() {
        &[_, d] => d,
        dims => bail!("{op}: x is {dims:?}, expected [T, d]"),
    };
    if y.dims() != x.dims() || c.dims() != [d + 1, d] {
        bail!(
            "{op}: y {:?}, x {:?} and c {:?} do not form [T, d] + [T, d] · [d+1, d] with d = {d}",
            y.dims(),
            x.dims(),
            c.dims()
        );
    }
    if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) {
        return linear_correction_reference(y, x, c);
    }
    let fused = Correction { c: c.contiguous()? };
    y.contiguous()?.apply_op2(&x.contiguous()?, fused)
}

/// The composed form of [`add_linear_correction`], `y + x C[..d] + C[d]` with candle's ops: the
/// reference in tests and the path off the CPU.
pub fn linear_correction_reference(y: &Tensor, x: &Tensor, c: &Tensor) -> Result<Tensor> {
    let d = x.dim(1)?;
    let term = x.matmul(&c.narrow(0, 0, d)?)?.broadcast_add(&c.get(d)?)?;
    y.add(&term)
}

struct Correction {
    /// `[d+1, d]`, contiguous.
    c: Tensor,
}

/// `y + x C_x + c_b` with `C_x [d, d]` row-major followed by `c_b [d]` in `c`.
fn forward<T: Float>(y: &[T], x: &[T], c: &[T], d: usize) -> Vec<T> {
    if d == 0 {
        return y.to_vec();
    }
    let t = x.len() / d;
    let (cx, cb) = c.split_at(d * d);
    let mut out = crate::bias::add_rows(y, cb);
    // bf16: `x C_x` as `x Mᵀ` for M = C_xᵀ, packed from its transpose C_x row-major.
    let packed = bf16_weight(cx, d, d, true);
    if bf16_matmul_t_par(packed.as_ref(), x, t, &mut out, true) {
        return out;
    }
    let (lhs, rhs) = (Mat::new(x, 0, d, 1), Mat::new(cx, 0, d, 1));
    gemm_into(t, d, d, &mut out, true, lhs, rhs, inner_par(1));
    out
}

/// `dx = g C_xᵀ`.
fn backward_x<T: Float>(g: &[T], c: &[T], d: usize) -> Vec<T> {
    if d == 0 {
        return vec![T::zero(); g.len()];
    }
    let t = g.len() / d;
    let cx = &c[..d * d];
    let mut dx = vec![T::zero(); t * d];
    // bf16: `g C_xᵀ` as `g Mᵀ` for M = C_x, row-major.
    let packed = bf16_weight(cx, d, d, false);
    if bf16_matmul_t_par(packed.as_ref(), g, t, &mut dx, false) {
        return dx;
    }
    // C_xᵀ read in place: element (i, j) is C_x[j, i].
    let (lhs, rhs) = (Mat::new(g, 0, d, 1), Mat::new(cx, 0, 1, d));
    gemm_into(t, d, d, &mut dx, false, lhs, rhs, inner_par(1));
    dx
}

impl CustomOp2 for Correction {
    fn name(&self) -> &'static str {
        "add_linear_correction"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "add_linear_correction";
        let d = l2.dims()[1];
        macro_rules! run {
            ($t:ty) => {{
                let (y, x) = (
                    contiguous::<$t>(op, "y", s1, l1)?,
                    contiguous::<$t>(op, "x", s2, l2)?,
                );
                with_slices::<$t, _>(op, &[&self.c], |c| Ok(forward::<$t>(y, x, c[0], d)))?
            }};
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(run!(f32)),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(run!(f64)),
            _ => bail!("{op}: y and x must both be f32 or both f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = "add_linear_correction backward";
        let dx = if x.track_op() {
            let d = x.dim(1)?;
            macro_rules! run {
                ($t:ty) => {
                    with_slices::<$t, _>(op, &[grad, &self.c], |s| {
                        Tensor::from_vec(backward_x(s[0], s[1], d), x.dims(), x.device())
                    })?
                };
            }
            Some(match grad.dtype() {
                DType::F32 => run!(f32),
                DType::F64 => run!(f64),
                dt => bail!("{op}: unsupported dtype {dt:?}"),
            })
        } else {
            None
        };
        Ok((if_tracked(y, grad.clone()), dx))
    }
}

impl RoutedFfn {
    /// The linear correction `[d+1, d]` (input rows, then the bias row), if configured
    /// ([`RoutedFfnConfig::correction`](super::RoutedFfnConfig::correction)).
    pub fn correction(&self) -> Option<&Tensor> {
        self.correction.as_ref()
    }

    /// Whether `c` can be this layer's linear correction: the layer has one, `c` is `[d+1, d]`
    /// and finite (a NaN or infinity would reach the output of every token that skips a block).
    pub fn check_correction(&self, c: &Tensor) -> Result<()> {
        let d = self.d_model();
        if self.correction.is_none() {
            bail!("routed_ffn: a linear correction given, but the layer is configured without one");
        }
        if c.dims() != [d + 1, d] {
            bail!(
                "routed_ffn: the linear correction is {:?}, expected [d+1, d] = [{}, {d}]",
                c.dims(),
                d + 1
            );
        }
        // c − c is 0 where c is finite and NaN elsewhere: one reduction, no overflow.
        let bad = c.sub(c)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if bad != 0.0 {
            bail!(
                "routed_ffn: the linear correction {:?} holds a non-finite value (NaN or ±inf)",
                c.dims()
            );
        }
        Ok(())
    }

    /// Sets the linear correction (e.g. restored from a checkpoint): `[d+1, d]`, finite.
    pub fn set_correction(&mut self, c: &Tensor) -> Result<()> {
        self.check_correction(c)?;
        let Some(cur) = &mut self.correction else {
            bail!("routed_ffn: a linear correction given, but the layer is configured without one");
        };
        *cur = c
            .detach()
            .to_dtype(self.w1.dtype())?
            .to_device(self.w1.device())?;
        Ok(())
    }

    /// `y + [x, 1] C` for tokens `x2 [T, d]` and fc2's output `y [T, d]`, or y without a
    /// correction.
    pub(super) fn add_correction(&self, y: Tensor, x2: &Tensor) -> Result<Tensor> {
        let Some(c) = &self.correction else {
            return Ok(y);
        };
        if let Some(p) = self.packed_correction(&y, x2, c)? {
            let d = x2.dim(1)?;
            return y.add(&crate::packed_linear(x2, &p, Some(&c.get(d)?))?);
        }
        add_linear_correction(&y, x2, c)
    }

    /// `C_xᵀ` packed for bf16 products when this frozen layer's evaluation takes them
    /// (`MatmulPrecision::Bf16`, f32 on the CPU, nothing tracked): packed once per correction
    /// tensor and kept, as fc1's and fc2's blocks are (`frozen.rs`).
    fn packed_correction(&self, y: &Tensor, x2: &Tensor, c: &Tensor) -> Result<Option<crate::PackedWeight>> {
        if !self.frozen
            || crate::matmul_precision() != crate::MatmulPrecision::Bf16
            || !x2.device().is_cpu()
            || x2.dtype() != DType::F32
            || c.dtype() != DType::F32
            || x2.track_op()
            || y.track_op()
            || c.track_op()
        {
            return Ok(None);
        }
        let d = x2.dim(1)?;
        if d == 0 {
            return Ok(None);
        }
        // y = x C_x = x Wᵀ for W = C_xᵀ, the transposed view of C's first d rows, kept by C's id.
        let w = || c.narrow(0, 0, d)?.t();
        Ok(Some(self.frozen_operands.correction.get_or_pack_as(c.id(), w)?))
    }
}
