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

use super::RoutedFfn;
use candle_core::{bail, DType, Result, Tensor};

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

    /// `[x, 1] C` for tokens `x2 [T, d]`, or `None` without a correction.
    pub(super) fn correction_term(&self, x2: &Tensor) -> Result<Option<Tensor>> {
        let Some(c) = &self.correction else {
            return Ok(None);
        };
        let d = self.d_model();
        let w = c.narrow(0, 0, d)?; // [d, d]
        let b = c.get(d)?; // [d]
        Ok(Some(x2.matmul(&w)?.broadcast_add(&b)?))
    }
}
