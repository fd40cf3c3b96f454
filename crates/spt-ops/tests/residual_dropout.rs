//! `residual_dropout`: residual + dropout(x) as one op. f64 finite differences for both inputs
//! (across the 32-row task seam), the composed form as reference over random shapes, dropout
//! rates and frozen/tracked inputs, the mask shared with `residual_layer_norm`, determinism,
//! the drop rate, and named errors for bad input.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::max_diff;
use spt_ops::gradcheck::{check_gradients, randn_f64, GradCheck};
use spt_ops::norm::residual_dropout_reference;
use spt_ops::{residual_dropout, residual_layer_norm, SeededDropout};

#[test]
fn gradients_match_finite_differences() -> Result<()> {
    for (rows, p) in [(3usize, 0.0), (70, 0.3), (70, 0.7)] {
        let d = 9;
        let x = randn_f64(&[rows, d], 1)?;
        let r = randn_f64(&[rows, d], 2)?;
        let drop = Some(SeededDropout { p, seed: 11 });
        check_gradients(
            |t| residual_dropout(&t[0], &t[1], drop),
            &[x, r],
            &[0, 1],
            GradCheck {
                max_elems: 96,
                ..Default::default()
            },
        )
        .map_err(|e| candle_core::Error::Msg(format!("rows {rows}, p {p}: {e}")))?;
    }
    Ok(())
}

#[test]
fn mask_is_seeded_shared_with_residual_layer_norm_and_drops_p() -> Result<()> {
    let (rows, d) = (300, 64);
    let x = Tensor::ones((rows, d), DType::F32, &Device::Cpu)?;
    let r = Tensor::zeros((rows, d), DType::F32, &Device::Cpu)?;
    let drop = Some(SeededDropout { p: 0.25, seed: 5 });
    let a = residual_dropout(&x, &r, drop)?;
    assert_eq!(
        max_diff(&a, &residual_dropout(&x, &r, drop)?)?,
        0.0,
        "same seed, different mask"
    );
    let other = residual_dropout(&x, &r, Some(SeededDropout { p: 0.25, seed: 6 }))?;
    assert!(max_diff(&a, &other)? > 1.0, "another seed gave the same mask");
    // Kept elements are 1/(1-p), dropped ones 0, about p of them.
    let v: Vec<f32> = a.flatten_all()?.to_vec1()?;
    let dropped = v.iter().filter(|&&e| e == 0.0).count() as f64 / v.len() as f64;
    assert!(v.iter().all(|&e| e == 0.0 || (e - 1.0 / 0.75).abs() < 1e-6));
    assert!((dropped - 0.25).abs() < 0.01, "drop rate {dropped}");
    // The same mask residual_layer_norm applies: LN(residual_dropout(x, r)) equals it.
    let (x, r) = (randn_f64(&[rows, d], 7)?, randn_f64(&[rows, d], 8)?);
    let (g, b) = (randn_f64(&[d], 9)?, randn_f64(&[d], 10)?);
    let fused = residual_layer_norm(&x, &r, &g, &b, 1e-5, drop)?;
    let composed = spt_ops::layer_norm(&residual_dropout(&x, &r, drop)?, &g, &b, 1e-5)?;
    assert!(max_diff(&fused, &composed)? < 1e-12);
    // p = 0 and None are the plain sum.
    let sum = (&x + &r)?;
    assert_eq!(max_diff(&residual_dropout(&x, &r, None)?, &sum)?, 0.0);
    let p0 = residual_dropout(&x, &r, Some(SeededDropout { p: 0.0, seed: 3 }))?;
    assert_eq!(max_diff(&p0, &sum)?, 0.0);
    Ok(())
}

#[test]
fn bad_input_is_a_named_error() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::zeros((4, 8), DType::F32, &dev)?;
    let err = |r: Result<Tensor>| r.unwrap_err().to_string();
    let e = err(residual_dropout(
        &x,
        &Tensor::zeros((4, 7), DType::F32, &dev)?,
        None,
    ));
    assert!(e.contains("residual is [4, 7]") && e.contains("[4, 8]"), "{e}");
    let e = err(residual_dropout(&x, &x.to_dtype(DType::F64)?, None));
    assert!(e.contains("residual has dtype F64"), "{e}");
    let e = err(residual_dropout(&x, &x, Some(SeededDropout { p: 1.0, seed: 0 })));
    assert!(e.contains("dropout p must be in [0, 1), got 1"), "{e}");
    let e = err(residual_dropout(
        &x.to_dtype(DType::U32)?,
        &x.to_dtype(DType::U32)?,
        None,
    ));
    assert!(e.contains("x has dtype U32"), "{e}");
    Ok(())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 40, ..Default::default() })]

    /// The fused op equals the composed form in values and in both gradients, over shapes, row
    /// counts across task seams, dropout rates, and x / residual frozen or tracked.
    #[test]
    fn fused_equals_composed(
        rows in 1usize..300, d in 1usize..70, p in proptest::sample::select(vec![0.0, 0.1, 0.5]),
        x_tracked in proptest::bool::ANY, r_tracked in proptest::bool::ANY,
        seed in 0u64..10_000,
    ) {
        let run = || -> Result<()> {
            let f = |s: &[usize], k: u64| randn_f64(s, seed * 8 + k).and_then(|t| t.to_dtype(DType::F32));
            let var = |t: Tensor, tracked: bool| -> Result<(Var, Tensor)> {
                let v = Var::from_tensor(&t)?;
                let t = if tracked { v.as_tensor().clone() } else { v.as_tensor().detach() };
                Ok((v, t))
            };
            let (xv, x) = var(f(&[2, rows, d], 0)?, x_tracked)?;
            let (rv, r) = var(f(&[2, rows, d], 1)?, r_tracked)?;
            let up = f(&[2, rows, d], 4)?;
            let drop = Some(SeededDropout { p, seed });
            let got = residual_dropout(&x, &r, drop)?;
            let want = residual_dropout_reference(&x, &r, drop)?;
            assert!(max_diff(&got, &want)? < 1e-6, "values");
            if !(x_tracked || r_tracked) {
                return Ok(());
            }
            let (gg, gw) = ((got * &up)?.sum_all()?.backward()?, (want * &up)?.sum_all()?.backward()?);
            for (v, tracked, name) in [(&xv, x_tracked, "dx"), (&rv, r_tracked, "d residual")] {
                let (a, b) = (gg.get(v.as_tensor()), gw.get(v.as_tensor()));
                assert_eq!(a.is_some(), tracked, "{name}: gradient presence");
                if let (Some(a), Some(b)) = (a, b) {
                    assert!(max_diff(a, b)? < 1e-6, "{name}");
                }
            }
            Ok(())
        };
        run().unwrap();
    }
}
