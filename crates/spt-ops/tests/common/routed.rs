//! Helpers of the routed-FFN tests (routed_ffn*.rs).

use candle_core::{DType, Result, Tensor, Var};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use spt_ops::gradcheck::randn_f64;
use spt_ops::Routing;

/// `max |a − b|` and `max |b|`.
pub fn diff(a: &Tensor, b: &Tensor) -> Result<(f64, f64)> {
    let a = a.to_dtype(DType::F64)?.flatten_all()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?;
    if b.elem_count() == 0 {
        return Ok((0.0, 0.0));
    }
    // NaN-aware (candle's max passes NaN over).
    let d = spt_ops::gradcheck::max_abs_diff(&a, &b)?;
    let m = spt_ops::gradcheck::max_abs(&b)?;
    Ok((d, m))
}

/// Asserts `max |a − b| ≤ tol · max(1, max |b|)`.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) -> Result<()> {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let (d, m) = diff(a, b)?;
    assert!(
        d <= tol * m.max(1.0),
        "{what}: max |Δ| = {d:e} (max |ref| = {m:e}, tol {tol:e})"
    );
    Ok(())
}

/// FFN weights with 1/√fan_in scale: `(W1 [d_ff, d], b1, W2 [d, d_ff], b2)`.
pub fn weights(d: usize, d_ff: usize, seed: u64, dt: DType) -> Result<[Tensor; 4]> {
    let s1 = 1.0 / (d as f64).sqrt();
    let s2 = 1.0 / (d_ff as f64).sqrt();
    Ok([
        (randn_f64(&[d_ff, d], seed)? * s1)?.to_dtype(dt)?,
        (randn_f64(&[d_ff], seed + 1)? * 0.1)?.to_dtype(dt)?,
        (randn_f64(&[d, d_ff], seed + 2)? * s2)?.to_dtype(dt)?,
        (randn_f64(&[d], seed + 3)? * 0.1)?.to_dtype(dt)?,
    ])
}

pub fn vars(ts: &[Tensor]) -> Result<Vec<Var>> {
    ts.iter().map(Var::from_tensor).collect()
}

/// A random routing: each token picks k distinct blocks, never `skip` (when given).
pub fn random_routing(t: usize, n: usize, k: usize, skip: Option<u32>, seed: u64) -> Result<Routing> {
    let mut rng = StdRng::seed_from_u64(seed);
    let allowed: Vec<u32> = (0..n as u32).filter(|&e| Some(e) != skip).collect();
    let mut blocks = Vec::with_capacity(t * k);
    for _ in 0..t {
        let mut a = allowed.clone();
        a.shuffle(&mut rng);
        blocks.extend_from_slice(&a[..k]);
    }
    Routing::from_blocks(t, n, k, blocks)
}
