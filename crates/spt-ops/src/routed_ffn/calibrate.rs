//! Calibration of a routed FFN on sample tokens from the pretrained model: the router fit (the
//! reference implementation starts the router at random), the linear correction's fit, and a
//! report of how well the routed output reproduces the dense one.
//!
//! The correction's fit is ridge least squares of the dense minus the routed output on `[x, 1]`,
//! each token weighted by `1 / ‖y_dense‖`, so that the few tokens with FFN outputs far above the
//! median (up to 34× on MiniLM) count no more than the others. (On MiniLM the unweighted fit is
//! as good per token, within 0.004 held out; the weighting is a safeguard, not a measured gain.)

use super::{GateMode, RoutedFfn, Routing};
use candle_core::{bail, DType, Result, Tensor, D};
use std::sync::Arc;

/// How [`RoutedFfn::init_router`] fits the router: its scores are fitted to rank each token's
/// blocks by their hidden activation norm `‖act(x W1_eᵀ + b1_e)‖`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterFitConfig {
    /// Ridge penalty, relative to the mean diagonal of `XᵀX`.
    pub ridge: f64,
    /// The fitted scores approximate `score_scale ·` (per-token standardised block activation
    /// norms). Ranking does not depend on it; the gates do: a small scale keeps the initial
    /// softmax-kept gates near 1, i.e. close to the dense FFN restricted to the kept blocks.
    pub score_scale: f64,
    /// Ridge penalty of the linear correction's fit (if the layer has one), relative to the
    /// mean diagonal of the weighted `[x, 1]ᵀ[x, 1]`. 0.1 suits a few thousand tokens at
    /// d = 384: fitted on 2,000 MiniLM tokens it reached a held-out per-token cosine within
    /// 0.01 of a fit on 5,000, where 1e-3 fell 0.02 short.
    #[serde(default = "default_correction_ridge")]
    pub correction_ridge: f64,
}

fn default_correction_ridge() -> f64 {
    RouterFitConfig::default().correction_ridge
}

impl RouterFitConfig {
    /// Refuses a ridge or scale that is not a positive finite number (an infinite scale gives a
    /// NaN router, an infinite ridge an all-zero one).
    pub fn check(&self) -> Result<()> {
        let ok = |x: f64| x.is_finite() && x > 0.0;
        if !(ok(self.ridge) && ok(self.score_scale) && ok(self.correction_ridge)) {
            bail!("routed_ffn: router fit needs finite ridge, score_scale and correction_ridge > 0, got {self:?}");
        }
        Ok(())
    }
}

impl Default for RouterFitConfig {
    fn default() -> Self {
        Self {
            ridge: 1e-3,
            score_scale: 0.1,
            correction_ridge: 0.1,
        }
    }
}

/// Routed vs dense FFN on sample tokens (both without the fc2 bias b2, which they share).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoutingQuality {
    /// Cosine similarity of the routed and dense outputs over all sample tokens (as one
    /// vector: tokens with large FFN outputs dominate it).
    pub cosine: f64,
    /// The per-token cosine of the routed and dense outputs, averaged over the sample tokens:
    /// how well an ordinary token's FFN output survives the routing.
    pub token_cosine: f64,
    /// `‖y_routed − y_dense‖ / ‖y_dense‖`.
    pub rel_error: f64,
    /// `‖y_routed‖ / ‖y_dense‖`.
    pub norm_ratio: f64,
    /// Fraction of the router's picks that are among each token's k blocks of largest
    /// output norm (1 = the router picks exactly the oracle blocks).
    pub oracle_recall: f64,
    /// The cosine the oracle routing (those blocks, gate 1) would reach: the ceiling of any
    /// router at this k and block partition.
    pub oracle_cosine: f64,
    /// [`token_cosine`](Self::token_cosine) of the oracle routing.
    pub oracle_token_cosine: f64,
    /// Tokens in the sample.
    pub tokens: usize,
}

