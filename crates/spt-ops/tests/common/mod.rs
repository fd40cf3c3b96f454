//! Helpers shared by the spt-ops integration tests.
#![allow(dead_code)]

pub mod routed;

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// A rayon pool of `n` threads, for the tests that compare results across thread counts.
pub fn pool(n: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .map_err(candle_core::Error::wrap)
}

/// The bit patterns of an f32 tensor's elements, for comparisons that must be exact.
pub fn f32_bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f32::to_bits)
        .collect())
}

/// Seeded uniform tensor in [-a, a].
pub fn uniform(shape: &[usize], a: f64, seed: u64, dtype: DType) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-a..=a)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)
}

/// Random key-padding mask [b, l] with at least one kept key per batch unless `allow_empty`.
pub fn padding(b: usize, l: usize, seed: u64, allow_empty: bool) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; b * l];
    for bi in 0..b {
        for j in 0..l {
            v[bi * l + j] = rng.random_bool(0.7) as u8;
        }
        if !allow_empty && l > 0 && v[bi * l..(bi + 1) * l].iter().all(|&x| x == 0) {
            v[bi * l + rng.random_range(0..l)] = 1;
        }
    }
    Tensor::from_vec(v, (b, l), &Device::Cpu)
}

/// Max |a − b| over all elements; NaN where one holds a NaN the other does not (so no tolerance
/// check passes it).
pub fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims());
    spt_ops::gradcheck::max_abs_diff(a, b)
}

/// Output and input gradients of `Σ f(q, k, v) ⊙ w`.
pub fn fwd_bwd(
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    w: &Tensor,
) -> Result<(Tensor, Vec<Tensor>)> {
    let vars = [Var::from_tensor(q)?, Var::from_tensor(k)?, Var::from_tensor(v)?];
    let out = f(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor())?;
    let grads = out.mul(w)?.sum_all()?.backward()?;
    let g = vars
        .iter()
        .map(|x| {
            grads
                .get(x.as_tensor())
                .cloned()
                .map_or_else(|| x.as_tensor().zeros_like(), Ok)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((out, g))
}

/// q, k, v and an upstream gradient `[b, h, l, d]`, uniform in [-1, 1] (f32, seeds `seed..+4`).
pub fn qkvw([b, h, l, d]: [usize; 4], seed: u64) -> Result<[Tensor; 4]> {
    let t = |i: u64| uniform(&[b, h, l, d], 1.0, seed + i, DType::F32);
    Ok([t(0)?, t(1)?, t(2)?, t(3)?])
}

/// Output and the three gradients of `op` on the f32 `q, k, v` (upstream gradient `w`) against
/// `reference` on the same values in f64, each within `tol`·max|reference| (NaN fails).
pub fn matches_f64(
    what: &str,
    op: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    reference: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    [q, k, v, w]: [&Tensor; 4],
    tol: f64,
) -> Result<()> {
    let up = |t: &Tensor| t.to_dtype(DType::F64);
    let (o, g) = fwd_bwd(op, q, k, v, w)?;
    let (o64, g64) = fwd_bwd(reference, &up(q)?, &up(k)?, &up(v)?, &up(w)?)?;
    for (name, got, want) in [
        ("o", &o, &o64),
        ("dq", &g[0], &g64[0]),
        ("dk", &g[1], &g64[1]),
        ("dv", &g[2], &g64[2]),
    ] {
        let err = spt_ops::gradcheck::max_abs_diff(&got.to_dtype(DType::F64)?, want)?;
        let scale = spt_ops::gradcheck::max_abs(want)?;
        assert!(scale > 0.0, "{what} {name}: the reference is all zeros");
        assert!(
            err <= tol * scale,
            "{what} {name}: max |f32 − f64| {err:e} against max |f64| {scale:e}"
        );
    }
    Ok(())
}
