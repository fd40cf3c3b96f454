//! Fused linear cross-entropy: equals the dense reference (loss and both gradients) over random
//! shapes, masks and more rows than one chunk; f64 finite differences; a frozen weight gets no
//! gradient; bad input is named.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::{max_diff, uniform};
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use spt_ops::cross_entropy::{
    cross_entropy, linear_cross_entropy, linear_cross_entropy_reference, Reduction, ROW_CHUNK,
};
use spt_ops::gradcheck::{check_gradients, randn_f64, GradCheck};

fn targets(n: usize, v: usize, seed: u64) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let t: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
    Tensor::from_vec(t, n, &Device::Cpu)
}

fn mask(n: usize, seed: u64) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let m: Vec<f32> = (0..n).map(|_| rng.random_bool(0.7) as u8 as f32).collect();
    Tensor::from_vec(m, n, &Device::Cpu)
}

type Run = (f64, Option<Tensor>, Option<Tensor>);

/// Loss and gradients of `f` with `h` (and `w` unless frozen) as variables.
fn run(
    fused: bool,
    h: &Tensor,
    w: &Tensor,
    t: &Tensor,
    m: Option<&Tensor>,
    red: Reduction,
    w_frozen: bool,
) -> Result<Run> {
    let hv = Var::from_tensor(h)?;
    let wv = Var::from_tensor(w)?;
    let w_in = if w_frozen {
        w.clone()
    } else {
        wv.as_tensor().clone()
    };
    let f = if fused {
        linear_cross_entropy
    } else {
        linear_cross_entropy_reference
    };
    let loss = f(hv.as_tensor(), &w_in, t, m, red)?;
    assert_eq!(loss.dims(), &[] as &[usize]);
    let g = loss.backward()?;
    Ok((
        loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        g.get(hv.as_tensor()).cloned(),
        g.get(wv.as_tensor()).cloned(),
    ))
}

fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let scale = b
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    Ok(max_diff(a, b)? / scale.max(1e-12))
}

fn assert_matches_reference(
    n: usize,
    d: usize,
    v: usize,
    masked: bool,
    red: Reduction,
    seed: u64,
) -> Result<()> {
    // Logits of a few units, as in a trained LM head.
    let h = uniform(&[n, d], 1.0, seed, DType::F32)?;
    let w = uniform(&[v, d], 2.0 / (d as f64).sqrt(), seed + 1, DType::F32)?;
    let t = targets(n, v, seed + 2)?;
    let m = if masked { Some(mask(n, seed + 3)?) } else { None };
    let (lf, dhf, dwf) = run(true, &h, &w, &t, m.as_ref(), red, false)?;
    let (lr, dhr, dwr) = run(false, &h, &w, &t, m.as_ref(), red, false)?;
    assert!((lf - lr).abs() <= 1e-5 * lr.abs().max(1.0), "loss {lf} vs {lr}");
    let (dhf, dhr) = (dhf.expect("dh"), dhr.expect("dh ref"));
    let (dwf, dwr) = (dwf.expect("dw"), dwr.expect("dw ref"));
    assert!(rel(&dhf, &dhr)? < 1e-5, "dh rel {}", rel(&dhf, &dhr)?);
    assert!(rel(&dwf, &dwr)? < 1e-5, "dw rel {}", rel(&dwf, &dwr)?);
    // Masked rows get exactly zero gradient.
    if let Some(m) = &m {
        let keep: Vec<f32> = m.to_vec1()?;
        let dh: Vec<Vec<f32>> = dhf.to_vec2()?;
        for (i, k) in keep.iter().enumerate() {
            if *k == 0.0 {
                assert!(dh[i].iter().all(|x| *x == 0.0), "masked row {i} has a gradient");
            }
        }
    }
    Ok(())
}

#[test]
fn equals_reference_across_chunks() -> Result<()> {
    // More rows than one chunk, with and without a mask, both reductions.
    let n = ROW_CHUNK * 2 + 37;
    assert_matches_reference(n, 24, 301, false, Reduction::Mean, 1)?;
    assert_matches_reference(n, 24, 301, true, Reduction::Mean, 2)?;
    assert_matches_reference(n, 16, 97, true, Reduction::Sum, 3)
}

#[test]
fn frozen_weight_gets_no_gradient_and_same_dh() -> Result<()> {
    let (n, d, v) = (70, 12, 50);
    let h = uniform(&[n, d], 1.0, 7, DType::F32)?;
    let w = uniform(&[v, d], 0.5, 8, DType::F32)?;
    let t = targets(n, v, 9)?;
    let (lf, dhf, dwf) = run(true, &h, &w, &t, None, Reduction::Mean, true)?;
    let (lr, dhr, _) = run(false, &h, &w, &t, None, Reduction::Mean, true)?;
    assert!(dwf.is_none(), "a frozen w must get no gradient");
    assert!((lf - lr).abs() < 1e-5);
    assert!(rel(&dhf.expect("dh"), &dhr.expect("dh ref"))? < 1e-5);
    // Untracked inputs (evaluation): the same loss, no graph.
    let plain = linear_cross_entropy(&h, &w, &t, None, Reduction::Mean)?;
    assert!(!plain.track_op());
    assert!((plain.to_scalar::<f32>()? as f64 - lr).abs() < 1e-5);
    Ok(())
}

#[test]
fn finite_differences_f64() -> Result<()> {
    let (n, d, v) = (9, 5, 7);
    let h = randn_f64(&[n, d], 11)?;
    let w = randn_f64(&[v, d], 12)?;
    let t = targets(n, v, 13)?;
    let m = mask(n, 14)?;
    for (red, m) in [(Reduction::Mean, Some(&m)), (Reduction::Sum, None)] {
        let f = |xs: &[Tensor]| linear_cross_entropy(&xs[0], &xs[1], &t, m, red);
        let report = check_gradients(f, &[h.clone(), w.clone()], &[0, 1], GradCheck::default())?;
        assert_eq!(report.len(), 2);
    }
    Ok(())
}

