//! The linear correction for the skipped blocks: `y += [x, 1] C` with a constant `C [d+1, d]`,
//! added when a token skips blocks.
//!
//! What a token's skipped blocks would have added is a nonlinear function of `x`, but a good
//! part of it is linear: on MiniLM at 4 of 8 blocks the routed output's cosine to the dense one,
//! averaged over tokens, rises from 0.80–0.83 to 0.85–0.90 (layers 0–4) with `C` fitted on 2,000
//! tokens. It costs one `[T, d] × [d, d]` GEMM per layer (about a quarter of the routed fc1 +
//! fc2 GEMMs at `d_ff = 4d` and half the blocks) and no weight-gradient work: like the frozen
//! weights it stands in for, `C` is a constant, fitted with the router (and refitted with it).
//!
//! The fit is ridge least squares of the dense minus the routed output on `[x, 1]`, each token
//! weighted by `1 / ‖y_dense‖`, so that the few tokens with FFN outputs far above the median (up
//! to 34× on MiniLM) count no more than the others. (On MiniLM the unweighted fit is as good per
//! token, within 0.004 held out; the weighting is a safeguard, not a measured gain.)

use super::init::cholesky_solve;
use super::RoutedFfn;
use candle_core::{bail, DType, Result, Tensor};

impl RoutedFfn {
    /// The linear correction `[d+1, d]` (input rows, then the bias row), if configured
    /// ([`RoutedFfnConfig::correction`](super::RoutedFfnConfig::correction)).
    pub fn correction(&self) -> Option<&Tensor> {
        self.correction.as_ref()
    }

    /// Sets the linear correction (e.g. restored from a checkpoint): `[d+1, d]`.
    pub fn set_correction(&mut self, c: &Tensor) -> Result<()> {
        let d = self.d_model();
        let Some(cur) = &mut self.correction else {
            bail!("routed_ffn: a linear correction given, but the layer is configured without one");
        };
        if c.dims() != [d + 1, d] {
            bail!(
                "routed_ffn: the linear correction is {:?}, expected [d+1, d] = [{}, {d}]",
                c.dims(),
                d + 1
            );
        }
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

    /// Fits the linear correction to what the current routing (router, gates, skip biases,
    /// LoRA) misses of the dense FFN on the sample tokens. `ridge` is relative to the mean
    /// diagonal of the weighted `[x, 1]ᵀ[x, 1]`. Does nothing without
    /// [`correction`](super::RoutedFfnConfig::correction).
    pub fn fit_correction(&mut self, sample: &Tensor, ridge: f64) -> Result<()> {
        if self.correction.is_none() {
            return Ok(());
        }
        if ridge.is_nan() || ridge <= 0.0 {
            bail!("routed_ffn: the correction fit needs ridge > 0, got {ridge}");
        }
        let x2 = self.sample_tokens(sample)?.detach();
        let (s, d) = (x2.dim(0)?, self.d_model());
        let dt = self.w1.dtype();
        // Fit what the routing alone misses, whatever correction is in place now.
        let old = self
            .correction
            .replace(Tensor::zeros((d + 1, d), dt, x2.device())?);
        let fitted = (|| {
            let b2 = self.b2.detach().to_dtype(DType::F64)?;
            let routed = self.forward_t(&x2, false)?.y.detach().to_dtype(DType::F64)?;
            let dense = self.forward_dense(&x2, false)?.detach().to_dtype(DType::F64)?;
            let miss = dense.sub(&routed)?; // [S, d]
            let norm = dense.broadcast_sub(&b2)?.sqr()?.sum_keepdim(1)?.sqrt()?;
            let w = (norm + 1e-12)?.recip()?; // [S, 1]
            let xa = Tensor::cat(
                &[
                    x2.to_dtype(DType::F64)?,
                    Tensor::ones((s, 1), DType::F64, x2.device())?,
                ],
                1,
            )?
            .broadcast_mul(&w)?; // [S, d+1]
            let m = d + 1;
            let mut g: Vec<f64> = xa.t()?.matmul(&xa)?.flatten_all()?.to_vec1()?;
            let r: Vec<f64> = xa
                .t()?
                .matmul(&miss.broadcast_mul(&w)?)?
                .flatten_all()?
                .to_vec1()?;
            let mean_diag = (0..m).map(|i| g[i * m + i]).sum::<f64>() / m as f64;
            for i in 0..m {
                g[i * m + i] += ridge * mean_diag.max(1e-12);
            }
            let c = cholesky_solve(&g, &r, m, d)?;
            Tensor::from_vec(c, (m, d), x2.device())?.to_dtype(dt)
        })();
        match fitted {
            Ok(c) => {
                self.correction = Some(c);
                Ok(())
            }
            Err(e) => {
                self.correction = old;
                Err(e)
            }
        }
    }
}
