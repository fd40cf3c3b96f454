//! `residual_layer_norm`: LayerNorm(dropout(x) + residual) as one op. f64 finite differences
//! for all four inputs (with and without dropout, across the backward's task seam), the composed
//! form as reference over random shapes, dropout rates and frozen/tracked inputs, determinism,
//! and named errors for bad input.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::max_diff;
use spt_ops::gradcheck::{check_gradients, randn_f64, GradCheck};
use spt_ops::norm::residual_layer_norm_reference;
use spt_ops::{residual_layer_norm, SeededDropout};

#[test]
fn gradients_match_finite_differences() -> Result<()> {
    // 70 rows: two backward tasks of 64 rows, so the dgamma/dbeta reduction crosses a seam.
    for (rows, p) in [(3usize, 0.0), (70, 0.0), (70, 0.3)] {
        let d = 9;
        let x = randn_f64(&[rows, d], 1)?;
        let r = randn_f64(&[rows, d], 2)?;
        let g = (randn_f64(&[d], 3)? + 1.0)?;
        let b = randn_f64(&[d], 4)?;
        let drop = Some(SeededDropout { p, seed: 11 });
        check_gradients(
            |t| residual_layer_norm(&t[0], &t[1], &t[2], &t[3], 1e-5, drop),
            &[x, r, g, b],
            &[0, 1, 2, 3],
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
fn dropout_zeroes_x_only_and_is_deterministic() -> Result<()> {
    let (rows, d) = (40, 32);
    let f = |s: u64| randn_f64(&[rows, d], s).and_then(|t| t.to_dtype(DType::F32));
    let (x, r) = (f(1)?, f(2)?);
    let (g, b) = (
        Tensor::ones(d, DType::F32, &Device::Cpu)?,
        Tensor::zeros(d, DType::F32, &Device::Cpu)?,
    );
    let drop = Some(SeededDropout { p: 0.5, seed: 3 });
    let a = residual_layer_norm(&x, &r, &g, &b, 1e-5, drop)?;
    let again = residual_layer_norm(&x, &r, &g, &b, 1e-5, drop)?;
    assert_eq!(max_diff(&a, &again)?, 0.0, "same seed, different output");
    let other = residual_layer_norm(&x, &r, &g, &b, 1e-5, Some(SeededDropout { p: 0.5, seed: 4 }))?;
    assert!(max_diff(&a, &other)? > 1e-3, "another seed gave the same mask");
    // x = 0: dropout has nothing to drop, so the output is LN(residual) for any mask.
    let zero = x.zeros_like()?;
    let none = residual_layer_norm(&zero, &r, &g, &b, 1e-5, None)?;
    let masked = residual_layer_norm(&zero, &r, &g, &b, 1e-5, drop)?;
    assert!(max_diff(&none, &masked)? < 1e-6);
    // p = 0 is no dropout.
    let p0 = residual_layer_norm(&x, &r, &g, &b, 1e-5, Some(SeededDropout { p: 0.0, seed: 3 }))?;
    assert_eq!(
        max_diff(&p0, &residual_layer_norm(&x, &r, &g, &b, 1e-5, None)?)?,
        0.0
    );
    Ok(())
}

#[test]
fn bad_input_is_a_named_error() -> Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::zeros((4, 8), DType::F32, &dev)?;
    let g = Tensor::ones(8, DType::F32, &dev)?;
    let err = |r: Result<Tensor>| r.unwrap_err().to_string();
    let e = err(residual_layer_norm(
        &x,
        &Tensor::zeros((4, 7), DType::F32, &dev)?,
        &g,
        &g,
        1e-5,
        None,
    ));
    assert!(e.contains("residual") && e.contains("[4, 7]"), "{e}");
    let e = err(residual_layer_norm(
        &x,
        &x,
        &Tensor::ones(7, DType::F32, &dev)?,
        &g,
        1e-5,
        None,
    ));
    assert!(e.contains("gamma and beta") && e.contains("[8]"), "{e}");
    let e = err(residual_layer_norm(
        &x,
        &x.to_dtype(DType::F64)?,
        &g,
        &g,
        1e-5,
        None,
    ));
    assert!(e.contains("residual"), "{e}");
    let e = err(residual_layer_norm(&x, &x, &g, &g, 0.0, None));
    assert!(e.contains("eps"), "{e}");
    let e = err(residual_layer_norm(
        &x,
        &x,
        &g,
        &g,
        1e-5,
        Some(SeededDropout { p: 1.0, seed: 0 }),
    ));
    assert!(e.contains("dropout p"), "{e}");
    Ok(())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 40, ..Default::default() })]

    /// The fused op equals the composed form in values and in every gradient, over shapes, row
    /// counts across task seams, dropout rates, and x / residual / gamma-beta frozen or tracked.
    #[test]
    fn fused_equals_composed(
        rows in 1usize..300, d in 1usize..70, p in proptest::sample::select(vec![0.0, 0.1, 0.5]),
        x_tracked in proptest::bool::ANY, r_tracked in proptest::bool::ANY, affine_tracked in proptest::bool::ANY,
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
            let (gv, g) = var((f(&[d], 2)? + 1.0)?, affine_tracked)?;
            let (bv, b) = var(f(&[d], 3)?, affine_tracked)?;
            let up = f(&[2, rows, d], 4)?;
            let drop = Some(SeededDropout { p, seed });
            let got = residual_layer_norm(&x, &r, &g, &b, 1e-5, drop)?;
            let want = residual_layer_norm_reference(&x, &r, &g, &b, 1e-5, drop)?;
            assert!(max_diff(&got, &want)? < 1e-4, "values");
            if !(x_tracked || r_tracked || affine_tracked) {
                return Ok(());
            }
            let (gg, gw) = ((got * &up)?.sum_all()?.backward()?, (want * &up)?.sum_all()?.backward()?);
            for (v, tracked, name, tol) in [
                (&xv, x_tracked, "dx", 1e-3),
                (&rv, r_tracked, "d residual", 1e-3),
                (&gv, affine_tracked, "dgamma", 1e-3 * (rows as f64).sqrt()),
                (&bv, affine_tracked, "dbeta", 1e-3 * (rows as f64).sqrt()),
            ] {
                let (a, b) = (gg.get(v.as_tensor()), gw.get(v.as_tensor()));
                assert_eq!(a.is_some(), tracked, "{name}: gradient presence");
                if let (Some(a), Some(b)) = (a, b) {
                    assert!(max_diff(a, b)? < tol, "{name}");
                }
            }
            Ok(())
        };
        run().unwrap();
    }
}