#[test]
fn deterministic() -> Result<()> {
    let (n, d, v) = (300, 16, 200);
    let h = uniform(&[n, d], 1.0, 21, DType::F32)?;
    let w = uniform(&[v, d], 0.5, 22, DType::F32)?;
    let t = targets(n, v, 23)?;
    let a = run(true, &h, &w, &t, None, Reduction::Mean, false)?;
    let b = run(true, &h, &w, &t, None, Reduction::Mean, false)?;
    assert_eq!(a.0, b.0);
    assert_eq!(max_diff(a.1.as_ref().unwrap(), b.1.as_ref().unwrap())?, 0.0);
    assert_eq!(max_diff(a.2.as_ref().unwrap(), b.2.as_ref().unwrap())?, 0.0);
    Ok(())
}

#[test]
fn bad_input_is_named() -> Result<()> {
    let h = uniform(&[4, 3], 1.0, 1, DType::F32)?;
    let w = uniform(&[5, 3], 1.0, 2, DType::F32)?;
    let err = |r: Result<Tensor>| r.expect_err("should fail").to_string();
    let t = Tensor::new(&[0u32, 1, 9, 2], &Device::Cpu)?;
    let e = err(linear_cross_entropy(&h, &w, &t, None, Reduction::Mean));
    assert!(e.contains("targets[2] = 9") && e.contains("5 classes"), "{e}");
    // The same label is fine when its row is masked out.
    let m = Tensor::new(&[1f32, 1., 0., 1.], &Device::Cpu)?;
    linear_cross_entropy(&h, &w, &t, Some(&m), Reduction::Mean)?;
    let none = Tensor::zeros(4, DType::F32, &Device::Cpu)?;
    let e = err(linear_cross_entropy(&h, &w, &t, Some(&none), Reduction::Mean));
    assert!(e.contains("no row to average"), "{e}");
    let e = err(linear_cross_entropy(
        &h,
        &uniform(&[5, 4], 1.0, 3, DType::F32)?,
        &t,
        None,
        Reduction::Sum,
    ));
    assert!(e.contains("w is [5, 4]") && e.contains("[vocab, 3]"), "{e}");
    let e = err(linear_cross_entropy(
        &h,
        &w,
        &t.narrow(0, 0, 3)?,
        None,
        Reduction::Sum,
    ));
    assert!(e.contains("targets is [3]"), "{e}");
    let e = err(linear_cross_entropy(
        &h,
        &w.to_dtype(DType::F64)?,
        &t,
        None,
        Reduction::Sum,
    ));
    assert!(e.contains("w has dtype F64"), "{e}");
    // The logits form checks what the fused one checks: a negative id wrapped to a valid one, a
    // fractional id was truncated, a 0.5 mask counted as 1, integer logits panicked in candle.
    let logits = h.matmul(&w.t()?)?;
    let ce = |l: &Tensor, t: &Tensor, m: Option<&Tensor>| err(cross_entropy(l, t, m, Reduction::Mean));
    let e = ce(&logits, &Tensor::new(&[0i64, -1, 2, 1], &Device::Cpu)?, None);
    assert!(
        e.contains("cross_entropy") && e.contains("targets[1] = -1"),
        "{e}"
    );
    let e = ce(&logits, &Tensor::new(&[0f32, 1.7, 2., 1.], &Device::Cpu)?, None);
    assert!(e.contains("cross_entropy") && e.contains("integer dtype"), "{e}");
    let half = Tensor::new(&[1f32, 0.5, 1., 1.], &Device::Cpu)?;
    let e = ce(&logits, &t, Some(&half));
    assert!(e.contains("mask[1] = 0.5"), "{e}");
    let e = ce(&Tensor::zeros((4, 5), DType::U32, &Device::Cpu)?, &t, None);
    assert!(e.contains("cross_entropy") && e.contains("logits"), "{e}");
    let e = ce(&logits.flatten_all()?, &t, None);
    assert!(e.contains("logits are [20]"), "{e}");
    let e = ce(&logits.narrow(0, 0, 0)?, &t.narrow(0, 0, 0)?, None);
    assert!(e.contains("no rows"), "{e}");
    // HF's −100 on a masked row is fine, and equals the fused loss.
    let ignore = Tensor::new(&[0i64, 1, -100, 2], &Device::Cpu)?;
    let a = cross_entropy(&logits, &ignore, Some(&m), Reduction::Mean)?.to_scalar::<f32>()?;
    let b = linear_cross_entropy(&h, &w, &ignore, Some(&m), Reduction::Mean)?.to_scalar::<f32>()?;
    assert!((a - b).abs() < 1e-5, "{a} {b}");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 60, ..ProptestConfig::default() })]
    #[test]
    fn proptest_equals_reference(
        n in 1usize..300, d in 1usize..20, v in 1usize..80, masked: bool, mean: bool, seed in 0u64..1000
    ) {
        let red = if mean { Reduction::Mean } else { Reduction::Sum };
        // A random mask may drop every row of a tiny batch: a mean is then an error, checked above.
        let m = mask(n, seed + 3).unwrap();
        let all_masked = m.sum_all().unwrap().to_scalar::<f32>().unwrap() == 0.0;
        prop_assume!(!(masked && mean && all_masked));
        assert_matches_reference(n, d, v, masked, red, seed).unwrap();
    }
}