/// Solves `G β = R` for symmetric positive definite `G [m, m]` and `R [m, c]` (row-major, f64).
///
/// Each column of `R` is solved on its own, contiguously and in parallel: the correction's fit
/// has `c = d` columns (768 on GPT-2), and substituting row by row down strided columns took
/// ~2 s a layer, most of a GPT-2 model's start-up.
pub(super) fn cholesky_solve(g: &[f64], r: &[f64], m: usize, c: usize) -> Result<Vec<f64>> {
    use crate::simd::Vector;
    use rayon::prelude::*;
    let dot = f64::dot;
    // G = L Lᵀ, L lower triangular, row-major.
    let mut l = vec![0f64; m * m];
    for i in 0..m {
        for j in 0..=i {
            let s = g[i * m + j] - dot(&l[i * m..i * m + j], &l[j * m..j * m + j]);
            if i == j {
                if s.is_nan() || s <= 0.0 {
                    bail!("routed_ffn: router fit is singular (pivot {i} = {s}); raise the ridge");
                }
                l[i * m + i] = s.sqrt();
            } else {
                l[i * m + j] = s / l[j * m + j];
            }
        }
    }
    // Lᵀ row-major, so that the backward substitution reads rows too.
    let mut u = vec![0f64; m * m];
    for i in 0..m {
        for j in 0..=i {
            u[j * m + i] = l[i * m + j];
        }
    }
    // Columns of R, each contiguous: L z = r, then Lᵀ β = z.
    let mut cols = vec![0f64; c * m];
    for (i, row) in r.chunks(c.max(1)).take(m).enumerate() {
        for (col, &v) in row.iter().enumerate() {
            cols[col * m + i] = v;
        }
    }
    cols.par_chunks_mut(m.max(1)).for_each(|x| {
        for i in 0..m {
            x[i] = (x[i] - dot(&l[i * m..i * m + i], &x[..i])) / l[i * m + i];
        }
        for i in (0..m).rev() {
            x[i] = (x[i] - dot(&u[i * m + i + 1..(i + 1) * m], &x[i + 1..])) / l[i * m + i];
        }
    });
    let mut beta = vec![0f64; m * c];
    for (col, x) in cols.chunks(m.max(1)).enumerate() {
        for (i, &v) in x.iter().enumerate() {
            beta[i * c + col] = v;
        }
    }
    Ok(beta)
}

impl RoutedFfn {
    /// `[S, d_ff]` hidden activations `act(x W1ᵀ + b1)` (LoRA included) of tokens `[S, d]`,
    /// in the layer's dtype. They are computed there, not in f64: candle's f64 GEMM and scalar
    /// f64 GELU took a quarter of a GPT-2 model's start-up, and the fits only rank blocks by
    /// norms of these values, which the callers sum in f64.
    fn hidden(&self, x2: &Tensor) -> Result<Tensor> {
        let (w1, _) = self.merged_weights()?;
        let x = x2.detach().to_dtype(w1.dtype())?;
        let pre = x.matmul(&w1.detach().t()?)?.broadcast_add(&self.b1.detach())?;
        self.activation.forward(&pre)
    }

    /// [`hidden`](Self::hidden) in f64.
    pub(super) fn hidden_f64(&self, x2: &Tensor) -> Result<Tensor> {
        self.hidden(x2)?.to_dtype(DType::F64)
    }

    /// The dense FFN on the sample tokens `x2 [S, d]`: computed once per fit and shared by
    /// the router's targets, the correction's fit and the quality report (each computed it
    /// again before, 10 FFN-sized GEMMs per fit instead of 6).
    fn dense_sample(&self, x2: &Tensor) -> Result<DenseSample> {
        let h = self.hidden(x2)?;
        let (_, w2) = self.merged_weights()?;
        let w2 = w2.detach(); // [d, d_ff]
        let y = h.matmul(&w2.t()?)?.broadcast_add(&self.b2.detach())?;
        Ok(DenseSample { h, w2, y })
    }

    /// `[S, n_blocks]` per-block hidden activation norms `‖act(x W1_eᵀ + b1_e)‖` of the sample
    /// tokens (LoRA included), in f64: what the router is fitted to rank by.
    fn activation_norms(&self, dense: &DenseSample) -> Result<Tensor> {
        let (s, n, b) = (dense.h.dim(0)?, self.cfg.n_blocks, self.block);
        dense
            .h
            .to_dtype(DType::F64)?
            .reshape((s, n, b))?
            .sqr()?
            .sum(D::Minus1)?
            .sqrt()
    }

