//! f64 finite-difference gradient checks, shared by the tests of every crate in the workspace.
//!
//! The loss is `Σ f(inputs) ⊙ w` with a seeded random upstream gradient `w`, so that both signs
//! of the upstream gradient are exercised (a positive one-hot upstream hides sign bugs).

use candle_core::{bail, DType, Result, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Tolerances and sampling for [`check_gradients`].
#[derive(Debug, Clone, Copy)]
pub struct GradCheck {
    /// Central-difference step.
    pub eps: f64,
    /// Allowed `|analytic − numeric| ≤ atol + rtol·|numeric|`.
    pub atol: f64,
    pub rtol: f64,
    /// At most this many elements per input are checked (chosen at random, seeded).
    pub max_elems: usize,
    pub seed: u64,
}

impl Default for GradCheck {
    fn default() -> Self {
        Self {
            eps: 1e-6,
            atol: 1e-6,
            rtol: 1e-5,
            max_elems: 64,
            seed: 0,
        }
    }
}

/// Largest deviation seen for one input.
#[derive(Debug, Clone)]
pub struct GradError {
    pub input: usize,
    pub max_abs_err: f64,
}

/// Compares candle's autograd gradient of `Σ f(xs) ⊙ w` with central differences, for every
/// input listed in `wrt`. Inputs must be f64. Returns the worst error per input, or an error
/// naming the input and the element that failed.
pub fn check_gradients<F>(f: F, inputs: &[Tensor], wrt: &[usize], cfg: GradCheck) -> Result<Vec<GradError>>
where
    F: Fn(&[Tensor]) -> Result<Tensor>,
{
    if let Some(i) = wrt.iter().find(|&&i| i >= inputs.len()) {
        bail!(
            "gradcheck: wrt names input {i}, but there are {} inputs",
            inputs.len()
        );
    }
    for (i, x) in inputs.iter().enumerate() {
        if wrt.contains(&i) && x.dtype() != DType::F64 {
            bail!("gradcheck: input {i} has dtype {:?}, expected f64", x.dtype());
        }
    }
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let vars: Vec<Tensor> = inputs
        .iter()
        .enumerate()
        .map(|(i, x)| {
            if wrt.contains(&i) {
                Ok(Var::from_tensor(x)?.as_tensor().clone())
            } else {
                Ok(x.clone())
            }
        })
        .collect::<Result<_>>()?;
    let out = f(&vars)?;
    let w_data: Vec<f64> = (0..out.elem_count())
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let w = Tensor::from_vec(w_data, out.shape(), out.device())?;
    let loss_of = |xs: &[Tensor]| -> Result<f64> { f(xs)?.mul(&w)?.sum_all()?.to_scalar::<f64>() };
    let grads = out.mul(&w)?.sum_all()?.backward()?;

    let mut report = Vec::new();
    for &i in wrt {
        let x = &inputs[i];
        let n = x.elem_count();
        let analytic: Vec<f64> = match grads.get(&vars[i]) {
            Some(g) => g.flatten_all()?.to_vec1()?,
            None => vec![0.0; n],
        };
        let base: Vec<f64> = x.flatten_all()?.to_vec1()?;
        let picks: Vec<usize> = if n <= cfg.max_elems {
            (0..n).collect()
        } else {
            (0..cfg.max_elems).map(|_| rng.random_range(0..n)).collect()
        };
        let mut worst = 0f64;
        for e in picks {
            let probe = |delta: f64| -> Result<f64> {
                let mut d = base.clone();
                d[e] += delta;
                let mut xs = inputs.to_vec();
                xs[i] = Tensor::from_vec(d, x.shape(), x.device())?;
                loss_of(&xs)
            };
            let numeric = (probe(cfg.eps)? - probe(-cfg.eps)?) / (2.0 * cfg.eps);
            let err = (analytic[e] - numeric).abs();
            if err.is_nan() || err > cfg.atol + cfg.rtol * numeric.abs() {
                bail!(
                    "gradcheck: input {i} {:?}, element {e}: analytic {} vs numeric {numeric} (|Δ| = {err:e})",
                    x.dims(),
                    analytic[e]
                );
            }
            worst = worst.max(err);
        }
        report.push(GradError {
            input: i,
            max_abs_err: worst,
        });
    }
    Ok(report)
}

/// A seeded standard-normal f64 tensor, for tests.
pub fn randn_f64(shape: &[usize], seed: u64) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n)
        .map(|_| {
            // Box–Muller keeps us off rand_distr.
            let u1: f64 = rng.random_range(f64::EPSILON..1.0);
            let u2: f64 = rng.random_range(0.0..1.0);
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect();
    Tensor::from_vec(data, shape, &candle_core::Device::Cpu)
}

/// `max |a − b|` over all elements, computed in f64 on the host, for tests. A NaN in one tensor
/// where the other holds none makes it NaN, so that no `≤ tol` check passes (candle's `max`
/// passes NaN over); NaN beside NaN, and equal infinities, count as equal.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        bail!("max_abs_diff: {:?} against {:?}", a.dims(), b.dims());
    }
    let host = |t: &Tensor| t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>();
    let (a, b) = (host(a)?, host(b)?);
    Ok(a.iter().zip(&b).fold(0.0, |worst: f64, (&x, &y)| {
        let d = if x == y || (x.is_nan() && y.is_nan()) {
            0.0
        } else {
            (x - y).abs()
        };
        if d.is_nan() || worst.is_nan() {
            f64::NAN
        } else {
            worst.max(d)
        }
    }))
}

/// `max |t|` over all elements (NaN when `t` holds one), for tests.
pub fn max_abs(t: &Tensor) -> Result<f64> {
    max_abs_diff(t, &t.zeros_like()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn max_abs_diff_sees_nan_past_the_first_element() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::new(&[1f32, f32::NAN, 3.0], &dev)?;
        let b = Tensor::new(&[1f32, 2.0, 3.5], &dev)?;
        // (candle 0.11's `max(0)` over |a − b| gives 0.5 here: it passes the NaN over.)
        assert!(max_abs_diff(&a, &b)?.is_nan());
        assert!(max_abs_diff(&b, &a)?.is_nan());
        assert!(max_abs(&a)?.is_nan());
        // NaN beside NaN and equal infinities are equal; the rest is max |a − b|.
        let c = Tensor::new(&[f32::INFINITY, f32::NAN, 3.0], &dev)?;
        let d = Tensor::new(&[f32::INFINITY, f32::NAN, 2.5], &dev)?;
        assert_eq!(max_abs_diff(&c, &d)?, 0.5);
        assert!(max_abs_diff(&a, &Tensor::new(&[1f32, 2.0], &dev)?).is_err());
        Ok(())
    }
}