    /// `[S, n_blocks]` norms `‖act(x W1_eᵀ + b1_e) W2_eᵀ‖` of what each block adds to the output
    /// (LoRA included), in f64: the oracle routing of [`quality`](Self::quality) keeps each
    /// token's k largest.
    fn output_norms(&self, dense: &DenseSample) -> Result<Tensor> {
        let (n, b) = (self.cfg.n_blocks, self.block);
        let cols = (0..n)
            .map(|e| {
                let out = dense
                    .h
                    .narrow(1, e * b, b)?
                    .matmul(&dense.w2.narrow(1, e * b, b)?.t()?)?;
                out.to_dtype(DType::F64)?.sqr()?.sum_keepdim(1)?.sqrt() // [S, 1]
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&cols, 1)
    }

    pub(super) fn sample_tokens(&self, x: &Tensor) -> Result<Tensor> {
        let (_, t) = self.check_input(x)?;
        if t == 0 {
            bail!("routed_ffn: the router needs at least one sample token");
        }
        // A NaN sample makes the least-squares system NaN, which would be reported as singular.
        // (An f64 sum of f32 values overflows only if a value is not finite.)
        let sum = x.detach().to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        if !sum.is_finite() {
            bail!("routed_ffn: the sample tokens hold a NaN or infinite value; fit on finite activations");
        }
        x.reshape((t, self.d_model()))
    }

    /// Fits the router by ridge least squares so that its scores rank the blocks of each sample
    /// token by their activation norm, then (if configured) the linear correction under that
    /// router, and reports the routing quality on the same sample.
    pub fn init_router(&mut self, sample: &Tensor, fit: RouterFitConfig) -> Result<RoutingQuality> {
        fit.check()?;
        let x2 = self.sample_tokens(sample)?;
        let (s, d, n) = (x2.dim(0)?, self.d_model(), self.cfg.n_blocks);
        let dense = self.dense_sample(&x2)?;
        // Per-token standardised norms: the targets.
        let norms = self.activation_norms(&dense)?;
        let mean = norms.mean_keepdim(1)?;
        let centred = norms.broadcast_sub(&mean)?;
        let std = (centred.sqr()?.mean_keepdim(1)?.sqrt()? + 1e-12)?;
        let z = centred.broadcast_div(&std)?; // [S, n]
                                              // Ridge regression on [x, 1].
        let xa = Tensor::cat(
            &[
                x2.detach().to_dtype(DType::F64)?,
                Tensor::ones((s, 1), DType::F64, x2.device())?,
            ],
            1,
        )?; // [S, d+1]
        let g: Vec<f64> = xa.t()?.matmul(&xa)?.flatten_all()?.to_vec1()?;
        let r: Vec<f64> = xa.t()?.matmul(&z)?.flatten_all()?.to_vec1()?;
        let m = d + 1;
        let mut g = g;
        let mean_diag = (0..m).map(|i| g[i * m + i]).sum::<f64>() / m as f64;
        for i in 0..m {
            g[i * m + i] += fit.ridge * mean_diag.max(1e-12);
        }
        let beta = cholesky_solve(&g, &r, m, n)?; // [d+1, n]
        let beta = (Tensor::from_vec(beta, (m, n), x2.device())? * fit.score_scale)?;
        let w = beta.narrow(0, 0, d)?.t()?.contiguous()?; // [n, d]
        let b = beta.narrow(0, d, 1)?.flatten_all()?; // [n]
        let dt = self.w1.dtype();
        self.router_w.set(&w.to_dtype(dt)?)?;
        self.router_b.set(&b.to_dtype(dt)?)?;
        self.fit_correction_to(&x2, &dense.y, fit.correction_ridge)?;
        self.quality_against(&x2, &dense)
    }

    /// Compares the routed output (current router, gates and LoRA, eval mode) with the dense FFN
    /// (every block, gate ≡ 1) on the sample tokens.
    pub fn quality(&self, sample: &Tensor) -> Result<RoutingQuality> {
        let x2 = self.sample_tokens(sample)?.detach();
        self.quality_against(&x2, &self.dense_sample(&x2)?)
    }

    /// [`quality`](Self::quality) of tokens `x2 [S, d]` against their dense FFN.
    fn quality_against(&self, x2: &Tensor, dense: &DenseSample) -> Result<RoutingQuality> {
        let t = x2.dim(0)?;
        let b2 = self.b2.detach().to_dtype(DType::F64)?;
        let out = self.forward_t(x2, false)?;
        let yr = out.y.detach().to_dtype(DType::F64)?.broadcast_sub(&b2)?;
        let yd = dense.y.to_dtype(DType::F64)?.broadcast_sub(&b2)?;
        let tiny = f64::MIN_POSITIVE;
        let norm = |a: &Tensor| -> Result<f64> { Ok(a.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt()) };
        let (nr, nd) = (norm(&yr)?, norm(&yd)?);
        let cos = |a: &Tensor, na: f64| -> Result<f64> {
            Ok(a.mul(&yd)?.sum_all()?.to_scalar::<f64>()? / (na * nd).max(tiny))
        };
        let ne = norm(&yr.sub(&yd)?)?;
        // Mean over tokens of the row cosines (a token with a zero dense output counts as 0).
        let token_cos = |a: &Tensor| -> Result<f64> {
            let dot = a.mul(&yd)?.sum(1)?;
            let na = a.sqr()?.sum(1)?.sqrt()?;
            let nd = yd.sqr()?.sum(1)?.sqrt()?;
            let c: Vec<f64> = dot.div(&(na.mul(&nd)? + tiny)?)?.to_vec1()?;
            Ok(c.iter().sum::<f64>() / c.len().max(1) as f64)
        };
        // Oracle: each token's k blocks that add most to the output.
        let norms: Vec<f64> = self.output_norms(dense)?.flatten_all()?.to_vec1()?;
        let oracle = Arc::new(Routing::top_k(&norms, t, self.cfg.n_blocks, self.k)?);
        let yo = self
            .forward_with_routing(x2, oracle.clone(), GateMode::Ones, false)?
            .y
            .detach()
            .to_dtype(DType::F64)?
            .broadcast_sub(&b2)?;
        let picked = out.routing.blocks()?;
        let hits = picked
            .chunks(self.k)
            .zip(oracle.blocks()?.chunks(self.k))
            .map(|(p, o)| p.iter().filter(|e| o.contains(e)).count())
            .sum::<usize>();
        Ok(RoutingQuality {
            cosine: cos(&yr, nr)?,
            token_cosine: token_cos(&yr)?,
            oracle_cosine: cos(&yo, norm(&yo)?)?,
            oracle_token_cosine: token_cos(&yo)?,
            rel_error: ne / nd.max(tiny),
            norm_ratio: nr / nd.max(tiny),
            oracle_recall: hits as f64 / picked.len().max(1) as f64,
            tokens: t,
        })
    }

    /// Fits the linear correction to what the current routing (router, gates, LoRA) misses of the dense FFN on the sample tokens. `ridge` (finite, > 0) is relative to the mean
    /// diagonal of the weighted `[x, 1]ᵀ[x, 1]`. Does nothing without
    /// [`correction`](super::RoutedFfnConfig::correction).
    pub fn fit_correction(&mut self, sample: &Tensor, ridge: f64) -> Result<()> {
        if self.correction.is_none() {
            return Ok(());
        }
        let x2 = self.sample_tokens(sample)?.detach();
        let dense = self.dense_sample(&x2)?;
        self.fit_correction_to(&x2, &dense.y, ridge)
    }

    /// [`fit_correction`](Self::fit_correction) on tokens `x2 [S, d]` whose dense FFN output
    /// is `dense_y [S, d]`.
    fn fit_correction_to(&mut self, x2: &Tensor, dense_y: &Tensor, ridge: f64) -> Result<()> {
        if self.correction.is_none() {
            return Ok(());
        }
        // An infinite ridge makes every Cholesky pivot infinite: an all-zero fit, silently.
        if !(ridge.is_finite() && ridge > 0.0) {
            bail!("routed_ffn: the correction fit needs a finite ridge > 0, got {ridge}");
        }
        let (s, d) = (x2.dim(0)?, self.d_model());
        let dt = self.w1.dtype();
        // Fit what the routing alone misses, whatever correction is in place now.
        let old = self
            .correction
            .replace(Tensor::zeros((d + 1, d), dt, x2.device())?);
        let fitted = (|| {
            let b2 = self.b2.detach().to_dtype(DType::F64)?;
            let routed = self.forward_t(x2, false)?.y.detach().to_dtype(DType::F64)?;
            let dense = dense_y.to_dtype(DType::F64)?;
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

/// [`RoutedFfn::dense_sample`]: the hidden activations `h [S, d_ff]`, the effective `W2
/// [d, d_ff]` and the dense output `y [S, d]` (with b2), in the layer's dtype.
struct DenseSample {
    h: Tensor,
    w2: Tensor,
    y: Tensor,
}

#[cfg(test)]
mod tests {
    use super::cholesky_solve;

    /// A random SPD system `G = AᵀA + I` with several right-hand sides: `G β` reproduces `R`.
    #[test]
    fn cholesky_solve_solves_spd_systems() {
        let mut state = 7u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        for (m, c) in [(1, 1), (5, 3), (19, 1), (37, 41)] {
            let a: Vec<f64> = (0..m * m).map(|_| next()).collect();
            let mut g = vec![0f64; m * m];
            for i in 0..m {
                for j in 0..m {
                    g[i * m + j] = (0..m).map(|p| a[p * m + i] * a[p * m + j]).sum::<f64>()
                        + if i == j { 1.0 } else { 0.0 };
                }
            }
            let r: Vec<f64> = (0..m * c).map(|_| next()).collect();
            let beta = cholesky_solve(&g, &r, m, c).unwrap();
            for i in 0..m {
                for col in 0..c {
                    let gb: f64 = (0..m).map(|p| g[i * m + p] * beta[p * c + col]).sum();
                    let want = r[i * c + col];
                    assert!(
                        (gb - want).abs() < 1e-9,
                        "m {m} c {c} row {i} col {col}: {gb} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn cholesky_solve_names_a_singular_system() {
        // Rank one: [[1, 1], [1, 1]].
        let e = cholesky_solve(&[1.0, 1.0, 1.0, 1.0], &[1.0, 2.0], 2, 1).unwrap_err();
        assert!(e.to_string().contains("singular (pivot 1"), "{e}");
    }
}
